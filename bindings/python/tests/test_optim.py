"""The library's optimisers step exactly as torch.optim's SGD / Adam / AdamW on the same
gradients; schedules as transformers' get_*_schedule_with_warmup; clipping; saved state."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import loldu

CASES = [
    ("sgd", dict(lr=0.05), torch.optim.SGD, dict(lr=0.05)),
    ("sgd", dict(lr=0.05, momentum=0.9, dampening=0.1, weight_decay=0.01),
     torch.optim.SGD, dict(lr=0.05, momentum=0.9, dampening=0.1, weight_decay=0.01)),
    ("sgd", dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01),
     torch.optim.SGD, dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01)),
    ("adam", dict(lr=0.01, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.02),
     torch.optim.Adam, dict(lr=0.01, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.02)),
    ("adam", dict(lr=0.01), torch.optim.Adam, dict(lr=0.01)),
    ("adamw", dict(lr=0.01, weight_decay=0.05), torch.optim.AdamW, dict(lr=0.01, weight_decay=0.05)),
    ("adamw", dict(lr=0.02), torch.optim.AdamW, dict(lr=0.02)),  # torch's default decay 1e-2
]


def make_adapters(minilm, dtype, train_sigma=True):
    names = ["encoder.layer.3.attention.self.key", "encoder.layer.4.output.dense"]
    return [
        loldu.Adapter(np.ascontiguousarray(minilm[f"{n}.weight"], dtype), rank=r, train_sigma=train_sigma, alpha=2 * r)
        for n, r in zip(names, (24, 40))
    ]


def torch_params(adapters):
    zs = [torch.tensor(a.z.copy(), requires_grad=True) for a in adapters]
    sigmas = [torch.tensor([a.sigma], dtype=zs[0].dtype, requires_grad=True) for a in adapters]
    return zs, sigmas


def random_grads(adapters, rng, scale=1.0):
    return [(rng.standard_normal(a.rank + 1) * scale).astype(a.dtype) for a in adapters]


def set_grads(adapters, zs, sigmas, grads):
    for a, z, s, g in zip(adapters, zs, sigmas, grads):
        a.grad[:] = g
        z.grad = torch.from_numpy(g[:-1].copy())
        s.grad = torch.from_numpy(g[-1:].copy())


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("kind, options, torch_class, torch_options", CASES)
def test_steps_equal_torch_optim(minilm, dtype, kind, options, torch_class, torch_options):
    adapters = make_adapters(minilm, dtype)
    zs, sigmas = torch_params(adapters)
    lr_sigma, wd_sigma = 0.5 * options["lr"], 0.003
    opt = loldu.Optimizer(adapters, kind, lr_sigma=lr_sigma, weight_decay_sigma=wd_sigma, **options)
    sigma_options = dict(torch_options, lr=lr_sigma, weight_decay=wd_sigma)
    ref = torch_class([{"params": zs}, {"params": sigmas, **sigma_options}], foreach=False, **torch_options)
    rng = np.random.default_rng(10)
    initial = [a.params.copy() for a in adapters]
    for step in range(6):
        set_grads(adapters, zs, sigmas, random_grads(adapters, rng))
        norm = opt.step()
        ref.step()
        expected_norm = torch.linalg.vector_norm(torch.cat([p.grad.double() for p in zs + sigmas]))
        assert norm == pytest.approx(float(expected_norm), rel=1e-6)
        opt.zero_grad()
        assert all(not a.grad.any() for a in adapters)
        assert opt.steps == step + 1
    # Equal to rounding: torch's vectorised CPU kernels fuse multiply-adds (one rounding), the
    # library rounds the product and the sum separately, so single elements differ by an ulp.
    tol = dict(rtol=1e-6, atol=1e-6) if dtype == np.float32 else dict(rtol=1e-13, atol=1e-14)
    for a, z, s, before in zip(adapters, zs, sigmas, initial):
        np.testing.assert_allclose(a.z, z.detach().numpy(), **tol)
        np.testing.assert_allclose(a.sigma, float(s.detach()[0]), **tol)
        assert np.abs(a.params - before).mean() > 1e3 * tol["atol"]  # the values really moved


def test_frozen_sigma_is_not_updated(minilm):
    adapters = make_adapters(minilm, np.float64, train_sigma=False)
    zs, _ = torch_params(adapters)
    opt = loldu.AdamW(adapters, lr=0.01)
    ref = torch.optim.AdamW(zs, lr=0.01, foreach=False)
    rng = np.random.default_rng(11)
    for _ in range(3):
        for a, z, g in zip(adapters, zs, random_grads(adapters, rng)):
            a.grad[:-1] = g[:-1]
            z.grad = torch.from_numpy(g[:-1].copy())
        opt.step()
        ref.step()
        opt.zero_grad()
    for a, z in zip(adapters, zs):
        np.testing.assert_allclose(a.z, z.detach().numpy(), rtol=1e-13, atol=1e-14)
        assert a.sigma == 2.0 and a.num_trainable == a.rank


@pytest.mark.parametrize("schedule", ["constant", "linear", "cosine"])
def test_schedules_equal_transformers(minilm, schedule):
    import transformers

    adapters = make_adapters(minilm, np.float64)
    zs, sigmas = torch_params(adapters)
    warmup, total = 3, 10
    opt = loldu.AdamW(adapters, lr=0.02, lr_sigma=0.01, schedule=schedule, warmup_steps=warmup, total_steps=total)
    ref = torch.optim.AdamW([{"params": zs}, {"params": sigmas, "lr": 0.01}], lr=0.02, foreach=False)
    make = {
        "constant": lambda o: transformers.get_constant_schedule_with_warmup(o, warmup),
        "linear": lambda o: transformers.get_linear_schedule_with_warmup(o, warmup, total),
        "cosine": lambda o: transformers.get_cosine_schedule_with_warmup(o, warmup, total),
    }[schedule]
    scheduler = make(ref)
    rng = np.random.default_rng(12)
    for step in range(total + 2):
        lr, lr_sigma = opt.get_lr()
        assert lr == pytest.approx(ref.param_groups[0]["lr"], rel=1e-14, abs=1e-18)
        assert lr_sigma == pytest.approx(ref.param_groups[1]["lr"], rel=1e-14, abs=1e-18)
        assert lr == pytest.approx(0.02 * loldu.schedule_factor(schedule, step, warmup, total), rel=1e-14, abs=1e-18)
        set_grads(adapters, zs, sigmas, random_grads(adapters, rng))
        opt.step()
        ref.step()
        scheduler.step()
        opt.zero_grad()
    for a, z in zip(adapters, zs):
        np.testing.assert_allclose(a.z, z.detach().numpy(), rtol=1e-13)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_gradient_clipping_equals_clip_grad_norm(minilm, dtype):
    adapters = make_adapters(minilm, dtype)
    zs, sigmas = torch_params(adapters)
    opt = loldu.SGD(adapters, lr=0.1, momentum=0.5, max_grad_norm=0.5)
    ref = torch.optim.SGD(zs + sigmas, lr=0.1, momentum=0.5, foreach=False)
    rng = np.random.default_rng(13)
    for _ in range(4):
        grads = random_grads(adapters, rng, scale=3.0)
        set_grads(adapters, zs, sigmas, grads)
        norm = opt.step()
        expected = torch.nn.utils.clip_grad_norm_(zs + sigmas, 0.5, foreach=False)
        assert norm == pytest.approx(float(expected), rel=1e-6)
        scaled = np.concatenate([a.grad for a in adapters])
        assert np.linalg.norm(scaled.astype(np.float64)) == pytest.approx(0.5, rel=1e-5)
        ref.step()
        opt.zero_grad()
    for a, z in zip(adapters, zs):
        np.testing.assert_allclose(a.z, z.detach().numpy(), rtol=1e-6 if dtype == np.float32 else 1e-13)


def test_saved_state_resumes_bit_for_bit(minilm, tmp_path):
    rng = np.random.default_rng(14)
    grads = [random_grads(make_adapters(minilm, np.float32), rng) for _ in range(6)]

    def run(adapters, opt, steps):
        for g in steps:
            for a, gi in zip(adapters, g):
                a.grad[:] = gi
            opt.step()
            opt.zero_grad()

    options = dict(lr=0.01, schedule="cosine", warmup_steps=2, total_steps=6)
    straight = make_adapters(minilm, np.float32)
    run(straight, loldu.Adam(straight, **options), grads)

    first = make_adapters(minilm, np.float32)
    opt = loldu.Adam(first, **options)
    run(first, opt, grads[:3])
    opt.save(tmp_path / "optimizer.safetensors")
    loldu.save(tmp_path / "ckpt", {"a": first[0], "b": first[1]})

    weights = {n: np.ascontiguousarray(minilm[f"{k}.weight"], np.float32)
               for n, k in zip("ab", ["encoder.layer.3.attention.self.key", "encoder.layer.4.output.dense"])}
    restored = loldu.load(tmp_path / "ckpt", weights)
    resumed = [restored["a"], restored["b"]]
    opt2 = loldu.Adam(resumed, **options)
    opt2.load(tmp_path / "optimizer.safetensors")
    assert opt2.steps == 3 and opt2.get_lr() == opt.get_lr()
    run(resumed, opt2, grads[3:])
    for a, b in zip(straight, resumed):
        np.testing.assert_array_equal(a.z, b.z)
        assert a.sigma == b.sigma


def test_loading_a_state_saved_with_another_configuration_is_refused(minilm, tmp_path):
    adapters = make_adapters(minilm, np.float64)
    saved = loldu.AdamW(adapters, lr=0.5, schedule="cosine", warmup_steps=1, total_steps=10)
    saved.save(tmp_path / "state.safetensors")
    for other in (loldu.SGD(adapters, lr=0.5), loldu.AdamW(adapters, lr=0.1, schedule="cosine", warmup_steps=1,
                                                                 total_steps=10)):
        before = other.get_lr()
        with pytest.raises(loldu.MismatchError, match="saved with another configuration"):
            other.load(tmp_path / "state.safetensors")
        assert other.get_lr() == before and other.steps == 0
    same = loldu.AdamW(adapters, lr=0.5, schedule="cosine", warmup_steps=1, total_steps=10)
    same.load(tmp_path / "state.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      ")
    with pytest.raises(loldu.FormatError):
        same.load(tmp_path / "bad.safetensors")


def test_optimizer_errors(minilm):
    adapters = make_adapters(minilm, np.float64)
    with pytest.raises(loldu.InvalidArgumentError, match="lr must be finite and > 0"):
        loldu.SGD(adapters, lr=0)
    with pytest.raises(loldu.InvalidArgumentError, match="nesterov needs momentum > 0"):
        loldu.SGD(adapters, nesterov=True)
    with pytest.raises(loldu.InvalidArgumentError, match="total_steps must be > warmup_steps"):
        loldu.AdamW(adapters, schedule="linear", warmup_steps=5, total_steps=5)
    with pytest.raises(loldu.InvalidArgumentError, match="kind must be one of"):
        loldu.Optimizer(adapters, "lion")
    with pytest.raises(loldu.InvalidArgumentError, match="at least one adapter"):
        loldu.AdamW([])
    with pytest.raises(loldu.InvalidArgumentError, match="must be a loldu.Adapter"):
        loldu.AdamW([np.zeros(3)])
    with pytest.raises(loldu.InvalidArgumentError, match=r"adapters\[2\] is adapters\[0\]"):
        loldu.SGD([adapters[0], adapters[1], adapters[0]])
    opt = loldu.AdamW(adapters, lr=0.1)
    z = [a.z.copy() for a in adapters]
    adapters[0].grad[0] = np.nan
    with pytest.raises(loldu.NotFiniteError, match="no parameter was updated"):
        opt.step()
    for a, before in zip(adapters, z):
        np.testing.assert_array_equal(a.z, before)
    opt.zero_grad()
    adapters[1].merge()
    with pytest.raises(loldu.StateError, match="merged"):
        opt.step()
    with pytest.raises(loldu.LoLDUIOError):
        opt.load("/nonexistent/optimizer.safetensors")
    opt.close()
    opt.close()
    with pytest.raises(loldu.InvalidHandleError):
        opt.step()
