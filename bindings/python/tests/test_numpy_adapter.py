"""The numpy layer on all-MiniLM-L6-v2's real weights: factors, forward, backward, weight space,
paths, merge, views, lifetime, and the exceptions for bad inputs."""

from __future__ import annotations

import copy
import gc
import os
import pickle
import warnings

import ml_dtypes
import numpy as np
import pytest

import loldu
from loldu import _capi
from conftest import run_python, tolerance
from reference import effective_weight, ldu_factors

LAYERS = [
    "encoder.layer.0.attention.self.query",  # 384 × 384
    "encoder.layer.1.intermediate.dense",  # 1536 × 384
    "encoder.layer.2.output.dense",  # 384 × 1536
]


def layer(minilm, name, dtype):
    return (np.ascontiguousarray(minilm[f"{name}.weight"], dtype), np.ascontiguousarray(minilm[f"{name}.bias"], dtype))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", LAYERS)
def test_factors_forward_backward_against_the_formulas(minilm, name, dtype):
    w, b = layer(minilm, name, dtype)
    m, n = w.shape
    r = 48
    rng = np.random.default_rng(1)
    a_ref, d_ref, u_ref = ldu_factors(w, r)
    tol = tolerance(dtype)
    with loldu.Adapter(w, b, rank=r, alpha=2 * r) as a:
        assert a.shape == (m, n) and a.rank == r and a.dtype == dtype and a.sigma == 2.0
        # the factors are those of a full LU with partial pivoting, truncated
        np.testing.assert_allclose(a.factor("lower"), a_ref, rtol=1e-3 if dtype == np.float32 else 1e-9, atol=1e-4 if dtype == np.float32 else 1e-10)
        np.testing.assert_allclose(a.factor("diag"), d_ref, rtol=1e-4 if dtype == np.float32 else 1e-10)
        np.testing.assert_allclose(a.factor("upper"), u_ref, rtol=1e-3 if dtype == np.float32 else 1e-9, atol=1e-3 if dtype == np.float32 else 1e-9)
        np.testing.assert_array_equal(a.factor("weight"), w)
        np.testing.assert_array_equal(a.factor("bias"), b)
        assert a.pivots().dtype == np.int32 and a.pivots().min() >= 1
        # at initialisation (lu init, pivots residual) the layer is the pretrained one
        x = rng.standard_normal((3, 5, n)).astype(dtype)
        np.testing.assert_allclose(a.forward(x), x @ w.T.astype(np.float64) + b, **tol)
        # move z and σ, then compare every output and gradient with the formulas
        a.z[:] = a.z * rng.uniform(0.5, 1.5, r).astype(dtype)
        a.sigma = 1.7
        z = a.z.astype(np.float64)
        w_eff = effective_weight(w, a_ref, d_ref, u_ref, z, 1.7, 2.0)
        y = a.forward(x)
        assert y.shape == (3, 5, m)
        scale = np.abs(x @ w_eff.T).max()
        np.testing.assert_allclose(y, x @ w_eff.T + b, rtol=0, atol=scale * (3e-5 if dtype == np.float32 else 1e-12))
        np.testing.assert_allclose(a.effective_weight(), w_eff, rtol=0, atol=np.abs(w_eff).max() * (3e-5 if dtype == np.float32 else 1e-12))
        dy = rng.standard_normal((3, 5, m)).astype(dtype)
        dx = a.backward(x, dy)
        x2, dy2 = x.reshape(-1, n).astype(np.float64), dy.reshape(-1, m).astype(np.float64)
        s = np.sum((x2 @ u_ref.T) * (dy2 @ a_ref), axis=0)
        gtol = 3e-4 if dtype == np.float32 else 1e-9
        np.testing.assert_allclose(dx, (dy2 @ w_eff).reshape(x.shape), rtol=0, atol=np.abs(dy2 @ w_eff).max() * gtol)
        np.testing.assert_allclose(a.grad_z, 1.7 * s, rtol=0, atol=np.abs(1.7 * s).max() * gtol)
        np.testing.assert_allclose(a.grad_sigma, z @ s, rtol=gtol * 10)
        np.testing.assert_allclose(a.bias_grad, dy2.sum(0), rtol=1e-5 if dtype == np.float32 else 1e-12, atol=1e-4)
        # gradients accumulate until zero_grad
        a.backward(x, dy, need_dx=False)
        np.testing.assert_allclose(a.grad_z, 2 * 1.7 * s, rtol=0, atol=np.abs(s).max() * gtol * 4)
        a.zero_grad()
        assert not a.grad.any() and not a.bias_grad.any()
        # weight space: the gradient of W_eff is dYᵀ x
        a.weight_backward(np.ascontiguousarray((dy2.T @ x2).astype(dtype)))
        np.testing.assert_allclose(a.grad_z, 1.7 * s, rtol=0, atol=np.abs(1.7 * s).max() * gtol * 4)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_every_path_and_the_h_buffer_agree(minilm, dtype):
    w, b = layer(minilm, LAYERS[1], dtype)
    rng = np.random.default_rng(2)
    x = rng.standard_normal((64, w.shape[1])).astype(dtype)
    dy = rng.standard_normal((64, w.shape[0])).astype(dtype)
    results = {}
    with loldu.Adapter(w, b, rank=16, z_init="s_normal", residual="init", seed=3) as a:
        for path in loldu.PATHS:
            a.path = path
            assert a.path == path
            a.zero_grad()
            h = np.empty((64, 16), dtype)
            y = a.forward(x, h=h)
            dx = a.backward(x, dy, h=h)
            y2 = a.forward(x)
            grads = a.grad.copy()
            a.zero_grad()
            dx2 = a.backward(x, dy)
            np.testing.assert_array_equal(y, y2)
            np.testing.assert_allclose(a.grad, grads, rtol=1e-4 if dtype == np.float32 else 1e-12)
            np.testing.assert_allclose(dx2, dx, rtol=1e-6 if dtype == np.float32 else 1e-12)
            results[path] = (y, dx, grads)
        a.path = "auto"
        assert a.plan(64) in loldu.PATHS[1:] and a.plan(64, keeps_h=True) in loldu.PATHS[1:]
        a.path = "merged"
        assert a.plan(64) == "merged"
    tol = {"rtol": 1e-3, "atol": 1e-3} if dtype == np.float32 else {"rtol": 1e-10, "atol": 1e-10}
    for path, (y, dx, grads) in results.items():
        np.testing.assert_allclose(y, results["factored"][0], **tol)
        np.testing.assert_allclose(dx, results["factored"][1], **tol)
        np.testing.assert_allclose(grads, results["factored"][2], rtol=1e-3 if dtype == np.float32 else 1e-9)


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16, ml_dtypes.bfloat16],
                         ids=["float32", "float64", "float16", "bfloat16"])
def test_bias_given_per_call_equals_the_layers_own(minilm, dtype):
    w, b = layer(minilm, LAYERS[0], dtype)
    x = np.random.default_rng(4).standard_normal((40, w.shape[1])).astype(dtype)
    with loldu.Adapter(w, rank=16, z_init="s_normal", residual="init") as plain, \
            loldu.Adapter(w, b, rank=16, z_init="s_normal", residual="init") as own:
        for path in loldu.PATHS[1:]:
            plain.path = own.path = path
            np.testing.assert_array_equal(plain.forward(x, bias=b), own.forward(x))
        with pytest.raises(loldu.StateError, match="bias"):
            own.forward(x, bias=b)
        with pytest.raises(loldu.DTypeError):
            plain.forward(x, bias=b.astype(np.float32 if dtype != np.float32 else np.float64))
        with pytest.raises(loldu.ShapeError):
            plain.forward(x, bias=b[:-1])


@pytest.mark.parametrize("z_init", loldu.Z_INITS)
def test_inits_and_residual_modes(minilm, z_init):
    w, b = layer(minilm, LAYERS[0], np.float64)
    x = np.random.default_rng(4).standard_normal((4, w.shape[1]))
    pretrained = x @ w.T + b
    _, d, _ = ldu_factors(w, 32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", loldu.LoLDUWarning)
        a = loldu.Adapter(w, b, rank=32, z_init=z_init, residual="init", seed=7)
        p = loldu.Adapter(w, b, rank=32, z_init=z_init, residual="pivots", seed=7)
    with a, p:
        np.testing.assert_array_equal(a.z, p.z)  # same seed, same z
        np.testing.assert_allclose(a.forward(x), pretrained, rtol=1e-10, atol=1e-10)  # 'init' keeps the output
        expected = {"lu": d, "constant": np.full(32, d.mean()), "ones": np.ones(32), "zeros": np.zeros(32)}
        if z_init in expected:
            np.testing.assert_allclose(a.z, expected[z_init], rtol=1e-10)
        if z_init == "lu":
            np.testing.assert_allclose(p.forward(x), pretrained, rtol=1e-10, atol=1e-10)
        else:
            w_eff = w + p.factor("lower") @ np.diag(p.z - d) @ p.factor("upper")
            np.testing.assert_allclose(p.forward(x), x @ w_eff.T + b, rtol=1e-9, atol=1e-9)
        # The guard: how much the initial z moved W, and a warning (with the fix) when it is large.
        change = np.linalg.norm(p.effective_weight() - w) / np.linalg.norm(w)
        assert a.info["init_change"] == 0 and p.info["init_change"] == pytest.approx(change, rel=1e-6, abs=1e-12)
        warned = [str(w.message) for w in caught if w.category is loldu.LoLDUWarning]
        assert len(warned) == (1 if change > 0.1 else 0), (z_init, change, warned)
        if warned:
            assert f"z_init='{z_init}' with residual='pivots'" in warned[0] and "residual='init'" in warned[0]
        assert a.config.z_init == z_init and a.config.residual == "init" and a.config.seed == 7


@pytest.mark.parametrize("z_init, alpha_one_fixes", [("normal", False), ("s_uniform", False), ("uniform", True)])
def test_the_init_change_warning_suggests_only_what_brings_the_change_under_it(minilm, z_init, alpha_one_fixes):
    """At rank 64 on a MiniLM query weight, alpha = 1 leaves 12% with the 'normal' and 's_uniform'
    inits (the change is proportional to σ₀ = alpha / rank), 4% with 'uniform': it is suggested
    only then; residual='init' and z_init='lu' always bring the change to 0."""
    w, b = layer(minilm, LAYERS[0], np.float32)
    with pytest.warns(loldu.LoLDUWarning) as record:
        a = loldu.Adapter(w, b, rank=64, z_init=z_init, seed=7)
    (message,) = [str(r.message) for r in record if r.category is loldu.LoLDUWarning]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", loldu.LoLDUWarning)
        one = loldu.Adapter(w, b, rank=64, z_init=z_init, seed=7, alpha=1)
    assert one.info["init_change"] == pytest.approx(a.info["init_change"] / 64, rel=1e-5)
    assert (one.info["init_change"] <= 0.1) == alpha_one_fixes == (not caught)
    assert ("alpha=1 (σ = 1/rank" in message) == alpha_one_fixes, message
    assert ("alpha=1 would still move it by" in message) != alpha_one_fixes, message
    assert "residual='init'" in message and "z_init='lu'" in message and "alpha=64 moves" in message
    for fix in ({"residual": "init"}, {"z_init": "lu"}):
        with warnings.catch_warnings():
            warnings.simplefilter("error", loldu.LoLDUWarning)
            assert loldu.Adapter(w, b, **{"rank": 64, "z_init": z_init, "seed": 7, **fix}).info["init_change"] == 0


def test_z_is_a_live_zero_copy_view():
    rng = np.random.default_rng(5)
    w = rng.standard_normal((12, 10))
    x = rng.standard_normal((3, 10))
    with loldu.Adapter(w, rank=4) as a:
        z = a.z
        assert np.shares_memory(z, a.params) and z.ctypes.data == a.params.ctypes.data
        before = a.forward(x)
        z[1] += 0.5  # written straight into the library
        np.testing.assert_array_equal(a.get_z(), z)
        assert not np.allclose(a.forward(x), before)
        a.z = np.ones(4)
        np.testing.assert_array_equal(z, np.ones(4))
        assert a.params[4] == a.sigma == 1.0
        a.params[4] = 2.0
        assert a.sigma == 2.0


def test_values_written_while_merged_through_an_older_view_are_not_saved(tmp_path):
    """A view of z taken before the merge stays writable (numpy cannot take that back); the
    merged weight keeps computing with the values it merged, so saving or exporting the
    written ones is refused, naming the layer, and nothing is written."""
    w = np.random.default_rng(5).standard_normal((6, 5))
    a = loldu.Adapter(w, rank=3)
    z = a.z
    a.merge()
    z[:] = 5.0
    for call in (lambda: loldu.save(tmp_path / "ckpt", {"l": a}), lambda: loldu.export_lora(tmp_path / "lora", {"l": a})):
        with pytest.raises(loldu.StateError, match='layer "l": z or sigma were written while the adapter is merged'):
            call()
    assert not (tmp_path / "ckpt").exists() and not (tmp_path / "lora").exists()
    a.unmerge()  # (the values meant, merged again: saved)
    a.merge()
    loldu.save(tmp_path / "ckpt", {"l": a})


@pytest.mark.filterwarnings("ignore::loldu.LoLDUWarning")  # a non-lu init on purpose
def test_merge_unmerge_enable():
    rng = np.random.default_rng(6)
    w, b = rng.standard_normal((20, 16)), rng.standard_normal(20)
    x = rng.standard_normal((5, 16))
    with loldu.Adapter(w, b, rank=8, z_init="s_uniform") as a:
        live = a.forward(x)
        a.merge()
        assert a.merged and a.info["merged"] and a.info["bytes_merged"] == 20 * 16 * 8
        np.testing.assert_allclose(a.forward(x), live, rtol=1e-12, atol=1e-12)
        with pytest.raises(loldu.StateError, match="unmerge it first"):
            a.set_z(np.zeros(8))
        with pytest.raises(loldu.StateError):
            a.sigma = 3.0
        assert not a.z.flags.writeable and not a.params.flags.writeable
        with pytest.raises(ValueError):
            a.z[0] = 1.0
        with pytest.raises(ValueError):  # (σ too: a merged adapter computes with the values it merged)
            a.params[-1] = 2.0
        a.zero_grad()
        a.backward(x, np.ones((5, 20)))
        assert not a.grad.any()  # a merged adapter does not depend on z
        a.merge()  # no-op
        a.unmerge()
        assert not a.merged and a.z.flags.writeable and a.params.flags.writeable
        a.enabled = False
        np.testing.assert_allclose(a.forward(x), x @ w.T + b, rtol=1e-12, atol=1e-12)
        np.testing.assert_array_equal(a.effective_weight(), w)
        a.backward(x, np.ones((5, 20)))
        assert not a.grad.any()
        a.enabled = True
        np.testing.assert_allclose(a.forward(x), live, rtol=1e-12, atol=1e-12)


def test_clone_shares_factors_not_state():
    w = np.random.default_rng(7).standard_normal((9, 7)).astype(np.float32)
    with loldu.Adapter(w, rank=5, borrow_weight=True) as a:
        a.z[:] = 2
        c = a.clone()
        del a  # the clone keeps the borrowed weight and the factors alive
    gc.collect()
    np.testing.assert_array_equal(c.z, np.full(5, 2, np.float32))
    c.z[:] = 3
    np.testing.assert_array_equal(c.factor("weight"), w)
    assert c.info["borrow_weight"] and c.info["bytes_weight"] == 0
    c.close()


def test_copies_are_clones_and_pickling_is_refused_with_the_way_out():
    """copy.copy shared the handle (z changed in both) and pickle failed with ctypes' message."""
    w = np.random.default_rng(7).standard_normal((9, 7)).astype(np.float32)
    with loldu.Adapter(w, rank=5) as a:
        a.enabled = False
        for copy_ in (copy.copy, copy.deepcopy):
            c = copy_(a)
            assert c.handle != a.handle and not c.enabled
            c.z[:] = 3
            assert not np.array_equal(a.z, c.z)
            np.testing.assert_array_equal(c.factor("lower"), a.factor("lower"))
        with pytest.raises(TypeError, match=r"loldu.Adapter .*cannot be pickled.*loldu.save"):
            pickle.dumps(a)
        a.enabled = True
        a.merge()
        with pytest.raises(loldu.StateError, match="merged"):
            copy.deepcopy(a)
        a.unmerge()
        optimiser = loldu.AdamW([a])
        with pytest.raises(TypeError, match=r"optimiser .*cannot be pickled or copied: save\(\)"):
            copy.deepcopy(optimiser)
        with pytest.raises(TypeError, match="optimiser"):
            pickle.dumps(optimiser)


def test_borrowed_weight_is_kept_alive():
    w = np.random.default_rng(8).standard_normal((30, 20))
    a = loldu.Adapter(w, rank=4, borrow_weight=True)
    expected = a.forward(np.eye(20))
    del w
    gc.collect()
    np.testing.assert_array_equal(a.forward(np.eye(20)), expected)
    a.close()


def test_handles_are_freed_exactly_once(monkeypatch):
    freed = []
    real = _capi.loldu_adapter_free
    monkeypatch.setattr(_capi, "loldu_adapter_free", lambda h: (freed.append(h), real(h)))
    w = np.eye(6)
    # close(), twice
    a = loldu.Adapter(w, rank=3)
    h = a.handle
    a.close()
    a.close()
    assert freed == [h] and a.closed
    with pytest.raises(loldu.InvalidHandleError, match="closed"):
        a.forward(np.ones((1, 6)))
    # context manager, then close() again
    with loldu.Adapter(w, rank=3) as b:
        hb = b.handle
    b.close()
    assert freed == [h, hb]
    # garbage collection
    c = loldu.Adapter(w, rank=3)
    hc = c.handle
    del c
    gc.collect()
    assert freed == [h, hb, hc]
    # a live view keeps the memory (and the handle) until it goes
    d = loldu.Adapter(w, rank=3)
    hd = d.handle
    z = d.z
    d.close()
    assert freed == [h, hb, hc]
    np.testing.assert_array_equal(z, np.ones(3))  # still valid memory
    del z
    gc.collect()
    assert freed == [h, hb, hc, hd]
    assert len(set(freed)) == len(freed)


def test_no_crash_or_warning_at_interpreter_shutdown():
    code = """
        import numpy as np, loldu
        w = np.eye(8, dtype=np.float32)
        a = loldu.Adapter(w, rank=4)
        view = a.z
        b = loldu.Adapter(w, rank=2, borrow_weight=True)
        opt = loldu.AdamW([a, b], lr=0.1)
        c = loldu.Adapter(w, rank=2); c.close()
        cycle = [loldu.Adapter(w, rank=3)]; cycle.append(cycle)
        print("ok")
    """
    result = run_python(code)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr
    assert result.stderr == ""


def test_bad_inputs_raise_documented_exceptions():
    w = np.random.default_rng(9).standard_normal((8, 6)).astype(np.float32)
    with pytest.raises(loldu.DTypeError, match="int32"):
        loldu.Adapter(w.astype(np.int32))
    with pytest.raises(loldu.DTypeError, match="numpy.ndarray"):
        loldu.Adapter(w.tolist())
    with pytest.raises(loldu.ShapeError, match="2-D"):
        loldu.Adapter(w.reshape(2, 4, 6))
    with pytest.raises(loldu.ShapeError, match="C-contiguous"):
        loldu.Adapter(np.asfortranarray(w))
    with pytest.raises(loldu.DTypeError, match="bias has dtype float64"):
        loldu.Adapter(w, np.zeros(8))
    with pytest.raises(loldu.ShapeError, match=r"bias has shape \(6,\), expected \(8,\)"):
        loldu.Adapter(w, np.zeros(6, np.float32))
    with pytest.raises(loldu.InvalidArgumentError, match=r"config.rank must be 0 \(full rank\) or in \[1, min\(m, n\)\] = \[1, 6\], got 7"):
        loldu.Adapter(w, rank=7)
    with pytest.raises(loldu.InvalidArgumentError, match="z_init must be one of"):
        loldu.Adapter(w, rank=4, z_init="svd")
    with pytest.raises(loldu.InvalidArgumentError, match="alpha"):
        loldu.Adapter(w, rank=4, alpha=-1)
    bad = w.copy()
    bad[3, 2] = np.nan
    with pytest.raises(loldu.NotFiniteError) as info:
        loldu.Adapter(bad, rank=4)
    assert isinstance(info.value, ValueError) and info.value.status == _capi.LOLDU_ERR_NOT_FINITE
    assert "weight" in str(info.value)
    with loldu.Adapter(w, rank=4) as a:
        x = np.ones((3, 6), np.float32)
        with pytest.raises(loldu.DTypeError, match=r"x has dtype float64, expected float32.*astype"):
            a.forward(x.astype(np.float64))
        with pytest.raises(loldu.ShapeError, match=r"expected \(\.\.\., 6\)"):
            a.forward(np.ones((3, 5), np.float32))
        with pytest.raises(loldu.ShapeError, match="C-contiguous"):
            a.forward(np.ones((6, 3), np.float32).T)
        with pytest.raises(loldu.ShapeError, match="read-only"):
            out = np.empty((3, 8), np.float32)
            out.flags.writeable = False
            a.forward(x, out=out)
        with pytest.raises(loldu.ShapeError, match=r"dy has shape \(3, 6\), expected \(3, 8\)"):
            a.backward(x, np.ones((3, 6), np.float32))
        with pytest.raises(loldu.ShapeError, match=r"h has shape"):
            a.forward(x, h=np.empty((3, 3), np.float32))
        with pytest.raises(loldu.NotFiniteError, match="z"):
            a.set_z(np.array([1, np.inf, 1, 1], np.float32))
        with pytest.raises(loldu.NotFiniteError, match="sigma must be finite"):
            a.sigma = float("nan")
        with pytest.raises(loldu.InvalidArgumentError, match="path must be one of"):
            a.path = "fastest"
        # Integers that ctypes would wrap silently are refused by name.
        with pytest.raises(loldu.InvalidArgumentError, match=r"batch = 9223372036854775808 is outside"):
            a.plan(2**63)
        with pytest.raises(loldu.InvalidArgumentError, match=r"batch must be an integer"):
            a.plan(2.5)
        with pytest.raises(loldu.InvalidArgumentError, match=r"threads = 4294967298 is outside"):
            loldu.set_num_threads(2**32 + 2)
        with pytest.raises(loldu.InvalidArgumentError, match=r"total_steps = 18446744073709551626 is outside"):
            loldu.AdamW([a], lr=1e-3, schedule="linear", warmup_steps=5, total_steps=2**64 + 10)
        with pytest.raises(loldu.InvalidArgumentError, match="which must be one of"):
            a.factor("pivots")
        with pytest.raises(loldu.StateError, match="no bias"):
            a.factor("bias")
        with pytest.raises(loldu.ShapeError, match="batch must be in"):
            a.plan(-1)
        # A masked array's mask is not silently dropped (the library reads every element):
        # refused when something is masked, used as its data when nothing is.
        hidden = np.ma.masked_array(x, mask=np.zeros(x.shape, bool))
        np.testing.assert_array_equal(a.forward(hidden), a.forward(x))
        hidden[1, 2] = np.ma.masked
        with pytest.raises(loldu.InvalidArgumentError, match=r"x is a masked array with masked elements.*filled"):
            a.forward(hidden)
        with pytest.raises(loldu.InvalidArgumentError, match="z is a masked array"):
            a.set_z(np.ma.masked_array(np.ones(4, np.float32), mask=[0, 1, 0, 0]))
        assert a.bias_grad is None
        np.testing.assert_array_equal(a.forward(np.ones((0, 6), np.float32)), np.ones((0, 8), np.float32))


def test_a_child_forked_after_two_thread_products_computes_in_a_pytorch_process():
    """GNU OpenMP (under oneDNN, and PyTorch's) cannot start threads in a child of fork() once the
    parent started some: the child's first oneDNN product on two threads waited for ever. Here
    OpenBLAS runs kernels older than the CPU, so float32 goes to oneDNN, in a process where
    PyTorch loaded OpenMP first (the runtime is shared)."""
    result = run_python("""
        import os, signal
        import numpy as np
        import torch
        import loldu
        if loldu.gemm_backend("float32")[0] != "onednn":
            print("backend", loldu.gemm_backend("float32"))
            raise SystemExit(0)
        loldu.set_num_threads(2)
        torch.set_num_threads(2)
        rng = np.random.default_rng(0)
        a = loldu.Adapter(rng.standard_normal((256, 256)).astype(np.float32), rank=64)
        x = rng.standard_normal((256, 256)).astype(np.float32)
        y = a.forward(x)
        torch.randn(512, 512).exp().sum()  # (PyTorch's OpenMP threads started too)
        pid = os.fork()
        if pid == 0:
            signal.alarm(30)
            ok = np.allclose(a.forward(x), y, rtol=1e-4, atol=1e-3)
            torch.set_num_threads(1)  # (PyTorch's own operations need it in a forked child)
            ok = ok and bool(torch.isfinite(torch.randn(512, 512).exp()).all())
            os._exit(0 if ok else 1)
        print("child", os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
    """, env={"OPENBLAS_CORETYPE": "Prescott"}, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    if "backend" in result.stdout:  # (oneDNN takes float32 from OpenBLAS's old kernels on every AVX2 CPU)
        assert " avx2 " not in open("/proc/cpuinfo").read().replace("\n", " "), result.stdout
        pytest.skip(f"a CPU without AVX2: float32 stays on OpenBLAS ({result.stdout.strip()})")
    assert result.stdout.split("child ")[1].strip() == "0", result.stdout  # (-14: SIGALRM, it blocked)


def test_a_fork_during_a_call_gives_the_child_an_error_not_a_trap_or_a_hang():
    """The child of a fork made while another thread was inside a call on an adapter died of a
    trap (the lock held by a thread the child does not have) on its first call to that adapter;
    then calls that take no lock (set_z, an optimiser's step) went on with its unknown state."""
    result = run_python("""
        import os, threading, time
        import numpy as np
        import loldu
        loldu.set_num_threads(1)
        rng = np.random.default_rng(0)
        busy = loldu.Adapter(rng.standard_normal((384, 384)).astype(np.float32), rank=64)
        idle = loldu.Adapter(rng.standard_normal((32, 16)).astype(np.float32), rank=8)
        x, small = rng.standard_normal((2048, 384)).astype(np.float32), np.ones((3, 16), np.float32)
        expected = idle.forward(small)
        stop = threading.Event()
        def serve():
            while not stop.is_set():
                busy.forward(x)
        server = threading.Thread(target=serve)
        server.start()
        refused = 0
        for _ in range(20):
            pid = os.fork()
            if pid == 0:
                refusals = []
                for call in (lambda: busy.set_z(busy.z.copy()), lambda: busy.forward(x[:4])):  # (unlocked, locked)
                    try:
                        call()
                        refusals.append(False)
                    except loldu.StateError as error:
                        refusals.append("forked" in str(error) or None)
                code = {(False, False): 0, (True, True): 3}.get(tuple(refusals), 4)
                if not np.array_equal(idle.forward(small), expected):
                    code = 5
                os._exit(code)
            for _ in range(200):  # (a child that blocks, on a lock another thread held at the fork, fails the test)
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    break
                time.sleep(0.05)
            else:
                os.kill(pid, 9)
                raise AssertionError("a child blocked")
            code = os.waitstatus_to_exitcode(status)
            assert code in (0, 3), code  # 0: the lock happened to be free at the fork
            refused += code == 3
        stop.set()
        server.join()
        np.testing.assert_array_equal(idle.forward(small), expected)
        print("refused", refused)
    """, env={"OMP_NUM_THREADS": "1"}, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert int(result.stdout.split("refused ")[1]) >= 2, result.stdout


def test_malformed_arguments_are_loldu_errors_naming_them(tmp_path):
    """Arguments of the wrong kind raise the library's errors, naming the argument, not Python's
    own from deep inside the binding (AttributeError, unpacking errors, FileExistsError)."""
    w = np.random.default_rng(3).standard_normal((6, 5)).astype(np.float32)
    a = loldu.Adapter(w, rank=3)
    x = np.ones((2, 5), np.float32)
    (tmp_path / "file").write_text("")
    os.mkfifo(tmp_path / "fifo")
    loldu.save(tmp_path / "ckpt", {"l": a})
    cases = [
        (lambda: loldu.grouped_forward([None], [0, 0], x), loldu.InvalidArgumentError, "adapters must be"),
        (lambda: loldu.grouped_backward(["a"], [0, 0], x, np.ones((2, 6), np.float32)), loldu.InvalidArgumentError,
         "adapters must be"),
        (lambda: loldu.export_lora(tmp_path / "l", {"l": a}, kinds={"l": ("conv",)}), loldu.InvalidArgumentError,
         r"kinds\['l'\] must be"),
        (lambda: loldu.export_lora(tmp_path / "l", {"l": a}, kinds={"l": ("conv", 5)}), loldu.InvalidArgumentError,
         r"kinds\['l'\] must be"),
        (lambda: loldu.load(tmp_path / "ckpt", {"l": (w, None, None)}), loldu.InvalidArgumentError,
         r"weights\['l'\] must be a weight array or a \(weight, bias\) pair"),
        (lambda: loldu.save(tmp_path / "file", {"l": a}), loldu.LoLDUIOError, "is a regular file, not a directory"),
        (lambda: loldu.save(tmp_path / "fifo", {"l": a}), loldu.LoLDUIOError, "is a FIFO, not a directory"),
        (lambda: setattr(a, "sigma", "abc"), loldu.InvalidArgumentError, "sigma must be a number, got 'abc'"),
        (lambda: loldu.Optimizer([a], "adamw", lr="x"), loldu.InvalidArgumentError, "lr must be a number"),
        (lambda: loldu.Optimizer([a], "adamw", betas=(0.9,)), loldu.InvalidArgumentError, "betas must be a pair"),
        (lambda: loldu.Adapter(w, rnk=4), loldu.InvalidArgumentError, r"unknown adapter option\(s\) \['rnk'\]"),
        (lambda: a.derive(config={"rank": 2}), loldu.InvalidArgumentError, "config must be a loldu.AdapterConfig"),
        (lambda: loldu.Adapter(w, train_sigma="no"), loldu.InvalidArgumentError, "train_sigma must be True or False"),
        (lambda: a.convert(None), loldu.DTypeError, "dtype = None is not a dtype"),  # (not numpy's float64)
        (lambda: loldu.gemm_backend("foo"), loldu.DTypeError, "dtype = 'foo' is not a dtype"),
        (lambda: loldu.merge_model(tmp_path / "ckpt", tmp_path, tmp_path / "m", progress=3), loldu.InvalidArgumentError,
         "progress must be a function"),
    ]
    for call, error, message in cases:
        with pytest.raises(error, match=message):
            call()
    assert a.sigma == 1.0 and not (tmp_path / "l").exists()
    np.testing.assert_array_equal(loldu.grouped_forward(iter([a]), [0, 0], x), a.forward(x))  # (any iterable)
