"""``loldu.torch.Optimizer``: the library's optimiser (``loldu.Optimizer``) over the adapters of a
model, for training loops driven by PyTorch's autograd."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Mapping

import torch
from torch import nn

import loldu as _loldu

from .. import _capi
from ..errors import InvalidArgumentError, StateError
from .layers import LoLDULayer
from .model import _chosen, loldu_layers


STATE_KEY = "loldu_optimizer"  # (the one key of state_dict())


@contextlib.contextmanager
def _state_file():
    """A path for the optimiser's state file, in a temporary directory removed afterwards
    (``state_dict`` and ``load_state_dict`` go through the library's file format)."""
    with tempfile.TemporaryDirectory() as directory:
        yield os.path.join(directory, "optimizer.safetensors")


class Optimizer:
    """``Optimizer(model_or_layers, kind="adamw", lr=1e-3, adapter_name=None, **options)``
    (options as ``loldu.Optimizer``: schedule, warm-up, clipping, σ's rate...) over adapter
    ``adapter_name`` of the layers that have it; by default over the active adapters each layer
    has (those its forward computes with, and whose parameters require grad).

    The parameters' ``.grad`` are the library's own gradient buffers: ``zero_grad()`` sets them
    (zeroed) before the backward, autograd accumulates into them in place, and ``step()`` updates
    z and σ in place from them, without copying. Should autograd have replaced a ``.grad``
    tensor (or ``DistributedDataParallel`` reduced into another), ``step()`` copies it in first.
    A parameter without ``.grad`` counts as a zero gradient (``torch.optim`` would skip it;
    momentum and weight decay still apply here). A layer given twice is updated once.
    ``step()`` returns the global gradient norm before clipping.
    """

    def __init__(self, model_or_layers, kind: str = "adamw", lr: float = 1e-3, *, adapter_name: str | None = None,
                 **options):
        if isinstance(model_or_layers, nn.Module):
            layers = list(loldu_layers(model_or_layers).values())
        else:
            layers = list(model_or_layers)
        if not layers or not all(isinstance(layer, LoLDULayer) for layer in layers):
            raise InvalidArgumentError("Optimizer needs a model with LoLDU layers or a list of LoLDU layers",
                                       _capi.LOLDU_ERR_INVALID_ARGUMENT)
        layers = list(dict.fromkeys(layers))  # a layer shared by two modules is updated once
        if adapter_name is None:
            self.entries = [(layer, name) for layer in layers for name in layer._present_active()]
            if not self.entries:
                raise InvalidArgumentError("no LoLDU layer has an active adapter (set_adapter)",
                                           _capi.LOLDU_ERR_INVALID_ARGUMENT)
        else:
            self.entries = list(_chosen(dict(enumerate(layers)), adapter_name, required=True).values())
        adapters = [layer._prepare(name) for layer, name in self.entries]
        self._optimizer = _loldu.Optimizer(adapters, kind, lr, **options)
        self.zero_grad()

    @property
    def layers(self) -> list[LoLDULayer]:
        return list(dict.fromkeys(layer for layer, _ in self.entries))

    def _parameters(self):
        for (layer, name), adapter in zip(self.entries, self._optimizer.adapters):
            if layer.get_adapter(name) is not adapter:
                raise StateError(f"{layer.loldu_name}: adapter {name!r} was re-created (refactor, load or dtype "
                                 "change) after this optimiser; create a new optimiser", _capi.LOLDU_ERR_STATE)
            grad = torch.from_numpy(adapter.grad)
            yield layer.loldu_z[name], grad[: adapter.rank], layer.loldu_sigma[name], grad[adapter.rank:]

    def step(self) -> float:
        for z, dz, sigma, dsigma in self._parameters():
            for param, buffer in ((z, dz), (sigma, dsigma)):
                if param.grad is None or not param.requires_grad:
                    buffer.zero_()
                elif param.grad.data_ptr() != buffer.data_ptr():
                    buffer.copy_(param.grad.detach())
        return self._optimizer.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zeroes the library's gradients and makes them the parameters' ``.grad`` (whatever
        ``set_to_none``: autograd then accumulates straight into them)."""
        self._optimizer.zero_grad()
        for z, dz, sigma, dsigma in self._parameters():
            z.grad = dz if z.requires_grad else None
            sigma.grad = dsigma if sigma.requires_grad else None

    def get_lr(self) -> tuple[float, float]:
        return self._optimizer.get_lr()

    @property
    def lr(self) -> float:
        return self._optimizer.lr

    @property
    def steps(self) -> int:
        return self._optimizer.steps

    def save(self, path) -> None:
        self._optimizer.save(path)

    def load(self, path) -> None:
        self._optimizer.load(path)

    def state_dict(self) -> dict:
        """The state as ``save`` writes it (steps, moments, configuration), for ``torch.save``
        beside the model's: ``{"loldu_optimizer": <the file's bytes as a uint8 tensor>}``."""
        with _state_file() as path:
            self.save(path)
            with open(path, "rb") as f:
                return {STATE_KEY: torch.frombuffer(bytearray(f.read()), dtype=torch.uint8)}

    def load_state_dict(self, state_dict: Mapping) -> None:
        """Restores a ``state_dict()`` of an optimiser with the same configuration over the same
        layers (``load``'s checks: ``MismatchError`` naming what differs; nothing changes then)."""
        state = state_dict.get(STATE_KEY) if isinstance(state_dict, Mapping) else None
        if not isinstance(state, torch.Tensor) or state.dtype != torch.uint8 or state.dim() != 1:
            raise InvalidArgumentError(
                f"state_dict must be what loldu.torch.Optimizer.state_dict() returns ({{{STATE_KEY!r}: a 1-D uint8 "
                f"tensor}}), got {type(state_dict).__name__}"
                + (f" with keys {sorted(map(str, state_dict))[:4]}" if isinstance(state_dict, Mapping) else ""),
                _capi.LOLDU_ERR_INVALID_ARGUMENT)
        with _state_file() as path:
            with open(path, "wb") as f:
                f.write(state.contiguous().numpy().tobytes())
            self.load(path)

    def close(self) -> None:
        self._optimizer.close()
