"""loldu.torch in half precision (bf16 and f16 models, CPU autocast) and with several named
adapters per layer (PEFT's conventions): add, load, set, delete, weighted combination, mixed
batches through any model, two adapters trained in one mixed batch."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

import loldu
import loldu.torch as lt


def small_model(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 24), nn.Tanh(), nn.Linear(24, 8)).to(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_models_train_with_float32_parameters(dtype):
    model = lt.add_loldu(small_model(dtype), ["0", "2"], rank=6)
    layer = model[0]
    assert layer.dtype == dtype and layer.loldu_z["default"].dtype == torch.float32
    x = torch.randn(5, 16, dtype=dtype)
    reference = small_model(dtype)(x)
    # The pretrained model at initialisation, to the half type's rounding (the library rounds
    # x Wᵀ once, then PyTorch adds the bias and rounds again; nn.Linear rounds once).
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(model(x), reference, rtol=4 * eps, atol=4 * eps)
    opt = torch.optim.AdamW(lt.loldu_parameters(model), lr=1e-2)
    target = torch.randn(5, 8)
    losses = []
    for _ in range(20):
        loss = (model(x).float() - target).square().mean()
        losses.append(loss.item())
        loss.backward()
        assert layer.loldu_z["default"].grad.dtype == torch.float32
        opt.step()
        opt.zero_grad()
    assert losses[-1] < 0.8 * losses[0]
    assert model(x).dtype == dtype


def test_model_to_bfloat16_keeps_z_and_a_bf16_checkpoint_loads_on_the_float32_model(tmp_path):
    model = lt.add_loldu(small_model(), ["0", "2"], rank=6, z_init="s_normal", residual="init")
    with torch.no_grad():
        model[0].loldu_z["default"].mul_(1.5)
    z = model[0].loldu_z["default"].detach().clone()
    bf = copy.deepcopy(model).to(torch.bfloat16)
    assert bf[0].adapter.dtype == loldu.bfloat16 and torch.equal(bf[0].loldu_z["default"], z)
    x = torch.randn(3, 16)
    torch.testing.assert_close(bf(x.bfloat16()).float(), model(x), rtol=0.05, atol=0.05)
    # A checkpoint saved from a model in bf16 applies to the float32 model with the same values.
    plain = small_model().to(torch.bfloat16)
    lt.add_loldu(plain, ["0", "2"], rank=6)
    with torch.no_grad():
        plain[2].loldu_z["default"].add_(0.25)
    lt.save_loldu(plain, tmp_path / "ckpt")
    widened = small_model().to(torch.bfloat16).float()  # the bf16 values in float32
    lt.load_loldu(widened, tmp_path / "ckpt")
    torch.testing.assert_close(widened[2].loldu_z["default"], plain[2].loldu_z["default"], rtol=0, atol=0)


def test_autocast_computes_in_bf16_like_nn_linear():
    torch.manual_seed(3)
    base = nn.Linear(32, 20)
    layer = lt.LoLDULinear(copy.deepcopy(base), rank=8)
    x = torch.randn(7, 32, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
        expected = base(x)
    assert y.dtype == expected.dtype == torch.bfloat16
    # z at initialisation: autocast's nn.Linear, to bf16 rounding (its kernel adds the bias
    # before rounding once, the layer after the library's rounding).
    torch.testing.assert_close(y, expected, rtol=2 ** -7, atol=2 ** -7)
    with torch.no_grad():
        layer.loldu_z["default"].mul_(torch.linspace(0.5, 1.5, 8))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    y.float().sum().backward()
    grad = layer.loldu_z["default"].grad
    assert grad is not None and grad.dtype == torch.float32 and x.grad is not None
    # The same step in float32: bf16 rounding apart, the same output and gradient.
    layer.loldu_z["default"].grad = None
    y32 = layer(x)
    y32.sum().backward()
    torch.testing.assert_close(y.float(), y32, rtol=0.03, atol=0.03)
    torch.testing.assert_close(grad, layer.loldu_z["default"].grad, rtol=0.05, atol=0.05 * grad.abs().max().item())


def named_model():
    model = lt.add_loldu(small_model(), ["0", "2"], rank=6, seed=1)
    lt.add_loldu(model, ["0", "2"], rank=4, seed=2, z_init="s_normal", residual="init", adapter_name="b")
    for layer in lt.loldu_layers(model).values():
        with torch.no_grad():
            layer.loldu_z["default"].mul_(1.3)
            layer.loldu_z["b"].mul_(0.7)
    return model


def test_named_adapters_follow_peft_conventions(tmp_path):
    model = named_model()
    layer = model[0]
    assert lt.adapter_names(model) == ["default", "b"] and lt.active_adapters(model) == ["b"]
    assert layer.get_adapter("b").factor_rank == 6  # one set of factors for both
    x = torch.randn(4, 16)
    y_b = model(x)
    lt.set_adapter(model, "default")
    y_default = model(x)
    assert not torch.allclose(y_b, y_default)
    assert layer.loldu_z["default"].requires_grad and not layer.loldu_z["b"].requires_grad
    assert len(lt.loldu_parameters(model)) == 4  # z and σ of the active adapter, two layers
    # Save and reload a named adapter into a fresh model beside another.
    lt.save_loldu(model, tmp_path / "b", adapter_name="b")
    fresh = lt.add_loldu(small_model(), ["0", "2"], rank=6, seed=1)
    lt.load_loldu(fresh, tmp_path / "b", adapter_name="b")
    assert lt.active_adapters(fresh) == ["b"]
    torch.testing.assert_close(fresh(x), y_b, rtol=0, atol=0)
    # Deleting the active adapter activates a remaining one.
    lt.delete_adapter(fresh, "b")
    assert lt.adapter_names(fresh) == ["default"] and lt.active_adapters(fresh) == ["default"]
    with pytest.raises(loldu.InvalidArgumentError, match="no LoLDU layer has adapter"):
        lt.set_adapter(fresh, "b")


def test_weighted_adapter_is_the_exact_combination():
    model = named_model()
    x = torch.randn(6, 16, dtype=torch.float32)
    layer = model[2]
    lt.add_weighted_adapter(model, ["default", "b"], [0.5, 2.0], "mix")
    c = 0.5 * lt.adapter_coefficients(layer, "default") + 2.0 * torch.nn.functional.pad(
        lt.adapter_coefficients(layer, "b"), (0, 2))
    torch.testing.assert_close(lt.adapter_coefficients(layer, "mix"), c, rtol=1e-6, atol=1e-6)
    # Its weight update is the same combination of the two updates.
    w = layer.base_layer.weight.detach().double()
    updates = {name: layer.effective_weight(name).double() - w for name in ("default", "b", "mix")}
    torch.testing.assert_close(updates["mix"], 0.5 * updates["default"] + 2.0 * updates["b"], rtol=1e-5, atol=1e-5)


def test_mixed_batch_rows_equal_each_adapter_alone():
    model = named_model()
    x = torch.randn(5, 3, 16)  # 5 samples of 3 tokens
    names = ["b", "default", "__base__", "b", "default"]

    def rows_equal_each_alone(tolerance):
        with lt.mixed_batch(model, names):
            y = model(x)
        for i, name in enumerate(names):
            if name == "__base__":
                with lt.disable_adapters(model):
                    expected = model(x[i:i + 1])
            else:
                lt.set_adapter(model, name)
                expected = model(x[i:i + 1])
            torch.testing.assert_close(y[i:i + 1], expected, **tolerance)

    rows_equal_each_alone(dict(rtol=1e-5, atol=1e-6))
    # Under autocast too (the bf16 companions of a layer's adapters share its factors).
    with torch.autocast("cpu", dtype=torch.bfloat16):
        rows_equal_each_alone(dict(rtol=2e-2, atol=2e-2))
    with pytest.raises(loldu.ShapeError, match="adapter_names has 2 entries"):
        with lt.mixed_batch(model, ["b", "b"]):
            model(x)
    with pytest.raises(loldu.InvalidArgumentError, match="no adapter 'zzz'"):
        model[0](x, adapter_names=["zzz"] * 5)


def test_two_adapters_trained_in_one_mixed_batch_match_training_apart():
    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(4))
    target = torch.randn(8, 8, generator=torch.Generator().manual_seed(5))
    names = ["default", "b"] * 4

    def run(optimizer_kind):
        model = named_model()
        lt.set_adapter(model, ["default", "b"])  # both trainable
        params = lt.loldu_parameters(model)
        opt = torch.optim.SGD(params, lr=0.01) if optimizer_kind == "torch" else None
        lt_opts = [lt.Optimizer(model, "sgd", lr=0.01, adapter_name=n) for n in ("default", "b")] if opt is None else []
        for _ in range(5):
            with lt.mixed_batch(model, names):
                loss = (model(x) - target).square().mean()
            loss.backward()
            for o in ([opt] if opt else lt_opts):
                o.step()
                o.zero_grad()
        return model

    def apart():
        out = {}
        for name, rows in (("default", slice(0, 8, 2)), ("b", slice(1, 8, 2))):
            model = named_model()
            lt.set_adapter(model, name)
            opt = torch.optim.SGD(lt.loldu_parameters(model), lr=0.01)
            for _ in range(5):
                ((model(x[rows]) - target[rows]).square().mean() * 0.5).backward()
                opt.step()
                opt.zero_grad()
            out[name] = model
        return out

    separately = apart()
    for kind in ("torch", "library"):
        together = run(kind)
        for name in ("default", "b"):
            for i in (0, 2):
                torch.testing.assert_close(together[i].loldu_z[name], separately[name][i].loldu_z[name],
                                           rtol=1e-4, atol=1e-5, msg=f"{kind} {name} layer {i}")
