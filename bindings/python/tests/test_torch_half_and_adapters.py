"""loldu.torch in half precision (bf16 and f16 models, CPU autocast) and with several named
adapters per layer (PEFT's conventions): add, load, set, delete, weighted combination, mixed
batches through any model, two adapters trained in one mixed batch."""

from __future__ import annotations

import copy
import threading

import numpy as np
import pytest
import torch
from safetensors import safe_open
from torch import nn

import loldu
import loldu.torch as lt
from loldu.adapter import AdapterConfig


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


def test_a_half_model_under_autocast_takes_float32_inputs_as_torch_layers_do():
    """Under CPU autocast nn.Linear and nn.Conv casts a float32 input to the half type; so do
    LoLDU layers of a bf16 or f16 model (outside autocast, such an input is refused)."""
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Conv1d(3, 16, 1), nn.Flatten(1), nn.Linear(16 * 4, 8)).to(torch.bfloat16)
    model = lt.add_loldu(copy.deepcopy(plain), ["0", "2"], rank=3)
    x = torch.randn(2, 3, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, expected = model(x), plain(x)
    assert y.dtype == expected.dtype == torch.bfloat16
    torch.testing.assert_close(y, expected, rtol=0.02, atol=0.02)
    with pytest.raises(loldu.DTypeError, match="the input is torch.float32, the layer computes in torch.bfloat16"):
        model(x)


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
    # A combination beyond the parameter type is refused naming the layer and the weights; no layer gets it.
    with pytest.raises(loldu.NotFiniteError, match=r"the weighted sum of \['default', 'b'\] with weights \[1e\+300, 1\]"):
        lt.add_weighted_adapter(model, ["default", "b"], [1e300, 1], "huge")
    assert "huge" not in lt.adapter_names(model)


def test_several_active_adapters_add_their_updates_as_in_peft(tmp_path):
    """PEFT's layers add the updates of every active adapter; here, exactly, by adding their
    coefficient vectors on the shared factors (ranks 6 and 4). Embedding, convolution and linear
    layers alike; each adapter gets the gradient of its own update; a merged adapter still adds
    its update; merge_and_unload merges the sum; under autocast the sum computes in bf16."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Embedding(20, 16), nn.Conv1d(5, 8, 3), nn.Linear(14, 8))
    lt.add_loldu(model, ["0", "1", "2"], rank=6, seed=1)
    lt.add_loldu(model, ["0", "1", "2"], rank=4, seed=2, z_init="s_normal", residual="init", adapter_name="b")
    layers = list(lt.loldu_layers(model).values())
    with torch.no_grad():
        for layer in layers:
            layer.loldu_z["default"].mul_(1.3)
            layer.loldu_sigma["b"].fill_(0.8)
    both = ["default", "b"]
    lt.set_adapter(model, both)
    x = torch.randint(0, 20, (3, 5))
    with torch.no_grad():
        inputs = [x, model[0](x), model[1](model[0](x))]  # each layer's input in the model
        y = model(x)
    for layer, h in zip(layers, inputs):
        g = torch.randn_like(layer(h))

        def output_and_grads(names):
            lt.set_adapter(model, names)
            params = [p for name in names for p in (layer.loldu_z[name], layer.loldu_sigma[name])]
            out = layer(h)
            return out.detach(), torch.autograd.grad((out * g).sum(), params)

        summed, grads = output_and_grads(both)
        (first, grads_first), (second, grads_second) = output_and_grads(["default"]), output_and_grads(["b"])
        with lt.disable_adapters(model), torch.no_grad():
            plain = layer(h)
        # The output (and weight) with both: each one's update added to the base.
        torch.testing.assert_close(summed, first + second - plain, rtol=1e-5, atol=1e-5)
        w = layer.base_layer.weight.detach()
        lt.set_adapter(model, both)
        torch.testing.assert_close(layer.effective_weight(),
                                   layer.effective_weight("default") + layer.effective_weight("b") - w,
                                   rtol=1e-5, atol=1e-6)
        assert not torch.allclose(summed, first, atol=1e-3) and not torch.allclose(summed, second, atol=1e-3)
        # The loss is linear in the output: each adapter's gradient is the one it gets alone.
        for together, alone in zip(grads, grads_first + grads_second):
            torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-6)
    lt.set_adapter(model, both)
    # Gradient checkpointing, both of torch's kinds, gives the same gradients.
    linear, h = layers[2], inputs[2].clone().requires_grad_()
    wanted = [h, linear.loldu_z["default"], linear.loldu_sigma["b"]]

    def gradients(forward):
        for t in wanted:
            t.grad = None
        forward(h).square().sum().backward()  # (reentrant checkpoints take no autograd.grad)
        return [t.grad.clone() for t in wanted]

    expected = gradients(linear)
    for reentrant in (True, False):
        got = gradients(lambda h: torch.utils.checkpoint.checkpoint(linear, h, use_reentrant=reentrant))
        for g, want in zip(got, expected):
            torch.testing.assert_close(g, want, rtol=1e-6, atol=1e-6)
    model.zero_grad(set_to_none=True)
    # export_merged writes the weights the model computes with: the sum; the calls that take
    # one adapter ask which.
    lt.export_merged(model, tmp_path / "merged.safetensors")
    with safe_open(str(tmp_path / "merged.safetensors"), "pt") as f:
        for name, layer in lt.loldu_layers(model).items():
            torch.testing.assert_close(f.get_tensor(f"{name}.weight").reshape(layer.base_layer.weight.shape),
                                       layer.effective_weight(), rtol=0, atol=0)
    for call in (lambda: lt.save_loldu(model, tmp_path / "ckpt"), lambda: lt.export_lora(model, tmp_path / "lora"),
                 lambda: lt.loldu_state_dict(model)):
        with pytest.raises(loldu.StateError, match=r"2 active adapters \['default', 'b'\]; name the one to use"):
            call()
    assert not (tmp_path / "ckpt").exists() and not (tmp_path / "lora").exists()
    lt.save_loldu(model, tmp_path / "ckpt", adapter_name="b")
    # A backward computes with the sum its forward had, whatever forwards ran in between (here
    # one with other values of z swapped in for the call).
    linear, h = layers[2], inputs[2].clone().requires_grad_()
    out = linear(h)
    g = torch.randn_like(out)
    (expected,) = torch.autograd.grad((linear(h) * g).sum(), h)
    other = {f"loldu_z.{name}": 2 * linear.loldu_z[name].detach() for name in both}
    assert not torch.allclose(torch.func.functional_call(linear, other, (h,)), out)
    (dx,) = torch.autograd.grad((out * g).sum(), h)
    torch.testing.assert_close(dx, expected, rtol=1e-6, atol=1e-6)
    # Both train with torch.optim.
    before = [p.detach().clone() for p in lt.loldu_parameters(model)]
    assert len(before) == 12
    optimizer = torch.optim.SGD(lt.loldu_parameters(model), lr=0.1)
    model(x).square().mean().backward()
    optimizer.step()
    assert all(not torch.equal(b, p) for b, p in zip(before, lt.loldu_parameters(model)))
    optimizer.zero_grad(set_to_none=True)
    with torch.no_grad():
        for p, b in zip(lt.loldu_parameters(model), before):
            p.copy_(b)
    # And with lt.Optimizer, which takes every active adapter by default.
    library = lt.Optimizer(model, "sgd", lr=0.1)
    assert library.entries == [(layer, name) for layer in layers for name in both] and library.layers == layers
    model(x).square().mean().backward()
    library.step()
    assert all(not torch.equal(b, p) for b, p in zip(before, lt.loldu_parameters(model)))
    library.zero_grad()
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        for p, b in zip(lt.loldu_parameters(model), before):
            p.copy_(b)
    # A merged adapter (merged while it was the only active one) still adds its update, frozen.
    lt.set_adapter(model, "default")
    lt.merge_loldu(model)
    lt.set_adapter(model, both)
    out = model(x)
    torch.testing.assert_close(out.detach(), y, rtol=1e-5, atol=1e-5)
    out.square().sum().backward()
    assert layers[2].loldu_z["default"].grad is None and layers[2].loldu_z["b"].grad is not None
    with pytest.raises(loldu.StateError, match=r"2 active adapters .*merge_and_unload"):
        lt.merge_loldu(model)
    lt.unmerge_loldu(model)
    # Under bf16 autocast (the linear layer), to bf16's rounding.
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        torch.testing.assert_close(model[2](inputs[2]).float(), y, rtol=0.05, atol=0.05)
    # merge_and_unload merges the sum into plain layers.
    plain = lt.merge_and_unload(model)
    assert not lt.loldu_layers(plain)
    torch.testing.assert_close(plain(x), y, rtol=1e-5, atol=1e-5)


def assert_rows_equal_each_alone(model, x, names, **tolerance):
    """Sample i of a mixed batch is what the model computes for it with adapter names[i] set
    (``"__base__"``: the adapters disabled)."""
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


def test_an_adapter_on_some_layers_is_active_everywhere_and_computes_the_base_where_missing():
    """PEFT: set_adapter sets every layer's active list; a layer without the adapter skips it
    (LoraLayer.forward) and computes its base layer, in mixed batches too (_mixed_batch_forward)."""
    model = lt.add_loldu(small_model(), ["0", "2"], rank=6, seed=1)
    lt.add_loldu(model, ["2"], rank=4, z_init="s_normal", residual="init", adapter_name="b", mark_trainable=False)
    with torch.no_grad():
        model[2].loldu_z["b"].mul_(0.7)
        model[0].loldu_z["default"].mul_(1.3)
    x = torch.randn(5, 16)
    lt.set_adapter(model, "b")
    assert lt.active_adapters(model) == ["b"]
    assert [layer.active_adapters for layer in lt.loldu_layers(model).values()] == [["b"], ["b"]]
    with torch.no_grad():  # layer 0: its pretrained module, not its "default"
        torch.testing.assert_close(model(x), model[2](model[1](model[0].base_layer(x))), rtol=0, atol=0)
    assert not model[0].loldu_z["default"].requires_grad and not model[0].merged
    assert lt.loldu_parameters(model) == [model[2].loldu_z["b"], model[2].loldu_sigma["b"]]
    assert lt.Optimizer(model, "sgd", lr=0.1).layers == [model[2]]
    lt.merge_loldu(model)  # (layer 0 has nothing to merge)
    lt.unmerge_loldu(model)
    assert_rows_equal_each_alone(model, x, ["b", "default", "__base__", "b", "default"], rtol=1e-5, atol=1e-6)
    with lt.mixed_batch(model, ["b"] * 5), torch.no_grad():
        torch.testing.assert_close(model(x), model[2](model[1](model[0].base_layer(x))), rtol=1e-6, atol=1e-6)
    # A name on no layer is refused, as PEFT's "Adapter ... not found", and nothing changes.
    for names in ("zzz", ["b", "zzz"]):
        with pytest.raises(loldu.InvalidArgumentError, match="adapter_name: no LoLDU layer has adapter 'zzz'"):
            lt.set_adapter(model, names)
    assert lt.active_adapters(model) == ["default"]  # (the last set_adapter above)
    # Deleting the active adapter activates the model's first remaining one on every layer alike.
    lt.set_adapter(model, "b")
    lt.delete_adapter(model, "b")
    assert [layer.active_adapters for layer in lt.loldu_layers(model).values()] == [["default"], ["default"]]


def test_only_active_adapters_train_however_added_or_loaded(tmp_path):
    """As PEFT's update_layer and load_adapter: an adapter added or loaded without being made
    active computes nothing and trains nothing, whether its layer is new or not; a replaced
    adapter's σ trains only if its new configuration says so."""
    model = lt.add_loldu(small_model(), ["0"], rank=4)
    layer = model[0]
    layer.update_layer("extra", AdapterConfig(rank=3))
    assert layer.active_adapters == ["default"]
    assert [n for n, p in lt.named_loldu_parameters(model) if p.requires_grad] == ["0.loldu_z.default",
                                                                                  "0.loldu_sigma.default"]
    layer.update_layer("default", AdapterConfig(rank=4, train_sigma=False))
    assert layer.loldu_z["default"].requires_grad and not layer.loldu_sigma["default"].requires_grad

    saved = lt.add_loldu(small_model(), ["0", "2"], rank=4, seed=3, adapter_name="b")
    with torch.no_grad():
        for i in (0, 2):
            saved[i].loldu_z["b"].mul_(1.5)
    lt.save_loldu(saved, tmp_path / "b", adapter_name="b")
    model = lt.add_loldu(small_model(), ["0"], rank=4)
    x = torch.randn(3, 16)
    with torch.no_grad():
        before = model(x)
    lt.load_loldu(model, tmp_path / "b", adapter_name="b", mark_trainable=False)  # layer 2 is wrapped anew
    assert [layer.active_adapters for layer in lt.loldu_layers(model).values()] == [["default"], ["default"]]
    assert [n for n, p in lt.named_loldu_parameters(model) if p.requires_grad] == ["0.loldu_z.default",
                                                                                  "0.loldu_sigma.default"]
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, rtol=0, atol=0)
        lt.set_adapter(model, "b")
        torch.testing.assert_close(model(x), saved(x), rtol=1e-6, atol=1e-6)


def test_an_empty_mixed_batch_gives_an_empty_output_on_every_layer_kind():
    model = nn.Sequential(nn.Embedding(20, 16), nn.Conv1d(5, 8, 3, padding=1), nn.Linear(16, 8))
    lt.add_loldu(model, ["0", "1", "2"], rank=4)
    with lt.mixed_batch(model, []):
        assert model(torch.zeros(0, 5, dtype=torch.long)).shape == (0, 8, 8)
        assert model[1](torch.randn(0, 5, 16)).shape == (0, 8, 16)


def test_weighted_adapter_of_small_weights_keeps_full_precision(tmp_path):
    """The combined adapter stores c itself (z_init "zeros", residual "init", σ = 1), not
    c + D_r, from which c would come back with D_r's rounding error (1e-4 relative here)."""
    model = named_model()
    weights = [0.01, -0.02]
    lt.add_weighted_adapter(model, ["default", "b"], weights, "mix")
    for layer in (model[0], model[2]):
        c = sum(w * torch.nn.functional.pad(lt.adapter_coefficients(layer, name), (0, 6 - layer.get_adapter(name).rank))
                for name, w in zip(["default", "b"], weights))
        torch.testing.assert_close(lt.adapter_coefficients(layer, "mix"), c, rtol=1e-7, atol=0)
        config = layer.loldu_config["mix"]
        assert (config.z_init, config.residual, layer.get_adapter("mix").sigma) == ("zeros", "init", 1.0)
        # Its output is the pretrained output plus the same combination of the adapters' deltas.
        x = torch.randn(6, layer.in_features)
        with torch.no_grad():
            y = {name: layer(x, adapter_names=[name] * 6).double() for name in ("__base__", "default", "b", "mix")}
        delta = sum(w * (y[name] - y["__base__"]) for name, w in zip(["default", "b"], weights))
        torch.testing.assert_close(y["mix"] - y["__base__"], delta, rtol=0, atol=1e-6 * y["__base__"].abs().max().item())
    # Saved and loaded as any adapter: the same values into a fresh model.
    lt.save_loldu(model, tmp_path / "mix", adapter_name="mix")
    fresh = lt.add_loldu(small_model(), ["0", "2"], rank=6, seed=1)
    lt.load_loldu(fresh, tmp_path / "mix", adapter_name="mix")
    lt.set_adapter(model, "mix")
    for i in (0, 2):
        torch.testing.assert_close(fresh[i].loldu_z["mix"], model[i].loldu_z["mix"], rtol=0, atol=0)
    x = torch.randn(6, 16)
    torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)


def test_mixed_batch_rows_equal_each_adapter_alone():
    model = named_model()
    x = torch.randn(5, 3, 16)  # 5 samples of 3 tokens
    names = ["b", "default", "__base__", "b", "default"]
    assert_rows_equal_each_alone(model, x, names, rtol=1e-5, atol=1e-6)
    # Under autocast too (the bf16 companions of a layer's adapters share its factors).
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert_rows_equal_each_alone(model, x, names, rtol=2e-2, atol=2e-2)
    with pytest.raises(loldu.ShapeError, match="adapter_names has 2 entries"):
        with lt.mixed_batch(model, ["b", "b"]):
            model(x)
    # A name on no layer is refused by the model-level call (PEFT: "non-existing adapter"); a
    # layer alone cannot tell, and gives such rows its base output, as PEFT's layers do.
    with pytest.raises(loldu.InvalidArgumentError, match="adapter_names: no LoLDU layer has adapter 'zzz'"):
        with lt.mixed_batch(model, ["b", "zzz", "b", "b", "b"]):
            model(x)
    with lt.disable_adapters(model):
        torch.testing.assert_close(model[0](x, adapter_names=["zzz"] * 5), model[0](x))


def test_mixed_batch_blocks_in_threads_do_not_see_each_other():
    """Threads serving different mixed batches through one model (a block was model state: a
    thread's forward ran with another's names, giving a ShapeError or another adapter's rows)."""
    model = named_model()
    batches = [(torch.randn(k + 2, 16), [["b", "default", "__base__"][(k + j) % 3] for j in range(k + 2)])
               for k in range(4)]
    with torch.no_grad():
        expected = []
        for x, names in batches:
            with lt.mixed_batch(model, names):
                expected.append(model(x))
    inside, outcomes = threading.Barrier(len(batches)), [None] * len(batches)

    def serve(k):
        x, names = batches[k]
        try:
            with torch.no_grad(), lt.mixed_batch(model, names):
                inside.wait()  # every thread's block is open before any forward
                outcomes[k] = model(x)
        except Exception as error:  # (reported below)
            outcomes[k] = error

    threads = [threading.Thread(target=serve, args=(k,)) for k in range(len(batches))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for got, want in zip(outcomes, expected):
        assert isinstance(got, torch.Tensor), got
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("reentrant", [False, True])
def test_a_checkpointed_mixed_batch_gets_the_gradients_of_the_plain_one(reentrant):
    """Gradient checkpointing recomputes the forward during backward: with backward inside the
    block (as documented) it sees the same rows, and every adapter gets its rows' gradients."""
    x = torch.randn(6, 16)
    names = ["b", "default", "__base__", "b", "default", "b"]

    def gradients(checkpointed):
        model = named_model()
        for p in lt.loldu_parameters(model, trainable_only=False):
            p.requires_grad_(True)
        inputs = x.clone().requires_grad_(True)
        with lt.mixed_batch(model, names):
            if checkpointed:
                y = torch.utils.checkpoint.checkpoint(model, inputs, use_reentrant=reentrant)
            else:
                y = model(inputs)
            y.square().sum().backward()
        return [inputs.grad] + [p.grad for _, p in lt.named_loldu_parameters(model)]

    plain, checkpointed = gradients(False), gradients(True)
    assert all(g is not None and g.abs().max() > 0 for g in plain)
    for a, b in zip(plain, checkpointed):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)


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


@pytest.mark.parametrize("setting", ["bfloat16 model", "float32 model under autocast"])
def test_the_library_optimizer_trains_half_precision_as_torch_adamw(setting):
    """lt.Optimizer and torch.optim.AdamW, the same settings, the same half-precision steps: the
    same z and σ (the gradients are float32 in both; only the update's arithmetic differs)."""
    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(7))
    target = torch.randn(8, 8, generator=torch.Generator().manual_seed(8))
    options = dict(lr=5e-2, betas=(0.9, 0.99), eps=1e-7, weight_decay=0.1)
    autocast = setting.endswith("autocast")

    def train(library: bool):
        model = lt.add_loldu(small_model(torch.float32 if autocast else torch.bfloat16), ["0", "2"], rank=6)
        if library:  # (σ's weight decay is its own option in the library, AdamW's for every parameter in torch)
            optimizer = lt.Optimizer(model, "adamw", weight_decay_sigma=options["weight_decay"], **options)
        else:
            optimizer = torch.optim.AdamW(lt.loldu_parameters(model), **options)
        losses = []
        for _ in range(10):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                y = model(x if autocast else x.bfloat16())
            assert y.dtype == torch.bfloat16
            loss = (y.float() - target).square().mean()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
        return model, losses

    (ours, our_losses), (theirs, their_losses) = train(True), train(False)
    assert our_losses[-1] < 0.9 * our_losses[0]
    np.testing.assert_allclose(our_losses, their_losses, rtol=1e-4)
    for i in (0, 2):
        for params in ("loldu_z", "loldu_sigma"):
            mine, reference = getattr(ours[i], params)["default"], getattr(theirs[i], params)["default"]
            assert mine.dtype == torch.float32
            torch.testing.assert_close(mine, reference, rtol=1e-5, atol=1e-6, msg=f"layer {i} {params}")


def test_a_transformers_model_loaded_in_bf16_trains_with_loldu():
    from transformers import AutoModel

    from conftest import minilm_dir

    model = AutoModel.from_pretrained(str(minilm_dir()), torch_dtype=torch.bfloat16).eval()
    reference = copy.deepcopy(model)
    lt.add_loldu(model, ["query", "value"], rank=8)
    layer = model.encoder.layer[0].attention.self.query
    assert layer.dtype == torch.bfloat16 and layer.adapter.dtype == loldu.bfloat16
    tokens = torch.randint(1000, 30000, (2, 12), generator=torch.Generator().manual_seed(9))
    hidden = model(input_ids=tokens).last_hidden_state
    assert hidden.dtype == torch.bfloat16
    with torch.no_grad():  # at initialisation, the pretrained model to bf16 rounding (through 6 layers)
        expected = reference(input_ids=tokens).last_hidden_state.float()
    assert float((hidden.detach().float() - expected).norm() / expected.norm()) < 2e-2
    hidden.float().square().mean().backward()
    grads = [p.grad for p in lt.loldu_parameters(model)]
    assert len(grads) == 6 * 2 * 2  # z and σ of query and value in 6 layers
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
    assert all(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_effective_weight_and_weight_gradient_in_half_precision_match_float32(dtype):
    """A half-precision embedding and its float32 copy (the same rounded values): W_eff is the
    float32 one rounded once, and the gradient through the weight (loldu_weight_backward, the
    numpy API's Adapter.weight_backward) is float32's, to float32 rounding, from the same dW."""
    torch.manual_seed(6)
    half = nn.Embedding(40, 24).to(dtype)
    wide = copy.deepcopy(half).float()
    layers = {}
    for name, module in (("half", half), ("float32", wide)):
        layers[name] = lt.LoLDUEmbedding(module, rank=8, z_init="s_normal", residual="init", seed=3)
        with torch.no_grad():
            layers[name].loldu_z["default"].mul_(torch.linspace(0.5, 1.5, 8))
    w_half, w32 = layers["half"].effective_weight(), layers["float32"].effective_weight()
    assert w_half.dtype == dtype and w32.dtype == torch.float32
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(w_half.float(), w32, rtol=eps, atol=eps * w32.abs().max().item())
    # Distinct indices: the embedding's dW is the upstream gradient itself, the same rounded values.
    indices = torch.randperm(40, generator=torch.Generator().manual_seed(1))[:30].view(5, 6)
    upstream = torch.randn(5, 6, 24).to(dtype)
    layers["half"](indices).backward(upstream)
    layers["float32"](indices).backward(upstream.float())
    for params in ("loldu_z", "loldu_sigma"):
        mine, reference = getattr(layers["half"], params)["default"].grad, getattr(layers["float32"], params)["default"].grad
        assert mine.dtype == torch.float32
        torch.testing.assert_close(mine, reference, rtol=1e-5, atol=1e-6 * reference.abs().max().item(), msg=params)


def test_a_float32_checkpoint_on_a_bf16_copy_is_another_weight_unless_exactly_representable(tmp_path):
    """loldu_checkpoint_apply: the base weight's fingerprint (of its values) must be the saved
    one. A float32 weight rounded to bf16 is another weight (MismatchError, the model unchanged);
    float32 weights that bf16 represents exactly, and a bf16 checkpoint on the float32 copy, load."""
    def trained(model):
        lt.add_loldu(model, ["0", "2"], rank=6)
        with torch.no_grad():
            model[2].loldu_z["default"].add_(0.25)
        return model

    model = trained(small_model())
    lt.save_loldu(model, tmp_path / "float32")
    rounded = small_model().to(torch.bfloat16)
    with pytest.raises(loldu.MismatchError, match="base weight differs .* saved on a float32 weight and this one is bfloat16"):
        lt.load_loldu(rounded, tmp_path / "float32")
    assert not lt.loldu_layers(rounded)

    x = torch.randn(3, 16)
    for saved, loaded in ((torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32)):
        source = trained(small_model().to(torch.bfloat16).to(saved))  # weights bf16 represents exactly
        lt.save_loldu(source, tmp_path / str(saved))
        target = lt.load_loldu(small_model().to(torch.bfloat16).to(loaded), tmp_path / str(saved))
        for i in (0, 2):
            assert torch.equal(target[i].loldu_z["default"], source[i].loldu_z["default"])
        torch.testing.assert_close(target(x.to(loaded)).float(), source(x.to(saved)).float(), rtol=0.03, atol=0.03)


def adapter_state(model) -> dict:
    return {name: (list(layer.loldu_config), list(layer.active_adapters), dict(layer.loldu_z.items()))
            for name, layer in lt.loldu_layers(model).items()}


def test_adapter_names_the_layers_cannot_hold_are_refused_before_any_layer_changes(tmp_path):
    """The adapters' parameters live in nn.ParameterDicts, which store entries as attributes: a
    name such as "copy" or "keys" used to fail after the first layer had half of the adapter,
    and "training" silently replaced the dict's attribute. Every entry point refuses such names
    with the argument named, leaving the model as it was; other strings work."""
    model = named_model()
    lt.save_loldu(model, tmp_path / "b", adapter_name="b")
    x = torch.randn(3, 16)
    y, before = model(x), adapter_state(model)
    for name in ("copy", "keys", "items", "update", "pop", "to", "train", "training", "a.b", "", "__base__", 3):
        with pytest.raises(loldu.InvalidArgumentError, match=r"^adapter_name must be a non-empty string without "
                                                             r"'\.', other than '__base__' and the attributes"):
            lt.add_loldu(model, ["0", "2"], rank=4, adapter_name=name, mark_trainable=False)
        with pytest.raises(loldu.InvalidArgumentError, match="^adapter_name must be"):
            lt.load_loldu(model, tmp_path / "b", adapter_name=name)
        with pytest.raises(loldu.InvalidArgumentError, match="^adapter_name must be"):
            lt.add_weighted_adapter(model, ["b"], [1.0], name)
        with pytest.raises(loldu.InvalidArgumentError, match="^adapter_name must be"):
            lt.LoLDULinear(nn.Linear(4, 4), rank=2, adapter_name=name)
        assert adapter_state(model) == before
        torch.testing.assert_close(model(x), y)
    for name in ("weight", "b-2", "copy_of_b", "ÿ"):  # what the containers hold
        lt.load_loldu(model, tmp_path / "b", adapter_name=name)
        torch.testing.assert_close(model(x), y)
    assert model[0].loldu_z.training is True and lt.adapter_names(model) == ["default", "b", "weight", "b-2",
                                                                              "copy_of_b", "ÿ"]


def test_a_failed_dtype_change_leaves_the_layer_as_it_was_and_working():
    """model.half() with a weight beyond float16's range: the layer that cannot be factored in
    float16 says so and stays a float32 layer that computes, trains and refactors as before
    (its parameters, gradients and adapters put back). torch converts modules one at a time, so
    those before it were converted; model.float() brings them back."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    with torch.no_grad():
        model[1].weight[0, 0] = 1e5
    lt.add_loldu(model, ["0", "1"], rank=4)
    layer = model[1]
    with torch.no_grad():
        layer.loldu_z["default"].add_(0.25)
    h = torch.randn(3, 8)
    expected = layer(h).detach()
    layer(h).sum().backward()
    z, grad = layer.loldu_z["default"], layer.loldu_z["default"].grad.clone()
    adapter = layer.adapter
    with pytest.raises(loldu.NotFiniteError, match=r"^1: cannot convert the layer to torch.float16 \(weight\[0, 0\] is "
                                                   r"inf.*\); it is left as it was, in torch.float32"):
        model.half()
    assert model[0].dtype == torch.float16  # converted before layer 1 was reached
    assert layer.dtype == torch.float32 and layer.base_layer.bias.dtype == torch.float32
    assert layer.adapter is adapter and layer.loldu_z["default"] is z and z.dtype == torch.float32
    assert z.data_ptr() == adapter._params_ptr and torch.equal(z.grad, grad)
    torch.testing.assert_close(layer(h), expected)
    layer(h).sum().backward()
    torch.testing.assert_close(z.grad, 2 * grad)
    layer.refactor()
    model.float()
    torch.testing.assert_close(layer(h), expected)
    # A conversion that works keeps each adapter's merged state, as refactoring does.
    lt.merge_loldu(model)
    model.double()
    assert layer.merged and layer.get_adapter("default").dtype == np.float64
    torch.testing.assert_close(layer(h.double()).float(), expected, rtol=1e-5, atol=1e-5)
