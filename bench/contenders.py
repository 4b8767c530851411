"""What a user would otherwise pick, written in plain PyTorch for the benchmarks.

- ``ReferenceLoLDU``: the LoLDU formulation as the paper describes it (docs/design.md): a full
  ``torch.linalg.lu`` of W, a dense m × m permutation P, the residual formed by dense products,
  and the whole m × n update ``σ P L_r diag(z) U_r`` rebuilt on every forward.
- ``pissa_init`` / ``pissa_init_lowrank``: PiSSA-style initialisation by SVD.
- PEFT LoRA comes from ``peft`` itself (``lora_model``).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class ReferenceLoLDU(nn.Module):
    """y = x (W_res + σ P L_r diag(z) U_r)ᵀ + b, with every factor dense, as in the paper."""

    def __init__(self, linear: nn.Linear, rank: int, alpha: float | None = None):
        super().__init__()
        weight = linear.weight.detach()
        P, L, U = torch.linalg.lu(weight)  # full factorisation, P dense m × m
        d = torch.diagonal(U)
        sigma0 = (alpha if alpha is not None else rank) / rank
        self.register_buffer("P", P)
        self.register_buffer("L", L[:, :rank].contiguous())
        self.register_buffer("U", (U[:rank] / d[:rank, None]).contiguous())
        self.register_buffer(
            "residual", weight - sigma0 * (P @ self.L @ torch.diag(d[:rank]) @ self.U)
        )
        self.z = nn.Parameter(d[:rank].clone())
        self.sigma = nn.Parameter(torch.tensor(sigma0, dtype=weight.dtype))
        self.bias = linear.bias

    def forward(self, x):
        update = self.sigma * (self.P @ self.L @ torch.diag(self.z) @ self.U)
        return F.linear(x, self.residual + update, self.bias)


def reference_init(weight: torch.Tensor, rank: int):
    """The reference initialisation alone: full LU, dense P, residual by dense products."""
    P, L, U = torch.linalg.lu(weight)
    d = torch.diagonal(U)
    Lr, Ur = L[:, :rank], U[:rank] / d[:rank, None]
    return P, Lr, Ur, weight - P @ Lr @ torch.diag(d[:rank]) @ Ur


def pissa_init(weight: torch.Tensor, rank: int):
    """PiSSA: the principal r singular triplets by a full SVD, and the residual."""
    U, S, Vh = torch.linalg.svd(weight, full_matrices=False)
    A, B = U[:, :rank] * S[:rank].sqrt(), S[:rank].sqrt()[:, None] * Vh[:rank]
    return A, B, weight - A @ B


def pissa_init_lowrank(weight: torch.Tensor, rank: int, niter: int = 4):
    """PiSSA with ``torch.svd_lowrank`` (randomised, ``niter`` subspace iterations)."""
    U, S, V = torch.svd_lowrank(weight, q=rank, niter=niter)
    A, B = U * S.sqrt(), S.sqrt()[:, None] * V.T
    return A, B, weight - A @ B


class _Holder(nn.Module):
    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.layer = linear

    def forward(self, x):
        return self.layer(x)


def lora_config(rank: int = 16):
    import peft

    return peft.LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules=["layer"])


def lora_model(linear: nn.Linear, rank: int = 16, autocast_adapter_dtype: bool = True):
    """A PEFT LoRA model (r = rank, alpha = rank, no dropout) around one linear layer. On a bf16
    layer PEFT keeps the LoRA weights in float32 by default (``autocast_adapter_dtype=True``);
    ``False`` keeps them in the layer's dtype."""
    import peft

    return peft.get_peft_model(_Holder(linear), lora_config(rank), autocast_adapter_dtype=autocast_adapter_dtype)


def held_bytes(module: nn.Module, exclude: tuple = ()) -> int:
    """Bytes of the parameters and buffers a module holds, without those named in ``exclude``."""
    total = 0
    for name, tensor in list(module.named_parameters()) + list(module.named_buffers()):
        if not any(name.endswith(e) for e in exclude):
            total += tensor.numel() * tensor.element_size()
    return total
