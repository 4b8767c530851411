"""`loldu merge` reads a model one tensor at a time: its peak memory stays near the largest
tensor, not the model's size.

A synthetic model of 48 tensors of 4 MiB (192 MiB) with one adapted 1024 × 1024 layer is merged
by the command-line tool in a child process; its peak resident set (ru_maxrss of the child) must
stay below a bound far under the model's size: what the tool needs with no model at all (its
`--version`), plus room for a few tensors and the adapted layer's factors.
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys

import numpy as np
from safetensors.numpy import save_file

import loldu
from test_cli import CLI

MIB = 1 << 20


def peak_rss_mib(*args) -> float:
    """Peak resident set of `loldu ARGS`, measured in a fresh interpreter whose only child it is."""
    probe = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, capture_output=True); "
             "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    out = subprocess.run([sys.executable, "-c", probe, str(CLI), *map(str, args)],
                         check=True, capture_output=True, text=True, timeout=600)
    return int(out.stdout.split()[-1]) / 1024  # KiB on Linux


def test_merge_peak_memory_is_near_one_tensor_not_the_model(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    rng = np.random.default_rng(0)
    tensors = {f"block.{i}.weight": rng.standard_normal((1024, 1024), dtype=np.float32) for i in range(48)}
    save_file(tensors, str(base / "model.safetensors"), metadata={"format": "pt"})
    (base / "config.json").write_text('{"model_type": "test"}')
    model_mib = os.path.getsize(base / "model.safetensors") / MIB
    assert model_mib > 190

    adapter = loldu.Adapter(tensors["block.47.weight"], rank=64)
    adapter.z = adapter.z * 1.01
    loldu.save(tmp_path / "ckpt", {"block.47": adapter})
    del tensors

    idle = peak_rss_mib("--version")
    merged = peak_rss_mib("merge", tmp_path / "ckpt", "--base", base, "--out", tmp_path / "merged")
    assert (tmp_path / "merged" / "model.safetensors").stat().st_size == (base / "model.safetensors").stat().st_size
    # One 4 MiB tensor read, one written, the adapted layer's copy of W, its factors and W_eff:
    # about 30 MiB; 64 MiB of room, a third of the model.
    assert merged - idle < 64, f"merge peaked at {merged:.0f} MiB, {idle:.0f} MiB idle, model {model_mib:.0f} MiB"


def test_merge_copies_a_large_tensor_in_pieces(tmp_path):
    """A copied tensor much larger than the adapted one (an embedding matrix, say) costs a piece
    of it, not its size, kept in its type or converted (--dtype)."""
    base = tmp_path / "base"
    base.mkdir()
    rng = np.random.default_rng(1)
    tensors = {"embed.weight": rng.standard_normal((32768, 1024), dtype=np.float32),  # 128 MiB
               "layer.weight": rng.standard_normal((256, 256), dtype=np.float32)}
    save_file(tensors, str(base / "model.safetensors"), metadata={"format": "pt"})
    (base / "config.json").write_text('{"model_type": "test"}')
    adapter = loldu.Adapter(tensors["layer.weight"], rank=16)
    adapter.z = adapter.z * 1.01
    loldu.save(tmp_path / "ckpt", {"layer": adapter})
    del tensors

    idle = peak_rss_mib("--version")
    for dtype in ([], ["--dtype", "bf16"]):
        out = tmp_path / f"merged{len(dtype)}"
        merged = peak_rss_mib("merge", tmp_path / "ckpt", "--base", base, "--out", out, *dtype)
        assert merged - idle < 40, f"merge {dtype} peaked at {merged:.0f} MiB, {idle:.0f} MiB idle, the tensor 128 MiB"
    from safetensors.numpy import load_file
    import ml_dtypes
    kept, halved = load_file(str(tmp_path / "merged0" / "model.safetensors")), load_file(str(tmp_path / "merged2" / "model.safetensors"))
    original = load_file(str(base / "model.safetensors"))["embed.weight"]
    np.testing.assert_array_equal(kept["embed.weight"], original)
    np.testing.assert_array_equal(halved["embed.weight"], original.astype(ml_dtypes.bfloat16))


def test_export_needs_no_copy_of_the_weight(tmp_path):
    """A LoRA export holds the factors it writes, not W + ΔW: the finiteness check of W + lora_B
    lora_A goes by a bound unless the bound cannot tell (z near the type's limit)."""
    probe = """
import sys, numpy as np, loldu
rng = np.random.default_rng(2)
a = loldu.Adapter(rng.standard_normal((4096, 4096), dtype=np.float32), rank=8)
a.z = a.z * 1.01
def rss(field):
    return int(next(l for l in open("/proc/self/status") if l.startswith(field)).split()[1]) // 1024
before = rss("VmRSS:")
open("/proc/self/clear_refs", "w").write("5")  # (resets VmHWM, the peak, to now)
loldu.export_lora(sys.argv[1], {"layer": a})
print(rss("VmHWM:") - before)
"""
    out = subprocess.run([sys.executable, "-c", probe, str(tmp_path / "lora")], check=True, capture_output=True,
                         text=True, timeout=600, env={**os.environ})
    grown = int(out.stdout.split()[-1])
    # The tensors written (4096 × 8 twice, in double while built): under 1 MiB; W + ΔW would be 64 MiB.
    assert grown < 24, f"the export's peak grew by {grown} MiB"
