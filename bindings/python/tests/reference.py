"""An independent implementation of the LoLDU formulas (docs/design.md) in numpy/scipy and PyTorch,
to check the library against: the factors come from scipy's full LU, not from the library."""

from __future__ import annotations

import numpy as np
import scipy.linalg


def ldu_factors(weight: np.ndarray, rank: int):
    """``A = P L_r`` (m × r), ``D_r`` (r), ``U_r = D_r⁻¹ U[:r]`` (r × n), in float64, from
    scipy's LU with partial pivoting of the whole matrix."""
    w = np.asarray(weight, np.float64)
    p, lower, upper = scipy.linalg.lu(w)
    a = (p @ lower)[:, :rank]
    d = np.diag(upper)[:rank].copy()
    u = upper[:rank] / d[:, None]
    return a, d, u


def effective_weight(weight, a, d, u, z, sigma, sigma0, z_ref=None):
    """``W_eff = W − σ₀ A diag(z_ref) U_r + σ A diag(z) U_r`` with ``z_ref = D_r`` by default."""
    z_ref = d if z_ref is None else z_ref
    return np.asarray(weight, np.float64) + a @ np.diag(sigma * np.asarray(z, np.float64) - sigma0 * z_ref) @ u


def torch_linear(x, weight, bias, a, u, z_ref, sigma0, z, sigma):
    """Plain-PyTorch LoLDU linear layer (autograd does the backward):
    ``y = x W_resᵀ + σ ((x U_rᵀ) ⊙ z) Aᵀ + b``, ``W_res = W − σ₀ A diag(z_ref) U_r``."""
    import torch

    residual = weight - sigma0 * (a * z_ref) @ u
    y = x @ residual.T + (sigma * ((x @ u.T) * z)) @ a.T
    return y if bias is None else y + bias


def torch_weight(weight, a, u, z_ref, sigma0, z, sigma):
    """Plain-PyTorch ``W_eff`` for weight-space layers."""
    return weight - sigma0 * (a * z_ref) @ u + sigma * (a * z) @ u
