"""Optimisers and learning-rate schedules run by the library over the z and σ of adapters.

The update rules are torch.optim's (``SGD`` with momentum, dampening, Nesterov and L2 weight
decay; ``Adam``; ``AdamW`` with decoupled weight decay), optionally after clipping the global
gradient norm as ``torch.nn.utils.clip_grad_norm_``. Schedules scale the base rates as Hugging
Face's ``get_{constant,linear,cosine}_schedule_with_warmup``::

    opt = loldu.AdamW([a1, a2], lr=1e-3, schedule="cosine", warmup_steps=10, total_steps=100)
    ...backward on a1, a2...
    opt.step(); opt.zero_grad()
"""

from __future__ import annotations

import ctypes
import math

from . import _capi
from ._arrays import c_string, integer, real
from .adapter import Adapter, _choice, _Handle, _HandleOwner, _names
from .errors import InvalidArgumentError, check

KINDS = tuple(name[len("LOLDU_"):].lower() for _, name in sorted(
    (getattr(_capi, name), name) for name in ("LOLDU_SGD", "LOLDU_ADAM", "LOLDU_ADAMW")))  # loldu_optimizer_kind
SCHEDULES = _names("LOLDU_SCHEDULE_")


def schedule_factor(schedule: str, step: int, warmup_steps: int = 0, total_steps: int = 0) -> float:
    """The factor on the base learning rates at ``step`` (completed steps), as the library
    computes it and as transformers' ``get_*_schedule_with_warmup`` do::

        step < warmup_steps:  step / warmup_steps
        'constant':           1
        'linear':             max(0, (total − step) / (total − warmup))
        'cosine':             max(0, ½ (1 + cos(π (step − warmup) / (total − warmup))))
    """
    if schedule not in SCHEDULES:
        raise InvalidArgumentError(f"schedule must be one of {SCHEDULES}, got {schedule!r}", _capi.LOLDU_ERR_INVALID_ARGUMENT)
    if step < warmup_steps:
        return step / max(1, warmup_steps)
    span = max(1, total_steps - warmup_steps)
    if schedule == "constant":
        return 1.0
    if schedule == "linear":
        return max(0.0, (total_steps - step) / span)
    return max(0.0, 0.5 * (1 + math.cos(math.pi * (step - warmup_steps) / span)))


def _adapter_list(adapters) -> list[Adapter]:
    if isinstance(adapters, Adapter):
        adapters = [adapters]
    adapters = list(adapters)
    if not adapters:
        raise InvalidArgumentError("an optimiser needs at least one adapter", _capi.LOLDU_ERR_INVALID_ARGUMENT)
    for i, a in enumerate(adapters):
        if not isinstance(a, Adapter):
            raise InvalidArgumentError(
                f"adapters[{i}] must be a loldu.Adapter, got {type(a).__name__} "
                "(for torch models use loldu.torch.Optimizer)",
                _capi.LOLDU_ERR_INVALID_ARGUMENT,
            )
    return adapters


class Optimizer(_HandleOwner):
    """``loldu_optimizer``: SGD, Adam or AdamW over one or more adapters (any dtypes).

    ``Optimizer(adapters, kind="adamw", lr=1e-3, *, lr_sigma=None, weight_decay=None,
    weight_decay_sigma=0.0, momentum=0.0, dampening=0.0, nesterov=False, betas=(0.9, 0.999),
    eps=1e-8, max_grad_norm=0.0, schedule="constant", warmup_steps=0, total_steps=0)``

    ``weight_decay=None`` is torch's default for the kind (0.01 for AdamW, 0 otherwise);
    ``lr_sigma=None`` uses ``lr`` for σ. ``step()`` uses the gradients accumulated in the adapters
    and returns the global gradient norm before clipping; it does not clear them.
    """

    _what = "optimiser"
    _instead = ": save() its state and load() it into a new optimiser over the same adapters"

    def __init__(
        self,
        adapters,
        kind: str = "adamw",
        lr: float = 1e-3,
        *,
        lr_sigma: float | None = None,
        weight_decay: float | None = None,
        weight_decay_sigma: float = 0.0,
        momentum: float = 0.0,
        dampening: float = 0.0,
        nesterov: bool = False,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        max_grad_norm: float = 0.0,
        schedule: str = "constant",
        warmup_steps: int = 0,
        total_steps: int = 0,
    ):
        self.adapters = tuple(_adapter_list(adapters))
        c = _capi.loldu_optimizer_config()
        check(_capi.loldu_optimizer_config_default(ctypes.byref(c), _choice(kind, KINDS, "kind")))
        c.lr = real(lr, "lr")
        c.lr_sigma = -1.0 if lr_sigma is None else real(lr_sigma, "lr_sigma")
        if weight_decay is not None:
            c.weight_decay = real(weight_decay, "weight_decay")
        c.weight_decay_sigma = real(weight_decay_sigma, "weight_decay_sigma")
        c.momentum = real(momentum, "momentum")
        c.dampening = real(dampening, "dampening")
        c.nesterov = 1 if nesterov else 0
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise InvalidArgumentError(f"betas must be a pair of numbers, got {betas!r}", _capi.LOLDU_ERR_INVALID_ARGUMENT)
        c.beta1, c.beta2 = real(betas[0], "betas[0]"), real(betas[1], "betas[1]")
        c.eps = real(eps, "eps")
        c.max_grad_norm = real(max_grad_norm, "max_grad_norm")
        c.schedule = _choice(schedule, SCHEDULES, "schedule")
        c.warmup_steps = integer(warmup_steps, "warmup_steps")
        c.total_steps = integer(total_steps, "total_steps")
        handles = (_capi.loldu_adapter_p * len(self.adapters))(*(a.handle for a in self.adapters))
        out = _capi.loldu_optimizer_p()
        check(_capi.loldu_optimizer_create(ctypes.byref(out), ctypes.byref(c), handles, len(self.adapters)))
        self._handle = _Handle(out.value, _capi.loldu_optimizer_free)
        self.kind, self.schedule = kind, schedule
        self.config = c

    def step(self) -> float:
        """One update from the accumulated gradients; returns the global gradient norm before
        clipping. ``StateError`` if an adapter is merged, ``NotFiniteError`` if a gradient is
        NaN or infinite (nothing is updated then)."""
        norm = ctypes.c_double()
        check(_capi.loldu_optimizer_step(self.handle, ctypes.byref(norm)))
        return norm.value

    def zero_grad(self) -> None:
        check(_capi.loldu_optimizer_zero_grad(self.handle))

    def get_lr(self) -> tuple[float, float]:
        """The learning rates of z and of σ the next step will use (after the schedule)."""
        lr, lr_sigma = ctypes.c_double(), ctypes.c_double()
        check(_capi.loldu_optimizer_get_lr(self.handle, ctypes.byref(lr), ctypes.byref(lr_sigma)))
        return lr.value, lr_sigma.value

    @property
    def lr(self) -> float:
        return self.get_lr()[0]

    @property
    def steps(self) -> int:
        """Completed steps."""
        steps = ctypes.c_int64()
        check(_capi.loldu_optimizer_get_step(self.handle, ctypes.byref(steps)))
        return steps.value

    def save(self, path) -> None:
        """Writes the state (steps, moments, configuration) to a safetensors file, atomically."""
        check(_capi.loldu_optimizer_save(self.handle, c_string(path, "path", path=True)))

    def load(self, path) -> None:
        """Restores a state saved by ``save`` for the same configuration and adapters;
        ``MismatchError`` naming what differs otherwise (nothing changes then)."""
        check(_capi.loldu_optimizer_load(self.handle, c_string(path, "path", path=True)))

    def __repr__(self) -> str:
        if self._handle is None:
            return "<loldu.Optimizer closed>"
        return f"<loldu.Optimizer {self.kind} lr={self.lr:g} steps={self.steps} adapters={len(self.adapters)}>"


def SGD(adapters, lr: float = 1e-3, momentum: float = 0.0, dampening: float = 0.0, weight_decay: float = 0.0,
        nesterov: bool = False, **options) -> Optimizer:
    """torch.optim.SGD's rule (see ``Optimizer`` for ``options``: schedule, clipping, σ)."""
    return Optimizer(adapters, "sgd", lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                     nesterov=nesterov, **options)


def Adam(adapters, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
         **options) -> Optimizer:
    """torch.optim.Adam's rule (L2 weight decay added to the gradient)."""
    return Optimizer(adapters, "adam", lr, betas=betas, eps=eps, weight_decay=weight_decay, **options)


def AdamW(adapters, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2,
          **options) -> Optimizer:
    """torch.optim.AdamW's rule (decoupled weight decay)."""
    return Optimizer(adapters, "adamw", lr, betas=betas, eps=eps, weight_decay=weight_decay, **options)
