"""loldu.torch layers: forward and every gradient against a plain-PyTorch implementation of the
same formulas on all-MiniLM-L6-v2's real weights, gradcheck in float64, zero-copy parameters,
torch.optim and the library's optimiser, conversions, and the exceptions for bad inputs."""

from __future__ import annotations

import copy
import gc
import io
import re
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import loldu
import loldu.torch as lt
from loldu import AdapterConfig
from conftest import run_python
from reference import ldu_factors, torch_linear, torch_weight

LINEARS = [
    "encoder.layer.0.attention.self.query",  # 384 × 384
    "encoder.layer.1.intermediate.dense",  # 1536 × 384
    "encoder.layer.2.output.dense",  # 384 × 1536
]


def linear_from(minilm, name, dtype=torch.float32) -> nn.Linear:
    w = torch.from_numpy(minilm[f"{name}.weight"].copy()).to(dtype)
    layer = nn.Linear(w.shape[1], w.shape[0], dtype=dtype)
    with torch.no_grad():
        layer.weight.copy_(w)
        layer.bias.copy_(torch.from_numpy(minilm[f"{name}.bias"].copy()))
    return layer


def reference_parts(layer: lt.LoLDULayer, weight: torch.Tensor, z_ref_kind: str, z0):
    """Factors from scipy (float64) and the reference z_ref, as float64 tensors."""
    a, d, u = ldu_factors(weight.detach().reshape(weight.shape[0], -1).double().numpy(), layer.rank)
    z_ref = d if z_ref_kind == "pivots" else np.asarray(z0, np.float64)
    return torch.from_numpy(a), torch.from_numpy(u), torch.from_numpy(z_ref)


@pytest.mark.parametrize("residual, z_init", [("pivots", "lu"), ("init", "s_normal")])
@pytest.mark.parametrize("name", LINEARS)
def test_linear_forward_and_gradients_match_plain_torch(minilm, name, residual, z_init):
    torch.manual_seed(0)
    base = linear_from(minilm, name)
    sigma0 = 48 / 32
    layer = lt.LoLDULinear(base, rank=32, alpha=48, z_init=z_init, residual=residual, seed=1, name=name)
    base.bias.requires_grad_(True)
    z0 = layer.loldu_z["default"].detach().clone()
    a, u, z_ref = reference_parts(layer, base.weight, residual, z0)
    with torch.no_grad():  # move away from initialisation through the shared parameters
        layer.loldu_z["default"].mul_(torch.linspace(0.6, 1.4, 32))
        layer.loldu_sigma["default"].fill_(1.3)
    np.testing.assert_array_equal(layer.adapter.z, layer.loldu_z["default"].detach().numpy())
    assert layer.adapter.sigma == pytest.approx(1.3)

    x = torch.randn(4, 9, base.in_features, requires_grad=True)
    probe = torch.randn(4, 9, base.out_features)
    y = layer(x)
    (y * probe).sum().backward()

    # the same formulas in plain PyTorch, float64, autograd for the gradients
    z = layer.loldu_z["default"].detach().double().clone().requires_grad_(True)
    sigma = layer.loldu_sigma["default"].detach().double().clone().requires_grad_(True)
    bias = base.bias.detach().double().clone().requires_grad_(True)
    xr = x.detach().double().clone().requires_grad_(True)
    yr = torch_linear(xr, base.weight.detach().double(), bias, a, u, z_ref, sigma0, z, sigma)
    (yr * probe.double()).sum().backward()

    def close(actual, expected, rel):
        scale = expected.abs().max().item()
        torch.testing.assert_close(actual.double(), expected, rtol=0, atol=rel * scale)

    assert y.shape == (4, 9, base.out_features) and y.dtype == torch.float32
    close(y, yr, 3e-5)
    close(x.grad, xr.grad, 3e-5)
    close(layer.loldu_z["default"].grad, z.grad, 3e-4)
    close(layer.loldu_sigma["default"].grad, sigma.grad, 3e-4)
    close(base.bias.grad, bias.grad, 1e-5)
    assert base.weight.grad is None and not base.weight.requires_grad


@pytest.mark.parametrize("path", ["auto", "factored", "merged", "merged_wgrad"])
def test_gradcheck_linear_float64(path):
    torch.manual_seed(1)
    layer = lt.LoLDULinear(nn.Linear(6, 7, dtype=torch.float64), rank=4, z_init="s_normal", residual="init")
    layer.adapter.path = path
    x = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, z, s: layer(x), (x, layer.loldu_z["default"], layer.loldu_sigma["default"]))
    x3 = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, z, s: layer(x), (x3, layer.loldu_z["default"], layer.loldu_sigma["default"]))
    square = lt.LoLDULinear(nn.Linear(6, 6, dtype=torch.float64), rank=3, z_init="s_normal", residual="init")
    square.adapter.path = path
    # the same layer twice in one graph: both calls' dz accumulate in loldu_z.grad
    assert torch.autograd.gradcheck(lambda x, z, s: square(torch.tanh(square(x))), (x, square.loldu_z["default"], square.loldu_sigma["default"]))
    with torch.inference_mode():
        assert layer(x).shape == (5, 7)


@pytest.mark.parametrize("groups", [1, 2])
def test_gradcheck_conv2d_float64(groups):
    torch.manual_seed(2)
    conv = nn.Conv2d(4, 6, 3, padding=1, groups=groups, dtype=torch.float64)
    layer = lt.LoLDUConv(conv, rank=5, z_init="s_uniform", residual="init")
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, z, s: layer(x), (x, layer.loldu_z["default"], layer.loldu_sigma["default"]))


def test_gradcheck_embedding_float64():
    torch.manual_seed(3)
    emb = nn.Embedding(12, 5, padding_idx=0, dtype=torch.float64)
    layer = lt.LoLDUEmbedding(emb, rank=4, z_init="s_normal", residual="init")
    idx = torch.tensor([[1, 3, 3, 0], [11, 2, 5, 3]])
    assert torch.autograd.gradcheck(lambda z, s: layer(idx), (layer.loldu_z["default"], layer.loldu_sigma["default"]))


def test_conv2d_and_embedding_on_real_weights_match_plain_torch(minilm):
    torch.manual_seed(4)
    w = torch.from_numpy(minilm["encoder.layer.3.attention.self.value.weight"].copy()).reshape(384, 24, 4, 4)
    conv = nn.Conv2d(24, 384, 4, stride=2)
    with torch.no_grad():
        conv.weight.copy_(w)
    emb = nn.Embedding(512, 384)
    with torch.no_grad():
        emb.weight.copy_(torch.from_numpy(minilm["embeddings.position_embeddings.weight"].copy()))
    for base, make_input in ((conv, lambda: torch.randn(2, 24, 10, 10)),
                             (emb, lambda: torch.randint(0, 512, (3, 17)))):
        layer = lt.add_loldu(nn.Sequential(base), ["0"], rank=24, alpha=12)[0]
        with torch.no_grad():
            layer.loldu_z["default"].mul_(torch.linspace(0.5, 1.5, 24))
            layer.loldu_sigma["default"].fill_(0.7)
        a, u, z_ref = reference_parts(layer, base.weight, "pivots", None)
        x = make_input()
        out = layer(x)
        probe = torch.randn_like(out)
        (out * probe).sum().backward()
        z = layer.loldu_z["default"].detach().double().clone().requires_grad_(True)
        s = layer.loldu_sigma["default"].detach().double().clone().requires_grad_(True)
        w_ref = torch_weight(base.weight.detach().double().reshape(a.shape[0], -1), a, u, z_ref, 0.5, z, s)
        if isinstance(base, nn.Conv2d):
            ref = nn.functional.conv2d(x.double(), w_ref.reshape(base.weight.shape), base.bias.double(), stride=2)
        else:
            ref = nn.functional.embedding(x, w_ref)
        (ref * probe.double()).sum().backward()
        torch.testing.assert_close(out.double(), ref, rtol=0, atol=3e-5 * ref.abs().max().item())
        torch.testing.assert_close(layer.loldu_z["default"].grad.double(), z.grad, rtol=0, atol=3e-4 * z.grad.abs().max().item())
        torch.testing.assert_close(layer.loldu_sigma["default"].grad.double(), s.grad, rtol=1e-3, atol=0)
        torch.testing.assert_close(layer.effective_weight().double(), w_ref.reshape(base.weight.shape).detach(),
                                   rtol=0, atol=3e-5 * w_ref.abs().max().item())


def test_parameters_share_memory_with_the_library():
    layer = lt.LoLDULinear(nn.Linear(10, 8), rank=5)
    a = layer.adapter
    assert layer.loldu_z["default"].data_ptr() == a._params_ptr
    assert layer.loldu_sigma["default"].data_ptr() == a._params_ptr + 5 * 4
    assert isinstance(layer.loldu_z["default"], nn.Parameter) and layer.loldu_z["default"].shape == (5,) and layer.loldu_sigma["default"].shape == (1,)
    with torch.no_grad():
        layer.loldu_z["default"][2] = 7.0
    assert a.z[2] == 7.0 and a.get_z()[2] == 7.0
    a.z[3] = -1.0
    assert layer.loldu_z["default"][3].item() == -1.0
    a.sigma = 0.25
    assert layer.loldu_sigma["default"].item() == 0.25
    frozen = lt.LoLDULinear(nn.Linear(10, 8), rank=5, train_sigma=False)
    assert frozen.loldu_z["default"].requires_grad and not frozen.loldu_sigma["default"].requires_grad
    assert dict(layer.named_parameters()).keys() == {"loldu_z.default", "loldu_sigma.default", "base_layer.weight",
                                                     "base_layer.bias"}
    assert lt.Optimizer([layer, frozen, layer]).layers == [layer, frozen]  # each layer updated once


def test_torch_optim_and_the_library_optimiser_train_the_same(minilm):
    torch.manual_seed(5)

    def model():
        m = nn.Sequential(linear_from(minilm, LINEARS[1]), nn.GELU(), linear_from(minilm, LINEARS[2]))
        return lt.add_loldu(m, r"[02]", rank=16, z_init="s_normal", residual="init")

    with_torch, with_library = model(), model()
    opt_torch = torch.optim.AdamW(lt.loldu_parameters(with_torch), lr=0.01, weight_decay=0.1, foreach=False)
    opt_library = lt.Optimizer(with_library, "adamw", lr=0.01, weight_decay=0.1, weight_decay_sigma=0.1)
    data = [torch.randn(2, 8, 384) for _ in range(8)]
    for step in range(4):
        for m, opt in ((with_torch, opt_torch), (with_library, opt_library)):
            for micro in data[2 * step: 2 * step + 2]:  # gradient accumulation over two micro-batches
                m(micro).square().mean().backward()
            opt.step()
            opt.zero_grad()
    assert opt_library.steps == 4
    for a, b in zip(lt.loldu_parameters(with_torch), lt.loldu_parameters(with_library)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    moved = (with_library[0].loldu_z["default"] - model()[0].loldu_z["default"]).abs().max()
    assert moved > 1e-2
    for layer in lt.loldu_layers(with_library).values():  # .grad is the library's buffer, cleared
        grad = layer.loldu_z["default"].grad
        assert not layer.adapter.grad.any() and not grad.any()
        assert grad.data_ptr() == layer.adapter._gradient_pointers()[0]


def test_the_library_optimiser_resumes_from_its_state_dict_through_torch_save(tmp_path):
    """torch's checkpoint idiom: model and optimiser state_dicts in one torch.save file, loaded
    into fresh objects, train on as if never stopped (no state_dict before)."""
    torch.manual_seed(7)
    data = [torch.randn(5, 12) for _ in range(6)]

    def train(m, opt, batches):
        for x in batches:
            m(x).square().mean().backward()
            opt.step()
            opt.zero_grad()

    def fresh():
        m = lt.add_loldu(nn.Sequential(nn.Linear(12, 9), nn.Tanh(), nn.Linear(9, 4)), ["0", "2"], rank=4)
        return m, lt.Optimizer(m, "adamw", lr=0.05, schedule="linear", warmup_steps=2, total_steps=6)

    torch.manual_seed(8)
    straight, opt = fresh()
    train(straight, opt, data)
    torch.manual_seed(8)
    first, opt = fresh()
    train(first, opt, data[:3])
    torch.save({"model": first.state_dict(), "optimizer": opt.state_dict()}, tmp_path / "checkpoint.pt")
    saved = torch.load(tmp_path / "checkpoint.pt")
    torch.manual_seed(8)  # (the same pretrained base; z as initialised, replaced by the load)
    resumed, opt = fresh()
    resumed.load_state_dict(saved["model"])
    opt.load_state_dict(saved["optimizer"])
    assert opt.steps == 3
    train(resumed, opt, data[3:])
    for a, b in zip(straight.state_dict().values(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(loldu.InvalidArgumentError, match=r"state_dict must be what loldu.torch.Optimizer.state_dict\(\) "
                                                         r"returns.*keys \['param_groups', 'state'\]"):
        opt.load_state_dict(torch.optim.SGD(resumed.parameters(), lr=0.1).state_dict())
    other = lt.Optimizer(resumed, "sgd", lr=0.05)
    with pytest.raises(loldu.MismatchError):
        other.load_state_dict(saved["optimizer"])
    assert other.steps == 0


@pytest.mark.filterwarnings("ignore::loldu.LoLDUWarning")  # a non-lu init on purpose
def test_disabled_and_merged_layers():
    torch.manual_seed(6)
    base = nn.Linear(12, 9)
    layer = lt.LoLDULinear(base, rank=6, z_init="s_normal")
    x = torch.randn(4, 12, requires_grad=True)
    adapted = layer(x).detach()
    assert not torch.allclose(adapted, base(x))
    with lt.disable_adapters(layer):
        assert not layer.enabled
        y = layer(x)
        torch.testing.assert_close(y, base(x))
        y.sum().backward()
    assert layer.enabled
    # As PEFT: an adapter that does not compute gets no gradient (None, so that an optimiser's
    # weight decay leaves it alone), while x gets its gradient.
    assert layer.loldu_z["default"].grad is None and x.grad is not None
    layer.merge()
    assert layer.merged
    y = layer(x)
    torch.testing.assert_close(y, adapted, rtol=1e-6, atol=1e-6)
    y.sum().backward()
    assert layer.loldu_z["default"].grad is None
    z = layer.loldu_z["default"].detach().clone()
    torch.optim.AdamW([layer.loldu_z["default"]], lr=0.1, weight_decay=0.1).step()
    assert torch.equal(layer.loldu_z["default"].detach(), z), "z does not move while merged"
    with pytest.raises(loldu.StateError, match="merged"):
        lt.set_loldu_state_dict(nn.Sequential(layer), {"0.loldu_z": torch.zeros(6)})
    layer.unmerge()
    torch.testing.assert_close(layer(x), adapted)


def gradients(model, forward, x, change=None):
    """x's and every z's gradient of ``forward(model, x)`` (a non-uniform dY: the output squared),
    with ``change(model)`` done between the forward and the backward."""
    x = x.detach().clone().requires_grad_()
    y = forward(model, x)
    if change is not None:
        change(model)
    y.square().sum().backward()
    return x.grad, {name: p.grad for name, p in lt.named_loldu_parameters(model) if ".loldu_z." in name}


@pytest.mark.filterwarnings("ignore::loldu.LoLDUWarning")  # a non-lu init on purpose
def test_backward_differentiates_what_the_forward_computed():
    """As autograd's graph: a forward's gradients are those of what it computed, whatever the
    layers' state at backward (disabled, merged, either way), for the one-adapter call, a mixed
    batch and a weight-space layer; an adapter gone meanwhile raises, saying why."""
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(12, 9), nn.Conv1d(9, 6, 3))
    lt.add_loldu(model, ["0", "1"], rank=4, z_init="s_normal", residual="init")
    lt.add_loldu(model, ["0", "1"], rank=3, z_init="s_normal", residual="init", adapter_name="b",
                 mark_trainable=False)
    for layer in lt.loldu_layers(model).values():
        for name in ("default", "b"):
            with torch.no_grad():
                layer.loldu_z[name].add_(0.5)  # trained: W_eff != W
            layer.loldu_z[name].requires_grad_(True)
    x = torch.randn(5, 12)

    def chain(m, x):  # the linear layer (LinearFunction), then the convolution (WeightFunction)
        return m[1](m[0](x).T.unsqueeze(0))

    def mixed(m, x):  # GroupedLinearFunction
        return m[0](x, adapter_names=["default", "b", "__base__", "b", "default"])

    def unmerge_and_disable(m):
        lt.unmerge_loldu(m)
        lt.disable_loldu(m)

    cases = [  # (state before the forward, forward, change between forward and backward)
        (lt.disable_loldu, chain, lt.enable_loldu),  # lt.disable_adapters(model) around the forward only
        (None, chain, lt.disable_loldu),
        (None, chain, lt.merge_loldu),
        (lt.merge_loldu, chain, lt.unmerge_loldu),
        (lt.merge_loldu, chain, unmerge_and_disable),
        (None, mixed, lambda m: m[0].merge()),
        (None, mixed, lt.disable_loldu),
    ]
    for prepare, forward, change in cases:
        twins = [copy.deepcopy(model), copy.deepcopy(model)]
        for twin in twins:
            if prepare is not None:
                prepare(twin)
        expected = gradients(twins[0], forward, x)
        got = gradients(twins[1], forward, x, change)
        where = (getattr(prepare, "__name__", None), forward.__name__, change.__name__)
        torch.testing.assert_close(got[0], expected[0], rtol=1e-5, atol=1e-5, msg=lambda m: f"{where}: {m}")
        assert {k: g is None for k, g in got[1].items()} == {k: g is None for k, g in expected[1].items()}, where
        for name, grad in expected[1].items():
            if grad is not None:
                torch.testing.assert_close(got[1][name], grad, rtol=1e-5, atol=1e-5, msg=lambda m: f"{where}: {m}")
    # The reported case: differentiated after the block, a forward under disable_adapters is the
    # pretrained layer's: dX = dY W, and z gets no gradient.
    one = nn.Sequential(copy.deepcopy(model[0]))

    def pretrained(m, x):
        with lt.disable_adapters(m):
            return m(x)
    dx, dz = gradients(one, pretrained, x)
    base = one[0].base_layer
    torch.testing.assert_close(dx, 2 * base(x).detach() @ base.weight)
    assert all(grad is None for grad in dz.values())
    for change in (lambda m: lt.delete_adapter(m, "default"), lambda m: m[0].refactor(), lambda m: m.double()):
        with pytest.raises(loldu.StateError, match="closed before backward.*delete_adapter, refactor, a dtype change"):
            gradients(copy.deepcopy(model), chain, x, change)


def test_tensors_with_a_lazy_negation_are_read_as_their_values():
    """torch._neg_view (and the imaginary part of a conjugated complex tensor) only sets a bit:
    the memory holds the values un-negated. Inputs, upstream gradients and a base weight carrying
    it compute what the materialised tensors compute."""
    torch.manual_seed(5)
    layer = lt.LoLDULinear(nn.Linear(12, 9), rank=4)
    lt.add_loldu(nn.Sequential(layer), ["0"], rank=3, adapter_name="b", mark_trainable=False)
    with torch.no_grad():
        for z in layer.loldu_z.values():
            z.add_(0.5)
    x = torch.randn(4, 12)
    assert torch._neg_view(x).is_neg() and torch._neg_view(x).is_contiguous()
    for lazy, values in ((torch._neg_view(x), -x), (torch._neg_view(x.reshape(2, 2, 12)), -x.reshape(2, 2, 12)),
                         (torch.complex(x, x).conj().imag, -x)):
        assert lazy.is_neg()
        torch.testing.assert_close(layer(lazy), layer(values), rtol=0, atol=0)
    names = ["default", "b", "__base__", "b"]
    torch.testing.assert_close(layer(torch._neg_view(x), adapter_names=names), layer(-x, adapter_names=names),
                               rtol=0, atol=0)
    g = torch.randn(4, 9)
    grads = []
    for dy in (torch._neg_view(g), -g):
        x_ = x.clone().requires_grad_()
        layer.loldu_z["default"].grad = None
        layer(x_).backward(dy)
        grads.append((x_.grad, layer.loldu_z["default"].grad))
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)
    base = nn.Linear(12, 9)
    base.weight = nn.Parameter(torch._neg_view(base.weight.detach().clone()), requires_grad=False)
    plain = nn.Linear(12, 9)
    with torch.no_grad():
        plain.weight.copy_(base.weight.resolve_neg())
        plain.bias.copy_(base.bias)
    torch.testing.assert_close(lt.LoLDULinear(base, rank=4)(x), plain(x))


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
def test_an_empty_layer_is_refused_naming_its_empty_dimension():
    cases = [(nn.Linear(4, 0), "out_features = 0"), (nn.Linear(0, 4), "in_features = 0"),
             (nn.Embedding(0, 4), "num_embeddings = 0"), (nn.Conv1d(3, 0, 2), "out_channels = 0")]
    for module, empty in cases:
        model = nn.Sequential(nn.Linear(4, 4), module)
        with pytest.raises(loldu.ShapeError, match=f"^1: {re.escape(empty)} .*leave this module out of target_modules"):
            lt.add_loldu(model, ["0", "1"])  # rank "full": asked for, not given
        assert not lt.loldu_layers(model) and model[0].weight.requires_grad  # nothing changed


@pytest.mark.filterwarnings("ignore:.*(prototype stage|beta state):UserWarning")  # MaskedTensor, sparse CSR
def test_bad_inputs_raise_clear_exceptions():
    layer = lt.LoLDULinear(nn.Linear(5, 3), rank=2, name="head")

    class FakeCuda(torch.Tensor):
        @property
        def device(self):
            return torch.device("cuda", 0)

    with pytest.raises(loldu.DeviceError, match=r"head: the input is on cuda:0.*CPU.*merge_and_unload"):
        layer(torch.zeros(2, 5).as_subclass(FakeCuda))
    with pytest.raises(loldu.DeviceError, match="meta"):
        layer(torch.zeros(2, 5, device="meta"))
    with pytest.raises(loldu.DTypeError, match=r"torch.float16.*x.to\(torch.float32\)") as info:
        layer(torch.zeros(2, 5, dtype=torch.float16))
    assert isinstance(info.value, TypeError)
    with pytest.raises(loldu.DTypeError, match=r"model.to\(torch.float64\)"):
        layer(torch.zeros(2, 5, dtype=torch.float64))
    with pytest.raises(loldu.ShapeError, match=r"last dimension must be in_features = 5"):
        layer(torch.zeros(2, 4))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast: bf16, as nn.Linear under autocast
        assert layer(torch.zeros(2, 5, dtype=torch.bfloat16)).dtype == torch.bfloat16
        assert layer(torch.zeros(2, 5)).dtype == torch.bfloat16
    # Sparse inputs compute as nn.Linear computes them (a RuntimeError from .contiguous() before);
    # a tensor subclass with no memory of its own is refused by name ("x is NULL" before).
    x = torch.zeros(3, 5)
    x[1, 2], x[2, 4] = 1.5, -2.0
    for sparse in (x.to_sparse(), x.to_sparse_csr()):
        torch.testing.assert_close(layer(sparse), layer(x), rtol=0, atol=0)
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[0, 1] = False
    with pytest.raises(loldu.InvalidArgumentError, match="head: the input is a MaskedTensor .*no memory of its own"):
        layer(torch.masked.masked_tensor(x, mask))
    conv = lt.LoLDUConv(nn.Conv2d(3, 4, 2), rank=2)
    with pytest.raises(loldu.ShapeError, match=r"expected \(N, 3, \.\.\.\)"):
        conv(torch.zeros(1, 2, 5, 5))
    emb = lt.LoLDUEmbedding(nn.Embedding(6, 4), rank=2)
    with pytest.raises(loldu.DTypeError, match="indices must be int64"):
        emb(torch.zeros(3))
    with pytest.raises(loldu.DTypeError, match="libloldu computes in float32, float64, bfloat16 or float16"):
        lt.LoLDULinear(nn.Linear(5, 3).to(torch.float8_e4m3fn), rank=2)
    with pytest.raises(loldu.InvalidArgumentError, match=r"rank must be 0 \(full rank\) or in"):
        lt.LoLDULinear(nn.Linear(5, 3), rank=4)
    with pytest.raises(loldu.InvalidArgumentError, match="LoLDULinear wraps Linear"):
        lt.LoLDULinear(nn.Conv2d(3, 4, 2))
    # conversions the library cannot follow fail before anything is converted
    model = nn.Sequential(layer)
    with pytest.raises(loldu.DeviceError, match="merge_and_unload"):
        model.to("meta")
    assert layer.base_layer.weight.dtype == torch.float32 and layer(torch.zeros(1, 5)).shape == (1, 3)


def test_base_weight_changes_are_detected():
    torch.manual_seed(7)
    base = nn.Linear(8, 6)
    layer = lt.LoLDULinear(base, rank=4, z_init="s_normal", residual="init")
    x = torch.randn(3, 8)
    y = layer(x)
    with torch.no_grad():  # same values written again (DDP's broadcast, reloading a state dict)
        base.weight.copy_(base.weight.clone())
    torch.testing.assert_close(layer(x), y)
    with torch.no_grad():
        base.weight.mul_(2)
    with pytest.raises(loldu.StateError, match=r"base weight changed.*refactor\(\)"):
        layer(x)
    z = layer.loldu_z["default"].detach().clone()
    layer.refactor()
    torch.testing.assert_close(layer.loldu_z["default"].detach(), z)  # z kept
    assert layer.loldu_z["default"].data_ptr() == layer.adapter._params_ptr
    expected = x @ torch.from_numpy(layer.adapter.effective_weight()).T + base.bias
    torch.testing.assert_close(layer(x), expected)
    np.testing.assert_array_equal(layer.adapter.factor("weight"), base.weight.detach().numpy())
    y = layer(x)
    base.weight = nn.Parameter(base.weight.detach().clone(), requires_grad=False)  # new tensor, same values
    gc.collect()  # the old tensor, which the library borrows, must stay alive
    torch.testing.assert_close(layer(x), y, rtol=0, atol=0)
    with torch.no_grad():
        base.weight.add_(1)
    with pytest.raises(loldu.StateError):
        layer(x)
    # Writes that autograd does not count as versions of the tensor (through .data, a numpy view)
    # are seen too, on every path (the merged one computes with a W_eff made from the old weight).
    layer.refactor()
    for path in ("factored", "merged"):
        layer.adapter.path = path
        y = layer(x)
        view = base.weight.detach().numpy()
        for write in (lambda: base.weight.data.mul_(2), lambda: np.multiply(view, 2, out=view)):
            version = base.weight._version
            write()
            assert base.weight._version == version
            with pytest.raises(loldu.StateError, match="write through .data or a numpy view"):
                layer(x)
            base.weight.data.div_(2)  # (exact: the values it was factored with)
            torch.testing.assert_close(layer(x), y, rtol=0, atol=0)


def test_nested_inputs_are_refused_by_name():
    layer = lt.LoLDULinear(nn.Linear(5, 3), rank=2)
    for parts, layout in (([torch.randn(2, 5), torch.randn(3, 5)], torch.jagged),
                          ([torch.randn(2, 5), torch.randn(3, 5)], torch.strided),
                          ([torch.randn(5), torch.randn(5)], torch.strided)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # (torch: the strided layout is a prototype)
            nested = torch.nested.nested_tensor(parts, layout=layout)
        with pytest.raises(loldu.InvalidArgumentError, match="nested tensor"):
            layer(nested)


def test_the_modules_bias_goes_to_the_library_with_each_call():
    """The bias is the module's at every call: changed in place, replaced by a tensor of another
    dtype or layout, or removed; with and without autograd."""
    torch.manual_seed(0)
    base = nn.Linear(8, 6)
    layer = lt.LoLDULinear(base, rank=4, z_init="s_normal", residual="init")
    x = torch.randn(5, 8)

    def expected():
        w = torch.from_numpy(layer.adapter.effective_weight())
        return x @ w.T + (0 if base.bias is None else base.bias.detach().float())
    for change in ("in place", "strided", "float64", "broadcast", "none"):
        if change == "in place":
            with torch.no_grad():
                base.bias.add_(1)
        elif change == "broadcast":  # F.linear broadcasts a bias of one value
            base.bias = nn.Parameter(torch.tensor([0.5]))
        elif change == "strided":
            base.bias = nn.Parameter(torch.randn(12)[::2])
            assert not base.bias.is_contiguous()
        elif change == "float64":
            base.bias = nn.Parameter(torch.randn(6, dtype=torch.float64))
        else:
            base.bias = None
        torch.testing.assert_close(layer(x), expected(), msg=change)
        with torch.no_grad():
            torch.testing.assert_close(layer(x), expected(), msg=f"{change}, no grad")


def test_a_bias_of_another_size_is_refused_as_f_linear_refuses_it():
    """The library reads m bias values: a bias that does not broadcast to (m,) must raise, not
    be read past its end; one that broadcasts gets its gradient summed back to its shape."""
    torch.manual_seed(1)
    base = nn.Linear(8, 6)
    layer = lt.LoLDULinear(base, rank=4)
    x = torch.randn(5, 8)
    base.bias = nn.Parameter(torch.zeros(3))
    for call in (lambda: layer(x), lambda: layer(x, adapter_names=["default"] * 5)):
        with pytest.raises(RuntimeError):
            nn.functional.linear(x, base.weight, base.bias)
        with pytest.raises(loldu.ShapeError, match=r"bias has shape \(3,\)"):
            call()
    for bias in (torch.tensor([0.25]), torch.full((1, 6), 0.25)):  # one row, as F.linear broadcasts it
        base.bias = nn.Parameter(bias)
        expected = nn.functional.linear(x, base.weight, base.bias)
        for call in (lambda: layer(x), lambda: layer(x, adapter_names=["default"] * 5)):
            base.bias.grad = None
            y = call()
            torch.testing.assert_close(y, expected)
            y.sum().backward()
            assert base.bias.grad.shape == bias.shape
            torch.testing.assert_close(base.bias.grad, torch.full(bias.shape, 30.0 if bias.numel() == 1 else 5.0))


def test_replaced_parameters_are_rebound():
    torch.manual_seed(8)
    layer = lt.LoLDULinear(nn.Linear(8, 6), rank=4)
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    state["loldu_z.default"] = torch.arange(1.0, 5.0)
    layer.load_state_dict(state, assign=True)  # replaces the parameter tensors
    x = torch.randn(2, 8)
    layer(x)
    assert layer.loldu_z["default"].data_ptr() == layer.adapter._params_ptr
    np.testing.assert_array_equal(layer.adapter.z, [1, 2, 3, 4])
    layer.load_state_dict({**state, "loldu_z.default": torch.full((4,), 0.5)})  # in place: into the library
    np.testing.assert_array_equal(layer.adapter.z, [0.5] * 4)


def test_functional_call_computes_with_the_given_values_and_leaves_the_module_as_it_was():
    """``torch.func.functional_call`` swaps other tensors in for one call: that call computes
    with their values and gives them the gradients, and the module's own parameters, their
    values and its later outputs stay as they were (the swapped-in values are not written into
    the memory the module's parameters share with the library)."""
    torch.manual_seed(10)
    layer = lt.LoLDULinear(nn.Linear(8, 6), rank=4)
    layer.update_layer("b", AdapterConfig(rank=3))
    layer.set_adapter("default")
    x = torch.randn(5, 8)
    own = {k: v.detach().clone() for k, v in layer.named_parameters()}
    before = layer(x).detach()
    given = {k: (v.detach() * 1.5 if "loldu_" in k else v.detach()).clone().requires_grad_(k != "base_layer.weight")
             for k, v in own.items()}  # (a base weight requiring grad is refused: it would get none)
    twin = copy.deepcopy(layer)  # the reference: a layer that really has the given values
    with torch.no_grad():
        for k, p in twin.named_parameters():
            p.copy_(given[k])
    names = ["b", "default", "__base__", "b", "default"]
    for kwargs in ({}, {"adapter_names": names}):
        for t in (*given.values(), *twin.parameters()):
            t.grad = None
        y = torch.func.functional_call(layer, given, (x,), kwargs)
        expected = twin(x, **kwargs)
        torch.testing.assert_close(y, expected, rtol=0, atol=0)
        y.square().sum().backward()
        expected.square().sum().backward()
        for k, p in twin.named_parameters():
            if p.grad is not None:
                torch.testing.assert_close(given[k].grad, p.grad, rtol=1e-6, atol=1e-6, msg=k)
        for k, v in layer.named_parameters():
            torch.testing.assert_close(v.detach(), own[k], rtol=0, atol=0, msg=k)
        torch.testing.assert_close(layer(x).detach(), before, rtol=0, atol=0)
    assert layer.loldu_z["default"].data_ptr() == layer.adapter._params_ptr  # (bound again after the mixed call)


def test_share_memory_moves_the_borrowed_weight_and_the_layer_follows():
    """``model.share_memory()`` moves every parameter's memory into shared memory in place,
    freeing the old: a layer whose library reads the base weight in place (borrowed) must follow
    it (the library read freed memory, garbage, before). z and σ stay in the library's memory of
    this process, which the layer says."""
    torch.manual_seed(11)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    lt.add_loldu(model, ["0", "2"], rank=3)
    twin = copy.deepcopy(model)
    x = torch.randn(5, 8)
    with pytest.warns(loldu.LoLDUWarning, match="share_memory"):
        model.share_memory()
    assert model[0].base_layer.weight.is_shared()
    junk = [torch.full((64,), 7.0e30) for _ in range(1000)]  # (what reuses freed memory)
    for m in (model, twin):
        with torch.no_grad():
            m[0].loldu_z["default"].mul_(0.5)
        m(x).square().sum().backward()
    torch.testing.assert_close(model(x), twin(x), rtol=0, atol=0)
    torch.testing.assert_close(model[0].loldu_z["default"].grad, twin[0].loldu_z["default"].grad, rtol=0, atol=0)
    del junk


def test_refactor_keeps_the_values_of_replaced_parameters():
    torch.manual_seed(12)
    layer = lt.LoLDULinear(nn.Linear(8, 6), rank=4)
    layer.loldu_z["default"].data = torch.arange(1.0, 5.0)  # other memory: the library has not seen it yet
    layer.refactor()
    np.testing.assert_array_equal(layer.get_adapter("default").z, [1, 2, 3, 4])
    assert layer.loldu_z["default"].data_ptr() == layer.adapter._params_ptr


def test_a_computed_base_weight_is_refused_with_the_fix():
    """Pruning and parametrizations replace the weight parameter by a computed tensor: refused
    when adding (torch's own error about leaf tensors, before) and at the next call when applied
    afterwards (a KeyError, before), naming the layer and the way out."""
    from torch.nn.utils import parametrize, prune
    from torch.nn.utils.parametrizations import weight_norm

    x = torch.randn(3, 8)
    for computed in (lambda m: prune.l1_unstructured(m, "weight", 0.5), weight_norm):
        model = nn.Sequential()
        model.add_module("fc", nn.Linear(8, 6))
        computed(model.fc)
        with pytest.raises(loldu.InvalidArgumentError, match=r"fc: the base layer's weight is not a tensor"):
            lt.add_loldu(model, ["fc"], rank=3)
        assert lt.loldu_layers(model) == {}
        model = nn.Sequential()
        model.add_module("fc", nn.Linear(8, 6))
        lt.add_loldu(model, ["fc"], rank=3)
        computed(model.fc.base_layer)
        with pytest.raises(loldu.StateError, match=r"fc: .*remove_parametrizations"):
            model(x)
    parametrize.remove_parametrizations(model.fc.base_layer, "weight")  # a plain weight again (new values)
    with pytest.raises(loldu.StateError, match="refactor"):
        model(x)
    model.fc.refactor()
    torch.testing.assert_close(model(x), model.fc.base_layer(x), rtol=1e-5, atol=1e-5)


def test_saved_tensor_hooks_that_change_dtype_or_strides_give_the_gradients_of_what_they_return():
    """``torch.autograd.graph.saved_tensors_hooks`` may hand back a saved tensor in another dtype
    (compression to bf16) or with other strides: the backward converts it for the library (it
    wrote float32 into a bf16 buffer, a heap overflow, or read transposed memory, before). In a
    child process: the failure was a crash."""
    result = run_python("""
        import torch
        from torch import nn
        import loldu.torch as lt
        torch.manual_seed(13)
        model = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 6))
        lt.add_loldu(model, ["0", "1"], rank=4)
        with torch.no_grad():
            for p in lt.loldu_parameters(model):
                p.mul_(1.25)
        idx, x0 = torch.tensor([[1, 2], [3, 9], [0, 0]]), torch.randn(3, 2, 8)

        def grads(x, hooks=None):
            x = x.clone().requires_grad_()
            model.zero_grad()
            if hooks is None:
                (model[1](x + model[0](idx))).square().sum().backward()
            else:
                with torch.autograd.graph.saved_tensors_hooks(*hooks):
                    (model[1](x + model[0](idx))).square().sum().backward()
            return [x.grad] + [p.grad.clone() for p in lt.loldu_parameters(model)]

        plain = grads(x0)
        restrided = grads(x0, (lambda t: t.mT.contiguous().mT if t.dim() == 2 else t, lambda t: t))
        for a, b in zip(plain, restrided):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        to_bf16 = (lambda t: t, lambda t: t.to(torch.bfloat16) if t.is_floating_point() else t)
        for a, b in zip(plain, grads(x0, to_bf16)):  # (every saved tensor rounded, torch's too)
            assert a.dtype == b.dtype
            torch.testing.assert_close(a, b, rtol=3e-2, atol=3e-2)
        print("ok")
    """)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]


def test_computed_loldu_parameters_are_refused_with_the_fix(tmp_path):
    """A parametrization on loldu_z replaces the parameter the library's memory backs by a
    computed tensor: every call names it and the fix (a KeyError before)."""
    from torch.nn.utils import parametrize

    class Positive(nn.Module):
        def forward(self, z):
            return z.abs()

    layer = lt.LoLDULinear(nn.Linear(8, 6), rank=3)
    x = torch.randn(2, 8)
    expected = layer(x)
    layer(x, adapter_names=["default"] * 2)  # (the layer's group of adapters exists)
    parametrize.register_parametrization(layer.loldu_z, "default", Positive())
    for call in (lambda: layer(x), lambda: layer(x, adapter_names=["default"] * 2),
                 lambda: lt.save_loldu(nn.Sequential(layer), tmp_path / "ckpt")):
        with pytest.raises(loldu.StateError, match=r"loldu_z\['default'\].*remove_parametrizations"):
            call()
    parametrize.remove_parametrizations(layer.loldu_z, "default", leave_parametrized=False)  # (the parameter back)
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=0)


def test_a_mixed_batch_sees_replaced_parameters_and_added_or_deleted_adapters():
    """The layer keeps its adapters as one group between mixed batches: parameters replaced
    (``.data =``, ``load_state_dict(assign=True)``), adapters added, re-created or deleted since
    the last batch must show in the next one."""
    torch.manual_seed(9)
    layer = lt.LoLDULinear(nn.Linear(8, 6), rank=4)
    layer.update_layer("b", AdapterConfig(rank=3, residual="init", z_init="normal", seed=1))
    x = torch.randn(4, 8)
    names = ["default", "b", "__base__", "b"]

    def alone(name, row):
        if name == "__base__":
            return layer.base_layer(x[row:row + 1])
        layer.set_adapter(name)
        return layer(x[row:row + 1])

    def check():
        with torch.no_grad():
            y = layer(x, adapter_names=names)
            for row, name in enumerate(names):
                torch.testing.assert_close(y[row:row + 1], alone(name, row), rtol=1e-5, atol=1e-5)

    check()
    layer.loldu_z["b"].data = torch.full((3,), 2.0)  # the same parameter object, other memory
    check()
    assert layer.loldu_z["b"].data_ptr() == layer.get_adapter("b")._params_ptr
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    layer.load_state_dict({**state, "loldu_z.default": torch.arange(1.0, 5.0)}, assign=True)  # new objects
    check()
    np.testing.assert_array_equal(layer.get_adapter("default").z, [1, 2, 3, 4])
    layer.update_layer("c", AdapterConfig(rank=2, residual="init", z_init="normal", seed=2))
    with torch.no_grad():  # (an update of its own: rows that missed it would get the base output)
        layer.loldu_z["c"].add_(0.5)
        assert not torch.allclose(layer(x, adapter_names=["c"] * 4), layer.base_layer(x))
    names = ["c", "b", "default", "c"]
    check()
    layer.update_layer("b", AdapterConfig(rank=4, residual="init", z_init="normal", seed=3))  # re-created
    check()
    layer.delete_adapter("c")
    with torch.no_grad():  # a deleted adapter's rows: the base layer's output, as PEFT gives
        torch.testing.assert_close(layer(x, adapter_names=names)[0], layer.base_layer(x)[0])
    # An adapter the batch does not use, deleted between forward and backward: the gradients of
    # what the forward computed.
    xg = x.clone().requires_grad_()
    layer.loldu_z["b"].requires_grad_(True)
    twin = copy.deepcopy(layer)
    layer(xg, adapter_names=["b"] * 4).sum().backward()
    expected = xg.grad.clone(), layer.loldu_z["b"].grad.clone()
    xg.grad = None
    y = twin(xg, adapter_names=["b"] * 4)
    twin.delete_adapter("default")
    y.sum().backward()
    torch.testing.assert_close(xg.grad, expected[0])
    torch.testing.assert_close(twin.loldu_z["b"].grad, expected[1])


def test_a_group_built_while_the_adapters_change_is_not_kept():
    """Another thread may add an adapter while a mixed batch builds the layer's group: that
    group may serve its own call, never a later one (here the change happens during the build)."""
    import loldu.torch.layers as layers

    torch.manual_seed(10)
    layer = lt.LoLDULinear(nn.Linear(8, 6), rank=4)
    x = torch.randn(3, 8)
    built = layers.AdapterGroup

    class AddingDuringTheBuild(built):
        def __init__(self, *args):
            layers.AdapterGroup = built  # once
            layer.update_layer("new", AdapterConfig(rank=3, residual="init", z_init="normal", seed=1))
            super().__init__(*args)

    layers.AdapterGroup = AddingDuringTheBuild
    try:
        with torch.no_grad():
            layer(x, adapter_names=["default"] * 3)
    finally:
        layers.AdapterGroup = built
    with torch.no_grad():
        layer.loldu_z["new"].add_(0.5)  # (trained: not the pretrained layer)
        y = layer(x, adapter_names=["new", "default", "new"])
        layer.set_adapter("new")
        torch.testing.assert_close(y[0], layer(x)[0])
        assert not torch.allclose(y[0], layer.base_layer(x)[0])


def test_mixed_batch_edges_closed_layers_no_rows_one_sample_and_factors_outliving_adapters():
    torch.manual_seed(11)
    layer = lt.LoLDULinear(nn.Linear(8, 6), rank=4)
    layer.update_layer("b", AdapterConfig(rank=3, residual="init", z_init="normal", seed=1))
    layer.loldu_z["b"].requires_grad_(True)
    # No rows (a 3-D batch of empty sequences): zero gradients, not the contents of fresh memory.
    x = torch.randn(2, 0, 8, requires_grad=True)
    layer(x, adapter_names=["default", "b"]).sum().backward()
    for name in ("default", "b"):
        assert torch.count_nonzero(layer.loldu_z[name].grad) == 0
        layer.loldu_z[name].grad = None
    # A 1-D input is one sample, not a batch; so are an unbatched convolution input and one index.
    with pytest.raises(loldu.ShapeError, match="adapter_names needs a batch"):
        layer(torch.randn(8), adapter_names=["b"] * 8)
    for module, unbatched in ((nn.Conv1d(3, 4, 2), torch.randn(3, 5)), (nn.Embedding(10, 4), torch.tensor(3))):
        model = nn.Sequential(module)
        lt.add_loldu(model, ["0"], rank=2)
        with lt.mixed_batch(model, ["default"] * 3), pytest.raises(loldu.ShapeError, match="adapter_names needs a batch"):
            model(unbatched)
    # Every row on the pretrained layer, the first adapter deleted before backward: dX = dY W.
    x = torch.randn(4, 8, requires_grad=True)
    y = layer(x, adapter_names=["__base__"] * 4)
    layer.delete_adapter("default")
    y.sum().backward()
    torch.testing.assert_close(x.grad, torch.ones(4, 6) @ layer.base_layer.weight.detach())
    # The used adapters' parameters are autograd inputs: torch.autograd.grad and hooks see them.
    seen = []
    hook = layer.loldu_z["b"].register_hook(seen.append)
    (by_grad,) = torch.autograd.grad(layer(x, adapter_names=["b"] * 4).sum(), [layer.loldu_z["b"]])
    hook.remove()
    layer(x, adapter_names=["b"] * 4).sum().backward()
    torch.testing.assert_close(by_grad, layer.loldu_z["b"].grad)
    assert len(seen) == 1 and torch.equal(seen[0], by_grad)
    # A closed layer refuses mixed batches as it refuses the others, whatever ran before.
    layer.close()
    with pytest.raises(loldu.InvalidHandleError):
        layer(x, adapter_names=["b"] * 4)


def test_copy_pickle_and_dtype_conversions():
    torch.manual_seed(9)
    model = lt.add_loldu(nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4)), ["0", "2"], rank=3,
                         z_init="s_normal", residual="init")
    x = torch.randn(3, 6)
    y = model(x)
    twin = copy.deepcopy(model)
    torch.testing.assert_close(twin(x), y)
    assert twin[0].adapter.handle != model[0].adapter.handle
    with torch.no_grad():
        twin[0].loldu_z["default"].add_(1)
    torch.testing.assert_close(model(x), y)  # independent
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    torch.testing.assert_close(loaded(x), y)
    # A merged model's copies are merged too (as PEFT's): z gets no gradient there either.
    lt.merge_loldu(model)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    for copied in (copy.deepcopy(model), torch.load(buffer, weights_only=False)):
        assert copied[0].merged and copied[2].merged
        copied(x.clone().requires_grad_()).sum().backward()
        assert copied[0].loldu_z["default"].grad is None
        torch.testing.assert_close(copied(x), y)
    lt.unmerge_loldu(model)
    z = model[0].loldu_z["default"].detach().clone()
    model.double()
    assert model[0].adapter.dtype == np.float64 and model[0].loldu_z["default"].dtype == torch.float64
    assert model[0].loldu_z["default"].data_ptr() == model[0].adapter._params_ptr
    torch.testing.assert_close(model[0].loldu_z["default"].detach().float(), z)
    torch.testing.assert_close(model(x.double()).float(), y, rtol=1e-5, atol=1e-5)
    model.float()
    torch.testing.assert_close(model(x), y, rtol=1e-5, atol=1e-5)


def test_torch_compile_runs_the_layers_eagerly_and_the_rest_compiled():
    """torch.compile cannot see into the library: each LoLDU layer is a graph break, and the
    compiled model computes what the eager one does, gradients included."""
    torch.manual_seed(10)
    layers = [nn.Linear(6, 5), nn.Tanh(), nn.Unflatten(1, (5, 1)), nn.Conv1d(5, 4, 1), nn.Flatten(), nn.Linear(4, 3)]
    model = lt.add_loldu(nn.Sequential(*layers), ["0", "3", "5"], rank=3, z_init="s_normal", residual="init")
    x = torch.randn(3, 6)

    def step(m):
        for p in lt.loldu_parameters(m):
            p.grad = None
        y = m(x)
        y.square().sum().backward()
        return y.detach(), [p.grad.clone() for p in lt.loldu_parameters(m)]

    expected, grads = step(model)
    torch._dynamo.reset()
    got, compiled_grads = step(torch.compile(model, backend="aot_eager"))
    torch.testing.assert_close(got, expected)
    for a, b in zip(compiled_grads, grads):
        torch.testing.assert_close(a, b)


def test_library_threads_follow_torch_on_first_use(monkeypatch):
    before = loldu.get_num_threads(), torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        layer = lt.LoLDULinear(nn.Linear(4, 4), rank=2)
        # a fresh process: nothing configured yet, the user did not choose
        monkeypatch.setattr(lt.layers, "_process_configured", False)
        monkeypatch.setattr(loldu, "_threads_set_by_user", False)
        loldu._capi.loldu_set_num_threads(1)
        layer(torch.zeros(1, 4))
        assert loldu.get_num_threads() == 2
        # the user's choice wins
        monkeypatch.setattr(lt.layers, "_process_configured", False)
        loldu.set_num_threads(1)
        layer(torch.zeros(1, 4))
        assert loldu.get_num_threads() == 1
    finally:
        loldu._capi.loldu_set_num_threads(before[0])
        torch.set_num_threads(before[1])


STEP_FAULTS = """
import resource, torch
from torch import nn
import loldu.torch as lt
from loldu import AdapterConfig
torch.set_num_threads(1)
layer = lt.LoLDULinear(nn.Linear(384, 384), rank=384)
x, dy = torch.randn(2048, 384, requires_grad=True), torch.randn(2048, 384)
def step():
    x.grad = None
    layer(x).backward(dy)
def faults_per_step(steps=10):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(steps):
        step()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / steps
faults_per_step(30)  # (warm-up: the BLAS's buffers, the heap growing)
print(sorted(faults_per_step() for _ in range(5))[2])
"""


def test_step_buffers_stay_mapped_unless_the_user_opts_out():
    """y and dX (3 MiB each here) are allocated afresh every step: above glibc's mmap threshold
    their pages are handed back and faulted in again each step (768 pages per buffer); the
    package keeps them mapped (configure_malloc), unless LOLDU_KEEP_MALLOC=1 or glibc's own
    variables are set. The opted-out run fixes glibc's threshold at its initial 128 KiB: left
    adaptive, how many buffers it hands back depends on the allocation history (225 to 750
    faults per step measured). Measured as the median of five blocks of ten steps after 30
    steps of warm-up: the first steps also fault in memory once (the BLAS's buffers, the heap
    growing; up to 190 pages per step over the first 25 steps on an AVX2 CPU, and a median
    block of 154 once without the warm-up), which is not the per-step cost."""
    clean = {"MALLOC_MMAP_THRESHOLD_": None, "MALLOC_TRIM_THRESHOLD_": None, "LOLDU_KEEP_MALLOC": None}
    kept = run_python(STEP_FAULTS, env=clean)
    default = run_python(STEP_FAULTS, env={**clean, "LOLDU_KEEP_MALLOC": "1", "MALLOC_MMAP_THRESHOLD_": "131072"})
    assert kept.returncode == 0 and default.returncode == 0, kept.stderr + default.stderr
    assert float(kept.stdout) < 150 < 500 < float(default.stdout), (kept.stdout, default.stdout)
    assert lt.layers.configure_malloc({"LOLDU_KEEP_MALLOC": "1"}) is False
    assert lt.layers.configure_malloc({"MALLOC_TRIM_THRESHOLD_": "0"}) is False
    assert lt.layers.configure_malloc({}) is True


def test_the_per_batch_size_plans_stay_bounded():
    """Training on batches of ever new sizes kept one plan per size, without bound."""
    from loldu.torch.layers import PLANS_KEPT
    layer = lt.LoLDULinear(nn.Linear(8, 4), rank=3)
    for rows in range(1, PLANS_KEPT + 50):
        layer(torch.randn(rows, 8)).sum().backward()
        assert len(layer._plans) <= PLANS_KEPT
    assert len(layer._plans) >= 49  # (the cache still serves: it was cleared once, then refilled)


def test_adapters_made_under_inference_mode_train_afterwards(tmp_path):
    """Parameters made under torch.inference_mode() were inference tensors: set_adapter then
    failed half-way (some layers switched) and training raised."""
    torch.manual_seed(10)
    model = nn.Sequential(nn.Linear(12, 9), nn.Tanh(), nn.Linear(9, 4))
    lt.add_loldu(model, ["0", "2"], rank=4)
    lt.save_loldu(model, tmp_path / "a")
    with torch.inference_mode():
        lt.add_loldu(model, ["0", "2"], rank=3, adapter_name="b", mark_trainable=False)
        lt.load_loldu(model, tmp_path / "a", adapter_name="c", mark_trainable=False)
        model.double()
    assert not any(p.is_inference() for _, p in lt.named_loldu_parameters(model))
    for name in ("b", "c"):
        lt.set_adapter(model, name)
        assert all(layer.active_adapters == [name] for layer in lt.loldu_layers(model).values())
        model(torch.randn(5, 12, dtype=torch.float64)).square().sum().backward()
        assert all(layer.loldu_z[name].grad.abs().sum() > 0 for layer in lt.loldu_layers(model).values())


def test_an_interrupt_just_after_a_layer_merged_leaves_no_layer_merged(monkeypatch):
    """A KeyboardInterrupt raised once the library had merged a layer (before merge_loldu
    recorded it) left that layer merged: the all-or-nothing promise broken."""
    model = lt.add_loldu(nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)), "all-linear")
    second = model[1].adapter
    merge = type(second).merge

    def merge_then_interrupt(self):
        merge(self)
        if self is second:
            raise KeyboardInterrupt

    monkeypatch.setattr(type(second), "merge", merge_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        lt.merge_loldu(model)
    assert [layer.adapter.info["merged"] for layer in lt.loldu_layers(model).values()] == [False] * 3


def test_overlapping_disable_adapters_blocks_restore_the_state_from_before_the_first():
    """Blocks that overlap (two threads' requests) restored each other's saved state: the first
    to close re-enabled the model inside the second, and the second left it disabled for good."""
    model = lt.add_loldu(nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 3)), "all-linear")
    first, second = lt.disable_adapters(model), lt.disable_adapters(model)
    first.__enter__()
    second.__enter__()
    first.__exit__(None, None, None)
    assert [layer.enabled for layer in lt.loldu_layers(model).values()] == [False, False]  # the second is open
    second.__exit__(None, None, None)
    assert [layer.enabled for layer in lt.loldu_layers(model).values()] == [True, True]
    lt.disable_loldu(model)
    with lt.disable_adapters(model):
        pass
    assert [layer.enabled for layer in lt.loldu_layers(model).values()] == [False, False]  # as before the block
