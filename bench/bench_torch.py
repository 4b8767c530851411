"""Benchmarks side by side: our adapter against the paper's reference formulation, PEFT LoRA and
the bare layer, in one run, as ratios; writes docs/benchmarks.md and a PNG (`make bench`).

    python3 bench/bench_torch.py --c-bench build/bench [--out docs/benchmarks.md]
                                 [--png docs/benchmarks.png] [--readme README.md] [--quick]

The shapes are the C benchmark's (its JSON lists them), so both measure the same list.

1. Initialisation (4096 × 4096, r = 64): ours against the reference formulation (full LU, dense
   P, residual by dense products) and PiSSA's SVDs (full, and svd_lowrank with 4 iterations).
2. One training step (forward + backward) per shape: ours called from C (build/bench, against
   the bare layer on the same GEMM library), ours through loldu.torch, the same library calls
   made straight through ctypes in this process (what loldu.torch costs on top of the library),
   the reference formulation (dense P, the whole update rebuilt every forward), PEFT LoRA r = 16
   and a bare frozen nn.Linear, each as a ratio to that bare layer.
3. The same steps in bfloat16: a bf16 model through loldu.torch, PyTorch's bf16 nn.Linear and
   PEFT LoRA r = 16 on the bf16 model (LoRA weights in float32, PEFT's default, and in bf16); a
   float32 model under torch.autocast("cpu", dtype=torch.bfloat16) (ours, nn.Linear, PEFT LoRA);
   and our float32 step through loldu.torch, for the speed-up bf16 brings. Skipped on a CPU where
   PyTorch's bf16 products run over 3× slower than its float32 ones (no bf16 units), and said so.
4. Many adapters on one base in one batch (adapter_names=): loldu.torch and PEFT LoRA.
5. Memory held per adapted layer beyond W.
6. Python call overhead on a tiny layer against nn.Linear, and a profile of that call.
7. OMP_WAIT_POLICY unset against PASSIVE: the loldu.torch step on two shapes in child processes.
Every contender runs with the same number of threads. Ratios are medians of per-repetition
ratios over interleaved repetitions (the contenders of a repetition run back to back, in an
order that rotates), so a slow spell of this shared machine hits all of them.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import platform
import pstats
import random
import re
import statistics
import subprocess
import sys
import time

import numpy as np
import torch
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import loldu  # noqa: E402
import loldu.torch as lt  # noqa: E402
from loldu import _capi  # noqa: E402
from loldu.adapter import AdapterConfig  # noqa: E402
from contenders import (  # noqa: E402
    ReferenceLoLDU, held_bytes, lora_config, lora_model, pissa_init, pissa_init_lowrank, reference_init,
)

# The shapes come from the C benchmark's JSON (shape_list, group_shapes, group_counts: one list for
# both benchmarks); these name the shapes some targets and measurements are stated for.
TARGET_SHAPES = [(768, 768, 64), (4096, 4096, 64)]  # the bf16 targets' shapes
WAIT_SHAPES = [(384, 384, 384), (768, 768, 64)]  # the OMP_WAIT_POLICY measurement's
PEFT_COUNTS = [1, 16, 256]  # PEFT's add_adapter slows down with the number of adapters (see grouped())
BF16 = torch.bfloat16


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def interleave(contenders: dict, reps: int, warmup: int = 1) -> dict:
    """Times every contender `reps` times; each repetition runs them all back to back in a new
    random order (seeded), so that no contender always follows the same one and inherits its
    warm caches."""
    for fn in contenders.values():  # warm up (allocations, caches, primitives)
        for _ in range(warmup):
            fn()
    samples = {k: [] for k in contenders}
    order = list(contenders)
    shuffle = random.Random(0).shuffle
    for _ in range(reps):
        shuffle(order)
        for name in order:
            samples[name].append(timed(contenders[name]))
    return samples


def blocks(contenders: dict, baseline) -> tuple[dict, int]:
    """Each contender repeated `inner` times per sample, so that the baseline's sample lasts at
    least ~10 ms (a single preemption on this shared machine then spoils less of it)."""
    contenders[baseline]()
    once = timed(contenders[baseline])
    inner = max(1, min(50, int(np.ceil(0.010 / max(once, 1e-6)))))
    if inner == 1:
        return contenders, 1

    def repeat(fn):
        def run():
            for _ in range(inner):
                fn()
        return run
    return {k: repeat(fn) for k, fn in contenders.items()}, inner


def mratio(samples: dict, num, den) -> float:
    """Median over repetitions of num / den."""
    return statistics.median(a / b for a, b in zip(samples[num], samples[den]))


def mdiff(samples: dict, num, den) -> float:
    """Median over repetitions of num − den."""
    return statistics.median(a - b for a, b in zip(samples[num], samples[den]))


def per_adapter(us: float) -> str:
    """A per-adapter time difference; one at or below zero is noise, not a saving."""
    return f"{us:.1f} µs" if not us <= 0 else f"none measurable ({us:+.1f} µs)"


def med(samples: dict, key) -> float:
    return statistics.median(samples[key])


def linear(m: int, n: int, seed: int, bias: bool = True) -> nn.Linear:
    torch.manual_seed(seed)
    layer = nn.Linear(n, m, bias=bias)
    with torch.no_grad():
        layer.weight.normal_(0, n ** -0.5)
    layer.requires_grad_(False)
    return layer


def step_fn(module: nn.Module, x: torch.Tensor, dy: torch.Tensor, params: list, perturb: bool, autocast=None):
    """One training step: forward, backward into x and the trainable parameters. With
    ``autocast`` (a dtype) the forward runs under ``torch.autocast("cpu", dtype=autocast)`` and
    the backward after it, as a mixed-precision training loop does."""
    def run():
        if perturb:  # the trainable values change every step, as in training
            with torch.no_grad():
                params[0].view(-1)[0] += 1e-4
        x.grad = None
        for p in params:
            p.grad = None
        if autocast is None:
            y = module(x)
        else:
            with torch.autocast("cpu", dtype=autocast):
                y = module(x)
        y.backward(dy)
    return run


def trainable(module: nn.Module) -> list:
    return [p for p in module.parameters() if p.requires_grad]


def ours_params(layer) -> list:
    return [layer.loldu_z["default"], layer.loldu_sigma["default"]]


def library_steps(layer, x: torch.Tensor, dy: torch.Tensor):
    """The library calls loldu.torch's LinearFunction makes for one step, straight through ctypes
    on the layer's own adapter (same handle, same plan, same z perturbation): loldu_forward_bias
    with the module's bias (and h when the plan keeps it) and loldu_backward_into; and the bare
    layer through the same GEMM library (a disabled clone: exactly x Wᵀ + b and dY W). Buffers
    are allocated once, as in C."""
    adapter = layer.adapter
    z = layer.loldu_z["default"]
    bias = layer.base_layer.bias

    def perturb():
        with torch.no_grad():
            z.view(-1)[0] += 1e-4
    bare = adapter.clone()
    bare.enabled = False
    return adapter_step(adapter, x, bias, dy, perturb), adapter_step(bare, x, bias, dy, None), bare


def adapter_step(adapter, x: torch.Tensor, bias, dy: torch.Tensor, perturb):
    """One step of `adapter` through ctypes (``perturb()`` first, if given), as in C."""
    batch = x.shape[0]
    keep_h = adapter.enabled and adapter.plan(batch, keeps_h=True) == "factored"  # (a disabled one would still write h)
    y = torch.empty(batch, adapter.m, dtype=x.dtype)
    dx = torch.empty(batch, adapter.n, dtype=x.dtype)
    h = torch.empty(batch, adapter.rank, dtype=torch.float32)
    grads = torch.empty(adapter.rank + 1, dtype=torch.float32)
    forward, backward = _capi.loldu_forward_bias, _capi.loldu_backward_into
    handle, xp, yp, dyp, dxp, gp = adapter.handle, x.data_ptr(), y.data_ptr(), dy.data_ptr(), dx.data_ptr(), grads.data_ptr()
    hp = h.data_ptr() if keep_h else None
    bp = None if bias is None else bias.data_ptr()

    def run(buffers=(x, bias, dy, y, dx, h, grads)):  # the default keeps the memory behind the pointers alive
        if perturb is not None:
            perturb()
        if forward(handle, batch, xp, bp, yp, hp) or backward(handle, batch, xp, dyp, dxp, hp, gp):
            raise RuntimeError(f"libloldu: {_capi.loldu_last_error().decode()}")
    return run


# ---- 1. initialisation -------------------------------------------------------------------------

def init(reps: int) -> dict:
    m = n = 4096
    r = 64
    weight = linear(m, n, 2).weight.detach().contiguous()
    w = weight.numpy()
    contenders = {
        "ours": lambda: loldu.Adapter(w, rank=r).close(),
        "ours (W borrowed)": lambda: loldu.Adapter(w, rank=r, borrow_weight=True).close(),
        "reference (full LU, dense P)": lambda: reference_init(weight, r),
        "PiSSA, torch.svd_lowrank (4 iterations)": lambda: pissa_init_lowrank(weight, r, 4),
    }
    samples = interleave(contenders, reps)
    out = {name: {"ms": 1e3 * med(samples, name), "over_ours": mratio(samples, name, "ours"),
                  "over_borrowed": mratio(samples, name, "ours (W borrowed)")} for name in contenders}
    # The full SVD takes seconds: once, after the others, against ours' median.
    svd = timed(lambda: pissa_init(weight, r))
    out["PiSSA, torch.linalg.svd"] = {"ms": 1e3 * svd, "over_ours": svd / med(samples, "ours")}
    for name, v in out.items():
        print(f"init {name}: {v['ms']:.1f} ms", flush=True)
    return out


# ---- 2. float32 steps --------------------------------------------------------------------------

def steps(reps: int, shapes: list) -> list[dict]:
    rows = []
    for m, n, r, batch, what in shapes:
        base = linear(m, n, 1)
        x = torch.randn(batch, n, requires_grad=True)
        dy = torch.randn(batch, m)
        ours = lt.LoLDULinear(linear(m, n, 1), rank=r)
        reference = ReferenceLoLDU(linear(m, n, 1), r)
        lora = lora_model(linear(m, n, 1), 16)
        library, library_bare, bare_clone = library_steps(ours, x, dy)
        contenders = {
            "bare": step_fn(base, x, dy, [], False),
            "ours": step_fn(ours, x, dy, ours_params(ours), True),
            "ours_nobias": without_bias(ours.base_layer, step_fn(ours, x, dy, ours_params(ours), True)),
            "library": library,
            "library_bare": library_bare,
            "reference": step_fn(reference, x, dy, [reference.z, reference.sigma], True),
            "lora": step_fn(lora, x, dy, trainable(lora), True),
        }
        samples = interleave(contenders, reps)
        rows.append({"m": m, "n": n, "r": r, "b": batch, "what": what,
                     "ms": {k: 1e3 * med(samples, k) for k in samples},
                     "ratio": {k: mratio(samples, k, "bare") for k in samples},
                     "reference_over_ours": mratio(samples, "reference", "ours"),
                     "ours_over_library": mratio(samples, "ours", "library"),
                     "library_over_library_bare": mratio(samples, "library", "library_bare"),
                     "ours_minus_library_ms": 1e3 * mdiff(samples, "ours", "library"),
                     "bias_ms": 1e3 * mdiff(samples, "ours", "ours_nobias"),
                     "cold_roundtrip_us": cold_roundtrip(library, reps)})
        print(f"step {m}x{n} r={r} B={batch}: " + ", ".join(f"{k} {1e3 * med(samples, k):.1f} ms" for k in samples),
              flush=True)
        bare_clone.close()
        ours.close()
    return rows


def without_bias(module: nn.Module, fn):
    """`fn` with `module`'s bias removed for the call (the same layer, so that the difference
    to `fn` alone is the bias and not two layers' memory placement)."""
    def run():
        bias = module._parameters["bias"]
        module._parameters["bias"] = None
        try:
            fn()
        finally:
            module._parameters["bias"] = bias
    return run


class _Identity(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, dy):
        return dy


def cold_roundtrip(library_step, reps: int) -> dict:
    """µs of a trivial autograd round trip (an identity Function on 16 numbers, forward and
    backward) warm, and right after one library step: what PyTorch's own bookkeeping costs once
    the step's buffers have evicted its code and data from the caches."""
    a = torch.zeros(16, requires_grad=True)

    def roundtrip():
        a.grad = None
        _Identity.apply(a).sum().backward()
    samples = {"warm": [], "after_step": []}
    for _ in range(3 * reps):
        roundtrip()
        samples["warm"].append(timed(roundtrip))
        library_step()
        samples["after_step"].append(timed(roundtrip))
    return {k: 1e6 * statistics.median(v) for k, v in samples.items()}


# ---- 3. bfloat16 steps -------------------------------------------------------------------------

# PyTorch's bf16 products this many times slower than its float32 ones: the CPU has no bf16 units
# and PyTorch falls back to reference kernels (20-140× measured on an AVX2 CPU), where section 3
# would take hours and compare against kernels nobody trains with; it is skipped and said so.
TORCH_BF16_UNUSABLE = 3.0


def torch_bf16_slowdown() -> float:
    """PyTorch's bf16 matmul time over its float32 one (256 × 768 by 768 × 768, best of 3)."""
    def best(dtype):
        a, b = torch.randn(256, 768, dtype=dtype), torch.randn(768, 768, dtype=dtype)
        return min(timed(lambda: a @ b) for _ in range(3))
    return best(BF16) / best(torch.float32)


def bf16_steps(reps: int, shapes: list) -> list[dict]:
    """Per shape, in one set of interleaved repetitions: a bf16 model (bare nn.Linear, ours,
    the library calls, PEFT LoRA with float32 and with bf16 LoRA weights), the float32 model
    (bare and ours: the speed-up bf16 brings through loldu.torch), and the float32 model under
    bf16 autocast (bare, ours, PEFT LoRA)."""
    rows = []
    for m, n, r, batch, what in shapes:
        x32 = torch.randn(batch, n)
        dy32 = torch.randn(batch, m)
        x = x32.to(BF16).requires_grad_()
        dy = dy32.to(BF16)
        xa = x32.clone().requires_grad_()  # autocast: a float32 input, a bf16 output (so dy is bf16)
        base = linear(m, n, 1).to(BF16)
        ours = lt.LoLDULinear(linear(m, n, 1).to(BF16), rank=r)
        lora = lora_model(linear(m, n, 1).to(BF16), 16)  # LoRA weights float32 (PEFT's default)
        lora_bf16 = lora_model(linear(m, n, 1).to(BF16), 16, autocast_adapter_dtype=False)
        base32 = linear(m, n, 1)
        ours32 = lt.LoLDULinear(linear(m, n, 1), rank=r)
        x32.requires_grad_()
        ac_base = linear(m, n, 1)
        ac_ours = lt.LoLDULinear(linear(m, n, 1), rank=r)
        ac_lora = lora_model(linear(m, n, 1), 16)
        for module in (ac_base, ac_ours, ac_lora):
            with torch.no_grad(), torch.autocast("cpu", dtype=BF16):
                if module(xa[:1]).dtype != BF16:
                    raise RuntimeError(f"{type(module).__name__} under bf16 autocast does not compute in bf16")
        library, library_bare, bare_clone = library_steps(ours, x, dy)
        contenders = {
            "bare": step_fn(base, x, dy, [], False),
            "ours": step_fn(ours, x, dy, ours_params(ours), True),
            "library": library,
            "library_bare": library_bare,
            "lora": step_fn(lora, x, dy, trainable(lora), True),
            "lora_bf16": step_fn(lora_bf16, x, dy, trainable(lora_bf16), True),
            "bare_f32": step_fn(base32, x32, dy32, [], False),
            "ours_f32": step_fn(ours32, x32, dy32, ours_params(ours32), True),
            "ac_bare": step_fn(ac_base, xa, dy, [], False, autocast=BF16),
            "ac_ours": step_fn(ac_ours, xa, dy, ours_params(ac_ours), True, autocast=BF16),
            "ac_lora": step_fn(ac_lora, xa, dy, trainable(ac_lora), True, autocast=BF16),
        }
        contenders, inner = blocks(contenders, "bare")
        samples = interleave(contenders, reps)
        rows.append({"m": m, "n": n, "r": r, "b": batch, "what": what, "backend": ours.adapter.info["backend"],
                     "ms": {k: 1e3 * med(samples, k) / inner for k in samples},
                     "ratio": {k: mratio(samples, k, "bare") for k in samples},
                     "ours_over_lora": mratio(samples, "ours", "lora"),
                     "ours_over_lora_bf16": mratio(samples, "ours", "lora_bf16"),
                     "ours_over_library": mratio(samples, "ours", "library"),
                     "library_over_library_bare": mratio(samples, "library", "library_bare"),
                     "ours_f32_over_ours": mratio(samples, "ours_f32", "ours"),
                     "bare_f32_over_bare": mratio(samples, "bare_f32", "bare"),
                     "autocast": {"ours": mratio(samples, "ac_ours", "ac_bare"),
                                  "lora": mratio(samples, "ac_lora", "ac_bare"),
                                  "ours_over_lora": mratio(samples, "ac_ours", "ac_lora"),
                                  "ours_f32_over_ours": mratio(samples, "ours_f32", "ac_ours"),
                                  "bare_f32_over_bare": mratio(samples, "bare_f32", "ac_bare"),
                                  "ours_over_bf16_model": mratio(samples, "ac_ours", "ours")}})
        print(f"bf16 step {m}x{n} r={r} B={batch}: " + ", ".join(f"{k} {1e3 * med(samples, k) / inner:.1f} ms" for k in samples),
              flush=True)
        bare_clone.close()
        for layer in (ours, ours32, ac_ours):
            layer.close()
    return rows


# ---- 4. many adapters on one base --------------------------------------------------------------

class _Gradients(torch.autograd.Function):
    """``x[:, :1]``, and a gradient for each parameter: autograd's own cost per parameter input."""

    @staticmethod
    def forward(ctx, x, *parameters):
        ctx.sizes = [p.numel() for p in parameters]
        return x[:, :1].clone()

    @staticmethod
    def backward(ctx, dy):
        return (None, *torch.split(torch.zeros(sum(ctx.sizes)), ctx.sizes))


def spread(count: int, batch: int, name) -> list[str]:
    """Round-robin: row b → adapter b·⌈count/batch⌉ mod count (every row its own adapter once
    count ≥ batch), as in the C benchmark."""
    stride = max(1, count // batch)
    return [name((b * stride) % count) for b in range(batch)]


def grouped(reps: int, shapes: list, counts: list[int], peft_counts: list[int]) -> list[dict]:
    rows = []
    for m, n, r, batch, what in shapes:
        x = torch.randn(batch, n)
        xg = x.clone().requires_grad_()
        dy = torch.randn(batch, m)
        # (residual "init": each adapter its own random z, the layer unchanged at the start)
        layer = lt.LoLDULinear(linear(m, n, 1), rank=r, adapter_name="a0", z_init="normal", residual="init", seed=0)
        start = time.perf_counter()
        for i in range(1, max(counts)):
            layer.update_layer(f"a{i}", AdapterConfig(rank=r, z_init="normal", residual="init", seed=i, borrow_weight=True))
        ours_add = (time.perf_counter() - start) / max(1, max(counts) - 1)

        lora = lora_model(linear(m, n, 1), 16)
        config = lora_config(16)
        peft_add = {}
        start = time.perf_counter()
        for i in range(1, max(peft_counts)):
            lora.add_adapter(f"a{i}", config)
            if i + 1 in peft_counts:
                peft_add[i + 1] = time.perf_counter() - start
        lora.eval()  # PEFT refuses adapter_names in training mode
        lora_bytes = sum(p.numel() * p.element_size() for name, p in lora.named_parameters() if ".default." in name)

        contenders = {}
        for count in counts:
            names = spread(count, batch, lambda i: f"a{i}")

            def forward(names=names):
                with torch.no_grad():
                    layer(x, adapter_names=names)

            def step(names=names):
                xg.grad = None
                layer(xg, adapter_names=names).backward(dy)

            contenders[("ours_forward", count)] = forward
            contenders[("ours_step", count)] = step
        # PyTorch's autograd alone with the parameters a step passes it (each used adapter's z and
        # σ): a Function that computes nothing and returns their gradients.
        for count in (1, 256):
            used = list(dict.fromkeys(spread(count, batch, lambda i: f"a{i}")))
            parameters = [p for name in used for p in (layer.loldu_z[name], layer.loldu_sigma[name])]

            def autograd_only(parameters=parameters):
                _Gradients.apply(xg, *parameters).backward(dy[:, :1])

            contenders[("autograd", count)] = autograd_only
        for count in peft_counts:
            names = spread(count, batch, lambda i: "default" if i == 0 else f"a{i}")

            def peft_forward(names=names):
                with torch.no_grad():
                    lora(x, adapter_names=names)

            contenders[("peft_forward", count)] = peft_forward
        contenders, inner = blocks(contenders, ("ours_forward", 1))
        samples = interleave(contenders, reps)
        row = {"m": m, "n": n, "r": r, "b": batch, "what": what, "ours_add_ms": 1e3 * ours_add,
               "peft_add_s": peft_add, "lora_bytes": lora_bytes, "counts": {}}
        for count in counts:
            entry = {"ours_forward": mratio(samples, ("ours_forward", count), ("ours_forward", 1)),
                     "ours_step": mratio(samples, ("ours_step", count), ("ours_step", 1)),
                     "ours_forward_ms": 1e3 * med(samples, ("ours_forward", count)) / inner,
                     "ours_step_ms": 1e3 * med(samples, ("ours_step", count)) / inner}
            if count in peft_counts:
                entry["peft_forward"] = mratio(samples, ("peft_forward", count), ("peft_forward", 1))
                entry["peft_forward_ms"] = 1e3 * med(samples, ("peft_forward", count)) / inner
                entry["ours_over_peft"] = mratio(samples, ("ours_forward", count), ("peft_forward", count))
            row["counts"][count] = entry
        if 256 in counts:
            row["extra_us"] = {kind: 1e6 * mdiff(samples, (kind, 256), (kind, 1)) / 256 / inner
                               for kind in ("ours_forward", "ours_step", "autograd")}
        # Where the Python mixed-batch forward spends its time, at the largest N used by a batch.
        row["profile"] = profile(lambda: forward(spread(256, batch, lambda i: f"a{i}")), 20, top=6)
        rows.append(row)
        print(f"grouped {m}x{n} r={r}: " + ", ".join(f"{k} {1e3 * med(samples, k) / inner:.2f} ms" for k in samples),
              flush=True)
        layer.close()
    return rows


# ---- 5. memory ---------------------------------------------------------------------------------

def memory(shapes: list) -> list[dict]:
    rows = []
    for m, n, r, batch, what in shapes:
        layer = lt.LoLDULinear(linear(m, n, 1), rank=r)
        x, dy = torch.randn(batch, n), torch.randn(batch, m)
        for path in ("factored", "auto"):
            layer.adapter.path = path
            layer(x).backward(dy)
            info = layer.adapter.info
            if path == "factored":
                factored = info["bytes_factors"] + info["bytes_state"]
        merged_cache = info["bytes_merged"]
        reference = held_bytes(ReferenceLoLDU(linear(m, n, 1), r), exclude=("residual", "bias"))
        lora = held_bytes(lora_model(linear(m, n, 1), 16), exclude=("base_layer.weight", "base_layer.bias"))
        bound = 4 * r * (m + n) + 8 * m
        rows.append({"m": m, "n": n, "r": r, "what": what, "ours": factored, "bound": bound,
                     "merged_cache": merged_cache, "weight_copy": info["bytes_weight"],
                     "scratch": info["bytes_scratch"], "reference": reference, "lora": lora})
        layer.close()
    return rows


# ---- 6. the Python call ------------------------------------------------------------------------

def tiny_layers():
    base = linear(16, 16, 3)
    ours = lt.LoLDULinear(linear(16, 16, 3), rank=4)
    return base, ours, torch.randn(1, 16), torch.randn(1, 16, requires_grad=True)


def overhead(reps: int, calls: int) -> dict:
    """Microseconds per call on a tiny layer (16 × 16, one row), interleaved blocks of `calls`."""
    base, ours, x, xg = tiny_layers()

    def forward(module):
        def run():
            with torch.no_grad():
                for _ in range(calls):
                    module(x)
        return run

    def step(module):
        def run():
            for _ in range(calls):
                module(xg).sum().backward()
        return run

    samples = interleave({("nn.Linear", "forward"): forward(base), ("loldu.torch", "forward"): forward(ours),
                          ("nn.Linear", "step"): step(base), ("loldu.torch", "step"): step(ours)}, reps, warmup=2)
    out = {}
    for kind in ("forward", "step"):
        out[kind] = {"nn_us": 1e6 * med(samples, ("nn.Linear", kind)) / calls,
                     "ours_us": 1e6 * med(samples, ("loldu.torch", kind)) / calls,
                     "diff_us": 1e6 * mdiff(samples, ("loldu.torch", kind), ("nn.Linear", kind)) / calls,
                     "ratio": mratio(samples, ("loldu.torch", kind), ("nn.Linear", kind))}
    ours.close()
    return out


def _label(key) -> str:
    filename, line, func = key
    if filename == "~":
        return func
    for marker in ("site-packages/", "bindings/python/", "bench/"):
        if marker in filename:
            filename = filename.split(marker, 1)[1]
            break
    else:
        filename = os.path.basename(filename)
    return f"{filename}:{line} {func}"


def profile(fn, calls: int, top: int = 12) -> dict:
    """cProfile of `calls` calls of fn: the functions with the most own time, per call."""
    fn()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        fn()
    prof.disable()
    stats = pstats.Stats(prof)
    total = stats.total_tt
    entries = sorted(stats.stats.items(), key=lambda kv: kv[1][2], reverse=True)[:top]
    return {"total_us": 1e6 * total / calls,
            "rows": [{"function": _label(key), "calls": nc / calls, "own_us": 1e6 * tt / calls,
                      "share": tt / total, "cum_us": 1e6 * ct / calls}
                     for key, (cc, nc, tt, ct, callers) in entries]}


def profiles(calls: int) -> dict:
    base, ours, x, xg = tiny_layers()

    def forward():
        with torch.no_grad():
            ours(x)

    out = {"forward": profile(forward, calls), "forward + backward": profile(lambda: ours(xg).sum().backward(), calls // 2)}
    ours.close()
    return out


# ---- 7. OMP_WAIT_POLICY ----------------------------------------------------------------------

def wait_policy_child(shapes: list, reps: int) -> dict:
    """In a child process (its OMP_WAIT_POLICY set by the parent, read when OpenMP starts): the
    loldu.torch step and the bare nn.Linear step per shape, interleaved; ms per step."""
    out = {}
    for m, n, r, batch in shapes:
        base = linear(m, n, 1)
        ours = lt.LoLDULinear(linear(m, n, 1), rank=r)
        x = torch.randn(batch, n, requires_grad=True)
        dy = torch.randn(batch, m)
        contenders, inner = blocks({"bare": step_fn(base, x, dy, [], False),
                                    "ours": step_fn(ours, x, dy, ours_params(ours), True)}, "bare")
        samples = interleave(contenders, reps)
        out[f"{m}x{n}x{r}"] = {k: 1e3 * med(samples, k) / inner for k in samples}
        ours.close()
    return out


def wait_policy(c_bench: str, shapes: list, threads: int, rounds: int, reps: int) -> list[dict]:
    """The same steps in child processes with OMP_WAIT_POLICY unset and PASSIVE, alternately
    (`rounds` of each, the first of a round alternating), each figure the median over rounds of
    the per-round ratio unset / PASSIVE."""
    spec = json.dumps({"shapes": shapes, "threads": threads, "reps": reps})
    results = {"unset": [], "PASSIVE": []}
    for i in range(rounds):
        for policy in (("unset", "PASSIVE") if i % 2 == 0 else ("PASSIVE", "unset")):
            env = dict(os.environ)
            env.pop("OMP_WAIT_POLICY", None)
            if policy != "unset":
                env["OMP_WAIT_POLICY"] = policy
            else:  # truly unset: without the opt-out, `import loldu` would set PASSIVE itself
                env["LOLDU_KEEP_OMP_WAIT_POLICY"] = "1"
            child = subprocess.run([sys.executable, os.path.abspath(__file__), "--c-bench", c_bench,
                                    "--wait-policy-child", spec], env=env, check=True, capture_output=True, text=True)
            results[policy].append(json.loads(child.stdout.strip().splitlines()[-1]))
    rows = []
    for m, n, r, batch in shapes:
        key = f"{m}x{n}x{r}"
        per = {p: [res[key] for res in results[p]] for p in results}

        def over(kind, num="unset", den="PASSIVE"):
            return statistics.median(a[kind] / b[kind] for a, b in zip(per[num], per[den]))
        rows.append({"m": m, "n": n, "r": r, "b": batch, "rounds": rounds,
                     "ms": {p: {k: statistics.median(v[k] for v in per[p]) for k in ("ours", "bare")} for p in per},
                     "ours_unset_over_passive": over("ours"), "bare_unset_over_passive": over("bare"),
                     "ours_over_bare": {p: statistics.median(v["ours"] / v["bare"] for v in per[p]) for p in per}})
        print(f"wait policy {m}x{n} r={r}: loldu.torch unset/PASSIVE {rows[-1]['ours_unset_over_passive']:.3f}, "
              f"nn.Linear {rows[-1]['bare_unset_over_passive']:.3f}", flush=True)
    return rows


# ---- the figure --------------------------------------------------------------------------------

def plot(rows: list[dict], c_rows: dict, bf_rows: list[dict], c_bf: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2 if bf_rows else 1, 1, figsize=(11, 8 if bf_rows else 4), squeeze=False)
    axes = axes[:, 0]
    labels = [f"{r['m']}×{r['n']}\nr={r['r']}, B={r['b']}" for r in rows]
    panels = [
        ("float32: one training step (forward + backward) / the bare frozen layer", [
            ("ours, from C (vs the library's bare layer)", [c_rows.get((r["m"], r["n"], r["r"]), np.nan) for r in rows]),
            ("ours, loldu.torch (vs nn.Linear)", [r["ratio"]["ours"] for r in rows]),
            ("reference formulation", [r["ratio"]["reference"] for r in rows]),
            ("PEFT LoRA r = 16", [r["ratio"]["lora"] for r in rows])]),
        ("bfloat16: one training step / the bare bf16 layer", [
            ("ours, from C (vs the library's bare bf16 layer)",
             [c_bf.get((r["m"], r["n"], r["r"]), {}).get("step_over_bare", np.nan) for r in bf_rows]),
            ("ours, loldu.torch bf16 model (vs bf16 nn.Linear)", [r["ratio"]["ours"] for r in bf_rows]),
            ("PEFT LoRA r = 16, bf16 model (LoRA weights float32)", [r["ratio"]["lora"] for r in bf_rows]),
            ("PEFT LoRA r = 16, bf16 model (LoRA weights bf16)", [r["ratio"]["lora_bf16"] for r in bf_rows]),
            ("ours, loldu.torch, f32 model under bf16 autocast (vs nn.Linear under autocast)",
             [r["autocast"]["ours"] for r in bf_rows]),
            ("PEFT LoRA r = 16, f32 model under bf16 autocast", [r["autocast"]["lora"] for r in bf_rows])]),
    ]
    for ax, (title, series) in zip(axes, panels):  # (no bf16 panel without PyTorch bf16 figures)
        width = 0.8 / len(series)
        for i, (name, values) in enumerate(series):
            ax.bar(np.arange(len(rows)) + (i - (len(series) - 1) / 2) * width, values, width, label=name)
        ax.axhline(1, color="k", lw=0.8)
        ax.set_xticks(np.arange(len(rows)), labels, fontsize=8)
        ax.set_ylabel("step / bare layer")
        ax.set_yscale("log")
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---- the report --------------------------------------------------------------------------------

def cpu_info() -> tuple[str, set]:
    """The CPU's model name and flags (/proc/cpuinfo)."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and ":" in line:
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and ":" in line:
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return model, flags


def cpu_description() -> str:
    model, flags = cpu_info()
    units = [f for f in ("avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "avx512_fp16") if f in flags]
    missing = [f for f in ("amx_bf16",) if f not in flags]
    return (f"{model}, {os.cpu_count()} cores; CPU flags: {', '.join(units) or 'none of avx512f/avx512_bf16/amx'}"
            + (f" (no {', '.join(missing)})" if missing else ""))


def torch_libraries() -> str:
    config = torch.__config__.show()
    parts = [f"PyTorch {torch.__version__}"]
    for pattern, name in ((r"Math Kernel Library Version ([\w.\-]+)", "MKL"), (r"MKL-DNN v([\d.]+)", "oneDNN")):
        match = re.search(pattern, config)
        if match:
            parts.append(f"{name} {match.group(1)}")
    capability = re.search(r"CPU capability usage: (\w+)", config)
    if capability:
        parts.append(f"CPU capability {capability.group(1)}")
    return ", ".join(parts)


def status(ok) -> str:
    return "met" if ok else "missed"


def status_of(oks) -> str:
    """``status`` of all of ``oks``, and how many were met when not all were."""
    oks = list(oks)
    return status(all(oks)) + ("" if all(oks) else f" (met on {sum(oks)} of {len(oks)})")


def c_sections(path: str) -> dict:
    """The C report split at its `## ` headings (the part before the first is under '')."""
    with open(path) as f:
        text = f.read()
    sections, current, lines = {}, "", []
    for line in text.split("\n"):
        if line.startswith("## "):
            sections[current] = "\n".join(lines).strip("\n")
            current, lines = line[3:].strip(), []
        else:
            lines.append(line)
    sections[current] = "\n".join(lines).strip("\n")
    return sections


def demote(text: str) -> list[str]:
    """The C report's `### ` headings one level down, to sit under this report's `## `."""
    return [("#" + line) if line.startswith("###") else line for line in text.split("\n")]


def bf16_torch_tables(bf_rows: list[dict], peft_status: str) -> list[str]:
    """The report's tables of section 3: a bf16 model and a float32 model under bf16 autocast."""
    lines = ["Every contender below runs in the same interleaved repetitions per shape, so all columns of both tables "
             "come from one set of samples. The float32 model is `nn.Linear` in float32 (and `LoLDULinear` on it): "
             "*f32 / bf16* columns are the speed-up bf16 brings, as our own float32 step through loldu.torch over "
             "the bf16 one (and PyTorch's float32 `nn.Linear` over its bf16 one).", "",
             "#### A bf16 model", "",
             "`nn.Linear(...).to(torch.bfloat16)`, inputs and upstream gradients in bf16 (no autocast). "
             "Ours: `LoLDULinear` on that layer (z, σ float32). PEFT LoRA r = 16 on the same bf16 layer, with PEFT's "
             "default `autocast_adapter_dtype=True` (LoRA weights upcast to float32, the LoRA branch computed in "
             "float32) and with `autocast_adapter_dtype=False` (LoRA weights bf16). Ratios to PyTorch's bf16 "
             "`nn.Linear` forward + backward (frozen weight, dX computed).", "",
             "| shape (m × n, r, B) | bare bf16 nn.Linear | ours, loldu.torch | PEFT LoRA (f32 weights) | "
             "PEFT LoRA (bf16 weights) | ours / PEFT (f32) | ours / PEFT (bf16) | ours: f32 step / bf16 step | "
             "nn.Linear: f32 / bf16 | library bare / nn.Linear bare | library step / library bare | loldu.torch / library |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in bf_rows:
        ratio = row["ratio"]
        lines.append(f"| {row['m']} × {row['n']}, r = {row['r']}, B = {row['b']} | {row['ms']['bare']:.1f} ms | "
                     f"{ratio['ours']:.3f}× | {ratio['lora']:.3f}× | {ratio['lora_bf16']:.3f}× | "
                     f"**{row['ours_over_lora']:.2f}** | **{row['ours_over_lora_bf16']:.2f}** | "
                     f"**{row['ours_f32_over_ours']:.2f}×** | {row['bare_f32_over_bare']:.2f}× | {ratio['library_bare']:.3f}× | "
                     f"{row['library_over_library_bare']:.3f}× | {row['ours_over_library']:.3f} |")
    lines += ["", f"Backend of the bf16 layers' adapters: {', '.join(sorted({str(r['backend']) for r in bf_rows}))}.", "",
              "#### A float32 model under `torch.autocast(\"cpu\", dtype=torch.bfloat16)`", "",
              "The mixed-precision training loop: float32 layers and inputs, the forward under bf16 autocast and the "
              "backward after it (upstream gradients bf16, as autocast's outputs). `nn.Linear` casts its weight to bf16 "
              "on every call; ours computes through a bf16 conversion of the layer's factors made once, z and σ copied "
              "in when they changed (they change every step here); PEFT LoRA r = 16 on the float32 layer (LoRA weights "
              "float32, autocast runs its products in bf16). Ratios to the bare `nn.Linear` under the same autocast.", "",
              "| shape (m × n, r, B) | bare nn.Linear, autocast | ours, loldu.torch | PEFT LoRA r = 16 | ours / PEFT | "
              "ours: f32 step / autocast step | nn.Linear: f32 / autocast | ours: autocast / bf16 model |",
              "|---|---|---|---|---|---|---|---|"]
    for row in bf_rows:
        ac = row["autocast"]
        lines.append(f"| {row['m']} × {row['n']}, r = {row['r']}, B = {row['b']} | {row['ms']['ac_bare']:.1f} ms | "
                     f"{ac['ours']:.3f}× | {ac['lora']:.3f}× | **{ac['ours_over_lora']:.2f}** | "
                     f"**{ac['ours_f32_over_ours']:.2f}×** | {ac['bare_f32_over_bare']:.2f}× | {ac['ours_over_bf16_model']:.3f}× |")
    lines += ["", f"Target (r = 64 shapes, both tables): loldu.torch no slower than PEFT LoRA r = 16: **{peft_status}**.", ""]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--c-bench", required=True, help="the C benchmark binary (build/bench)")
    parser.add_argument("--out", default="docs/benchmarks.md")
    parser.add_argument("--png", default="docs/benchmarks.png")
    parser.add_argument("--readme", help="also replace the tables between the markers in this README")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--reuse-c", action="store_true", help="reuse the C benchmark's last output (development)")
    parser.add_argument("--wait-policy-child", help=argparse.SUPPRESS)  # (internal: wait_policy's child process)
    args = parser.parse_args()
    if args.wait_policy_child:
        spec = json.loads(args.wait_policy_child)
        torch.set_num_threads(spec["threads"])
        loldu.set_num_threads(spec["threads"])
        print(json.dumps(wait_policy_child(spec["shapes"], spec["reps"])), flush=True)
        return
    started, load_start = time.perf_counter(), os.getloadavg()[0]

    build = os.path.dirname(os.path.abspath(args.c_bench))
    c_json, c_md = os.path.join(build, "bench-c.json"), os.path.join(build, "bench-c.md")
    if not args.reuse_c:
        print("running", args.c_bench, flush=True)
        subprocess.run([args.c_bench, "--json", c_json, "--markdown", c_md] + (["--quick"] if args.quick else []),
                       check=True, stdout=subprocess.DEVNULL)
    c_seconds = time.perf_counter() - started
    with open(c_json) as f:
        c = json.load(f)
    threads = int(c["threads"])
    torch.set_num_threads(threads)
    loldu.set_num_threads(threads)

    if "shape_list" not in c:
        sys.exit(f"{c_json} has no shape_list: run without --reuse-c (the C benchmark is older than this script)")
    shapes = [(v["m"], v["n"], v["r"], v["b"], v["name"]) for v in c["shape_list"]]
    group_shapes = [(v["m"], v["n"], v["r"], v["b"], v["name"]) for v in c["group_shapes"]]
    group_counts = [k for k in c["group_counts"] if not args.quick or k <= 256]
    wait_shapes = [[m, n, r, b] for m, n, r, b, _ in shapes if (m, n, r) in WAIT_SHAPES]

    init_ms = init(3 if args.quick else 7)
    step_rows = steps(3 if args.quick else 25, shapes)
    bf16_slowdown = torch_bf16_slowdown()
    bf_rows = bf16_steps(3 if args.quick else 11, shapes) if bf16_slowdown < TORCH_BF16_UNUSABLE else []
    torch_bf16_skipped = (f"PyTorch's bf16 products run {bf16_slowdown:.0f}× slower than its float32 ones on this CPU "
                          "(no bf16 units: reference kernels), so its bf16 layers are no contender")
    group_rows = grouped(3 if args.quick else 9, group_shapes, group_counts, PEFT_COUNTS if not args.quick else [1, 16])
    memory_rows = memory(shapes)
    calls = overhead(5 if args.quick else 21, 100 if args.quick else 400)
    call_profiles = profiles(500 if args.quick else 3000)
    wait_rows = wait_policy(args.c_bench, wait_shapes, threads, 1 if args.quick else 3, 3 if args.quick else 9)

    c_step = {(s["m"], s["n"], s["r"]): s for s in c["shapes"]}
    c_bf = {(s["m"], s["n"], s["r"]): s for s in c["bf16"]["shapes"]}
    c_group = {(g["m"], g["n"], g["r"]): g for g in c["grouped"]}
    c_load = {(g["m"], g["n"], g["r"]): g for g in c["load"]}
    os.makedirs(os.path.dirname(os.path.abspath(args.png)), exist_ok=True)
    plot(step_rows, {k: v["auto"] for k, v in c_step.items()}, bf_rows, c_bf, args.png)
    sections = c_sections(c_md)
    backends = {d: loldu.gemm_backend(d) for d in ("float32", "bfloat16", "float16")}

    # ---- targets ------------------------------------------------------------------------------
    targets = []  # (what, this machine, status)
    flags = cpu_info()[1]
    amx = "amx_bf16" in flags
    bf_target = {k: c_bf[k] for k in TARGET_SHAPES if k in c_bf}
    bare_speed = {k: 1 / v["bare_bf16_over_bare_f32"] for k, v in bf_target.items()}
    targets.append((
        "bf16 step ≥ 2.5× faster than our float32 step (768 × 768 r = 64 B = 4096; 4096 × 4096 r = 64 B = 256)",
        "; ".join(f"{k[0]}²: {v['f32_over_bf16']:.2f}× (bare layer {bare_speed[k]:.2f}×)" for k, v in bf_target.items()),
        status_of(v["f32_over_bf16"] >= 2.5 for v in bf_target.values()) if amx else
        "not checkable here: AMX target; without AMX the bare bf16 GEMMs are only "
        f"{min(bare_speed.values()):.2f}–{max(bare_speed.values()):.2f}× faster than float32"))
    bound_over = {k: v["step_over_bare"] / v["bound"] for k, v in c_bf.items()}
    targets.append((
        "bf16 step within 1.10× of its FLOP bound (vs the bare bf16 layer, same library), every shape",
        "; ".join(f"{k[0]}×{k[1]} r = {k[2]}: {v:.3f}" for k, v in bound_over.items()),
        status_of(v <= 1.10 for v in bound_over.values())))
    bf_torch = {(r["m"], r["n"], r["r"]): r for r in bf_rows}
    vs_peft = {k: {"bf16 model, PEFT's LoRA weights f32": bf_torch[k]["ours_over_lora"],
                   "bf16 weights": bf_torch[k]["ours_over_lora_bf16"],
                   "f32 model under bf16 autocast": bf_torch[k]["autocast"]["ours_over_lora"]}
               for k in TARGET_SHAPES if k in bf_torch}
    peft_status = (status_of(v <= 1.0 for cases in vs_peft.values() for v in cases.values()) if bf_rows else
                   "not checkable here: " + torch_bf16_skipped)
    targets.append((
        "loldu.torch bf16 step at r = 64 no slower than PEFT LoRA r = 16, both shapes (a bf16 model, and a float32 "
        "model under `torch.autocast(\"cpu\", dtype=torch.bfloat16)`)",
        "; ".join(f"{k[0]}²: " + ", ".join(f"{v:.2f}× ({what})" for what, v in cases.items()) for k, cases in vs_peft.items())
        or f"PyTorch bf16 / float32 matmul: {bf16_slowdown:.0f}×", peft_status))
    worst_group = {}
    for k, g in c_group.items():
        worst_group[k] = max(max(r["forward"], r["step"]) for r in g["rows"] if r["n"] == 4096)
    targets.append((
        "N = 4,096 adapters within 1.10× of N = 1 (grouped forward, forward + backward), from C",
        "; ".join(f"{k[0]}×{k[1]} r = {k[2]}: worst {v:.2f}×" for k, v in worst_group.items()),
        status(all(v <= 1.10 for v in worst_group.values()))))
    top = max(group_counts)
    if top == 4096:
        torch_group = {(g["m"], g["n"], g["r"]): g["counts"][top] for g in group_rows}
        targets.append((
            "N = 4,096 adapters within 1.10× of N = 1, through loldu.torch (`adapter_names=`, round-robin)",
            "; ".join(f"{k[0]}×{k[1]} r = {k[2]}: forward {e['ours_forward']:.2f}×, forward + backward {e['ours_step']:.2f}×"
                      for k, e in torch_group.items()),
            status_of(v <= 1.10 for e in torch_group.values() for v in (e["ours_forward"], e["ours_step"]))))
    targets.append((
        "per added adapter ≤ 4·(r + 1) + 256 bytes",
        "; ".join(f"r = {k[2]}: {g['memory']['per_adapter']:.0f} B (allowance {g['memory']['allowance']:.0f})"
                  for k, g in c_group.items()),
        status(all(g["memory"]["per_adapter"] <= g["memory"]["allowance"] for g in c_group.values()))))
    targets.append((
        "adding a saved adapter to a loaded base ≤ 1 ms per layer (the first adapter on a new base and later ones)",
        "; ".join(f"{k[0]}×{k[1]}: first {v['first_ms']:.2f} ms, later {v['later_ms']:.2f} ms" for k, v in c_load.items()),
        status_of(v[kind] <= 1 for v in c_load.values() for kind in ("first_ms", "later_ms"))))
    for kind, label in (("forward", "forward"), ("step", "forward + backward")):
        v = calls[kind]
        targets.append((f"16 × 16 `LoLDULinear` {label} within nn.Linear + 30 µs",
                        f"+{v['diff_us']:.1f} µs ({v['ratio']:.2f}×)", status(v["diff_us"] <= 30)))
    over = {(r["m"], r["n"], r["r"]): r["ours_over_library"] for r in step_rows}
    targets.append((
        "loldu.torch step within 1.05× of the same library calls from C (ctypes, same process)",
        "; ".join(f"{k[0]}×{k[1]} r = {k[2]}: {v:.3f}" for k, v in over.items()),
        status_of(v <= 1.05 for v in over.values())))

    f32_over = {k: v["auto"] / v["bound"] for k, v in c_step.items()}
    targets.append(("float32 step (from C) within 1.10× of its FLOP bound, every shape",
                    "; ".join(f"{k[0]}×{k[1]} r = {k[2]}: {v:.3f}" for k, v in f32_over.items()),
                    status_of(v <= 1.10 for v in f32_over.values())))
    ref_speed = [r["reference_over_ours"] for r in step_rows]
    targets.append(("loldu.torch step faster than the reference formulation, every shape",
                    f"{min(ref_speed):.2f}–{max(ref_speed):.2f}× faster", status_of(v > 1 for v in ref_speed)))
    init_speed = init_ms["reference (full LU, dense P)"]["over_ours"]
    targets.append(("initialisation ≥ 20× faster than the reference (4096², r = 64)", f"{init_speed:.0f}×",
                    status(init_speed >= 20)))
    mem_ok = [row["ours"] <= row["bound"] for row in memory_rows]
    targets.append(("memory beyond W ≤ 4·r·(m + n) + 8·m bytes, every shape",
                    "; ".join(f"{row['m']}×{row['n']} r = {row['r']}: {(row['ours'] - row['bound']) / 1024:+.1f} KiB"
                              for row in memory_rows) + " (held − bound)",
                    status_of(mem_ok)))
    command = " ".join([os.path.basename(sys.executable)] + sys.argv)
    c_json_rel, c_md_rel = os.path.relpath(c_json), os.path.relpath(c_md)
    lines = ["# Benchmarks", "",
             f"Produced by `make bench` (`{command}`, which also runs `{args.c_bench} --json {c_json_rel} "
             f"--markdown {c_md_rel}`); the whole run took {(time.perf_counter() - started) / 60:.1f} min "
             f"(the C part {c_seconds / 60:.1f} min).", "",
             f"- Machine: {cpu_description()}; {platform.system()} {platform.release()}. Shared: other jobs may run "
             f"alongside (1-minute load average {load_start:.1f} when this run started, {os.getloadavg()[0]:.1f} when it "
             f"ended, on {os.cpu_count()} cores), so absolute times move between runs; every figure below is a ratio "
             f"against a baseline measured in the same run (medians of per-repetition ratios over interleaved repetitions).",
             f"- libloldu {loldu.library_version()}. GEMM dispatch (`loldu_gemm_backend`): float32 → "
             f"**{backends['float32'][0]}**, bfloat16 → **{backends['bfloat16'][0]}**, float16 → "
             f"**{backends['float16'][0]}**; {backends['float32'][1]}. OpenBLAS core `{c['blas']}` "
             f"(`OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE', 'unset')}`).",
             f"- PyTorch side: {torch_libraries()}; PEFT {__import__('peft').__version__}.",
             f"- {threads} threads for every contender; `OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}`.",
             "", "## Targets at a glance", "",
             "The targets are stated for an Intel Xeon with AMX; this machine "
             + ("has AMX." if amx else "has AVX512-BF16 but no AMX." if "avx512_bf16" in flags else
                "has neither AMX nor AVX512-BF16."),
             "",
             "| target | this machine | status |", "|---|---|---|"]
    lines += [f"| {a} | {b} | **{s}** |" for a, b, s in targets]
    summary = lines[-(len(targets) + 2):]
    lines.append("")

    # -- initialisation
    init_table = ["| method | time | ours is faster by |", "|---|---|---|"]
    for name, v in init_ms.items():
        factor = "—" if name.startswith("ours") else f"{v['over_ours']:.0f}×"
        init_table.append(f"| {name} | {v['ms']:.1f} ms | {factor} |")
    ref = init_ms["reference (full LU, dense P)"]
    init_ok = ref["over_ours"] >= 20
    borrowed = ref["over_borrowed"]
    lines += ["## Initialisation, 4096 × 4096, r = 64", "",
              "Interleaved repetitions; the full SVD runs once, against ours' median.", ""] + init_table
    lines += ["", f"Target: at least 20× faster than the reference formulation: **{status(init_ok)}** "
              f"({ref['over_ours']:.0f}× with W copied, {borrowed:.0f}× with W borrowed). "
              f"From C in the same run: full LAPACK getrf {c['init']['full_ms']:.0f} ms, ours {c['init']['copy_ms']:.1f} ms "
              f"(W copied) and {c['init']['borrow_ms']:.1f} ms (borrowed); a plain malloc + memcpy of W, the floor "
              f"of anything that keeps its own copy, {c['init']['memcpy_ms']:.1f} ms.", ""]

    # -- float32 steps
    lines += ["## One training step, float32 (forward + backward)", "",
              "Each contender as a multiple of the bare frozen layer: for ours from C, the bare layer computed by "
              "the library itself in the same C process (a disabled adapter: `x Wᵀ` and `dY W` through the same "
              f"GEMM library, here {backends['float32'][0]} for float32); for the others, a frozen `nn.Linear` in this process "
              "(PyTorch's MKL). *library* is the same library calls loldu.torch makes (`loldu_forward_bias` with the "
              "module's bias, `loldu_backward_into`, on the layer's own adapter) made straight through ctypes in this "
              "process, "
              "and *library bare* the disabled adapter likewise: the last columns compare loldu.torch with the "
              "library in the same process. The trainable values change before every step, as in training.", "",
              f"![training step ratios]({os.path.basename(args.png)})", ""]
    step_table = ["| shape (m × n, r, B) | bare nn.Linear | ours, from C | ours, loldu.torch | reference formulation | "
                  "PEFT LoRA r = 16 | FLOP bound | from C / bound | ours vs reference |",
                  "|---|---|---|---|---|---|---|---|---|"]
    within, faster = [], []
    for row in step_rows:
        cs = c_step.get((row["m"], row["n"], row["r"]))
        ratio = row["ratio"]
        over_bound = cs["auto"] / cs["bound"]
        within.append(over_bound <= 1.10)
        speedup = row["reference_over_ours"]
        faster.append(speedup > 1)
        step_table.append(
            f"| {row['m']} × {row['n']}, r = {row['r']}, B = {row['b']} ({row['what']}) | {row['ms']['bare']:.1f} ms | "
            f"{cs['auto']:.3f}× ({cs['auto_path']}) | {ratio['ours']:.3f}× | {ratio['reference']:.3f}× | "
            f"{ratio['lora']:.3f}× | {cs['bound']:.3f}× | {over_bound:.3f} | {speedup:.2f}× {'faster' if speedup > 1 else 'slower'} |")
    step_targets = (f"Targets: our step within 1.10× of its FLOP lower bound on every shape: "
                    f"**{status_of(within)}**; faster than the reference formulation on every shape: **{status_of(faster)}**.")
    lines += step_table + ["", step_targets, ""]
    slow = [1 / row["ratio"]["library_bare"] for row in step_rows]
    lines += [f"The two baselines differ: PyTorch's bare `nn.Linear` (MKL) takes {min(slow):.2f}–{max(slow):.2f}× the "
              f"time of the library's bare layer ({backends['float32'][0]}) on this CPU (first column of the table below), "
              "so the ratios to `nn.Linear` (loldu.torch, reference, PEFT) sit on a "
              + ("slower" if min(slow) > 1 else "faster" if max(slow) < 1 else "different")
              + " baseline than the ratios from C.", ""]
    lines += ["Against the library in this process:", "",
              "| shape | library bare / nn.Linear bare | library step / library bare | loldu.torch / library step | "
              "loldu.torch − library step | of which the bias | autograd round trip: warm → after a step |",
              "|---|---|---|---|---|---|---|"]
    for row in step_rows:
        cold = row["cold_roundtrip_us"]
        lines.append(f"| {row['m']} × {row['n']}, r = {row['r']}, B = {row['b']} | {row['ratio']['library_bare']:.3f}× | "
                     f"{row['library_over_library_bare']:.3f}× | **{row['ours_over_library']:.3f}** | "
                     f"{row['ours_minus_library_ms']:+.2f} ms | {row['bias_ms']:+.2f} ms | "
                     f"{cold['warm']:.0f} → {cold['after_step']:.0f} µs |")
    worst_over = max(step_rows, key=lambda r: r["ours_over_library"])
    lines += ["", "Target: loldu.torch within 1.05× of the library calls it makes: "
              f"**{status_of(v <= 1.05 for v in over.values())}**. Compared in the same process through ctypes (not against the C benchmark's "
              "numbers); the difference is what loldu.torch adds per step. The module's bias goes to the library with "
              "each call (`loldu_forward_bias`, in both columns), which adds it in the GEMM kernel with oneDNN (its bias "
              "argument) and otherwise writes the bias rows into y before a GEMM that accumulates (beta 1); the bias column is loldu.torch on the same layer with and without "
              "its bias (median of per-repetition differences). The rest is "
              "PyTorch's own work around the two library calls (autograd's graph, the dispatcher, `torch.empty` for "
              "y, dX, h and the gradients, the checks of the binding), which costs several times its warm cost because "
              "each step's buffers evict PyTorch's code and data from the caches: the last column times a trivial "
              "autograd Function (forward and backward on 16 numbers) warm and right after one library step. That "
              "remainder is a fixed cost per layer and step: "
              f"{min(r['ours_minus_library_ms'] for r in step_rows):+.2f} to "
              f"{max(r['ours_minus_library_ms'] for r in step_rows):+.2f} ms here, the largest fraction "
              f"({100 * (worst_over['ours_over_library'] - 1):.1f}%) on {worst_over['m']} × {worst_over['n']}, r = {worst_over['r']}, whose "
              f"library step takes {worst_over['ms']['library']:.1f} ms.", ""]
    # -- bf16
    lines += ["## bfloat16", "",
              "### From C", ""] + demote(sections.get("bfloat16 training steps", "(not run)"))
    lines += ["", "What limits the bf16 figures here (measured in the table above):", "",
              f"- Speed-up over float32 (target ≥ 2.5× on an AMX Xeon): the bare bf16 layer itself is "
              f"{min(bare_speed.values()):.2f}–{max(bare_speed.values()):.2f}× faster than the bare float32 layer on this "
              f"CPU ({'AMX tiles' if amx else 'AVX512-BF16 dot products, no AMX tiles' if 'avx512_bf16' in flags else 'no bf16 units'})"
              + (", so no bf16 step can reach 2.5× here" if max(bare_speed.values()) < 2.5 else "") + "; our bf16 step keeps "
              + ", ".join(f"{v['f32_over_bf16'] * v['bare_bf16_over_bare_f32']:.0%} of that gain at {k[0]}²"
                          for k, v in bf_target.items()) + ("." if amx else ". Not checkable without AMX."),
              "- Every product of the bf16 step runs on bf16 operands with float32 accumulation, the weight-space ones "
              "too (the `W_eff` rebuild `W + (A diag(c)) U_r`, 2·m·n·r, and on merged_wgrad `Aᵀ (dYᵀx)` for dz, another "
              "2·m·n·r): `A diag(c)` and `dYᵀx` are rounded to bf16 once, `A` and `U_r` have bf16 copies made at "
              "creation. Run as float32 GEMMs instead, these two products would go at the float32 rate, several times "
              "below bf16's on AMX tiles, and put the full-rank steps well over their FLOP bound. The price in precision is in the last columns: at a 20% "
              "move of the weight, y on the merged path is within "
              + f"{max(v['y_error_merged'] for v in c_bf.values()):.2e}" + " of float32's (relative), against "
              + f"{max(v['y_error_merged_exact'] for v in c_bf.values()):.2e}" + " with `W_eff` built from float32 "
              "operands (most of either is `W_eff`'s own rounding to bf16, which every merged path has), and dz on "
              "merged_wgrad is as close to float32's as on the factored path. `loldu_merge`, `loldu_effective_weight` "
              "and the merges into files build `W_eff` from float32 operands, rounded once. What remains of "
              "*step / bound* is elementwise: widening `W` and narrowing `W_eff`, `dYᵀx`, y and dX, the coefficient "
              "and score loops.",
              "- The widened path (`loldu_set_widened_half(1)`) is the float32 speed: it confirms the bf16 kernels are "
              "taken by default (`loldu_gemm_backend` → " + c["bf16"]["bf16_backend"] + ").", ""]
    lines += ["", "### Through loldu.torch, against PyTorch and PEFT", ""]
    lines += (bf16_torch_tables(bf_rows, peft_status) if bf_rows else
              [f"Not measured here: {torch_bf16_skipped}.", ""])

    # -- many adapters
    lines += ["## Many adapters on one base", "",
              "### From C", ""] + demote(sections.get("Many adapters on one base (float32)", "(not run)"))
    if not all(v <= 1.10 for v in worst_group.values()):
        extra = "; ".join(f"{k[0]}×{k[1]} r = {k[2]}: {per_adapter(g['extra_us_per_adapter_forward'])} forward, "
                          f"{per_adapter(g['extra_us_per_adapter_step'])} forward + backward"
                          for k, g in c_group.items())
        k_worst = max(worst_group, key=worst_group.get)
        cw = c_group[k_worst]
        rr = {r["n"]: r for r in cw["rows"] if r["assign"] == "round-robin"}
        spacing = max(rr) // cw["b"]
        others = "; ".join(f"on {k[0]} × {k[1]}, r = {k[2]}, the worst N = {max(rr):,} ratio is {v:.3f}×"
                           for k, v in worst_group.items() if k != k_worst)
        lines += ["", "What limits N = 4,096 against N = 1 (measured): the GEMMs are the same for every N (one factored "
                  "pass at the largest rank), but each adapter a batch uses costs a fixed time on top — "
                  f"{extra} per used adapter (the row *extra time per used adapter*). On {k_worst[0]} × {k_worst[1]}, "
                  f"r = {k_worst[2]}, where the whole N = 1 call takes {cw['n1_forward_ms']:.2f} ms (forward) and "
                  f"{cw['n1_step_ms']:.2f} ms (forward + backward), {rr[256]['used']} used adapters (round-robin N = 256) "
                  f"add {100 * (rr[256]['forward'] - 1):.1f}% and {100 * (rr[256]['step'] - 1):.1f}%, and "
                  f"{rr[max(rr)]['used']} of {max(rr):,} (each {spacing} adapters apart in memory: cache and TLB misses on "
                  f"their z and gradients) {100 * (rr[max(rr)]['forward'] / rr[256]['forward'] - 1):+.1f}% and "
                  f"{100 * (rr[max(rr)]['step'] / rr[256]['step'] - 1):+.1f}% on top of that"
                  + (f"; {others}" if others else "") + ". A profile (`bench/grouped_loop.c`, commands in its header) "
                  "puts that time in work "
                  "proportional to the adapters used, not in BLAS: the rows reading 256 adapters' z (each `c` is "
                  "computed as its rows read it, in forward and, when dX is asked for, in backward) instead of one, "
                  "and each adapter's scores, dz and dσ reductions in backward. That time is serial: it is "
                  "the same with one thread or two (`OMP_NUM_THREADS=1` or `2 build/grouped_loop N 3000` for N = 1 "
                  "and 256), so the ratio is largest where the GEMMs are fastest."]
    lines += ["", "### Adding a saved adapter to a loaded base", ""] + demote(sections.get("Adding a saved adapter to a loaded base", "(not run)"))
    for k, v in c_load.items():
        if v["first_ms"] <= 1:
            continue
        part = max(v["first"], key=lambda p: v["first"][p] - v["later"][p])
        call = {"open_ms": "loldu_checkpoint_open", "layer_ms": "loldu_checkpoint_layer", "derive_ms": "loldu_adapter_derive",
                "apply_ms": "loldu_checkpoint_apply", "free_ms": "loldu_checkpoint_free"}[part]
        lines += ["", f"The first adapter added to a new {k[0]} × {k[1]} base takes {v['first_ms']:.2f} ms, over the 1 ms "
                  f"target, against {v['later_ms']:.2f} ms for the next one; most of the difference is in `{call}` "
                  f"({v['first'][part]:.2f} ms against {v['later'][part]:.2f} ms). Creating that base took "
                  f"{v['create_ms']:.1f} ms."]
    batches = sorted({g["b"] for g in group_rows})
    peft_rates = []  # (shape, [(from, to, ms per adapter)])
    for g in group_rows:
        counts = sorted(g["peft_add_s"])
        spans, start, before = [], 2, 0.0
        for count in counts:
            spans.append((start, count, 1e3 * (g["peft_add_s"][count] - before) / (count - start + 1)))
            start, before = count + 1, g["peft_add_s"][count]
        peft_rates.append((g, spans))
    rates = "; ".join(f"{g['m']} × {g['n']}: " + ", ".join(f"{ms:.1f} ms each for adapters {a}–{b}" for a, b, ms in spans)
                      for g, spans in peft_rates)
    slowing = all(len(spans) > 1 and spans[-1][2] > spans[0][2] for _, spans in peft_rates)
    peft_top = max(max(g["peft_add_s"], default=1) for g in group_rows)
    remaining = max(group_counts) - peft_top
    lines += ["", "### Through loldu.torch and PEFT (`adapter_names=`)", "",
              f"The same batches of {', '.join(map(str, batches))} rows (round-robin), float32. Ours: one `LoLDULinear` with "
              f"{max(group_counts)} named adapters (`update_layer`, z_init normal with residual init, own seed each); forward under "
              "`torch.no_grad()` and forward + backward (dX and every used adapter's z, σ). PEFT LoRA r = 16 with "
              "`add_adapter` per name, forward only: PEFT refuses `adapter_names` in training mode (\"Cannot pass "
              "`adapter_names` when the model is in training mode\"), so mixed batches are inference-only there. "
              f"PEFT stops at N = {peft_top}: its `add_adapter` took ({rates})"
              + (", slowing down as adapters accumulate" if slowing else "")
              + (f"; the {remaining:,} more to N = {max(group_counts):,} would take at least "
                 + " and ".join(f"{remaining * spans[-1][2] / 1e3:.1f} s ({g['m']} × {g['n']})" for g, spans in peft_rates)
                 + f" at the last rate, and all {max(group_counts):,} would hold "
                 + " and ".join(f"{max(group_counts) * g['lora_bytes'] / 2**30:.2f} GiB ({g['m']} × {g['n']})"
                                for g in group_rows) if remaining > 0 else "") + ".", ""]
    for g in group_rows:
        cg = c_group.get((g["m"], g["n"], g["r"]), {})
        peft_times = ", ".join(f"{count}: {seconds:.2f} s" for count, seconds in sorted(g["peft_add_s"].items()))
        lines += [f"#### {g['m']} × {g['n']}, loldu r = {g['r']}, PEFT r = 16", "",
                  "| N | ours forward / N = 1 | ours forward + backward / N = 1 | PEFT forward / N = 1 | "
                  "ours forward / PEFT forward |", "|---|---|---|---|---|"]
        for count, e in g["counts"].items():
            peft = (f"{e['peft_forward']:.3f}× ({e['peft_forward_ms']:.2f} ms)" if "peft_forward" in e else "— (not created)")
            vs = f"{e['ours_over_peft']:.2f}" if "ours_over_peft" in e else "—"
            lines.append(f"| {count} | {e['ours_forward']:.3f}× ({e['ours_forward_ms']:.2f} ms) | "
                         f"{e['ours_step']:.3f}× ({e['ours_step_ms']:.2f} ms) | {peft} | {vs} |")
        if "extra_us" in g:
            lines += ["", f"Extra time per used adapter (N = 256 minus N = 1, over 256): {per_adapter(g['extra_us']['ours_forward'])} "
                      f"forward and {per_adapter(g['extra_us']['ours_step'])} forward + backward through loldu.torch, against "
                      f"{per_adapter(cg.get('extra_us_per_adapter_forward', float('nan')))} and "
                      f"{per_adapter(cg.get('extra_us_per_adapter_step', float('nan')))} in the C calls alone. "
                      "In forward + backward the rest is PyTorch's autograd: each used adapter's z and σ are inputs of "
                      "the step's autograd Function, so that each gets the gradient of its own rows, and autograd alone "
                      "(a Function that computes nothing and returns gradients for the same parameters) takes "
                      f"{per_adapter(g['extra_us']['autograd'])} per used adapter. The forward's own Python work "
                      "is profiled below."]
        lines += ["", f"Time to add one adapter: ours (`update_layer`, derive + parameters) {g['ours_add_ms']:.3f} ms on "
                  f"average over {max(group_counts) - 1}; PEFT `add_adapter`, cumulative: {peft_times}. Parameters per "
                  f"adapter: PEFT LoRA r = 16 {g['lora_bytes']} bytes; ours (C, above) "
                  f"{cg.get('memory', {}).get('per_adapter', float('nan')):.0f} bytes in all.", "",
                  f"Where the Python mixed-batch forward spends its own time (N = 256, cProfile, "
                  f"{g['profile']['total_us']:.0f} µs per call under the profiler; a library call counts as own time of the "
                  "Python function that makes it):", "",
                  "| function | calls per forward | own µs per forward | share |", "|---|---|---|---|"]
        lines += [f"| `{p['function']}` | {p['calls']:.0f} | {p['own_us']:.1f} | {100 * p['share']:.0f}% |"
                  for p in g["profile"]["rows"]]
        lines.append("")

    # -- memory
    lines += ["## Memory held per adapted layer beyond W", "",
              "Ours: the frozen factors A = P L_r, U_r, D_r, the pivots, z and σ, on the factored path (`bytes_factors + bytes_state`); `loldu.torch` borrows "
              "W from the module, so no copy of W is held. The bound is 4·r·(m + n) + 8·m bytes. The merged "
              "weight that `auto` caches on some shapes and the scratch buffers (which grow with the batch) "
              "are on their own lines. Reference: P (m × m), L_r, U_r, z, σ (its residual replaces W). "
              "LoRA: A and B.", "",
              "| shape (m × n, r) | ours (factored) | bound | within | merged cache (auto) | scratch | "
              "reference formulation | PEFT LoRA r = 16 |", "|---|---|---|---|---|---|---|---|"]
    for row in memory_rows:
        ok = row["ours"] <= row["bound"]
        lines.append(f"| {row['m']} × {row['n']}, r = {row['r']} | {row['ours'] / 1024:.1f} KiB | "
                     f"{row['bound'] / 1024:.1f} KiB | {'yes' if ok else 'no'} | {row['merged_cache'] / 1024:.0f} KiB | "
                     f"{row['scratch'] / 1024:.0f} KiB | {row['reference'] / 1024:.0f} KiB | {row['lora'] / 1024:.1f} KiB |")
    lines += ["", f"Target: at most 4·r·(m + n) + 8·m bytes on the factored path: **{status_of(mem_ok)}**."]
    if not all(mem_ok):
        lines += ["What limits it: A and U_r are dense (BLAS needs them so) and take the whole 4·r·(m + n); the "
                  "rest is D_r, the pivots, z and σ (12·r + 4 bytes; loldu.torch writes the gradients into "
                  "PyTorch's buffers, so the layer holds none). The 8·m-byte allowance holds 2·m values, so it is exceeded when r is large "
                  "against m: here by "
                  + "; ".join(f"{(row['ours'] - row['bound']) / 1024:.1f} KiB at {row['m']} × {row['n']}, r = {row['r']}"
                              for row in memory_rows if row["ours"] > row["bound"])
                  + ", and met on " + "; ".join(f"{row['m']} × {row['n']}, r = {row['r']}"
                                               for row in memory_rows if row["ours"] <= row["bound"]) + "."]
    lines.append("")

    # -- the Python call
    lines += ["## The Python call, 16 × 16 layer, one row", "",
              "Blocks of calls timed back to back with `nn.Linear` (interleaved repetitions); the difference and "
              "the ratio are medians of per-repetition values.", "",
              "| | nn.Linear | loldu.torch | difference | ratio | target: within nn.Linear + 30 µs |", "|---|---|---|---|---|---|"]
    for kind, label in (("forward", "forward (no grad)"), ("step", "forward + backward")):
        v = calls[kind]
        lines.append(f"| {label} | {v['nn_us']:.1f} µs | {v['ours_us']:.1f} µs | +{v['diff_us']:.1f} µs | "
                     f"{v['ratio']:.2f}× | **{status(v['diff_us'] <= 30)}** |")
    if calls["step"]["diff_us"] > 30 or calls["forward"]["diff_us"] > 30:
        lines += ["", "What limits the 16 × 16 call (profiles below): nn.Linear's forward and backward are C++ "
                  "(`torch._C._nn.linear` and its autograd node); `LoLDULinear` runs Python on every call — the "
                  "per-call checks in `_prepare` (base weight version and pointer, parameters still bound to the "
                  "library's memory), several `ParameterDict` look-ups of `loldu_z[name]` / `loldu_sigma[name]`, "
                  "`_base_weight` (three calls per forward), the autocast and dtype checks — and a Python "
                  "`torch.autograd.Function` whose `forward` and `backward` are Python callbacks with their own "
                  "bookkeeping (`_get_user_fn`, `apply`, saved tensors). The two library calls themselves are a few µs."]
    lines.append("")
    for kind, prof in call_profiles.items():
        lines += [f"Where a {kind} call's time goes (cProfile, own time per call, top entries; the profiler "
                  f"inflates small functions, so read the shares): {prof['total_us']:.0f} µs per call under the profiler.",
                  "", "| function | calls per call | own µs | share | cumulative µs |", "|---|---|---|---|---|"]
        lines += [f"| `{p['function']}` | {p['calls']:.0f} | {p['own_us']:.1f} | {100 * p['share']:.0f}% | "
                  f"{p['cum_us']:.1f} |" for p in prof["rows"]]
        lines.append("")

    # -- OMP_WAIT_POLICY
    unset = [w["ours_unset_over_passive"] for w in wait_rows]
    lines += ["## `OMP_WAIT_POLICY`: unset against PASSIVE", "",
              "The loldu.torch float32 step (as in the float32 table) and the bare `nn.Linear` step, interleaved, in child "
              "processes of this script started with `OMP_WAIT_POLICY` unset (and `LOLDU_KEEP_OMP_WAIT_POLICY=1`, "
              "since `import loldu` would otherwise set PASSIVE itself) and with `OMP_WAIT_POLICY=PASSIVE`, "
              f"alternately ({wait_rows[0]['rounds'] if wait_rows else 0} of each, the first of each pair alternating; "
              "OpenMP reads the variable when it starts, so it cannot change within a process), "
              f"{threads} threads. Each ratio is the median over rounds of the per-round ratio.", "",
              "| shape (m × n, r, B) | loldu.torch step, PASSIVE | unset / PASSIVE: loldu.torch | "
              "unset / PASSIVE: nn.Linear | loldu.torch / nn.Linear: PASSIVE | loldu.torch / nn.Linear: unset |",
              "|---|---|---|---|---|---|"]
    for w in wait_rows:
        lines.append(f"| {w['m']} × {w['n']}, r = {w['r']}, B = {w['b']} | {w['ms']['PASSIVE']['ours']:.2f} ms | "
                     f"**{w['ours_unset_over_passive']:.3f}×** | {w['bare_unset_over_passive']:.3f}× | "
                     f"{w['ours_over_bare']['PASSIVE']:.3f}× | {w['ours_over_bare']['unset']:.3f}× |")
    wait_verdict = (
        "no shape measured" if not unset else
        f"leaving it unset makes the loldu.torch step up to {100 * (max(unset) - 1):.0f}% slower here, which "
        "`import loldu` before `torch` avoids by setting PASSIVE" if max(unset) > 1.05 else
        f"PASSIVE makes the loldu.torch step up to {100 * (1 / min(unset) - 1):.0f}% slower here" if min(unset) < 0.95 else
        f"unset is within {100 * max(abs(v - 1) for v in unset):.1f}% of PASSIVE on every shape here, inside this "
        "machine's run-to-run noise (±5%): no measurable difference")
    lines += ["", f"Verdict: {wait_verdict}.", ""]

    lines += ["## The C benchmark in full", "",
              "From the same run of `build/bench` (its float32 step and initialisation tables; its other sections "
              "are above):", ""]
    lines += [line for line in demote(sections.get("", "")) if not line.startswith("# ")] + [""]
    for name in ("One training step", "Initialisation, 4096 × 4096, r = 64"):
        if name in sections:
            lines += [f"### {name}", ""] + demote(sections[name]) + [""]
    # -- the README's summary of what limits the targets missed, from this run's figures
    limits = []
    if not amx:
        all_bare = [1 / v["bare_bf16_over_bare_f32"] for v in c_bf.values()]
        limits.append(f"bf16 speed-up: the target is set for AMX tiles, which this CPU lacks; its bare bf16 layer runs at "
                      f"{min(all_bare):.2f}–{max(all_bare):.2f}× the speed of the float32 one (C, every shape).")
    over_bound = {k: v for k, v in bound_over.items() if v > 1.10}
    if over_bound:
        limits.append("bf16 step over 1.10× its FLOP bound on " + "; ".join(
            f"{k[0]} × {k[1]}, r = {k[2]} ({v:.3f})" for k, v in over_bound.items()) + ".")
    if any(v > 1.0 for cases in vs_peft.values() for v in cases.values()):
        limits.append("loldu.torch slower than PEFT LoRA at r = 64: " + "; ".join(
            f"{k[0]}², {what}: {v:.2f}×" for k, cases in vs_peft.items() for what, v in cases.items() if v > 1.0) + ".")
    if any(v > 1.10 for v in f32_over.values()):
        limits.append("float32 step over 1.10× its FLOP bound on " + "; ".join(
            f"{k[0]} × {k[1]}, r = {k[2]} ({v:.3f})" for k, v in f32_over.items() if v > 1.10) + ".")
    if not all(v > 1 for v in ref_speed):
        limits.append("loldu.torch slower than the reference formulation on " + "; ".join(
            f"{r['m']} × {r['n']}, r = {r['r']} ({1 / r['reference_over_ours']:.2f}×)"
            for r in step_rows if r["reference_over_ours"] <= 1) + ".")
    if init_speed < 20:
        limits.append(f"initialisation {init_speed:.0f}× faster than the reference.")
    if any(g["memory"]["per_adapter"] > g["memory"]["allowance"] for g in c_group.values()):
        limits.append("bytes per added adapter: " + "; ".join(
            f"r = {k[2]}: {g['memory']['per_adapter']:.0f} B against {g['memory']['allowance']:.0f}"
            for k, g in c_group.items() if g["memory"]["per_adapter"] > g["memory"]["allowance"]) + ".")
    if not all(v <= 1.10 for v in worst_group.values()):
        limits.append("N = 4,096 adapters from C: " + "; ".join(
            f"{k[0]} × {k[1]}, r = {k[2]}: {v:.3f}× N = 1 ({c_group[k]['extra_us_per_adapter_step']:.2f} µs per used "
            f"adapter, forward + backward, against a {c_group[k]['n1_step_ms']:.2f} ms call)"
            for k, v in worst_group.items() if v > 1.10) + ".")
    if top == 4096 and any(v > 1.10 for e in torch_group.values() for v in (e["ours_forward"], e["ours_step"])):
        limits.append("N = 4,096 adapters through loldu.torch: " + "; ".join(
            f"{g['m']} × {g['n']}, r = {g['r']}: forward {g['counts'][top]['ours_forward']:.2f}×, forward + backward "
            f"{g['counts'][top]['ours_step']:.2f}× N = 1" + (f" ({g['extra_us']['ours_forward']:.1f} and "
            f"{g['extra_us']['ours_step']:.1f} µs per used adapter, against {cg['extra_us_per_adapter_forward']:.2f} and "
            f"{cg['extra_us_per_adapter_step']:.2f} µs in the C calls alone and {g['extra_us']['autograd']:.1f} µs in "
            "PyTorch's autograd alone)" if "extra_us" in g else "")
            for g in group_rows for cg in [c_group[(g["m"], g["n"], g["r"])]]
            if max(g["counts"][top]["ours_forward"], g["counts"][top]["ours_step"]) > 1.10) + ".")
    if not all(v <= 1.05 for v in over.values()):
        limits.append(f"loldu.torch adds {min(r['ours_minus_library_ms'] for r in step_rows):+.2f} to "
                      f"{max(r['ours_minus_library_ms'] for r in step_rows):+.2f} ms per step to the library calls it makes "
                      f"({100 * (min(over.values()) - 1):.1f}–{100 * (max(over.values()) - 1):.1f}%; the most on "
                      f"{worst_over['m']} × {worst_over['n']}, r = {worst_over['r']}, whose library step takes {worst_over['ms']['library']:.1f} ms).")
    if not all(mem_ok):
        limits.append("memory beyond W over the bound by " + "; ".join(
            f"{(row['ours'] - row['bound']) / 1024:.1f} KiB at {row['m']} × {row['n']}, r = {row['r']}"
            for row in memory_rows if row["ours"] > row["bound"]) + ".")
    if any(v[kind] > 1 for v in c_load.values() for kind in ("first_ms", "later_ms")):
        limits.append("adding a saved adapter: " + "; ".join(
            f"{k[0]} × {k[1]}: first on a new base {v['first_ms']:.2f} ms, later {v['later_ms']:.2f} ms"
            for k, v in c_load.items() if max(v["first_ms"], v["later_ms"]) > 1) + ".")
    if any(calls[kind]["diff_us"] > 30 for kind in calls):
        limits.append("the 16 × 16 call: " + "; ".join(f"{kind} +{v['diff_us']:.1f} µs" for kind, v in calls.items()) + ".")

    with open(args.out, "w") as f:
        f.write("\n".join(lines).rstrip() + "\n")
    print("\n".join(lines))
    print(f"bench_torch: {(time.perf_counter() - started) / 60:.1f} min", flush=True)
    if args.readme:
        update_readme(args.readme,
                      ["Targets on this machine (" + cpu_description().split(";")[0] + "; the targets are for an "
                       "Intel Xeon with AMX):", ""] + summary
                      + ["", "One float32 training step, as a multiple of the bare layer (ours from C against the "
                         "library's own bare layer on the same GEMM library; the others against `nn.Linear`):", ""]
                      + step_table + ["", step_targets, "",
                                      "Initialisation of a rank-64 adapter on a 4096 × 4096 weight:", ""]
                      + init_table + ["", f"Target: at least 20× faster than the reference formulation: "
                                      f"**{status(init_ok)}**."]
                      + (["", "Where a target is missed or not checkable, this run's figures ([docs/benchmarks.md]"
                          "(docs/benchmarks.md) says what limits each):", ""] + [f"- {x}" for x in limits] if limits else [])
                      + ["", f"`OMP_WAIT_POLICY` unset against PASSIVE: {wait_verdict} (step time unset / PASSIVE, "
                         + "; ".join(f"{w['m']} × {w['n']}: loldu.torch {w['ours_unset_over_passive']:.3f}×, nn.Linear "
                                     f"{w['bare_unset_over_passive']:.3f}×" for w in wait_rows) + ")."])


README_BEGIN, README_END = "<!-- make bench: begin -->", "<!-- make bench: end -->"


def update_readme(path: str, block: list[str]) -> None:
    """Replaces the README's benchmark tables (between the markers) with this run's."""
    with open(path) as f:
        text = f.read()
    begin, end = text.find(README_BEGIN), text.find(README_END)
    if begin < 0 or end < begin:
        sys.exit(f"{path}: the markers {README_BEGIN} and {README_END} are missing")
    text = text[:begin + len(README_BEGIN)] + "\n" + "\n".join(block) + "\n" + text[end:]
    with open(path, "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()
