"""Adapters leaving the library: the exact PEFT LoRA export (loaded by PEFT; vLLM's and
llama.cpp's rules), and checkpoints merged into model files (loaded by transformers; one file,
shards, bf16), with the bad inputs each must refuse without leaving output."""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import signal
import threading
import time

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.numpy import load_file, save_file
from torch import nn

import loldu
import loldu.torch as lt
from conftest import adapted_minilm, hidden, minilm_dir, relative_error


def base_minilm():
    from transformers import AutoModel

    return AutoModel.from_pretrained(str(minilm_dir())).eval()


def peft_outputs(lora_dir, tokens):
    from peft import PeftModel

    return hidden(PeftModel.from_pretrained(base_minilm(), str(lora_dir)).eval(), tokens)


# --- the LoRA export ----------------------------------------------------------------------------

def test_peft_loads_the_exported_minilm_adapter_and_computes_the_same(trained_minilm, tmp_path):
    checkpoint, tokens = trained_minilm
    model = adapted_minilm(checkpoint)
    lt.export_lora(model, tmp_path / "lora")
    ours = hidden(model, tokens)
    assert relative_error(hidden(base_minilm(), tokens), ours) > 1e-3  # the adapter does something
    theirs = peft_outputs(tmp_path / "lora", tokens)
    assert relative_error(theirs, ours) < 1e-5
    assert float((theirs - ours).abs().max() / ours.abs().max()) < 1e-5

    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == config["lora_alpha"] == 8
    assert config["base_model_name_or_path"] == str(minilm_dir())
    tensors = load_file(str(tmp_path / "lora" / "adapter_model.safetensors"))
    embedding = "base_model.model.embeddings.word_embeddings."
    assert tensors[embedding + "lora_embedding_A"].shape == (8, 30522)  # rank 4, padded to 8
    assert tensors[embedding + "lora_embedding_B"].shape == (384, 8)
    assert not tensors[embedding + "lora_embedding_A"][4:].any()
    query = "base_model.model.encoder.layer.0.attention.self.query."
    assert tensors[query + "lora_A.weight"].shape == (8, 384) and tensors[query + "lora_B.weight"].shape == (384, 8)
    assert tensors["base_model.model.encoder.layer.0.intermediate.dense.lora_B.weight"].shape == (1536, 8)


def test_lora_tensors_are_the_factors_and_coefficients(tmp_path):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((12, 20)).astype(np.float32)
    a = loldu.Adapter(w, rank=5)
    a.z = a.z + rng.standard_normal(5).astype(np.float32) * 0.1
    a.sigma = 1.5
    for dtype, tolerance in (("float32", 2.0 ** -24), (loldu.bfloat16, 2.0 ** -8), ("float16", 2.0 ** -10)):
        out = tmp_path / str(np.dtype(dtype))
        loldu.export_lora(out, {"layer": a}, dtype=dtype)
        with safe_open(str(out / "adapter_model.safetensors"), "np") as f:
            assert f.metadata()["format"] == "pt"
            lora_a = f.get_slice("base_model.model.layer.lora_A.weight")
            assert lora_a.get_dtype() == {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}[str(np.dtype(dtype))]
        with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:  # (numpy reads no bf16 through safetensors)
            lora_a, lora_b = (f.get_tensor(f"base_model.model.layer.lora_{x}.weight").double().numpy() for x in "AB")
        expected_b = a.factor("lower").astype(np.float64) * a.coefficients().astype(np.float64)
        np.testing.assert_allclose(lora_a, a.factor("upper"), rtol=tolerance, atol=0)
        np.testing.assert_allclose(lora_b, expected_b, rtol=tolerance, atol=1e-7)
        if dtype == "float32":  # one rounding of the exact product
            np.testing.assert_array_equal(lora_b, expected_b.astype(np.float32))
        delta = lora_b @ lora_a  # (each factor rounded once: off by up to 2 roundings of each term)
        bound = 1e-5 + 2.5 * tolerance * (np.abs(lora_b) @ np.abs(lora_a))
        assert np.all(np.abs(w.astype(np.float64) + delta - a.effective_weight()) <= bound)


def test_half_precision_lora_tensors_are_rounded_once(tmp_path):
    """lora_B = A diag(c) is exact in double and rounded once to the export dtype, not through
    float32 first: these products lie just above a tie of the half type, where rounding to
    float32 first lands on the tie, and the tie rounds to even, down."""
    for dtype, a, correct in ((np.float16, 2.0 ** -12, 1 + 2.0 ** -10), (loldu.bfloat16, 2.0 ** -8 - 2.0 ** -16, 1 + 2.0 ** -7)):
        b = 2.0 ** -12 if dtype == np.float16 else 2.0 ** -16
        # W = [8, 4 (1 + a)]ᵀ: pivot 8, L = [1, (1 + a) / 2]; z = 9 + b makes c = z − 8 = 1 + b.
        adapter = loldu.Adapter(np.array([[8.0], [4.0 * (1 + a)]], np.float32), rank=1)
        adapter.z = np.array([9.0 + b], np.float32)
        exact, correct = (1 + a) * (1 + b) / 2, correct / 2
        assert float(adapter.factor("lower")[1, 0]) * float(adapter.coefficients()[0]) == exact
        assert float(np.float32(exact).astype(dtype)) != correct  # (rounded through float32: wrong)
        out = tmp_path / str(np.dtype(dtype))
        loldu.export_lora(out, {"layer": adapter}, dtype=dtype)
        with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
            lora_b = f.get_tensor("base_model.model.layer.lora_B.weight").double().numpy()
        assert lora_b[1, 0] == correct, (np.dtype(dtype), lora_b[1, 0], correct)


def vllm_problems(config: dict, max_lora_rank: int = 16) -> list[str]:
    """What vLLM's PEFTHelper refuses in an adapter_config.json (vllm/lora/peft_helper.py)."""
    problems = [f"missing {key}" for key in ("r", "lora_alpha", "target_modules") if key not in config]
    if config.get("bias", "none") != "none":
        problems.append("bias is not supported")
    if config.get("use_dora"):
        problems.append("DoRA is not supported")
    if config.get("modules_to_save"):
        problems.append("modules_to_save is not supported")
    if config.get("lora_bias"):
        problems.append("lora_bias is not supported")
    if config.get("init_lora_weights") in ("pissa", "olora", "corda", "loftq", "eva") or \
            str(config.get("init_lora_weights", "")).startswith("pissa"):
        problems.append("an init that modifies the base weights is not supported")
    if isinstance(config.get("r"), int) and config["r"] > max_lora_rank:
        problems.append(f"r {config['r']} > max_lora_rank {max_lora_rank}")
    return problems


def llama_cpp_problems(config: dict, tensor_names) -> list[str]:
    """What llama.cpp's convert_lora_to_gguf.py needs: lora_alpha, a base model, and only LoRA
    tensors (lora_A / lora_B, or an embedding's)."""
    problems = [] if "lora_alpha" in config else ["missing lora_alpha"]
    if not config.get("base_model_name_or_path"):
        problems.append("no base_model_name_or_path (pass --base to the converter)")
    pattern = re.compile(r"^base_model\.model\..+\.(lora_[AB]\.weight|lora_embedding_[AB])$")
    problems += [f"unexpected tensor {n}" for n in tensor_names if not pattern.match(n)]
    return problems


def test_the_export_passes_the_vllm_and_llama_cpp_rules(trained_minilm, tmp_path):
    checkpoint, _ = trained_minilm
    lt.export_lora(adapted_minilm(checkpoint), tmp_path / "lora")
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    names = load_file(str(tmp_path / "lora" / "adapter_model.safetensors")).keys()
    assert vllm_problems(config, max_lora_rank=8) == []
    assert llama_cpp_problems(config, names) == []
    # The rules themselves refuse what vLLM and llama.cpp refuse.
    assert vllm_problems(config, max_lora_rank=4) == ["r 8 > max_lora_rank 4"]
    for change, expected in (({"bias": "all"}, "bias"), ({"use_dora": True}, "DoRA"),
                             ({"modules_to_save": ["classifier"]}, "modules_to_save"),
                             ({"init_lora_weights": "pissa"}, "init"), ({"lora_bias": True}, "lora_bias")):
        assert any(expected in p for p in vllm_problems({**config, **change}, 8)), change
    assert vllm_problems({k: v for k, v in config.items() if k != "lora_alpha"}, 8) == ["missing lora_alpha"]
    assert llama_cpp_problems({**config, "base_model_name_or_path": None}, names)
    assert llama_cpp_problems(config, [*names, "base_model.model.x.lora_magnitude_vector"])


def test_convolutions_export_in_peft_shapes_and_odd_ones_are_refused(tmp_path):
    from peft import PeftModel

    torch.manual_seed(1)
    base = nn.Sequential(nn.Conv2d(3, 6, (3, 2), stride=2, padding=1), nn.ReLU(), nn.Conv1d(6, 4, 1)).eval()
    model = nn.Sequential(copy.deepcopy(base[0])).eval()
    reference = nn.Sequential(copy.deepcopy(base[0])).eval()
    lt.add_loldu(model, ["0"], rank=4)
    with torch.no_grad():
        model[0].loldu_z["default"].add_(torch.randn(4))
    lt.export_lora(model, tmp_path / "conv")
    x = torch.randn(2, 3, 9, 8)
    with torch.no_grad():
        ours = model(x)
        theirs = PeftModel.from_pretrained(reference, str(tmp_path / "conv")).eval()(x)
    assert relative_error(theirs, ours) < 1e-5
    assert load_file(str(tmp_path / "conv" / "adapter_model.safetensors"))[
        "base_model.model.0.lora_A.weight"].shape == (4, 3, 3, 2)

    dilated = nn.Sequential(nn.Conv2d(3, 6, 3, dilation=2))
    lt.add_loldu(dilated, ["0"], rank=2)
    with pytest.raises(loldu.InvalidArgumentError, match=r"layer '0'.*dilation=\(2, 2\)"):
        lt.export_lora(dilated, tmp_path / "dilated")
    assert not (tmp_path / "dilated").exists()
    # Kernel sizes the C struct cannot hold are refused, not wrapped into a valid-looking shape.
    a = loldu.Adapter(np.random.default_rng(2).standard_normal((4, 12)).astype(np.float32), rank=2)
    for kernel, message in [((2**64 + 3, 2**64 + 4), "kernel size = 18446744073709551619 is outside"),
                            ((2**31 - 1,) * 3, "kernel")]:
        with pytest.raises(loldu.InvalidArgumentError, match=message):
            loldu.export_lora(tmp_path / "huge", {"c": a}, kinds={"c": ("conv", kernel)})
        assert not (tmp_path / "huge").exists()


def test_several_active_adapters_compute_what_peft_computes_with_both_exported(tmp_path):
    """Two adapters (ranks 4 and 6) active at once, exported one by one and loaded into one
    PeftModel with both active: PEFT adds the two LoRA updates, as our layers add theirs."""
    from peft import PeftModel

    torch.manual_seed(2)
    base = nn.Sequential(nn.Linear(10, 12), nn.Tanh(), nn.Linear(12, 6)).eval()
    model = copy.deepcopy(base)
    lt.add_loldu(model, ["0", "2"], rank=4, adapter_name="a")
    lt.add_loldu(model, ["0", "2"], rank=6, z_init="s_normal", residual="init", adapter_name="b")
    with torch.no_grad():
        for layer in lt.loldu_layers(model).values():
            layer.loldu_z["a"].add_(0.3 * torch.randn(4))
            layer.loldu_sigma["b"].fill_(1.4)
    for name in ("a", "b"):
        lt.export_lora(model, tmp_path / name, adapter_name=name)
    peft = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "a"), adapter_name="a").eval()
    peft.load_adapter(str(tmp_path / "b"), adapter_name="b")
    peft.base_model.set_adapter(["a", "b"])
    lt.set_adapter(model, ["a", "b"])
    x = torch.randn(5, 10)
    with torch.no_grad():
        ours, theirs = model(x), peft(x)
        lt.set_adapter(model, "a")
        assert relative_error(model(x), ours) > 1e-3  # (b's update counts)
    assert relative_error(theirs, ours) < 1e-5


def test_exports_that_would_not_be_exact_or_would_be_cut_short_are_refused(tmp_path):
    """An embedding with max_norm (PEFT renormalises W's rows before adding the update, the layer
    W_eff's: a silently different model, before), a ``kinds`` entry for a layer not exported
    (ignored before), and a NUL in a name or path (cut there by the C string, before)."""
    model = nn.Sequential(nn.Embedding(10, 6, max_norm=1.0))
    lt.add_loldu(model, ["0"], rank=3)
    with pytest.raises(loldu.InvalidArgumentError, match=r"layer '0'.*max_norm"):
        lt.export_lora(model, tmp_path / "renorm")
    a = loldu.Adapter(np.random.default_rng(3).standard_normal((4, 6)).astype(np.float32), rank=2)
    with pytest.raises(loldu.InvalidArgumentError, match=r"kinds names layers that are not exported: \['b'\]"):
        loldu.export_lora(tmp_path / "kinds", {"a": a}, kinds={"b": "embedding"})
    for call, what in ((lambda: loldu.export_lora(tmp_path / "nul", {"a\0b": a}), "layer name"),
                       (lambda: loldu.export_lora(tmp_path / "nul", {"a": a}, base_model_name_or_path="org/m\0x"),
                        "base_model_name_or_path"),
                       (lambda: loldu.export_lora(str(tmp_path / "nul\0x"), {"a": a}), "directory"),
                       (lambda: loldu.export_merged(str(tmp_path / "m\0.safetensors"), {"a": a}), "path"),
                       (lambda: loldu.save(str(tmp_path / "s\0x"), {"a": a}), "directory")):
        with pytest.raises(loldu.InvalidArgumentError, match=f"{what} contains a NUL character"):
            call()
    # z so large that c is finite but W + lora_B lora_A is not (PEFT would compute ±inf): refused,
    # as a merge refuses it.
    big = loldu.Adapter(np.random.default_rng(4).standard_normal((4, 6)).astype(np.float32), rank=2)
    big.z = np.full(2, 3e38, np.float32)
    with pytest.raises(loldu.NotFiniteError, match=r'layer "a": as a LoRA, W \+ lora_B lora_A would not be finite'):
        loldu.export_lora(tmp_path / "big", {"a": big})
    # A name longer than the file system takes: refused before any work, not at the final rename.
    with pytest.raises(loldu.InvalidArgumentError, match="is 256 bytes; the file system .* at most 255 bytes"):
        loldu.export_lora(tmp_path / ("x" * 256), {"a": big})  # (the name first, before any work)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_an_existing_directory_is_refused_or_replaced_only_if_it_is_an_export(tmp_path):
    rng = np.random.default_rng(1)
    a = loldu.Adapter(rng.standard_normal((6, 5)).astype(np.float32), rank=3)
    target = tmp_path / "lora"
    target.mkdir()  # an empty directory is filled
    loldu.export_lora(target, {"l": a})
    before = (target / "adapter_model.safetensors").read_bytes()
    a.sigma = 2.0
    with pytest.raises(loldu.LoLDUIOError, match="already exists"):
        loldu.export_lora(target, {"l": a})
    assert (target / "adapter_model.safetensors").read_bytes() == before
    loldu.export_lora(target, {"l": a}, replace=True)
    assert (target / "adapter_model.safetensors").read_bytes() != before
    assert sorted(os.listdir(target)) == ["adapter_config.json", "adapter_model.safetensors"]

    (target / "notes.txt").write_text("mine")
    with pytest.raises(loldu.LoLDUIOError, match="notes.txt"):
        loldu.export_lora(target, {"l": a}, replace=True)
    assert (target / "notes.txt").read_text() == "mine"
    (target / "notes.txt").unlink()
    # An export's file names, but not files an export writes: a directory tree, a link.
    (target / "README.md").mkdir()
    (target / "README.md" / "results.csv").write_text("mine")
    with pytest.raises(loldu.LoLDUIOError, match=r"README.md\" is a directory, not a file an export writes"):
        loldu.export_lora(target, {"l": a}, replace=True)
    assert (target / "README.md" / "results.csv").read_text() == "mine"
    shutil.rmtree(target / "README.md")
    (target / "README.md").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(loldu.LoLDUIOError, match="is a symbolic link"):
        loldu.export_lora(target, {"l": a}, replace=True)
    (target / "README.md").unlink()
    checkpoint = tmp_path / "ckpt"
    loldu.save(checkpoint, {"l": a})
    with pytest.raises(loldu.LoLDUIOError, match="not an earlier"):
        loldu.export_lora(checkpoint, {"l": a}, replace=True)
    assert loldu.Checkpoint(checkpoint).names == ["l"]

    a.z[0] = np.inf  # (written through the live view)
    with pytest.raises(loldu.NotFiniteError, match="layer \"l\""):
        loldu.export_lora(tmp_path / "bad", {"l": a})
    assert not (tmp_path / "bad").exists()
    assert [n for n in os.listdir(tmp_path) if n.startswith(".")] == []


# --- merging into model files --------------------------------------------------------------------

def merged_tensors(directory) -> dict[str, np.ndarray]:
    out = {}
    for name in sorted(os.listdir(directory)):
        if name.endswith(".safetensors"):
            with safe_open(str(directory / name), "pt") as f:
                for key in f.keys():
                    out[key] = f.get_tensor(key)
    return out


def test_the_merged_minilm_loads_in_transformers_and_computes_the_adapted_model(trained_minilm, tmp_path):
    from transformers import AutoModel

    checkpoint, tokens = trained_minilm
    seen = []
    loldu.merge_model(checkpoint, minilm_dir(), tmp_path / "merged", progress=lambda d, t, n: seen.append((d, t, n)))
    merged = AutoModel.from_pretrained(str(tmp_path / "merged")).eval()
    assert relative_error(hidden(merged, tokens), hidden(adapted_minilm(checkpoint), tokens)) < 1e-5
    # Progress: once per tensor, ending at the total.
    assert seen[-1][0] == seen[-1][1] and len(seen) == len(merged_tensors(minilm_dir()))
    # Other files are copied as they are; tensors not adapted are the same bytes.
    for name in ("tokenizer.json", "vocab.txt", "config.json", "1_Pooling/config.json"):
        assert (tmp_path / "merged" / name).read_bytes() == (minilm_dir() / name).read_bytes(), name
    before, after = merged_tensors(minilm_dir()), merged_tensors(tmp_path / "merged")
    assert list(before) == list(after)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    adapted = {f"{n}.weight" for n in loldu.Checkpoint(checkpoint).names}
    assert changed == adapted


def split_into_shards(source, target, parts: int = 3) -> None:
    """A sharded copy of a single-file model, as transformers writes one."""
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("model.safetensors"))
    tensors = load_file(str(source / "model.safetensors"))
    names = list(tensors)
    weight_map, total = {}, 0
    for i in range(parts):
        file = f"model-{i + 1:05d}-of-{parts:05d}.safetensors"
        chunk = {n: tensors[n] for n in names[i::parts]}
        save_file(chunk, str(target / file), metadata={"format": "pt"})
        weight_map.update({n: file for n in chunk})
        total += sum(t.nbytes for t in chunk.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (target / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def test_a_sharded_copy_merges_to_the_same_tensors_and_shards(trained_minilm, tmp_path):
    from transformers import AutoModel

    checkpoint, tokens = trained_minilm
    split_into_shards(minilm_dir(), tmp_path / "sharded")
    # Another module's weights in a subdirectory (sentence-transformers' Dense) are copied; other
    # copies of the model's weights (which would not be merged) are not.
    (tmp_path / "sharded" / "2_Dense").mkdir()
    save_file({"linear.weight": np.ones((4, 384), dtype=np.float32)}, str(tmp_path / "sharded" / "2_Dense" / "model.safetensors"))
    (tmp_path / "sharded" / "onnx").mkdir()
    (tmp_path / "sharded" / "onnx" / "model.onnx").write_bytes(b"unmerged")
    (tmp_path / "sharded" / "pytorch_model.bin").write_bytes(b"unmerged")
    loldu.merge_model(checkpoint, minilm_dir(), tmp_path / "single")
    loldu.merge_model(checkpoint, tmp_path / "sharded", tmp_path / "merged")
    dense = "2_Dense/model.safetensors"
    assert (tmp_path / "merged" / dense).read_bytes() == (tmp_path / "sharded" / dense).read_bytes()
    assert not (tmp_path / "merged" / "onnx" / "model.onnx").exists()
    assert not (tmp_path / "merged" / "pytorch_model.bin").exists()
    single, sharded = merged_tensors(tmp_path / "single"), merged_tensors(tmp_path / "merged")
    assert set(single) == set(sharded) and all(torch.equal(single[k], sharded[k]) for k in single)
    shards = sorted(n for n in os.listdir(tmp_path / "merged") if n.endswith(".safetensors"))
    assert shards == sorted(n for n in os.listdir(tmp_path / "sharded") if n.endswith(".safetensors"))
    index = json.loads((tmp_path / "merged" / "model.safetensors.index.json").read_text())
    assert index == json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    merged = AutoModel.from_pretrained(str(tmp_path / "merged")).eval()
    assert relative_error(hidden(merged, tokens), hidden(adapted_minilm(checkpoint), tokens)) < 1e-5

    # --dtype: every float tensor converted, the index's total size and the config follow.
    loldu.merge_model(checkpoint, tmp_path / "sharded", tmp_path / "bf16", dtype=loldu.bfloat16)
    converted = merged_tensors(tmp_path / "bf16")
    assert {t.dtype for t in converted.values()} == {torch.bfloat16, torch.int64}  # (position_ids stay integers)
    assert all(torch.equal(converted[k], sharded[k].to(converted[k].dtype)) for k in converted)
    index = json.loads((tmp_path / "bf16" / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in converted.values())
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_bf16_base_in_bf16_out(tmp_path):
    from transformers import AutoModel

    bf16_dir = tmp_path / "bf16-base"
    AutoModel.from_pretrained(str(minilm_dir()), dtype=torch.bfloat16).save_pretrained(str(bf16_dir))
    # A checkpoint trained on the bf16 model's float32 copy (same values, same fingerprints).
    model = AutoModel.from_pretrained(str(bf16_dir), dtype=torch.float32).eval()
    lt.add_loldu(model, ["query", "value"], rank=6)
    torch.manual_seed(3)
    with torch.no_grad():
        for _, p in lt.named_loldu_parameters(model):
            p.add_(torch.randn_like(p) * 0.2)
    lt.save_loldu(model, str(tmp_path / "ckpt"))
    loldu.merge_model(tmp_path / "ckpt", bf16_dir, tmp_path / "merged")

    base, merged = merged_tensors(bf16_dir), merged_tensors(tmp_path / "merged")
    assert {t.dtype for t in merged.values()} == {t.dtype for t in base.values()} == {torch.bfloat16}
    for name, layer in lt.loldu_layers(model).items():
        # W + ΔW in float32, rounded once to bf16.
        assert torch.equal(merged[f"{name}.weight"], layer.effective_weight().to(torch.bfloat16)), name
    tokens = torch.randint(1000, 30000, (2, 10))
    bf16_model = AutoModel.from_pretrained(str(tmp_path / "merged")).eval()
    assert bf16_model.dtype == torch.bfloat16
    assert relative_error(hidden(bf16_model, tokens), hidden(model, tokens)) < 3e-2


def test_ctrl_c_stops_a_merge_and_is_raised_after_it(trained_minilm, tmp_path):
    """A SIGINT while the library merges (here from another thread, while the progress callback
    of a slowed merge runs) stops the merge at its next tensor, leaves no output, and is raised
    as KeyboardInterrupt once the call returns: raised inside a ctypes callback, it would be
    lost (printed as "Exception ignored") and the merge would end as cancelled, or complete."""
    checkpoint, _ = trained_minilm
    calls = []

    timer = threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGINT))

    def progress(done, total, tensor):
        if not calls:  # (started by the first tensor: the checks before it take longer on a busy machine)
            timer.start()
        calls.append(tensor)
        time.sleep(0.01)  # (a merge long enough for the timer: about 100 tensors)

    try:
        with pytest.raises(KeyboardInterrupt):
            loldu.merge_model(checkpoint, minilm_dir(), tmp_path / "merged", progress=progress)
    finally:
        timer.cancel()
    assert 0 < len(calls) < 100 and os.listdir(tmp_path) == []


def test_bad_model_directories_are_refused_and_leave_no_output(trained_minilm, tmp_path):
    checkpoint, _ = trained_minilm
    out = tmp_path / "out"

    def refused(error, match, base, **kwargs):
        with pytest.raises(error, match=match):
            loldu.merge_model(checkpoint, base, out, **kwargs)
        assert not out.exists()
        assert [n for n in os.listdir(tmp_path) if n.startswith(".out")] == []

    refused(loldu.LoLDUIOError, "cannot open", tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    refused(loldu.LoLDUIOError, "neither model.safetensors nor", tmp_path / "empty")
    # A truncated shard, and an index naming a tensor its shard lacks.
    split_into_shards(minilm_dir(), tmp_path / "truncated")
    shard = tmp_path / "truncated" / "model-00002-of-00003.safetensors"
    with open(shard, "r+b") as f:
        f.truncate(os.path.getsize(shard) - 100)
    refused(loldu.FormatError, "model-00002-of-00003.safetensors", tmp_path / "truncated")
    split_into_shards(minilm_dir(), tmp_path / "lying")
    index = json.loads((tmp_path / "lying" / "model.safetensors.index.json").read_text())
    index["weight_map"]["extra.weight"] = "model-00001-of-00003.safetensors"
    (tmp_path / "lying" / "model.safetensors.index.json").write_text(json.dumps(index))
    refused(loldu.FormatError, "extra.weight", tmp_path / "lying")
    index["weight_map"] = {"x": "../model.safetensors"}
    (tmp_path / "lying" / "model.safetensors.index.json").write_text(json.dumps(index))
    refused(loldu.FormatError, "not a file name in this directory", tmp_path / "lying")
    index["weight_map"] = {"x": "model-00001-of-00003.safetensors\u0000junk"}  # JSON may escape a NUL
    (tmp_path / "lying" / "model.safetensors.index.json").write_text(json.dumps(index))
    refused(loldu.FormatError, "control character", tmp_path / "lying")
    # Another model: one adapted weight changed.
    tensors = load_file(str(minilm_dir() / "model.safetensors"))
    other = tmp_path / "other"
    shutil.copytree(minilm_dir(), other)
    tensors["encoder.layer.2.attention.self.value.weight"][0, 0] += 1e-3
    save_file(tensors, str(other / "model.safetensors"), metadata={"format": "pt"})
    refused(loldu.MismatchError, r"layer \"encoder.layer.2.attention.self.value\".*not the weight", other)
    # The same values in one dimension: a tensor the layer cannot have been saved on.
    tensors["encoder.layer.2.attention.self.value.weight"] = np.zeros(384 * 384, np.float32)
    save_file(tensors, str(other / "model.safetensors"), metadata={"format": "pt"})
    refused(loldu.MismatchError, r"layer \"encoder.layer.2.attention.self.value\".*has shape \(147456,\)|\[147456\]", other)
    # A weight stored as integers.
    tensors["encoder.layer.2.attention.self.value.weight"] = np.zeros((384, 384), np.int32)
    save_file(tensors, str(other / "model.safetensors"), metadata={"format": "pt"})
    refused(loldu.DTypeError, "I32", other)
    # The right weight with an infinite bias: the message names the layer and the file.
    tensors = load_file(str(minilm_dir() / "model.safetensors"))
    tensors["encoder.layer.2.attention.self.value.bias"][0] = np.inf
    save_file(tensors, str(other / "model.safetensors"), metadata={"format": "pt"})
    refused(loldu.NotFiniteError, r"layer \"encoder.layer.2.attention.self.value\".*other.*bias\[0\]", other)
    # A progress callback that raises stops the merge; its exception comes out.
    def stop(done, total, name):
        if done > total // 2:
            raise KeyboardInterrupt

    refused(KeyboardInterrupt, None, minilm_dir(), progress=stop)
    with pytest.raises(loldu.InvalidArgumentError, match="float32, bfloat16 or float16"):
        loldu.merge_model(checkpoint, minilm_dir(), out, dtype="float64")
    # An empty directory is filled (as after `mkdir out`); one with files is never touched.
    out.mkdir()
    loldu.merge_model(checkpoint, minilm_dir(), out)
    assert (out / "model.safetensors").is_file()
    shutil.rmtree(out)
    out.mkdir()
    (out / "keep").write_text("x")
    with pytest.raises(loldu.LoLDUIOError, match="already exists"):
        loldu.merge_model(checkpoint, minilm_dir(), out)
    assert os.listdir(out) == ["keep"]


def with_header(path, change) -> None:
    """Rewrites a safetensors file's header through ``change(header dict)``, data as it was."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    change(header)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + n:])


def test_what_python_and_transformers_write_merges_and_tied_embeddings_are_refused(trained_minilm, tmp_path):
    """A config.json holding Python's Infinity (json.dumps writes it), and an empty tensor with
    dimensions whose product without the 0 overflows: merged, and kept as they are. A model that
    ties its word embeddings to its output layer: merging into them is refused (the adapter
    changed the input embeddings only), until the config unties them."""
    checkpoint, _ = trained_minilm
    base = tmp_path / "base"
    shutil.copytree(minilm_dir(), base)
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "clamp_value": float("inf")}, indent=2))
    tensors = load_file(str(base / "model.safetensors"))
    save_file({**tensors, "empty": np.zeros(0, np.float32)}, str(base / "model.safetensors"), metadata={"format": "pt"})
    with_header(base / "model.safetensors", lambda header: header["empty"].update(shape=[1 << 40, 1 << 40, 0]))
    loldu.merge_model(checkpoint, base, tmp_path / "merged", dtype="bfloat16")
    written = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert written == {**config, "clamp_value": float("inf"), "torch_dtype": "bfloat16"}
    raw = (tmp_path / "merged" / "model.safetensors").read_bytes()
    header = json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])
    assert header["empty"]["shape"] == [1 << 40, 1 << 40, 0] and header["empty"]["dtype"] == "BF16"
    begin, end = header["empty"]["data_offsets"]
    assert begin == end

    # (MiniLM's config says model_type "bert": BertModel is its bare encoder)
    for architectures, tied, refused in ((["BertForMaskedLM"], None, True), (["BertForMaskedLM"], True, True),
                                         (None, None, True), (["GPT2LMHeadModel"], None, True),
                                         (["MarianMTModel"], None, True), (["BertModel", "BertForMaskedLM"], None, True),
                                         (["BertForMaskedLM"], False, False), (["BertModel"], None, False),
                                         (["BertForSequenceClassification"], None, False), ("text_config", None, True)):
        changed = {**config, "architectures": architectures}
        if tied is not None:
            changed["tie_word_embeddings"] = tied
        if architectures is None:
            del changed["architectures"]
        if architectures == "text_config":  # a multimodal model's language settings
            changed.update(architectures=["LlavaForConditionalGeneration"], model_type="llava",
                           text_config={"vocab_size": changed.pop("vocab_size")})
        (base / "config.json").write_text(json.dumps(changed))
        out = tmp_path / "tied"
        if refused:
            with pytest.raises(loldu.InvalidArgumentError,
                               match=r'"embeddings.word_embeddings".*tie its input and output embeddings.*tie_word_embeddings'):
                loldu.merge_model(checkpoint, base, out)
            assert not out.exists()
        else:
            loldu.merge_model(checkpoint, base, out)
            shutil.rmtree(out)
    # A config Python reads but this parser does not (a duplicate key): copied as it is without
    # --dtype (the tie check then cannot look); with it, which rewrites the config, refused.
    (base / "config.json").write_text('{"architectures": ["BertForMaskedLM"], "vocab_size": 1, "vocab_size": 2}')
    loldu.merge_model(checkpoint, base, tmp_path / "duplicate")
    assert (tmp_path / "duplicate" / "config.json").read_bytes() == (base / "config.json").read_bytes()
    with pytest.raises(loldu.FormatError, match='duplicate key "vocab_size"'):
        loldu.merge_model(checkpoint, base, tmp_path / "duplicate16", dtype="float16")


def test_adapters_load_from_model_files_without_building_the_model(trained_minilm):
    checkpoint, tokens = trained_minilm
    model = adapted_minilm(checkpoint)
    adapters = loldu.load_model(checkpoint, minilm_dir())
    layers = lt.loldu_layers(model)
    assert set(adapters) == set(layers)
    rng = np.random.default_rng(0)
    for name in ("encoder.layer.1.attention.self.query", "encoder.layer.4.intermediate.dense"):
        x = rng.standard_normal((5, adapters[name].n)).astype(np.float32)
        with torch.no_grad():
            expected = layers[name](torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(adapters[name].forward(x), expected, rtol=1e-5, atol=1e-5)
        assert adapters[name].has_bias
    values = loldu.Checkpoint(checkpoint).values("embeddings.word_embeddings")
    assert values["z"].shape == (4,) and len(values["weight_fingerprint"]) == 16
    np.testing.assert_array_equal(values["z"], adapters["embeddings.word_embeddings"].z)
