"""PEFT-style helpers on a real model: all-MiniLM-L6-v2 as a transformers BertModel (offline)."""

from __future__ import annotations

import copy
import json
import signal
import warnings

import pytest
import torch
from torch import nn

import loldu
import loldu.torch as lt
from conftest import minilm_dir, run_python
from reference import torch_weight

QV = ["query", "value"]


@pytest.fixture(scope="module")
def bert() -> nn.Module:
    import transformers

    model = transformers.BertModel.from_pretrained(str(minilm_dir()), local_files_only=True)
    return model.eval()


@pytest.fixture()
def model(bert) -> nn.Module:
    return copy.deepcopy(bert)


def inputs(seed: int = 0, batch: int = 2, length: int = 12):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 20000, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    mask[1, length - 3:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def output(model, seed=0):
    with torch.no_grad():
        return model(**inputs(seed)).last_hidden_state


def train(model, steps=3, lr=0.05):
    opt = torch.optim.AdamW(lt.loldu_parameters(model), lr=lr)
    target = torch.randn(2, 12, 384, generator=torch.Generator().manual_seed(1))
    for step in range(steps):
        loss = (model(**inputs(step)).last_hidden_state - target).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
    return loss.item()


def test_add_loldu_by_names_keeps_the_model_and_trains_only_z(bert, model):
    before = output(bert)
    lt.add_loldu(model, target_modules=QV, rank=16)
    layers = lt.loldu_layers(model)
    assert len(layers) == 12 and all(isinstance(m, lt.LoLDULinear) for m in layers.values())
    assert "encoder.layer.0.attention.self.query" in layers and "encoder.layer.5.attention.self.value" in layers
    torch.testing.assert_close(output(model), before, rtol=1e-4, atol=1e-4)  # unchanged at initialisation
    trainable, total = lt.get_nb_trainable_parameters(model)
    base_total = sum(p.numel() for p in bert.parameters())
    assert trainable == 12 * 17 and total == base_total + 12 * 17
    report = lt.print_trainable_parameters(model)
    assert report == f"trainable params: 204 || all params: {total:,d} || trainable%: {100 * 204 / total:.4f}"
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all(n.rsplit(".", 2)[-2:] in (["loldu_z", "default"], ["loldu_sigma", "default"]) for n in names)
    assert set(lt.loldu_state_dict(model)) == {f"{n}.{p}" for n in layers for p in ("loldu_z", "loldu_sigma")}
    first = train(model, steps=1)
    last = train(model, steps=4)
    assert last < first
    assert not torch.allclose(output(model), before, atol=1e-3)
    # the base weights never changed
    for name, layer in layers.items():
        torch.testing.assert_close(layer.base_layer.weight, bert.get_submodule(name).weight, rtol=0, atol=0)


def test_trainable_report_is_peft_s(model):
    import contextlib
    import io

    import peft

    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=QV))
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        lora.print_trainable_parameters()
    assert lt.print_trainable_parameters(lora, file=io.StringIO()) == printed.getvalue().strip()
    assert lt.get_nb_trainable_parameters(lora) == lora.get_nb_trainable_parameters()


def test_regex_targets_and_bad_targets(model):
    lt.add_loldu(model, r".*\.attention\.self\.(query|key)", rank=4, train_sigma=False)
    layers = lt.loldu_layers(model)
    assert len(layers) == 12 and all(n.endswith(("query", "key")) for n in layers)
    assert lt.get_nb_trainable_parameters(model)[0] == 12 * 4
    assert len(lt.loldu_parameters(model)) == 12 and len(lt.loldu_parameters(model, trainable_only=False)) == 24
    with pytest.raises(loldu.InvalidArgumentError, match=r"matched no module.*encoder\.layer\.0"):
        lt.add_loldu(model, ["nonexistent"])
    with pytest.raises(loldu.InvalidArgumentError, match="is a BertSelfAttention; LoLDU adapts nn.Linear"):
        lt.add_loldu(model, r"encoder\.layer\.0\.attention\.self")
    with pytest.raises(loldu.InvalidArgumentError, match=r"encoder.layer.0.intermediate.dense: config.rank must be 0 \(full rank\) or in"):
        lt.add_loldu(model, ["intermediate.dense"], rank=1000)
    lt.add_loldu(model, ["query"], rank=4)  # adapted already: left as is
    assert len(lt.loldu_layers(model)) == 12


def peft_targets(model, **config) -> set[str]:
    """The modules PEFT's LoRA adapts for ``config``, by name in ``model``."""
    import peft

    lora = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(r=2, **config))
    prefix = "base_model.model."
    return {n[len(prefix):] for n, m in lora.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)}


def test_all_linear_as_peft(model):
    """"all-linear" adapts what PEFT's does: every nn.Linear but the output layer (here the pooler
    too), and leaves a classification head or an LM head out."""
    import transformers

    expected = peft_targets(model, target_modules="all-linear")
    lt.add_loldu(model, "ALL-linear", rank=2)
    names = set(lt.loldu_layers(model))
    assert len(names) == 6 * 6 + 1 and names == expected
    lt.add_loldu(model, "all-linear", rank=2, adapter_name="second")  # LoLDU layers around Linear count
    assert all(set(layer.loldu_config) == {"default", "second"} for layer in lt.loldu_layers(model).values())

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the head is new: transformers says so
        classifier = transformers.BertForSequenceClassification.from_pretrained(str(minilm_dir()), local_files_only=True)
    expected = peft_targets(classifier, target_modules="all-linear", task_type="SEQ_CLS")
    with pytest.warns(loldu.LoLDUWarning, match=r"leaves the model's head 'classifier' out.*requires_grad_\(True\)"):
        lt.add_loldu(classifier, "all-linear", rank=2)
    names = set(lt.loldu_layers(classifier))
    assert "classifier" not in names and len(names) == 37 and names == expected

    class LM(nn.Module):  # (a head made of layers, as RoBERTa's classifier: none of them adapted)
        def __init__(self):
            super().__init__()
            self.body, self.lm_head = nn.Linear(8, 8), nn.Linear(8, 32)
            self.classifier = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2))

        def get_output_embeddings(self):
            return self.lm_head
    with pytest.warns(loldu.LoLDUWarning, match="head 'classifier'"):
        lm = lt.add_loldu(LM(), "all-linear", rank=2)
    assert set(lt.loldu_layers(lm)) == {"body"}


def test_an_adapter_added_without_mark_trainable_is_inactive_and_frozen(model):
    """As PEFT's add_adapter: a new adapter neither becomes active nor trains, on new layers
    as on layers that have others; the model computes what it did."""
    lt.add_loldu(model, ["query"], rank=4)
    lt.add_loldu(model, ["query", "key"], rank=4, adapter_name="b", mark_trainable=False, z_init="s_normal",
                 residual="init")
    with torch.no_grad():
        for layer in lt.loldu_layers(model).values():
            layer.loldu_z["b"].add_(1.0)  # b would change the output if it computed
    before = output(model)
    assert {tuple(layer.active_adapters) for layer in lt.loldu_layers(model).values()} == {("default",)}
    assert not any(layer.loldu_z["b"].requires_grad for layer in lt.loldu_layers(model).values())
    assert lt.get_nb_trainable_parameters(model)[0] == 6 * (4 + 1)
    lt.set_adapter(model, lt.active_adapters(model))
    torch.testing.assert_close(output(model), before, rtol=0, atol=0)
    lt.set_adapter(model, "b")
    assert all(layer.loldu_z["b"].requires_grad for layer in lt.loldu_layers(model).values())


def test_embeddings_and_full_rank(model):
    lt.add_loldu(model, ["word_embeddings", "output.dense"], rank="full", z_init="ones", residual="init")
    layers = lt.loldu_layers(model)
    assert isinstance(layers["embeddings.word_embeddings"], lt.LoLDUEmbedding)
    assert layers["embeddings.word_embeddings"].rank == 384 and layers["encoder.layer.0.output.dense"].rank == 384
    assert train(model, steps=2) > 0
    assert layers["embeddings.word_embeddings"].loldu_z["default"].grad is None  # zero_grad(set_to_none)
    assert layers["embeddings.word_embeddings"].adapter.z.std() > 0  # moved away from ones


def test_save_then_load_in_a_fresh_process(model, tmp_path):
    loldu.set_num_threads(1)  # the child's too: BLAS results may depend on the thread count
    lt.add_loldu(model, target_modules=QV, rank=16, z_init="s_normal", residual="init", seed=3)
    train(model, steps=2)
    lt.save_loldu(model, tmp_path / "ckpt")
    torch.save(output(model, seed=7), tmp_path / "expected.pt")
    from safetensors.torch import load_file

    tensors = load_file(str(tmp_path / "ckpt" / loldu.MODEL_FILE))
    assert tensors.keys() == lt.loldu_state_dict(model).keys()
    for key, value in lt.loldu_state_dict(model).items():
        torch.testing.assert_close(tensors[key], value, rtol=0, atol=0)
    config = json.loads((tmp_path / "ckpt" / loldu.CONFIG_FILE).read_text())
    assert config["peft_type"] == "LOLDU" and len(config["target_modules"]) == 12 and config["r"] == 16

    code = """
        import sys, torch, transformers, loldu, loldu.torch as lt
        sys.path.insert(0, sys.argv[2])
        from test_torch_model import output
        from conftest import minilm_dir
        torch.set_num_threads(1)
        loldu.set_num_threads(1)  # as the test process: BLAS results may depend on the thread count
        model = transformers.BertModel.from_pretrained(str(minilm_dir()), local_files_only=True).eval()
        lt.load_loldu(model, sys.argv[1] + "/ckpt")
        print(len(lt.loldu_layers(model)), lt.get_nb_trainable_parameters(model)[0])
        torch.save(output(model, seed=7), sys.argv[1] + "/actual.pt")
    """
    from conftest import TESTS

    result = run_python(code, str(tmp_path), str(TESTS))
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["12", "204"]
    actual, expected = torch.load(tmp_path / "actual.pt"), torch.load(tmp_path / "expected.pt")
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)  # identical outputs


def test_load_into_an_adapted_model_keeps_the_parameters(bert, model, tmp_path):
    lt.add_loldu(model, target_modules=QV, rank=8)
    train(model, steps=2)
    lt.save_loldu(model, tmp_path)
    expected = output(model)
    other = copy.deepcopy(bert)
    lt.add_loldu(other, target_modules=QV, rank=8)
    params = lt.loldu_parameters(other)
    opt = torch.optim.SGD(params, lr=0.1)
    lt.load_loldu(other, tmp_path)
    assert all(a is b for a, b in zip(params, lt.loldu_parameters(other)))  # optimisers keep working
    torch.testing.assert_close(output(other), expected, rtol=0, atol=0)
    assert opt.param_groups[0]["params"][0] is params[0]
    # set_loldu_state_dict from a state dict gives the same model as well
    third = lt.add_loldu(copy.deepcopy(bert), target_modules=QV, rank=8)
    missing, unexpected = lt.set_loldu_state_dict(third, lt.loldu_state_dict(model))
    assert missing == [] and unexpected == []
    torch.testing.assert_close(output(third), expected, rtol=0, atol=0)


def test_load_checks_the_base_model(bert, model, tmp_path):
    lt.add_loldu(model, target_modules=QV, rank=8)
    lt.save_loldu(model, tmp_path)
    changed = copy.deepcopy(bert)
    with torch.no_grad():
        changed.encoder.layer[3].attention.self.value.weight.mul_(1.01)
    with pytest.raises(loldu.MismatchError, match="encoder.layer.3.attention.self.value.*base weight differs"):
        lt.load_loldu(changed, tmp_path)
    with pytest.raises(loldu.MismatchError, match="not a module of the model"):
        lt.load_loldu(nn.Sequential(nn.Linear(384, 384)), tmp_path)
    with pytest.raises(loldu.DTypeError, match="saved in float32"):
        lt.load_loldu(copy.deepcopy(bert).double(), tmp_path)


def test_merge_unmerge_unload_and_disable(bert, model):
    lt.add_loldu(model, target_modules=QV + ["intermediate.dense"], rank=32, z_init="s_normal", residual="init")
    train(model, steps=2)
    adapted = output(model)
    original = output(bert)
    with lt.disable_adapters(model):  # the original model exactly: its own modules compute
        torch.testing.assert_close(output(model), original, rtol=0, atol=0)
    torch.testing.assert_close(output(model), adapted, rtol=0, atol=0)
    lt.disable_loldu(model)  # the reference code's switches
    assert not any(layer.enabled for layer in lt.loldu_layers(model).values())
    torch.testing.assert_close(output(model), original, rtol=0, atol=0)
    lt.enable_loldu(model)
    torch.testing.assert_close(output(model), adapted, rtol=0, atol=0)
    lt.merge_loldu(model)
    assert all(layer.merged for layer in lt.loldu_layers(model).values())
    torch.testing.assert_close(output(model), adapted, rtol=1e-4, atol=1e-4)  # merged equals unmerged
    lt.unmerge_loldu(model)
    torch.testing.assert_close(output(model), adapted, rtol=1e-5, atol=1e-5)  # the cached W_eff may be used
    merged = lt.merge_and_unload(copy.deepcopy(model))
    assert not lt.loldu_layers(merged)
    assert type(merged.encoder.layer[0].attention.self.query) is nn.Linear
    torch.testing.assert_close(output(merged), adapted, rtol=1e-4, atol=1e-4)
    assert output(merged.half()).dtype == torch.float16  # a plain model again
    assert lt.get_loldu_params(model) == lt.loldu_parameters(model)
    assert lt.get_loldu_state_dict(model).keys() == lt.loldu_state_dict(model).keys()
    unloaded = lt.remove_loldu(model)
    torch.testing.assert_close(output(unloaded), original, rtol=0, atol=0)


def test_export_merged(model, tmp_path):
    from safetensors.torch import load_file

    lt.add_loldu(model, target_modules=["value"], rank=8, z_init="s_uniform", residual="init")
    for layer in lt.loldu_layers(model).values():
        with torch.no_grad():  # (trained: W_eff is not W)
            layer.loldu_z["default"].add_(0.5)
    lt.export_merged(model, tmp_path / "merged.safetensors")
    tensors = load_file(str(tmp_path / "merged.safetensors"))
    for name, layer in lt.loldu_layers(model).items():
        torch.testing.assert_close(tensors[f"{name}.weight"], layer.effective_weight(), rtol=0, atol=0)
        assert not torch.equal(tensors[f"{name}.weight"], layer.base_layer.weight)


def test_add_loldu_warns_once_when_the_initial_z_replaces_the_pretrained_layers():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 32))
    with pytest.warns(loldu.LoLDUWarning) as record:
        lt.add_loldu(model, ["0", "1"], rank=16, z_init="uniform")
    messages = [str(w.message) for w in record if w.category is loldu.LoLDUWarning]
    assert len(messages) == 1 and messages[0].startswith("2 of 2 adapted layers, e.g. 0: z_init='uniform'")
    assert "residual='init'" in messages[0] and "alpha=1" in messages[0]
    for safe in ({"z_init": "uniform", "residual": "init"}, {"z_init": "lu"}):
        with warnings.catch_warnings():
            warnings.simplefilter("error", loldu.LoLDUWarning)
            lt.add_loldu(nn.Sequential(nn.Linear(32, 32)), ["0"], rank=16, **safe)


def small() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 12), nn.Tanh(), nn.Linear(12, 8))


def snapshot(model: nn.Module) -> dict:
    """Everything a failed call must leave as it was: module types, adapters, values, flags."""
    out = {name: type(m).__name__ for name, m in model.named_modules()}
    for name, layer in lt.loldu_layers(model).items():
        out[name] = (sorted(layer.loldu_config), list(layer.active_adapters),
                     {a: (c.rank, layer.loldu_z[a].detach().clone().tolist(), layer.loldu_z[a].requires_grad)
                      for a, c in layer.loldu_config.items()})
    out["grads"] = {n: p.requires_grad for n, p in model.named_parameters()}
    return out


def test_failed_model_operations_leave_the_model_as_it_was(tmp_path):
    other = small()
    with torch.no_grad():
        other[0].weight.add_(1)  # another base model
    lt.add_loldu(other, ["0", "2"], rank=8)
    lt.save_loldu(other, tmp_path / "other")

    model = small()
    lt.add_loldu(model, ["0", "2"], rank=4)
    with torch.no_grad():
        model[0].loldu_z["default"].add_(0.25)  # "trained"
    optimizer = lt.Optimizer(model, "adamw", lr=1e-3)
    before = snapshot(model)
    with pytest.raises(loldu.MismatchError):
        lt.load_loldu(model, tmp_path / "other")  # layer 0: a different base weight
    assert snapshot(model) == before
    with pytest.raises(loldu.MismatchError):
        lt.load_loldu(model, tmp_path / "other", adapter_name="new")
    assert snapshot(model) == before
    model(torch.randn(3, 16)).sum().backward()
    optimizer.step()  # the adapters it holds are still the model's

    plain = small()
    before = snapshot(plain)
    with pytest.raises(loldu.InvalidArgumentError, match="rank"):
        lt.add_loldu(plain, ["0", "2"], rank=10)  # fits layer 0 (12 × 16), not layer 2 (8 × 12)
    assert snapshot(plain) == before

    lt.add_loldu(model, ["2"], rank=4, adapter_name="c", mark_trainable=False)  # "default" stays active
    before = snapshot(model)
    with pytest.raises(loldu.InvalidArgumentError, match="already has an adapter named 'c'"):
        lt.add_weighted_adapter(model, ["default"], [1.0], "c")
    with pytest.raises(loldu.InvalidArgumentError, match=r"weights\[0\] = nan"):
        lt.add_weighted_adapter(model, ["default"], [float("nan")], "d")
    state = lt.loldu_state_dict(model)
    state["2.loldu_z"] = torch.full_like(state["2.loldu_z"], float("nan"))
    state["0.loldu_z"] = torch.zeros_like(state["0.loldu_z"])
    with pytest.raises(loldu.NotFiniteError, match="2.loldu_z"):
        lt.set_loldu_state_dict(model, state)
    assert snapshot(model) == before


def test_second_derivatives_equal_plain_torch_and_tracing_and_torch_func_are_refused():
    """Under ``create_graph=True`` (gradient penalties, Hessian-vector products) the backward runs
    as torch operations autograd differentiates again: a gradient penalty's gradients with
    respect to the input and to z and σ equal a plain-PyTorch LoLDU's (the Linear's term was
    silently missing from ``autograd.grad``'s second derivative before), for linear and
    weight-space layers; a mixed batch refuses."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Embedding(10, 16), nn.Linear(16, 12), nn.Tanh(), nn.Linear(12, 8))
    lt.add_loldu(model, ["0", "1", "3"], rank=6)
    with torch.no_grad():
        for p in lt.loldu_parameters(model):
            p.mul_(torch.linspace(0.8, 1.2, p.numel()))
    layers = [model[0], model[1], model[3]]

    def weight(layer):  # the reference: W − σ₀ A diag(D_r) U_r + σ A diag(z) U_r, σ₀ = 1 (alpha = r)
        a = layer.adapter
        factors = [torch.from_numpy(a.factor(f)) for f in ("lower", "upper", "diag")]
        w = layer.base_layer.weight
        same = w.shape == (a.m, a.n)  # (else the module's weight is the factored matrix transposed)
        w_eff = torch_weight(w if same else w.T, factors[0], factors[1], factors[2], 1.0,
                             layer.loldu_z["default"], layer.loldu_sigma["default"])
        return w_eff if same else w_eff.T

    def plain(idx, x):
        e = nn.functional.embedding(idx, weight(model[0]))
        h = torch.tanh(nn.functional.linear(x + e, weight(model[1]), model[1].base_layer.bias))
        return nn.functional.linear(h, weight(model[3]), model[3].base_layer.bias)

    def ours(idx, x):
        return model[3](model[2](model[1](x + model[0](idx))))

    idx, x0 = torch.tensor([1, 4, 4, 9, 0]), torch.randn(5, 16)
    params = [p for layer in layers for p in (layer.loldu_z["default"], layer.loldu_sigma["default"])]
    results = []
    for forward in (plain, ours):
        x = x0.clone().requires_grad_()
        out = forward(idx, x).square().sum()
        gx, gz = torch.autograd.grad(out, [x, params[0]], create_graph=True)  # (params[0]: the embedding's z)
        penalty = gx.square().sum() + gz.square().sum()
        results.append(torch.autograd.grad(penalty, [x, *params]))
    for expected, got in zip(*results):
        torch.testing.assert_close(got, expected, rtol=2e-4, atol=1e-5)
    x = x0.clone().requires_grad_()
    with lt.mixed_batch(model, ["default", "__base__", "default", "default", "__base__"]):
        out = ours(idx, x).square().sum()
    with pytest.raises(RuntimeError, match="mixed batch"):
        torch.autograd.grad(out, x, create_graph=True)
    with pytest.raises(RuntimeError, match="cannot be traced"):
        torch.jit.trace(model[1], torch.randn(2, 16))
    for transform in (lambda: torch.func.vmap(model[1])(x0.unsqueeze(1)),
                      lambda: torch.func.grad(lambda x: model[1](x).sum())(x0),
                      lambda: torch.func.vmap(model[0])(idx.unsqueeze(1))):
        with pytest.raises(RuntimeError, match="do not run under torch.func transforms"):
            transform()
    with pytest.raises(loldu.ShapeError):
        model[1](torch.tensor(1.0))


def test_modules_a_loldu_layer_cannot_stand_in_for_are_refused_or_left_out():
    """A subclass with a forward of its own (a LoLDU layer would compute the base type's forward:
    silently different outputs, before) and the linear layers whose owner reads their weights
    instead of calling them (nn.MultiheadAttention's out_proj, nn.TransformerEncoderLayer's
    linear1/linear2: an AttributeError at every forward, before): refused when named, left out
    of "all-linear" with a warning."""
    class Scaled(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    model = nn.Sequential(Scaled(8, 8), nn.TransformerEncoderLayer(8, 2, 16, batch_first=True), nn.Linear(8, 3))
    before = snapshot(model)
    for name, match in (("0", "Scaled, a subclass of nn.Linear with a forward of its own"),
                        ("1.self_attn.out_proj", "reads its weight instead of calling it"),
                        ("1.linear1", "reads its weight instead of calling it")):
        with pytest.raises(loldu.InvalidArgumentError, match=match):
            lt.add_loldu(model, [name])
        assert snapshot(model) == before
    x = torch.randn(2, 5, 8)
    model.eval()
    with torch.no_grad():
        expected = model(x)
    with pytest.warns(loldu.LoLDUWarning, match="'all-linear' leaves out 4 linear layers: 0 "):
        lt.add_loldu(model, "all-linear")
    assert sorted(lt.loldu_layers(model)) == ["2"]
    with torch.no_grad():  # (the encoder layer's fast path reads linear1 / linear2 / out_proj weights)
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(loldu.InvalidArgumentError, match="and the model has no other"):
        lt.add_loldu(nn.TransformerEncoderLayer(8, 2, 16), "all-linear")


def test_an_unfrozen_base_weight_is_refused_in_training_and_a_sparse_embedding_trains():
    model = nn.Sequential(nn.Embedding(10, 8, sparse=True), nn.Linear(8, 3))
    lt.add_loldu(model, ["0", "1"], rank=3)
    idx = torch.tensor([[1, 2], [7, 7]])
    model(idx).square().sum().backward()  # (sparse=True: torch's sparse dW could not reach dz before)
    assert model[0].loldu_z["default"].grad.abs().sum() > 0
    for layer in (model[0], model[1]):
        layer.base_layer.weight.requires_grad_(True)
        with pytest.raises(loldu.StateError, match="base_layer.weight requires grad"):
            model(idx)
        with torch.no_grad():
            model(idx)
        layer.base_layer.weight.requires_grad_(False)
    model(idx)


def test_deleting_adapters_as_peft_does(tmp_path):
    model = small()
    lt.add_loldu(model, ["0", "2"], rank=4)
    lt.add_loldu(model, ["0", "2"], rank=4, adapter_name="b")
    lt.set_adapter(model, "b")
    lt.delete_adapter(model, "b")
    assert lt.active_adapters(model) == ["default"]
    assert model[0].loldu_z["default"].requires_grad  # active again, and trainable
    # A layer whose adapters are all deleted computes its base module; saving skips it.
    lt.add_loldu(model, ["0"], rank=4, adapter_name="only0")
    reference = small()
    x = torch.randn(3, 16)
    lt.set_adapter(model, "default")
    with torch.no_grad():  # (an update of its own: deleted, it must stop computing)
        model[2].loldu_z["default"].add_(0.5)
        assert not torch.allclose(model(x), reference[2](model[1](model[0](x))))
    lt.delete_adapter(model, "default")
    assert not lt.loldu_layers(model)["2"].loldu_config and lt.active_adapters(model) == ["only0"]
    with torch.no_grad():
        expected = reference[2](model[1](model[0](x)))
        torch.testing.assert_close(model(x), expected)
    lt.save_loldu(model, tmp_path / "saved")
    assert loldu.Checkpoint(tmp_path / "saved").names == ["0"]


def test_copies_of_a_disabled_model_stay_disabled_and_embeddings_keep_their_weight():
    model = nn.Sequential(nn.Linear(16, 12))
    reference = copy.deepcopy(model)
    lt.add_loldu(model, ["0"], rank=4)
    with torch.no_grad():
        model[0].loldu_z["default"].add_(0.5)
    lt.disable_loldu(model)
    x = torch.randn(3, 16)
    for copied in (copy.deepcopy(model), model):
        assert not copied[0].enabled
        torch.testing.assert_close(copied(x), reference(x))

    embedding = nn.Sequential(nn.Embedding(20, 8, max_norm=1.0))
    with torch.no_grad():
        embedding[0].weight.mul_(3)
    lt.add_loldu(embedding, ["0"], rank=4)
    weight = embedding[0].base_layer.weight.detach().clone()
    with lt.mixed_batch(embedding, ["__base__", "default"]):
        embedding(torch.tensor([[1, 2, 3], [4, 5, 6]]))
    assert torch.equal(embedding[0].base_layer.weight, weight), "max_norm renormalised the base weight"
    embedding(torch.tensor([[1, 2]]))


def test_adapters_keep_their_objects_and_merged_state_through_loads_and_refactors(tmp_path):
    model = small()
    lt.add_loldu(model, ["0", "2"], rank=4)  # alpha left at its default
    lt.save_loldu(model, tmp_path / "same")
    optimizer = lt.Optimizer(model, "adamw", lr=1e-3)
    before = {name: layer.adapter for name, layer in lt.loldu_layers(model).items()}
    lt.load_loldu(model, tmp_path / "same")  # the saved alpha (= rank) is the default's
    assert {name: layer.adapter for name, layer in lt.loldu_layers(model).items()} == before
    model(torch.randn(3, 16)).sum().backward()
    optimizer.step()
    # A failing add_loldu that would refactor one layer before another refuses: nothing re-created.
    with pytest.raises(loldu.InvalidArgumentError):
        lt.add_loldu(model, ["0", "2"], rank=10, adapter_name="big")
    assert {name: layer.adapter for name, layer in lt.loldu_layers(model).items()} == before
    optimizer.step()
    # A merged adapter stays merged (and gets no gradient) when its layer is factored again.
    layer = model[0]
    layer.merge()
    lt.add_loldu(model, ["0"], rank=8, adapter_name="wide")  # factors at rank 8 now
    assert layer.get_adapter("default").merged
    x = torch.randn(3, 16, requires_grad=True)
    model(x).sum().backward()
    assert layer.loldu_z["default"].grad is None or not layer.loldu_z["default"].grad.any()


def test_a_layer_without_adapters_is_its_base_module_everywhere(tmp_path):
    model = small()
    reference = small()
    lt.add_loldu(model, ["0", "2"], rank=4)
    lt.add_loldu(model, ["0"], rank=4, adapter_name="b")
    x = torch.randn(3, 16)
    with torch.no_grad():  # (an update of its own: deleted, it must stop computing)
        model[2].loldu_z["default"].add_(0.5)
        assert not torch.allclose(model(x), reference(x))
    lt.delete_adapter(model, "default")  # layer 2 has none left
    with lt.mixed_batch(model, ["__base__"] * 3), torch.no_grad():
        torch.testing.assert_close(model(x), reference(x))
    lt.merge_loldu(model)
    lt.unmerge_loldu(model)
    with pytest.raises(loldu.InvalidArgumentError, match="no LoLDU layer has adapter 'zzz'"):
        lt.save_loldu(model, tmp_path / "none", adapter_name="zzz")
    model.double()
    plain = lt.merge_and_unload(model.float())
    assert isinstance(plain[2], nn.Linear)
    torch.testing.assert_close(plain[2].weight, reference[2].weight)
    layer = lt.LoLDULinear(nn.Linear(8, 6), rank=2)
    layer.base_layer.bias = nn.Parameter(torch.zeros(1, 1, 6))
    with pytest.raises(loldu.ShapeError, match=r"bias has shape \(1, 1, 6\)"):
        layer(torch.randn(2, 8))


def test_load_state_dict_refuses_other_values_for_a_merged_adapter():
    """torch's load_state_dict copies into z's memory: under a merged adapter that would leave
    the merged weight stale (and merge_and_unload would export it). Refused, naming the layer,
    before anything is copied; the same values load; unmerged, the new values load and merge."""
    trained = small()
    lt.add_loldu(trained, ["0", "2"], rank=4)
    with torch.no_grad():
        for layer in lt.loldu_layers(trained).values():
            layer.loldu_z["default"].mul_(2.0)
    x = torch.randn(3, 16)
    state, want = trained.state_dict(), trained(x).detach()
    model = small()
    lt.add_loldu(model, ["0", "2"], rank=4)
    lt.merge_loldu(model)
    before, values = model(x).detach(), snapshot(model)
    with pytest.raises(loldu.StateError, match=r"^0: adapter 'default' is merged, and the state dict holds other "
                                               r"values of its loldu_z; unmerge"):
        model.load_state_dict(state)
    assert snapshot(model) == values
    torch.testing.assert_close(model(x), before, rtol=0, atol=0)
    model.load_state_dict(model.state_dict())  # the same values: nothing goes stale
    lt.unmerge_loldu(model)
    model.load_state_dict(state)
    lt.merge_loldu(model)
    torch.testing.assert_close(model(x), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lt.merge_and_unload(model)(x), want, rtol=1e-5, atol=1e-5)


def test_merging_refuses_several_active_adapters_and_is_all_or_nothing():
    """PEFT merges every active adapter into the base weight; a LoLDU layer merges into one
    adapter's own weight, so merging several active adapters is refused (naming the layer and
    the ways out) before any layer merges. A merge that fails on a
    later layer (a float16 weight that would overflow) undoes the earlier ones."""
    model = small()
    lt.add_loldu(model, ["0", "2"], rank=4)
    lt.add_loldu(model, ["2"], rank=4, adapter_name="b")
    lt.set_adapter(model, ["default", "b"])  # layer 0 has one of them, layer 2 both
    message = r"^2: 2 active adapters \['default', 'b'\]; a LoLDU layer merges one adapter .*add_weighted_adapter"
    with pytest.raises(loldu.StateError, match=message):
        lt.merge_loldu(model)
    with pytest.raises(loldu.StateError, match=message):
        model[2].merge()
    assert not any(a.merged for layer in lt.loldu_layers(model).values() for a in layer._adapters.values())
    lt.set_adapter(model, "b")
    lt.merge_loldu(model)  # layer 0 has no "b": nothing to merge there
    assert model[2].merged and model[2].get_adapter("b").merged and not model[0].merged

    half = small().half()
    lt.add_loldu(half, ["0", "2"], rank=4)
    with torch.no_grad():
        half[2].loldu_z["default"].fill_(1e6)  # W_eff beyond float16's 65504
    with pytest.raises(loldu.NotFiniteError, match="^2: the merged weight would not be finite in float16"):
        lt.merge_loldu(half)
    assert not half[0].merged and not half[0].get_adapter("default").merged


def test_delete_adapter_checks_every_layer_before_deleting_anywhere():
    model = small()
    lt.add_loldu(model, ["0", "2"], rank=4)
    lt.add_loldu(model, ["0", "2"], rank=4, adapter_name="b")
    model[2].merge()  # "b" (active) merged on the later layer only
    before = snapshot(model)
    with pytest.raises(loldu.StateError, match=r"^2: adapter 'b' is merged; unmerge it before deleting it"):
        lt.delete_adapter(model, "b")
    assert snapshot(model) == before
    lt.unmerge_loldu(model)
    lt.delete_adapter(model, "b")
    assert lt.adapter_names(model) == ["default"]


def two_adapters() -> nn.Module:
    model = lt.add_loldu(small(), ["0", "2"], rank=4)
    return lt.add_loldu(model, ["0", "2"], rank=3, adapter_name="b", mark_trainable=False)


def load_as_c(model: nn.Module, directory) -> None:
    lt.load_loldu(model, directory, adapter_name="c")


def disabled() -> nn.Module:
    model = two_adapters()
    lt.disable_loldu(model)
    return model


def merged() -> nn.Module:
    model = two_adapters()
    lt.merge_loldu(model)
    return model


def through_disable_adapters(model: nn.Module, directory) -> None:
    with lt.disable_adapters(model):
        pass


# (a model-level call, the model it starts from, and the step it takes once per layer)
CHANGES_LAYER_BY_LAYER = {
    "add_loldu to LoLDU layers": (lambda m, d: lt.add_loldu(m, ["0", "2"], rank=2, adapter_name="c"),
                                  two_adapters, (lt.LoLDULayer, "_install")),
    "add_loldu to plain layers": (lambda m, d: lt.add_loldu(m, ["0", "2"], rank=2), small,
                                  (lt.model, "_set_submodule")),
    "load_loldu": (load_as_c, two_adapters, (lt.LoLDULayer, "_install")),
    "set_adapter": (lambda m, d: lt.set_adapter(m, "b"), two_adapters, (lt.LoLDULayer, "set_adapter")),
    "delete_adapter": (lambda m, d: lt.delete_adapter(m, "default"), two_adapters, (lt.LoLDULayer, "delete_adapter")),
    "add_weighted_adapter": (lambda m, d: lt.add_weighted_adapter(m, ["default", "b"], [1.0, -0.5], "c"),
                             two_adapters, (lt.LoLDULayer, "update_layer")),
    "disable_loldu": (lambda m, d: lt.disable_loldu(m), two_adapters, (lt.LoLDULayer, "enable_adapters")),
    "mark_only_loldu_as_trainable": (lambda m, d: lt.mark_only_loldu_as_trainable(m, bias="all"), two_adapters,
                                     (lt.LoLDULayer, "set_adapter")),
    "unload": (lambda m, d: lt.unload(m), two_adapters, (lt.model, "_set_submodule")),
    "enable_loldu": (lambda m, d: lt.enable_loldu(m), disabled, (lt.LoLDULayer, "enable_adapters")),
    "unmerge_loldu": (lambda m, d: lt.unmerge_loldu(m), merged, (lt.LoLDULayer, "unmerge")),
    "merge_and_unload": (lambda m, d: lt.merge_and_unload(m), two_adapters, (lt.model, "_set_submodule")),
    "disable_adapters (entering: the block is left again)": (through_disable_adapters, two_adapters,
                                                             (lt.LoLDULayer, "enable_adapters")),
}


@pytest.mark.parametrize("call", list(CHANGES_LAYER_BY_LAYER))
def test_ctrl_c_during_a_model_level_change_leaves_it_whole(call, monkeypatch, tmp_path):
    """Ctrl-C (SIGINT) while a call changed the layers one by one stopped it halfway: some layers
    had the new adapter (or active adapter, or were unloaded) and the others not. The call now
    completes, then raises KeyboardInterrupt: the model is exactly what the call without the
    interrupt makes."""
    change, start, (owner, step) = CHANGES_LAYER_BY_LAYER[call]
    lt.save_loldu(two_adapters(), tmp_path, adapter_name="b")
    expected = start()
    change(expected, tmp_path)
    model = start()
    original, calls = getattr(owner, step), []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            signal.raise_signal(signal.SIGINT)  # (Python raises KeyboardInterrupt at its next instruction)
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, step, interrupted)
    # Python's own SIGINT handler, as in a terminal (a process started in the background has
    # SIGINT ignored, and Python then installs no handler).
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            change(model, tmp_path)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert len(calls) >= 2  # (several layers: the interrupt came before the last)
    assert snapshot(model) == snapshot(expected)
    def flags(m):
        return [(layer.enabled, layer._disable_blocks, layer.merged) for layer in lt.loldu_layers(m).values()]

    assert flags(model) == flags(expected)
    if call == "merge_and_unload":
        x = torch.randn(3, 16)
        torch.testing.assert_close(model(x), expected(x), rtol=0, atol=0)


def test_merge_and_unload_is_all_or_nothing():
    """Every effective weight is computed before any layer is replaced: a float16 layer whose
    weight would overflow raises, naming it, and the model keeps all its LoLDU layers."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 8)).half()
    lt.add_loldu(model, ["0", "2"], rank=4)
    with torch.no_grad():
        model[2].loldu_z["default"].mul_(1e6)
    with pytest.raises(loldu.NotFiniteError, match="^2: "):
        lt.merge_and_unload(model)
    assert isinstance(model[0], lt.LoLDULayer) and isinstance(model[2], lt.LoLDULayer)
    with torch.no_grad():
        model[2].loldu_z["default"].div_(1e6)
    x = torch.randn(3, 16, dtype=torch.float16)
    expected = model(x)
    lt.merge_and_unload(model)
    assert type(model[0]) is nn.Linear and type(model[2]) is nn.Linear
    assert torch.allclose(model(x), expected, rtol=1e-2, atol=1e-2)


def test_unknown_names_and_wrong_kinds_are_refused_before_anything_changes(tmp_path):
    """A mistyped adapter name merged every layer away as its base (merge_and_unload) or read and
    loaded nothing (loldu_state_dict, set_loldu_state_dict); a value that is not a tensor, a
    checkpoint naming a module inside a LoLDU layer, torch.jit.script and adapter_names that are
    not names each failed deep inside; merge_and_unload of disabled adapters kept the base."""
    import numpy as np
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4))
    lt.add_loldu(model, "all-linear", rank=4, adapter_name="a")
    with torch.no_grad():
        for layer in lt.loldu_layers(model).values():
            layer.loldu_z["a"].add_(0.1)
    x = torch.randn(3, 6)
    adapted = model(x)
    for call in (lambda: lt.merge_and_unload(model, "typo"), lambda: lt.loldu_state_dict(model, adapter_name="typo"),
                 lambda: lt.set_loldu_state_dict(model, {"0.loldu_z": torch.zeros(4)}, adapter_name="typo")):
        with pytest.raises(loldu.InvalidArgumentError, match="adapter 'typo'"):
            call()
    with pytest.raises(loldu.InvalidArgumentError, match=r"state_dict\['0.loldu_z'\] is a ndarray"):
        lt.set_loldu_state_dict(model, {"0.loldu_z": np.ones(4, np.float32)}, adapter_name="a")
    with pytest.raises(loldu.InvalidArgumentError, match="adapter_names must be a list of adapter names"):
        model[0](x, adapter_names=[0, 1, 0])
    for call, argument in ((lambda: lt.set_adapter(model, None), "adapter_name"),
                           (lambda: lt.delete_adapter(model, ["a"]), "adapter_name"),
                           (lambda: lt.add_weighted_adapter(model, "aa", [1, 1], "c"), "adapters"),  # (not its letters)
                           (lambda: lt.add_weighted_adapter(model, ["a"], ["x"], "c"), r"weights\[0\]"),
                           (lambda: lt.mixed_batch(model, None).__enter__(), "adapter_names")):
        with pytest.raises(loldu.InvalidArgumentError, match=f"^{argument}"):
            call()
    with pytest.raises(RuntimeError, match="scripted by torch.jit"), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # (torch.jit.script is deprecated)
        torch.jit.script(model)
    saved = tmp_path / "inner"
    loldu.save(saved, {"0.base_layer": loldu.Adapter(model[0].base_layer.weight.detach().numpy(),
                                                      model[0].base_layer.bias.detach().numpy(), rank=3)})
    with pytest.raises(loldu.MismatchError, match="inside a LoLDU layer"):
        lt.load_loldu(model, saved, adapter_name="n")
    assert lt.adapter_names(model) == ["a"]
    torch.testing.assert_close(model(x), adapted, rtol=1e-6, atol=1e-6)  # (auto may switch to the merged path)
    state = model.state_dict()
    state["0.loldu_z.a"] = torch.full_like(state["0.loldu_z.a"], float("nan"))
    with pytest.raises(loldu.NotFiniteError, match=r"0: the state dict's values of adapter 'a'"):
        model.load_state_dict(state)  # (as set_loldu_state_dict refuses it)
    torch.testing.assert_close(model(x), adapted, rtol=1e-6, atol=1e-6)
    # finite values whose σ·z overflows float32 (or beyond float32 itself): refused the same way
    for z, sigma in ((3e38, 4.0), (1e300, None)):
        state = model.state_dict()
        state["0.loldu_z.a"] = torch.full(state["0.loldu_z.a"].shape, z, dtype=torch.float64)
        if sigma is not None:
            state["0.loldu_sigma.a"] = torch.tensor([sigma])
        with pytest.raises(loldu.NotFiniteError, match=r"0: the state dict's values of adapter 'a'.*σ·z"):
            model.load_state_dict(state)
        with pytest.raises(loldu.NotFiniteError, match=r"0: state_dict's 0.loldu_z / 0.loldu_sigma"):
            lt.set_loldu_state_dict(model, {"0.loldu_z": state["0.loldu_z.a"], "0.loldu_sigma": state["0.loldu_sigma.a"]})
        torch.testing.assert_close(model(x), adapted, rtol=1e-6, atol=1e-6)
    lt.disable_loldu(model)
    assert not torch.equal(model(x), adapted)
    torch.testing.assert_close(lt.merge_and_unload(model, "a")(x), adapted, rtol=1e-5, atol=1e-6)
    assert type(model[0]) is nn.Linear


def test_loading_values_checks_them_as_pairs_and_before_any_layer_changes():
    """z and σ are checked and set as one pair (a valid pair is not refused for the order of its
    keys), and a model's load_state_dict refuses before torch copies anything into any layer."""
    torch.manual_seed(3)
    model = lt.add_loldu(nn.Sequential(nn.Linear(6, 6), nn.Linear(6, 6)), ["0", "1"], rank=3)
    x = torch.randn(2, 6)
    with torch.no_grad():
        model[1].loldu_sigma["default"].fill_(4.0)
    pair = {"1.loldu_z": torch.full((3,), 1e38), "1.loldu_sigma": torch.tensor([1.0])}  # 4e38 with σ = 4
    for order in (list(pair), list(pair)[::-1]):
        lt.set_loldu_state_dict(model, {k: pair[k] for k in order})
        assert model[1].loldu_z["default"][0].item() == pytest.approx(1e38) and model[1].loldu_sigma["default"].item() == 1
        with torch.no_grad():
            model[1].loldu_sigma["default"].fill_(1.0)
            model[1].loldu_z["default"].fill_(1.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    y = model(x)
    state = {k: v + 1 for k, v in before.items()}  # every tensor changed: layer 0's weight and z too
    state["1.loldu_z.default"] = torch.full((3,), 3e38)
    state["1.loldu_sigma.default"] = torch.tensor([2.0])
    with pytest.raises(loldu.NotFiniteError, match=r"1: the state dict's values of adapter 'default'"):
        model.load_state_dict(state)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    torch.testing.assert_close(model(x), y, rtol=0, atol=0)
