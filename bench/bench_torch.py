"""Benchmarks side by side: our adapter against the paper's reference formulation, PEFT LoRA and
the bare layer, in one run, as ratios; writes docs/benchmarks.md and a PNG (`make bench`).

    python3 bench/bench_torch.py --c-bench build/bench [--out docs/benchmarks.md]
                                 [--png docs/benchmarks.png] [--quick]

1. Initialisation (4096 × 4096, r = 64): ours against the reference formulation (full LU, dense
   P, residual by dense products) and PiSSA's SVDs (full, and svd_lowrank with 4 iterations).
2. One training step (forward + backward) per shape: ours called from C (build/bench, against
   the bare layer on the same OpenBLAS), ours through loldu.torch, the reference formulation
   (dense P, the whole update rebuilt every forward), PEFT LoRA r = 16 and a bare frozen
   nn.Linear, each as a ratio to that bare layer.
3. Memory held per adapted layer beyond W.
4. Python call overhead on a tiny layer, against nn.Linear.
Every contender runs with the same number of threads.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
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
from contenders import (  # noqa: E402
    ReferenceLoLDU, held_bytes, lora_model, pissa_init, pissa_init_lowrank, reference_init,
)

SHAPES = [  # (m, n, r, B, what): the paper's and the demo's layers
    (768, 768, 768, 4096, "ViT-B query/value, full rank"),
    (768, 768, 64, 4096, "ViT-B query/value, r = 64"),
    (4096, 4096, 64, 256, "LLaMA-7B, r = 64"),
    (384, 384, 384, 2048, "MiniLM attention, full rank"),
    (1536, 384, 384, 2048, "MiniLM intermediate, full rank"),
]


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def linear(m: int, n: int, seed: int) -> nn.Linear:
    torch.manual_seed(seed)
    layer = nn.Linear(n, m)
    with torch.no_grad():
        layer.weight.normal_(0, n ** -0.5)
    layer.weight.requires_grad_(False)
    layer.bias.requires_grad_(False)
    return layer


def step_fn(module: nn.Module, x: torch.Tensor, dy: torch.Tensor, params: list, perturb: bool):
    """One training step: forward, backward into x and the trainable parameters."""
    def run():
        if perturb:  # the trainable values change every step, as in training
            with torch.no_grad():
                params[0].view(-1)[0] += 1e-4
        x.grad = None
        for p in params:
            p.grad = None
        module(x).backward(dy)
    return run


def steps(reps: int) -> list[dict]:
    rows = []
    for m, n, r, batch, what in SHAPES:
        base = linear(m, n, 1)
        x = torch.randn(batch, n, requires_grad=True)
        dy = torch.randn(batch, m)
        ours = lt.LoLDULinear(linear(m, n, 1), rank=r)
        reference = ReferenceLoLDU(linear(m, n, 1), r)
        lora = lora_model(linear(m, n, 1), 16)
        contenders = {
            "bare": step_fn(base, x, dy, [], False),
            "ours": step_fn(ours, x, dy, [ours.loldu_z, ours.loldu_sigma], True),
            "reference": step_fn(reference, x, dy, [reference.z, reference.sigma], True),
            "lora": step_fn(lora, x, dy, [p for p in lora.parameters() if p.requires_grad], True),
        }
        for fn in contenders.values():  # warm up (allocations, caches)
            fn()
        samples = {k: [] for k in contenders}
        names = list(contenders)
        for rep in range(reps):
            for i in range(len(names)):  # rotate the order every repetition
                name = names[(i + rep) % len(names)]
                samples[name].append(timed(contenders[name]))
        # Ratios are medians of per-repetition ratios, as in the C benchmark: a repetition's
        # contenders run back to back, so a slow spell of the machine cancels out.
        def median_ratio(num: str, den: str) -> float:
            return statistics.median(a / b for a, b in zip(samples[num], samples[den]))
        med = {k: statistics.median(v) for k, v in samples.items()}
        rows.append({"m": m, "n": n, "r": r, "b": batch, "what": what, "ms": {k: 1e3 * v for k, v in med.items()},
                     "ratio": {k: median_ratio(k, "bare") for k in samples},
                     "reference_over_ours": median_ratio("reference", "ours")})
        print(f"step {m}x{n} r={r} B={batch}: " + ", ".join(f"{k} {1e3 * v:.1f} ms" for k, v in med.items()),
              flush=True)
        ours.close()
    return rows


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
        "PiSSA, torch.linalg.svd": lambda: pissa_init(weight, r),
    }
    out = {}
    for name, fn in contenders.items():
        fn()
        count = 1 if "linalg.svd" in name else reps
        out[name] = 1e3 * statistics.median(timed(fn) for _ in range(count))
        print(f"init {name}: {out[name]:.1f} ms", flush=True)
    return out


def memory() -> list[dict]:
    rows = []
    for m, n, r, batch, what in SHAPES:
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


def overhead(reps: int) -> dict:
    """Microseconds per call on a tiny layer (16 × 16, one row)."""
    base = linear(16, 16, 3)
    ours = lt.LoLDULinear(linear(16, 16, 3), rank=4)
    x = torch.randn(1, 16)
    xg = torch.randn(1, 16, requires_grad=True)
    out = {}
    for name, module in (("nn.Linear", base), ("loldu.torch", ours)):
        with torch.no_grad():
            for _ in range(200):
                module(x)
            start = time.perf_counter()
            for _ in range(reps):
                module(x)
            forward = (time.perf_counter() - start) / reps
        start = time.perf_counter()
        for _ in range(reps // 4):
            module(xg).sum().backward()
        step = (time.perf_counter() - start) / (reps // 4)
        out[name] = {"forward_us": 1e6 * forward, "step_us": 1e6 * step}
    ours.close()
    return out


def plot(rows: list[dict], c_rows: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['m']}×{r['n']}\nr={r['r']}, B={r['b']}" for r in rows]
    series = [("ours, from C (vs OpenBLAS bare)", [c_rows.get((r["m"], r["n"], r["r"]), np.nan) for r in rows]),
              ("ours, loldu.torch", [r["ratio"]["ours"] for r in rows]),
              ("reference formulation", [r["ratio"]["reference"] for r in rows]),
              ("PEFT LoRA r = 16", [r["ratio"]["lora"] for r in rows])]
    fig, ax = plt.subplots(figsize=(10, 4))
    width = 0.2
    for i, (name, values) in enumerate(series):
        ax.bar(np.arange(len(rows)) + (i - 1.5) * width, values, width, label=name)
    ax.axhline(1, color="k", lw=0.8)
    ax.set_xticks(np.arange(len(rows)), labels, fontsize=8)
    ax.set_ylabel("training step / bare layer")
    ax.set_yscale("log")
    ax.set_title("One training step (forward + backward), as a multiple of the bare frozen layer")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--c-bench", required=True, help="the C benchmark binary (build/bench)")
    parser.add_argument("--out", default="docs/benchmarks.md")
    parser.add_argument("--png", default="docs/benchmarks.png")
    parser.add_argument("--readme", help="also replace the tables between the markers in this README")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    reps = 3 if args.quick else 15

    build = os.path.dirname(os.path.abspath(args.c_bench))
    c_json, c_md = os.path.join(build, "bench-c.json"), os.path.join(build, "bench-c.md")
    print("running", args.c_bench, flush=True)
    subprocess.run([args.c_bench, "--json", c_json, "--markdown", c_md] + (["--quick"] if args.quick else []),
                   check=True, stdout=subprocess.DEVNULL)
    with open(c_json) as f:
        c = json.load(f)
    threads = int(c["threads"])
    torch.set_num_threads(threads)
    loldu.set_num_threads(threads)

    init_ms = init(reps)
    step_rows = steps(reps)
    memory_rows = memory()
    calls = overhead(20000 if not args.quick else 2000)

    c_step = {(s["m"], s["n"], s["r"]): s for s in c["shapes"]}
    c_ratio = {k: v["auto"] for k, v in c_step.items()}
    os.makedirs(os.path.dirname(os.path.abspath(args.png)), exist_ok=True)
    plot(step_rows, c_ratio, args.png)

    # ---- the report ----------------------------------------------------------------------
    lines = ["# Benchmarks", "",
             f"Produced by `make bench` (`{' '.join([os.path.basename(sys.executable)] + sys.argv)}`, which also runs "
             f"`{args.c_bench}`). Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
             f"{platform.system()} {platform.release()}; {threads} threads for every contender (OpenBLAS core "
             f"`{c['blas']}` for libloldu; PyTorch {torch.__version__} with its own BLAS). libloldu "
             f"{loldu.library_version()}, float32. Times are medians over interleaved repetitions; ratios are "
             f"medians of per-repetition ratios.", ""]

    init_table = ["| method | time | ours is faster by |", "|---|---|---|"]
    for name, ms in init_ms.items():
        factor = "—" if name.startswith("ours") else f"{ms / init_ms['ours']:.0f}×"
        init_table.append(f"| {name} | {ms:.1f} ms | {factor} |")
    lines += ["## Initialisation, 4096 × 4096, r = 64", ""] + init_table
    init_ok = init_ms["reference (full LU, dense P)"] / init_ms["ours"] >= 20
    lines += ["", f"Target: at least 20× faster than the reference formulation: **{'met' if init_ok else 'missed'}** "
              f"({init_ms['reference (full LU, dense P)'] / init_ms['ours']:.0f}× with W copied, "
              f"{init_ms['reference (full LU, dense P)'] / init_ms['ours (W borrowed)']:.0f}× with W borrowed). "
              f"From C in the same run: full LAPACK getrf {c['init']['full_ms']:.0f} ms, ours {c['init']['copy_ms']:.1f} ms "
              f"(W copied) and {c['init']['borrow_ms']:.1f} ms (borrowed); a plain malloc + memcpy of W, the floor "
              f"of anything that keeps its own copy, {c['init']['memcpy_ms']:.1f} ms.", ""]

    lines += ["## One training step (forward + backward)", "",
              "Each contender as a multiple of the bare frozen layer: for ours from C, the bare layer on the "
              "same OpenBLAS in the same C process; for the others, a frozen `nn.Linear` in this process. "
              "The trainable values change before every step, as in training.", "",
              f"![training step ratios]({os.path.basename(args.png)})", ""]
    step_table = ["| shape (m × n, r, B) | bare nn.Linear | ours, from C | ours, loldu.torch | reference formulation | "
                  "PEFT LoRA r = 16 | FLOP bound | from C / bound | ours vs reference |",
                  "|---|---|---|---|---|---|---|---|---|"]
    within = faster = True
    for row in step_rows:
        cs = c_step.get((row["m"], row["n"], row["r"]))
        ratio = row["ratio"]
        over = cs["auto"] / cs["bound"] if cs else float("nan")
        within &= over <= 1.10
        speedup = row["reference_over_ours"]
        faster &= speedup > 1
        step_table.append(
            f"| {row['m']} × {row['n']}, r = {row['r']}, B = {row['b']} ({row['what']}) | {row['ms']['bare']:.1f} ms | "
            f"{cs['auto']:.3f}× ({cs['auto_path']}) | {ratio['ours']:.3f}× | {ratio['reference']:.3f}× | "
            f"{ratio['lora']:.3f}× | {cs['bound']:.3f}× | {over:.3f} | {speedup:.2f}× {'faster' if speedup > 1 else 'slower'} |")
    step_targets = (f"Targets: our step within 1.10× of its FLOP lower bound on every shape: "
                    f"**{'met' if within else 'missed'}**; faster than the reference formulation on every shape: "
                    f"**{'met' if faster else 'missed'}**.")
    lines += step_table + ["", step_targets + " (`loldu.torch` adds PyTorch's own costs around the library "
                           "call — autograd bookkeeping, the bias, copying dz out — on top of the C figure.)"]
    if not faster:
        lines += ["What limits it: at full rank (r = min(m, n)) both formulations build `W_eff` (2·m·n·r) and a "
                  "weight gradient (2·B·m·n) and take dz from it (2·m·n·r); ours saves only the reference's "
                  "dense-P products, about 10% of the FLOPs at 768 × 768, and runs them on OpenBLAS where "
                  "PyTorch uses its own BLAS. That margin is the size of this machine's run-to-run noise."]
    lines.append("")

    lines += ["## Memory held per adapted layer beyond W", "",
              "Ours: the frozen factors A = P L_r, U_r, D_r, the pivots, z, σ, their gradients and small "
              "per-adapter state, on the factored path (`bytes_factors + bytes_state`); `loldu.torch` borrows "
              "W from the module, so no copy of W is held. The bound is 4·r·(m + n) + 8·m bytes. The merged "
              "weight that `auto` caches on some shapes and the scratch buffers (which grow with the batch) "
              "are on their own lines. Reference: P (m × m), L_r, U_r, z, σ (its residual replaces W). "
              "LoRA: A and B.", "",
              "| shape (m × n, r) | ours (factored) | bound | within | merged cache (auto) | scratch | "
              "reference formulation | PEFT LoRA r = 16 |", "|---|---|---|---|---|---|---|---|"]
    memory_ok = True
    for row in memory_rows:
        ok = row["ours"] <= row["bound"]
        memory_ok &= ok
        lines.append(f"| {row['m']} × {row['n']}, r = {row['r']} | {row['ours'] / 1024:.1f} KiB | "
                     f"{row['bound'] / 1024:.1f} KiB | {'yes' if ok else 'no'} | {row['merged_cache'] / 1024:.0f} KiB | "
                     f"{row['scratch'] / 1024:.0f} KiB | {row['reference'] / 1024:.0f} KiB | {row['lora'] / 1024:.1f} KiB |")
    lines += ["", f"Target: at most 4·r·(m + n) + 8·m bytes on the factored path: **{'met' if memory_ok else 'missed'}**."]
    if not memory_ok:
        lines += ["What limits it: A and U_r are dense (BLAS needs them so) and take the whole 4·r·(m + n); the "
                  "rest is O(r) state — z and σ, their gradients, D_r, σ₀·z_ref, and three r-vectors that "
                  "track the coefficients — about 9·r values. The 8·m-byte allowance holds 2·m values, so it "
                  "is exceeded by a few KiB exactly when r approaches m (full rank): z and its gradient alone "
                  "are 2·r values. Below r ≈ m/4 the state fits."]
    lines.append("")

    lines += ["## Python call overhead, 16 × 16 layer, one row", "",
              "| layer | forward (no grad) | forward + backward |", "|---|---|---|"]
    for name, v in calls.items():
        lines.append(f"| {name} | {v['forward_us']:.1f} µs | {v['step_us']:.1f} µs |")
    lines += ["", "## The C benchmark in full", "",
              "From the same run of `build/bench` (issue's shapes for the library alone):", ""]
    with open(c_md) as f:
        c_text = f.read().split("\n")
    lines += [line.replace("# ", "### ", 1) if line.startswith("#") else line for line in c_text[1:]]
    with open(args.out, "w") as f:
        f.write("\n".join(lines).rstrip() + "\n")
    print("\n".join(lines))
    if args.readme:
        update_readme(args.readme, step_table + ["", step_targets, "",
                                                 "Initialisation of a rank-64 adapter on a 4096 × 4096 weight:", ""]
                      + init_table + ["", "Target: at least 20× faster than the reference formulation: "
                                      f"**{'met' if init_ok else 'missed'}**."])


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
