"""The numpy API in half precision (float16, ml_dtypes.bfloat16) and with many adapters on one
base: derived adapters, grouped calls, conversions."""

from __future__ import annotations

import numpy as np
import pytest

import loldu
from loldu import _capi

ml_dtypes = pytest.importorskip("ml_dtypes")
BF16 = np.dtype(ml_dtypes.bfloat16)


@pytest.mark.parametrize("dtype", [np.dtype(np.float16), BF16], ids=["float16", "bfloat16"])
def test_half_precision_adapter_matches_float32_on_the_same_values(dtype):
    rng = np.random.default_rng(3)
    w = rng.standard_normal((24, 16)).astype(dtype)
    x = rng.standard_normal((5, 16)).astype(dtype)
    half = loldu.Adapter(w, rank=6)
    ref = loldu.Adapter(w.astype(np.float32), rank=6)
    assert half.dtype == dtype and half.param_dtype == np.float32 and half.z.dtype == np.float32
    np.testing.assert_array_equal(half.factor("lower"), ref.factor("lower"))  # same factorisation
    z = half.z * 1.2
    half.z = z
    ref.z = z
    y, y_ref = half.forward(x), ref.forward(x.astype(np.float32))
    assert y.dtype == dtype
    # Within a few units in the last place of the half type (exactly one rounding when widened).
    ulp = np.finfo(np.float16).eps if dtype == np.float16 else 2.0 ** -7
    np.testing.assert_allclose(y.astype(np.float32), y_ref, rtol=4 * ulp, atol=4 * ulp)
    if half.info["backend"] == "widened":
        np.testing.assert_array_equal(y, y_ref.astype(dtype))
    dx = half.backward(x, np.ones_like(y))
    dx_ref = ref.backward(x.astype(np.float32), np.ones(y.shape, np.float32))
    assert dx.dtype == dtype and half.grad.dtype == np.float32
    np.testing.assert_allclose(dx.astype(np.float32), dx_ref, rtol=4 * ulp, atol=4 * ulp)
    np.testing.assert_allclose(half.grad, ref.grad, rtol=4 * ulp, atol=4 * ulp)
    if half.info["backend"] == "widened":
        np.testing.assert_array_equal(dx, dx_ref.astype(dtype))


def test_derived_adapters_and_a_grouped_batch():
    rng = np.random.default_rng(4)
    w = rng.standard_normal((20, 12)).astype(np.float64)
    b = rng.standard_normal(20)
    base = loldu.Adapter(w, b, rank=8)
    adapters = [base.derive(rank=r, seed=i) for i, r in enumerate([8, 8, 3])]
    for a in adapters:
        a.z = a.z * rng.uniform(0.5, 1.5, a.rank)
    assert [a.factor_rank for a in adapters] == [8, 8, 8] and adapters[2].rank == 3
    # At another rank the default alpha (= rank, σ = 1) stays the default; a chosen one is kept.
    assert adapters[2].sigma == 1.0 and adapters[2].config.alpha == 3
    assert loldu.Adapter(w, rank=8, alpha=2.0).derive(rank=4).sigma == 0.5
    assert adapters[2].info["bytes_state"] == 4 * 8  # z and σ only
    x = rng.standard_normal((9, 12))
    rows = np.array([0, 1, 2, -1, 2, 1, 0, 0, -1], np.int32)
    y = loldu.grouped_forward(adapters, rows, x)
    for b_, r in enumerate(rows):
        expected = base.forward(x[b_:b_ + 1]) if r < 0 else adapters[r].forward(x[b_:b_ + 1])
        if r < 0:
            base.enabled = False
            expected = base.forward(x[b_:b_ + 1])
            base.enabled = True
        np.testing.assert_allclose(y[b_:b_ + 1], expected, rtol=1e-12, atol=1e-12)
    dy = rng.standard_normal(y.shape)
    dx = loldu.grouped_backward(adapters, rows, x, dy)
    for i, adapter in enumerate(adapters):  # each row's dX and each adapter's gradients: its own rows alone
        own = adapter.clone()
        np.testing.assert_allclose(dx[rows == i], own.backward(x[rows == i], dy[rows == i]), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(adapter.grad, own.grad, rtol=1e-12, atol=1e-12)
    base.enabled = False
    np.testing.assert_allclose(dx[rows == -1], base.backward(x[rows == -1], dy[rows == -1]), rtol=1e-12, atol=1e-12)
    base.enabled = True
    with pytest.raises(loldu.InvalidArgumentError, match=r"rows\[1\] = 5"):
        loldu.grouped_forward(adapters, np.array([0, 5, 0, 0, 0, 0, 0, 0, 0], np.int32), x)
    # What a cast to int32 would change is refused, not wrapped or truncated into valid rows.
    with pytest.raises(loldu.InvalidArgumentError, match=r"rows\[2\] = 4294967297"):
        loldu.grouped_forward(adapters, np.array([0, 1, 2**32 + 1] + [0] * 6, np.int64), x)
    with pytest.raises(loldu.InvalidArgumentError, match=r"rows\[0\] = 4294967295"):
        loldu.grouped_forward(adapters, np.array([2**32 - 1] + [0] * 8, np.uint32), x)
    with pytest.raises(loldu.InvalidArgumentError, match=r"rows\[2\] = 9223372036854775808"):
        loldu.grouped_forward(adapters, [0, 1, 2**63] + [0] * 6, x)  # (numpy would make it a float)
    with pytest.raises(loldu.DTypeError, match="integers"):
        loldu.grouped_forward(adapters, np.array([0.9] * 9), x)
    with pytest.raises(loldu.InvalidArgumentError, match="rows is a masked array"):
        loldu.grouped_forward(adapters, np.ma.masked_array(rows, mask=rows < 0), x)
    np.testing.assert_array_equal(loldu.grouped_forward(adapters, rows.astype(np.int64), x), y)
    np.testing.assert_array_equal(loldu.grouped_forward(adapters, rows.tolist(), x), y)
    other = loldu.Adapter(rng.standard_normal((20, 12)), rank=8)
    with pytest.raises(loldu.MismatchError, match="adapters"):
        loldu.grouped_forward([adapters[0], other], np.zeros(9, np.int32) + np.arange(9) % 2, x)
    # The same fleet on factors without a bias, the bias given with the call: the same y.
    plain = loldu.Adapter(w, rank=8)
    fleet = [plain.derive(rank=a.rank, seed=i) for i, a in enumerate(adapters)]
    for mine, theirs in zip(fleet, adapters):
        mine.z = theirs.z
    np.testing.assert_array_equal(loldu.grouped_forward(fleet, rows, x, bias=b), y)
    with pytest.raises(loldu.StateError, match="bias"):
        loldu.grouped_forward(adapters, rows, x, bias=b)


def test_convert_to_half_keeps_the_factorisation():
    rng = np.random.default_rng(5)
    a = loldu.Adapter(rng.standard_normal((10, 8)).astype(np.float32), rank=4)
    a.z = a.z * 2
    for dtype in (np.float16, BF16):
        c = a.convert(dtype)
        assert c.dtype == dtype
        np.testing.assert_array_equal(c.z, a.z)
        np.testing.assert_array_equal(c.pivots(), a.pivots())
    with pytest.raises(loldu.InvalidArgumentError, match="float64"):
        a.convert(np.float64)
