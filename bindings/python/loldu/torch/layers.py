"""LoLDU layers: ``LoLDULinear``, ``LoLDUConv`` (``nn.Conv1d/2d/3d``), ``LoLDUEmbedding``.

A layer wraps the original module as ``base_layer`` (its weight frozen, its bias kept) and holds
any number of named adapters on that weight, as PEFT's LoRA layers do: ``loldu_z[name]`` and
``loldu_sigma[name]`` (``nn.ParameterDict``) are float32 (float64 for float64 models) parameters
that *share memory* with the library's adapters. All adapters of a layer share one set of
frozen factors (the LU of the weight, computed once at the largest rank asked for), so an added
adapter costs its r + 1 numbers. ``active_adapters`` compute by default (several: the sum of their
updates, as PEFT adds them); a mixed batch gives each sample its own adapter (``adapter_names=`` or
``loldu.torch.mixed_batch``). As in PEFT, the active names are the model's: a layer skips those it
does not have (without any, it computes its base layer), and a mixed batch's rows for an adapter
the layer lacks get the base layer's output.

Element types: the layer computes in its base weight's dtype: float32, float64, bfloat16 or
float16 (``model.to(torch.bfloat16)``, ``from_pretrained(..., torch_dtype=torch.bfloat16)``).
Under ``torch.autocast("cpu", dtype=torch.bfloat16)`` a float32 layer computes in bf16 as
``nn.Linear`` does, with the same factorisation, z and σ on its weight rounded to bf16
(``loldu_adapter_convert``); its parameters stay float32.
"""

from __future__ import annotations

import contextvars
import ctypes
import dataclasses
import os
import warnings
import weakref
import zlib

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import loldu as _loldu

from .. import _capi
from .._arrays import NUMPY_DTYPES
from ..adapter import Adapter, AdapterConfig, init_change_advice
from ..errors import (DeviceError, DTypeError, InvalidArgumentError, LoLDUWarning, NotFiniteError, ShapeError, StateError,
                      check)
from ._functions import (JIT_REFUSAL, LIBRARY_DTYPES, AdapterGroup, GroupedLinearFunction, LinearFunction,
                         SummedLinearFunction, WeightFunction, clone_in_state, eager_under_compile, grouped_linear,
                         library_input, linear, parameter_dtype, refuse_tracing)

BASE_NAME = "__base__"  # PEFT's name for rows that use no adapter in a mixed batch
PLANS_KEPT = 1024  # the training path's plans per layer, one per adapter and batch size
# The row → adapter names of the ``mixed_batch`` blocks open in this thread (or asyncio task):
# {layer: names}, None outside any. Per thread, as PEFT's ``adapter_names=`` is per call: threads
# that serve different mixed batches through one model do not see each other's.
MIXED_BATCH: contextvars.ContextVar[dict | None] = contextvars.ContextVar("loldu_mixed_batch", default=None)
_process_configured = False

# glibc's malloc gives large freed blocks back to the kernel: blocks above M_MMAP_THRESHOLD at
# once, and the top of the heap above M_TRIM_THRESHOLD. A training step allocates its outputs
# (y, dX: megabytes each) afresh, so with the defaults every step page-faults them in again
# (measured: 225–750 faults and up to +1 ms per step on a 384 × 384 layer at B = 2048). Kept instead,
# up to these sizes (mallopt's parameter numbers from <malloc.h>; 32 MiB is glibc's ceiling for
# its own adaptive threshold on 64-bit).
MALLOC_KEEP = {"M_MMAP_THRESHOLD": (-3, 32 << 20), "M_TRIM_THRESHOLD": (-1, 256 << 20)}


def configure_malloc(environ=os.environ) -> bool:
    """Sets ``MALLOC_KEEP`` through glibc's ``mallopt``, unless ``LOLDU_KEEP_MALLOC=1`` or the user
    set glibc's own ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_``; returns whether it did."""
    if environ.get("LOLDU_KEEP_MALLOC") == "1" or any(f"MALLOC_{k[2:]}_" in environ for k in MALLOC_KEEP):
        return False
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)  # glibc only
    if mallopt is None:
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return all(mallopt(param, value) == 1 for param, value in MALLOC_KEEP.values())


def configure_process() -> None:
    """Once, on the first forward: aligns the library's threads with torch's pool unless the user
    chose (``loldu.set_num_threads``), and keeps freed step buffers mapped (``configure_malloc``)."""
    global _process_configured
    if not _process_configured:
        _process_configured = True
        if not _loldu.threads_set_by_user():
            status = _capi.loldu_set_num_threads(max(1, torch.get_num_threads()))
            if status != _capi.LOLDU_ERR_OUT_OF_MEMORY:  # (no room for more threads: keep the count)
                check(status)
        configure_malloc()


_COMPUTED_WEIGHT = (
    "the base layer's weight is not a tensor of its own but computed (torch.nn.utils.prune, "
    "torch.nn.utils.parametrize, weight_norm): LoLDU factors a fixed weight. Make it a plain tensor "
    "first (prune.remove(module, 'weight'), parametrize.remove_parametrizations(module, 'weight')), or "
    "prune / parametrize the layers loldu.torch.merge_and_unload(model) returns")


def own_weight(module: nn.Module) -> torch.Tensor | None:
    """``module``'s weight tensor if it holds one (a parameter, or a buffer), not one it computes."""
    weight = module._parameters.get("weight")
    return module._buffers.get("weight") if weight is None else weight


def check_dtype(dtype: torch.dtype, what: str, advice: str) -> None:
    if dtype not in LIBRARY_DTYPES:
        raise DTypeError(
            f"{what} is {dtype}; libloldu computes in float32, float64, bfloat16 or float16. {advice}",
            _capi.LOLDU_ERR_DTYPE,
        )


def check_adapter_name(name, argument: str = "adapter_name") -> None:
    """``InvalidArgumentError`` naming ``argument`` unless ``name`` can name an adapter: a
    non-empty string without ``"."`` (torch's parameter names), other than ``"__base__"`` (a
    mixed batch's pretrained rows) and the attributes of the ``nn.ParameterDict`` holding the
    adapters' parameters ("keys", "copy", "to", "training"...: the dict stores its entries as
    attributes, so such a name fails or, for "training", silently replaces the attribute)."""
    if not isinstance(name, str) or not name or "." in name or name == BASE_NAME or hasattr(nn.ParameterDict(), name):
        raise InvalidArgumentError(
            f"{argument} must be a non-empty string without '.', other than {BASE_NAME!r} and the attributes of "
            f"nn.ParameterDict (such as 'keys', 'copy', 'to', 'training'), got {name!r}",
            _capi.LOLDU_ERR_INVALID_ARGUMENT)


def _crc(t: torch.Tensor) -> int:
    return zlib.crc32(library_input(t.detach()).view(torch.uint8).numpy().reshape(-1))


SAMPLED = 64  # elements of the base weight read on every call (see ``_stamp_of``)
_SAME_SIZE_INT = {2: torch.int16, 4: torch.int32, 8: torch.int64}  # bit patterns numpy can view, by element size


def _sampled(weight: torch.Tensor) -> tuple:
    """A view of ``weight``'s memory, positions of ``SAMPLED`` elements spread over it, and their
    current bit patterns: writes that do not count as versions of the tensor (through ``.data``,
    a numpy view, ctypes) show up there unless they miss every sampled element."""
    memory = weight.detach()
    if memory.is_neg():  # (a lazy negation: its memory holds the values before it)
        memory = torch._neg_view(memory)
    view = memory.view(_SAME_SIZE_INT[memory.element_size()]).numpy()
    positions = np.linspace(0, view.size - 1, min(SAMPLED, view.size)).astype(np.int64)
    if view.flags.c_contiguous:  # (one flat index: a third of the time of one per dimension)
        view = view.reshape(-1)
    else:
        positions = np.unravel_index(positions, view.shape)
    return view, positions, view[positions].tobytes()


def _stamp_of(weight: torch.Tensor, crc: int) -> tuple:
    """What ``_check_weight`` compares on every call: the version counter, address, dtype and a
    sample (``_sampled``) of the weight whose whole CRC is ``crc``."""
    return weight._version, weight.data_ptr(), weight.dtype, crc, _sampled(weight)


def _tensors(module: nn.Module) -> list:
    """Every parameter and buffer of ``module`` with what ``nn.Module._apply`` replaces of it (its
    data, its gradient's data, the object in its slot), for ``_put_back``."""
    return [(slots, key, t, t.data, t.grad, None if t.grad is None else t.grad.data)
            for m in module.modules() for slots in (m._parameters, m._buffers) for key, t in slots.items()
            if t is not None]


def _put_back(saved: list) -> None:
    """Undoes an ``nn.Module._apply`` over the tensors ``_tensors`` listed."""
    for slots, key, t, data, grad, grad_data in saved:
        slots[key] = t
        t.data = data
        if grad is not None:
            grad.data = grad_data
        t.grad = grad


class LoLDULayer(nn.Module):
    """Base of the LoLDU layers: the adapters over ``base_layer``'s weight, their parameters, the
    active adapters and the shared factors."""

    adapter_layer_names = ("loldu_z", "loldu_sigma")
    base_types: tuple[type, ...] = ()
    dimension_names = ("out_features", "in_features")  # of the m × n matrix the library factors

    def __init__(self, base_layer: nn.Module, config: AdapterConfig | None = None, *, name: str | None = None,
                 adapter_name: str = "default", **fields):
        super().__init__()
        check_adapter_name(adapter_name)
        if not isinstance(base_layer, self.base_types):
            raise InvalidArgumentError(
                f"{type(self).__name__} wraps {' or '.join(t.__name__ for t in self.base_types)}, "
                f"got {type(base_layer).__name__}",
                _capi.LOLDU_ERR_INVALID_ARGUMENT,
            )
        fields.setdefault("borrow_weight", True)
        self.loldu_name = name or type(base_layer).__name__
        if own_weight(base_layer) is None:
            raise InvalidArgumentError(f"{self.loldu_name}: {_COMPUTED_WEIGHT}", _capi.LOLDU_ERR_INVALID_ARGUMENT)
        self.base_layer = base_layer
        self.loldu_z = nn.ParameterDict()
        self.loldu_sigma = nn.ParameterDict()
        self.loldu_config: dict[str, AdapterConfig] = {}
        self.active_adapters: list[str] = []
        self._adapters: dict[str, Adapter] = {}
        self._factors: Adapter | None = None  # owns the shared factors (a rank-R adapter nobody trains)
        self._stamp = None
        self._borrowed = None  # (tensor, address) of a borrowed base weight, where the library reads it
        self._disabled = False
        self._disable_blocks, self._enabled_before_blocks = 0, True  # (open disable_adapters blocks)
        self._companions: dict = {}
        self._plans: dict[tuple[str, int], bool] = {}  # (adapter, rows) → the step keeps h (at most PLANS_KEPT)
        self._grouping: AdapterGroup | None = None  # (_group)
        self._changes = 0  # adapters added, re-created or removed (_group)
        self._bound_to: dict[str, tuple] = {}  # name -> weak references to the parameters bound (_bind)
        self.base_layer.weight.requires_grad_(False)
        self.update_layer(adapter_name, AdapterConfig.of(config, fields))
        self.set_adapter(adapter_name)

    # -- the weight as a matrix ----------------------------------------------------------------

    def _weight_matrix(self, weight: torch.Tensor) -> torch.Tensor:
        """The base weight as the ``m × n`` matrix the library factors (a view when possible)."""
        return weight

    def _base_weight(self) -> torch.Tensor:
        """The base layer's weight tensor (``StateError`` once pruning or a parametrization computes it)."""
        weight = own_weight(self._modules["base_layer"])
        if weight is None:
            raise StateError(f"{self.loldu_name}: {_COMPUTED_WEIGHT}", _capi.LOLDU_ERR_STATE)
        return weight

    @property
    def dtype(self) -> torch.dtype:
        """The element type the layer computes in (its base weight's)."""
        return self._base_weight().dtype

    @property
    def param_dtype(self) -> torch.dtype:
        """The dtype of z, σ and their gradients (float32, float64 for float64 layers)."""
        return torch.float64 if self.dtype == torch.float64 else torch.float32

    # -- adapters ------------------------------------------------------------------------------

    def _present_active(self) -> list[str]:
        """The active adapters this layer has: those it computes (PEFT's layers skip the others)."""
        return [name for name in self.active_adapters if name in self._adapters]

    @property
    def active_adapter(self) -> str:
        """The (first) active adapter the layer has."""
        names = self._present_active()
        if not names:
            raise StateError(f"{self.loldu_name}: none of the active adapters {self.active_adapters} is on this "
                             f"layer (it has {list(self._adapters)}; set_adapter)", _capi.LOLDU_ERR_STATE)
        return names[0]

    @property
    def adapter(self) -> Adapter:
        """The active adapter's numpy-level ``loldu.Adapter`` (paths, factors, info...)."""
        return self.get_adapter(self.active_adapter)

    def get_adapter(self, adapter_name: str) -> Adapter:
        """Adapter ``adapter_name``'s ``loldu.Adapter``, holding the values of the layer's
        ``loldu_z`` / ``loldu_sigma`` (bound to them again if they were replaced)."""
        if adapter_name not in self._adapters:
            raise InvalidArgumentError(f"{self.loldu_name} has no adapter {adapter_name!r}; it has "
                                       f"{list(self._adapters)}", _capi.LOLDU_ERR_INVALID_ARGUMENT)
        return self._bound(adapter_name)

    @property
    def rank(self) -> int:
        return self.adapter.rank

    @property
    def train_sigma(self) -> bool:
        return self.loldu_config[self.active_adapter].train_sigma

    def _resolved_rank(self, config: AdapterConfig, matrix: torch.Tensor) -> int:
        return min(matrix.shape) if config.rank == "full" else config.rank

    def update_layer(self, adapter_name: str, config: AdapterConfig, values=None) -> None:
        """Adds (or replaces) adapter ``adapter_name`` with ``config``, on the shared factors
        (factored again at a larger rank if needed); ``values`` = (z, σ) to restore."""
        check_adapter_name(adapter_name)
        config, adapter, factors = self._new_adapter(config)
        try:
            if values is not None:
                self._restore(adapter, values)
            else:
                self._warn_init_change(adapter)
        except BaseException:
            adapter.close()
            if factors is not None:
                factors.close()
            raise
        self._install(adapter_name, config, adapter, factors)

    def _warn_init_change(self, adapter: Adapter) -> None:
        """The warning of an initialisation that moves the pretrained layer far (see INIT_CHANGE_WARNING)."""
        if (advice := init_change_advice(adapter)) is not None:
            warnings.warn(f"{self.loldu_name}: {advice}", LoLDUWarning, stacklevel=4)

    def _new_adapter(self, config: AdapterConfig) -> tuple[AdapterConfig, Adapter, Adapter | None]:
        """An adapter for ``config`` (its rank resolved) that is not part of the layer yet: on the
        layer's factors, or on new ones (returned third, for ``_install``) where those are too
        small. The layer is unchanged."""
        weight = self._base_weight()
        if weight.device.type != "cpu":
            raise DeviceError(
                f"{self.loldu_name}: the base weight is on {weight.device}; libloldu computes on the CPU. "
                "Add LoLDU to the model while it is on the CPU.",
                _capi.LOLDU_ERR_INVALID_ARGUMENT,
            )
        check_dtype(weight.dtype, f"{self.loldu_name}: the base weight", "Convert the model first, e.g. model.float().")
        matrix = self._weight_matrix(weight.detach())
        if matrix.numel() == 0:
            empty = " and ".join(f"{d} = 0" for d, size in zip(self.dimension_names, matrix.shape) if size == 0)
            raise ShapeError(f"{self.loldu_name}: {empty} (a weight of shape {tuple(weight.shape)}): there is nothing to "
                             "adapt; leave this module out of target_modules", _capi.LOLDU_ERR_SHAPE)
        rank = self._resolved_rank(config, matrix)
        config = dataclasses.replace(config, rank=rank)
        factors = None
        try:
            if self._factors is None or rank > self._factors.rank:
                factors = self._new_factors(matrix, rank, config.borrow_weight)
            return config, (factors or self._factors)._derive(config), factors
        except _loldu.LoLDUError as error:
            if factors is not None:
                factors.close()
            raise self._named(error) from None

    def _named(self, error: _loldu.LoLDUError) -> _loldu.LoLDUError:
        """The library's ``error`` with this layer's name in front of its message."""
        return type(error)(f"{self.loldu_name}: {error.message}", error.status)

    def _install(self, adapter_name: str, config: AdapterConfig, adapter: Adapter, factors: Adapter | None = None) -> None:
        """Makes ``adapter`` (from ``_new_adapter``) the layer's adapter ``adapter_name``, moving
        the others onto ``factors`` when given."""
        if factors is not None:
            self._adopt(factors)
        adapter.enabled = not self._disabled
        old = self._adapters.get(adapter_name)
        self._adapters[adapter_name] = adapter
        self.loldu_config[adapter_name] = config
        self._bind(adapter_name)
        self._follow_active(adapter_name)  # (as PEFT's update_layer: trainable if active; σ if trained)
        if old is not None:
            old.close()
        self._forget(adapter_name)
        self._plans.clear()
        self._changes += 1

    @staticmethod
    def _restore(adapter: Adapter, values) -> None:
        z, sigma = values
        adapter.set_values(z.detach().cpu().to(parameter_dtype(adapter)).numpy(), float(sigma.detach().reshape(-1)[0]))

    @staticmethod
    def _new_factors(matrix: torch.Tensor, rank: int, borrow: bool) -> Adapter:
        """The factors of ``matrix`` (the base weight) at ``rank``: an adapter nobody trains."""
        if not matrix.is_contiguous() or matrix.is_neg():
            matrix, borrow = library_input(matrix), False
        config = AdapterConfig(rank=rank, borrow_weight=borrow)
        return Adapter.from_pointers(LIBRARY_DTYPES[matrix.dtype], matrix.shape[0], matrix.shape[1],
                                     matrix.data_ptr(), None, config, keep=matrix)

    def _factor(self, matrix: torch.Tensor, rank: int, borrow: bool) -> None:
        """Factors the base weight at ``rank`` and moves every adapter onto the new factors."""
        self._adopt(self._new_factors(matrix, rank, borrow))

    def _adopt(self, factors: Adapter) -> None:
        """Makes ``factors`` (of the current base weight, in any element type) the layer's and
        moves every adapter onto them, keeping its z, σ, enabled and merged state (and parameter
        objects). All or nothing: if an adapter cannot move (z beyond a narrower type's range, a
        merged weight that would not be finite in it), ``factors`` is closed and the layer is
        unchanged."""
        moved = {}
        try:
            for name, adapter in self._adapters.items():
                moved[name] = new = factors._derive(self.loldu_config[name])
                new.set_z(adapter.z)
                new.sigma = adapter.sigma
                new.enabled = adapter.enabled
                new.path = adapter.path
                if adapter._state[1]:  # (merged)
                    new.merge()
        except BaseException:
            for new in moved.values():
                new.close()
            factors.close()
            raise
        old, self._factors = self._factors, factors
        borrowed = factors._handle.keep  # (the base weight the library reads in place, if borrowed)
        self._borrowed = None if borrowed is None else (borrowed, borrowed.data_ptr())
        previous, self._adapters = self._adapters, moved
        self._changes += 1
        for name in moved:
            self._bind(name)
        weight = self._base_weight()
        self._stamp = _stamp_of(weight, _crc(self._weight_matrix(weight.detach())))
        self._companions.clear()
        for adapter in previous.values():
            adapter.close()
        if old is not None:
            old.close()

    def _bind(self, name: str) -> None:
        """(Re)binds ``loldu_z[name]`` / ``loldu_sigma[name]`` to the adapter's memory; existing
        parameter objects are kept, so an optimiser holding them keeps working."""
        adapter = self._adapters[name]
        with torch.inference_mode(False):  # (made under inference mode, they would be inference tensors: untrainable)
            params = torch.from_numpy(adapter._view(adapter._params_ptr, adapter.rank + 1))  # writable live view: z, σ
            z, sigma = params[: adapter.rank], params[adapter.rank:]
            train_sigma = self.loldu_config[name].train_sigma
            if name in self.loldu_z:
                with torch.no_grad():
                    self.loldu_z[name].data = z
                    self.loldu_sigma[name].data = sigma
                self.loldu_z[name].grad = None
                self.loldu_sigma[name].grad = None
            else:
                self.loldu_z[name] = nn.Parameter(z, requires_grad=True)
                self.loldu_sigma[name] = nn.Parameter(sigma, requires_grad=train_sigma)
        self._bound_to[name] = (weakref.ref(self.loldu_z[name]), weakref.ref(self.loldu_sigma[name]))

    def delete_adapter(self, adapter_name: str) -> None:
        """Removes an adapter; if it was active, the first remaining adapter becomes active."""
        adapter = self._deletable(adapter_name)
        del self._adapters[adapter_name], self.loldu_config[adapter_name]
        self._changes += 1
        del self.loldu_z[adapter_name], self.loldu_sigma[adapter_name], self._bound_to[adapter_name]
        self._forget(adapter_name)
        adapter.close()
        if adapter_name in self.active_adapters:  # as PEFT: another becomes active and trainable
            remaining = [a for a in self.active_adapters if a != adapter_name]
            if not remaining and self._adapters:
                remaining = [next(iter(self._adapters))]
            self.set_adapter(remaining)  # (none left: the layer computes its base module)

    def _deletable(self, adapter_name: str) -> Adapter:
        """Adapter ``adapter_name``, which may be deleted: ``StateError`` while it is merged (as PEFT)."""
        adapter = self.get_adapter(adapter_name)
        if self._is_merged(adapter_name):
            raise StateError(f"{self.loldu_name}: adapter {adapter_name!r} is merged; unmerge it before deleting it",
                             _capi.LOLDU_ERR_STATE)
        return adapter

    def _forget(self, name: str) -> None:
        """Drops the autocast conversions of adapter ``name``."""
        for key in [k for k in self._companions if k[0] == name]:
            self._companions.pop(key).close()

    def set_adapter(self, adapter_names) -> None:
        """Makes ``adapter_names`` (a name or a list) the active adapters; their parameters
        require grad, the others' do not (as PEFT's ``set_adapter``). Names the layer does not have
        are kept, as PEFT keeps them: they compute nothing here (``loldu.torch.set_adapter``
        checks that each is on some layer of the model)."""
        self.active_adapters = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        for name in self._adapters:
            self._follow_active(name)

    def _follow_active(self, name: str) -> None:
        """Adapter ``name``'s parameters require grad if it is active (σ if it is trained too)."""
        active = name in self.active_adapters
        self.loldu_z[name].requires_grad_(active)
        self.loldu_sigma[name].requires_grad_(active and self.loldu_config[name].train_sigma)

    def refactor(self) -> None:
        """Factors the base weight again (after its values changed or its type did), keeping every
        z and σ (the parameters' values, also of parameters replaced since the last call); all or
        nothing (see ``_adopt``). A layer without adapters has nothing to factor."""
        for name in self._adapters:
            self._bound(name)
        self._refactor()

    def _refactor(self) -> None:
        """``refactor`` with the adapters' values of z and σ, whatever the parameters hold."""
        if self._factors is not None:
            matrix = self._weight_matrix(self._base_weight().detach())
            self._factor(matrix, self._factors.rank, self._factors.config.borrow_weight)

    # -- checks before use ----------------------------------------------------------------------

    def _prepare(self, name: str, *, call: bool = False) -> Adapter:
        """Cheap checks before each use: threads, base weight unchanged, parameters bound (``_bound``)."""
        self._check_weight(call)
        return self._bound(name, call=call)

    def _check_weight(self, call: bool = False) -> None:
        """The process configured (threads, malloc), the base weight unchanged since it was factored
        and, for a ``call`` that records gradients, still frozen."""
        if not _process_configured:
            configure_process()
        # (Module attributes read through _modules / _parameters: nn.Module.__getattr__ is slow,
        # and this runs on every call.)
        weight = self._base_weight()
        if call:
            if torch._C._are_functorch_transforms_active():
                raise RuntimeError(
                    f"{self.loldu_name}: LoLDU layers do not run under torch.func transforms (vmap, grad, jacrev, "
                    "jvp...): the library computes outside what they can see. Use torch.autograd (backward, "
                    "autograd.grad, create_graph=True for second derivatives), or plain layers: "
                    "loldu.torch.merge_and_unload(model)")
            if weight.requires_grad and torch.is_grad_enabled():
                raise StateError(
                    f"{self.loldu_name}: base_layer.weight requires grad, but a LoLDU layer computes with factors of "
                    "the frozen weight, so it would get no gradient. Freeze it again (requires_grad_(False)), or "
                    "train plain layers: loldu.torch.merge_and_unload(model)", _capi.LOLDU_ERR_STATE)
        version, ptr, dtype, crc, (view, positions, sample) = self._stamp
        if weight._version != version or weight.data_ptr() != ptr or view[positions].tobytes() != sample:
            if weight.device.type != "cpu" or weight.dtype != dtype or _crc(self._weight_matrix(weight.detach())) != crc:
                renorm = getattr(self._modules["base_layer"], "max_norm", None) is not None
                raise StateError(
                    f"{self.loldu_name}: the base weight changed after it was factored (in-place update, "
                    "load_state_dict, a new tensor, or a write through .data or a numpy view"
                    + ("; nn.Embedding(max_norm=...) renormalises the rows it looks up in place whenever the "
                       "base layer runs alone, with adapters disabled or none active" if renorm else "")
                    + "). Call .refactor() on this layer to factor the new weight (z and σ are kept), or "
                    "restore the original weight.",
                    _capi.LOLDU_ERR_STATE,
                )
            self._stamp = _stamp_of(weight, crc)
            borrowed = self._borrowed
            if borrowed is not None and borrowed[0].data_ptr() != borrowed[1]:
                self.refactor()  # its memory moved (share_memory_()): the library would read freed memory

    def _check_values(self, name: str, z: torch.Tensor | None, sigma: torch.Tensor | None, what: str) -> None:
        """``NotFiniteError`` naming ``what`` unless adapter ``name`` can take these values of z and
        σ (None: its own): the library's own rule (each finite in the parameter type, and every
        σ·z_k − σ₀·z_ref,k), tried on a throwaway clone."""
        adapter = self._adapters[name]
        with adapter.clone() as trial:
            try:
                trial.set_values(trial.z if z is None else z.detach().to("cpu", torch.float64).reshape(-1).numpy(),
                                 adapter.sigma if sigma is None else float(sigma.detach().reshape(-1)[0]))
            except NotFiniteError as error:
                raise NotFiniteError(f"{self.loldu_name}: {what}: z and σ must be finite in {self.param_dtype} and "
                                     f"so must σ·z − σ₀·z_ref ({error.message})", error.status) from None

    def _bound(self, name: str, *, call: bool = False) -> Adapter:
        """Adapter ``name``, its ``loldu_z`` / ``loldu_sigma`` still its memory. Replaced by other
        tensors, their values win: for one ``call`` while the parameters bound before live on
        elsewhere (``torch.func.functional_call`` swaps tensors in for a call, then puts the
        parameters back), through a stand-in with those values, binding nothing; otherwise
        (``load_state_dict(assign=True)``, ``.data =``, or not for a call) bound again."""
        adapter = self._adapters[name]
        try:
            z = self._modules["loldu_z"]._parameters[name]
            sigma = self._modules["loldu_sigma"]._parameters[name]
        except KeyError:
            raise self._computed_parameters(name) from None
        if z.data_ptr() != adapter._params_ptr or sigma.data_ptr() != adapter._params_ptr + adapter.rank * adapter.param_dtype.itemsize:
            if adapter.merged:
                raise StateError(f"{self.loldu_name}: loldu_z / loldu_sigma were replaced while merged; unmerge first",
                                 _capi.LOLDU_ERR_STATE)
            replaced = self._replaced_alive(name, (z, sigma))
            if call and replaced:  # a stand-in computing with their values (freed with the call's graph)
                stand_in = clone_in_state(adapter, adapter._state)
                self._restore(stand_in, (z, sigma))
                return stand_in
            with torch.no_grad():  # (replaced parameters still alive keep their values, in memory of their own)
                for old in replaced:
                    old.data = old.data.clone()
            self._restore(adapter, (z, sigma))
            self._bind(name)
        return adapter

    def _computed_parameters(self, name: str) -> StateError:
        return StateError(
            f"{self.loldu_name}: loldu_z[{name!r}] / loldu_sigma[{name!r}] are not parameters of their own but "
            "computed (torch.nn.utils.parametrize): they are the library's memory, which the layer computes "
            "with. Remove the parametrization (parametrize.remove_parametrizations)", _capi.LOLDU_ERR_STATE)

    def _replaced_alive(self, name: str, current) -> list[torch.Tensor]:
        """The parameters ``_bind`` bound for ``name`` that are no longer in the module but still alive."""
        return [old for old, now in zip((ref() for ref in self._bound_to.get(name, ())), current)
                if old is not None and old is not now]

    def _check_input(self, x) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise InvalidArgumentError(f"{self.loldu_name}: expected a torch.Tensor, got {type(x).__name__}",
                                       _capi.LOLDU_ERR_INVALID_ARGUMENT)
        if x.device.type != "cpu":
            raise DeviceError(
                f"{self.loldu_name}: the input is on {x.device}, but LoLDU layers compute on the CPU (libloldu). "
                "Keep the model and its inputs on the CPU (x.cpu()), or call "
                "loldu.torch.merge_and_unload(model) to get plain layers with the merged weights and move "
                "those to the device.",
                _capi.LOLDU_ERR_INVALID_ARGUMENT,
            )
        return x

    def _compute_dtype(self) -> torch.dtype:
        """The dtype this call computes in: the layer's, or autocast's half type for a float32
        layer under CPU autocast (as nn.Linear)."""
        dtype = self.dtype
        if dtype == torch.float32 and torch.is_autocast_enabled("cpu"):
            cast = torch.get_autocast_dtype("cpu")
            if cast in (torch.bfloat16, torch.float16):
                return cast
        return dtype

    def _check_float_input(self, x, dtype: torch.dtype) -> torch.Tensor:
        x = self._check_input(x)
        if x.dtype != dtype:
            half = (torch.float16, torch.bfloat16)
            if dtype != self.dtype or torch.is_autocast_enabled("cpu") and (
                    x.dtype in half or x.dtype == torch.float32 and dtype in half):
                return x.to(dtype)  # autocast: the layer's compute dtype decides (as nn.Linear casts a float32 input)
            advice = f"Convert the input with x.to({dtype}), or the model with model.to({x.dtype})."
            if x.dtype not in LIBRARY_DTYPES:
                advice = f"Convert the input with x.to({dtype})."
            raise DTypeError(f"{self.loldu_name}: the input is {x.dtype}, the layer computes in {dtype}. {advice}",
                             _capi.LOLDU_ERR_DTYPE)
        return x

    def _computing_adapter(self, name: str, dtype: torch.dtype, weight_checked: bool = False) -> Adapter:
        """The adapter that computes ``name`` in ``dtype``: itself, or under autocast its
        conversion to the half type (same factorisation; z and σ copied in before each use)."""
        adapter = self._bound(name, call=True) if weight_checked else self._prepare(name, call=True)
        if dtype == self.dtype:
            return adapter
        companion = self._companions.get((name, dtype))
        if companion is None:
            companion = self._companions[(name, dtype)] = self._converted_factors(dtype)._derive(self.loldu_config[name])
            companion.path = adapter.path
        if not np.array_equal(companion.params, adapter.params):
            companion.params[:] = adapter.params
        companion.enabled = adapter.enabled
        return companion

    def _converted_factors(self, dtype: torch.dtype) -> Adapter:
        """The layer's factors converted to ``dtype`` once, so that the conversions of one
        layer's adapters share factors as the adapters do (a mixed batch under autocast groups
        them)."""
        factors = self._companions.get((None, dtype))
        if factors is None:
            factors = self._companions[(None, dtype)] = self._factors.convert(NUMPY_DTYPES[LIBRARY_DTYPES[dtype]])
        return factors

    def _parameters_of(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Adapter ``name``'s z and σ as a call uses them: detached unless they take part
        (``_computes``), so that autograd gives them no gradient."""
        z = self._modules["loldu_z"]._parameters[name]
        sigma = self._modules["loldu_sigma"]._parameters[name]
        return (z, sigma) if self._computes(name) else (z.detach(), sigma.detach())

    def _computes(self, name: str) -> bool:
        """Whether adapter ``name``'s z and σ take part in this call: not while it is merged or
        the layer disabled (as PEFT, they then get no gradient, and torch.optim leaves them alone)."""
        return not self._disabled and not self._is_merged(name)

    def _is_merged(self, name: str) -> bool:
        """Whether adapter ``name`` is merged: its own record of its state (the layer merges and
        unmerges through it), without a library call."""
        return self._adapters[name]._state[1]

    def _merged_names(self) -> list[str]:
        return [name for name in self._adapters if self._is_merged(name)]

    @staticmethod
    def _training(*tensors) -> bool:
        return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)

    def _computing_names(self) -> list[str]:
        """The adapters a call without a mixed batch computes with: the active adapters the layer
        has (several: the sum of their updates, as PEFT adds them; disabled: one of them, as each
        computes the base weight then); none: the base layer."""
        names = self._present_active()
        return names[:1] if self._disabled else names

    def _merge_name(self) -> str | None:
        """The adapter ``merge()`` merges: the one active adapter the layer has (``None``: none,
        nothing to merge). ``StateError`` for several: PEFT merges every active adapter into the
        base weight, but each LoLDU adapter merges into a weight of its own."""
        names = self._present_active()
        if len(names) > 1:
            raise self._several_active(names, "a LoLDU layer merges one adapter (PEFT would merge them all into "
                                              "the base weight): merge one (set_adapter), combine them "
                                              "(add_weighted_adapter) and merge that, or merge their sum into "
                                              "plain layers (merge_and_unload)")
        return names[0] if names else None

    def _several_active(self, names: list[str], advice: str) -> StateError:
        return StateError(f"{self.loldu_name}: {len(names)} active adapters {names}; {advice}", _capi.LOLDU_ERR_STATE)

    def _effective_weight(self, names: list[str], dtype: torch.dtype) -> torch.Tensor:
        """``W_eff`` (``m × n``) of adapter ``names[0]``, or of the sum of ``names``' updates."""
        if len(names) > 1:
            adapter, z, sigma = self._summed(names, dtype)
        else:
            adapter, (z, sigma) = self._computing_adapter(names[0], dtype), self._parameters_of(names[0])
        if self._training(z, sigma):
            return WeightFunction.apply(z, sigma, adapter, dtype)
        refuse_tracing()
        w = torch.empty((adapter.m, adapter.n), dtype=dtype)
        check(_capi.loldu_effective_weight(adapter.handle, w.data_ptr()))
        return w

    def effective_weight(self, adapter_name: str | None = None) -> torch.Tensor:
        """The weight adapter ``adapter_name`` computes with, in the base weight's shape (a copy);
        by default the active adapters' (several: the base weight plus the sum of their updates)."""
        with torch.no_grad():
            names = [adapter_name] if adapter_name else self._computing_names() or [self.active_adapter]
            return self._effective_weight(names, self.dtype).reshape(self._base_weight().shape)

    def _summed(self, names: list[str], dtype: torch.dtype) -> tuple[Adapter, torch.Tensor, torch.Tensor]:
        """Several active adapters as one, as PEFT adds their updates: an adapter on the layer's
        factors (converted to ``dtype`` under autocast) whose coefficients are the sum of theirs,
        ``c = Σ (σ z − σ₀ z_ref)`` (each zero past its adapter's rank), kept for these names
        (``_companions``) with its z set to ``c`` when that changed; with ``c`` as torch
        operations on their z and σ, so that each gets the gradient of its own update, and σ = 1.
        (A backward whose forward had another ``c`` computes with a stand-in: ``SummedLinearFunction``.)"""
        self._check_weight(call=True)
        rank = max(self._bound(name, call=True).rank for name in names)  # (the checks; the values are the parameters')
        c = torch.zeros(rank, dtype=self.param_dtype)
        for name in names:
            z, sigma = self._parameters_of(name)
            c[: z.numel()] += sigma * z - torch.from_numpy(self._adapters[name]._reference())
        key = (tuple(names), dtype)
        adapter = self._companions.get(key)
        if adapter is None or adapter.rank != rank:
            factors = self._factors if dtype == self.dtype else self._converted_factors(dtype)
            # (residual "init" with zeros: z_ref = 0, so the coefficients are z itself; σ = 1)
            adapter = self._companions[key] = factors._derive(AdapterConfig(rank=rank, z_init="zeros", residual="init"))
            adapter.path = self._adapters[names[0]].path
        values = c.detach().numpy()
        if not np.array_equal(adapter.params[:rank], values):
            try:
                adapter.set_z(values)
            except _loldu.LoLDUError as error:
                raise self._named(error) from None
        return adapter, c, torch.ones(1, dtype=c.dtype)

    # -- merge, enable ------------------------------------------------------------------------

    @property
    def merged(self) -> bool:
        """Whether the adapter the layer computes with is merged (False without one)."""
        names = self._present_active()
        return bool(names) and self._adapters[names[0]].merged

    def merge(self) -> None:
        """Computes with a merged weight until ``unmerge()`` (z and σ must not change meanwhile:
        as in PEFT, they get no gradient, so an optimiser leaves them alone). A layer that has none
        of the active adapters has nothing to merge; one with several refuses (``_merge_name``)."""
        name = self._merge_name()
        if name is not None:
            self._merge(name)

    def _merge(self, name: str) -> None:
        adapter = self._prepare(name)
        try:
            adapter.merge()
        except _loldu.LoLDUError as error:
            raise self._named(error) from None

    def unmerge(self) -> None:
        for adapter in self._adapters.values():
            adapter.unmerge()

    @property
    def _mixed(self) -> list[str] | None:
        """This thread's ``mixed_batch`` names for this layer, or None."""
        blocks = MIXED_BATCH.get()
        return None if blocks is None else blocks.get(self)

    @property
    def enabled(self) -> bool:
        return not self._disabled

    def enable_adapters(self, enabled: bool = True) -> None:
        """Disabled, the layer computes the original module exactly; z gets no gradient."""
        self._disabled = not enabled
        for adapter in self._adapters.values():
            adapter.enabled = enabled

    def _load_from_state_dict(self, state_dict, prefix, *args):
        """Before ``loldu_z`` / ``loldu_sigma`` (children, loaded after this) copy the state dict's
        values into the adapters' memory, ``_check_state_dict``."""
        self._check_state_dict(state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args)

    def _check_state_dict(self, state_dict, prefix: str) -> None:
        """``StateError`` if loading ``state_dict`` (this layer's keys under ``prefix``) would change
        a merged adapter, whose merged weight would then be stale (as ``set_loldu_state_dict``
        refuses), and ``NotFiniteError`` for values the adapter cannot take (``_check_values``).
        The same values load as they are."""
        for name in self.loldu_config:
            values = [state_dict.get(f"{prefix}{holder}.{name}") for holder in self.adapter_layer_names]
            values = [v if isinstance(v, torch.Tensor) and v.numel() == n else None  # (others: torch's own errors)
                      for v, n in zip(values, (self._adapters[name].rank, 1))]
            if values != [None, None]:
                self._check_values(name, *values, f"the state dict's values of adapter {name!r}")
        for name in self._merged_names():
            for holder in self.adapter_layer_names:
                value, current = state_dict.get(f"{prefix}{holder}.{name}"), getattr(self, holder)[name].detach()
                if value is not None and not torch.equal(value.detach().to("cpu", current.dtype), current):
                    raise StateError(
                        f"{self.loldu_name}: adapter {name!r} is merged, and the state dict holds other values of its "
                        f"{holder}; unmerge (loldu.torch.unmerge_loldu(model)), load, then merge again",
                        _capi.LOLDU_ERR_STATE)

    # -- mixed batches ------------------------------------------------------------------------

    def _check_names(self, names, x: torch.Tensor, batched: bool = True) -> None:
        """``names`` has one entry per sample of ``x`` (its first dimension; ``batched``: whether
        ``x`` is a batch at all, not one unbatched sample)."""
        if isinstance(names, str) or not all(issubclass(kind, str) for kind in set(map(type, names))):
            raise InvalidArgumentError(f"{self.loldu_name}: adapter_names must be a list of adapter names (str), one "
                                       f"per sample, got {type(names).__name__} {str(names)[:80]}",
                                       _capi.LOLDU_ERR_INVALID_ARGUMENT)
        if not batched:
            raise ShapeError(f"{self.loldu_name}: adapter_names needs a batch, samples along the first dimension; "
                             f"the input has shape {tuple(x.shape)}", _capi.LOLDU_ERR_SHAPE)
        if len(names) != x.shape[0]:
            raise ShapeError(f"{self.loldu_name}: adapter_names has {len(names)} entries for a batch of "
                             f"{x.shape[0]} samples", _capi.LOLDU_ERR_SHAPE)

    def _mixed_rows(self, names, x: torch.Tensor, batched: bool = True) -> tuple[list[str], np.ndarray]:
        """The distinct adapters of a mixed batch that the layer has and, per sample, its index
        among them: -1 for ``"__base__"`` and for an adapter the layer lacks (its rows get the base
        layer's output, as in PEFT's ``_mixed_batch_forward``)."""
        self._check_names(names, x, batched)
        position: dict[str, int] = {}
        used: list[str] = []
        for name in names:
            if name not in position:
                here = name != BASE_NAME and name in self._adapters
                position[name] = len(used) if here else -1
                used += [name] if here else []
        return used, np.fromiter((position[name] for name in names), np.int32, len(names))

    # -- dtype / device conversions -------------------------------------------------------------

    def _apply(self, fn, recurse=True):
        probe = fn(torch.zeros(1, dtype=self.dtype))
        if probe.device.type != "cpu":
            raise DeviceError(
                f"{self.loldu_name}: cannot move a LoLDU layer to {probe.device}: libloldu computes on the CPU. "
                "Call loldu.torch.merge_and_unload(model) first to get plain layers with the merged weights.",
                _capi.LOLDU_ERR_INVALID_ARGUMENT,
            )
        check_dtype(probe.dtype, f"{self.loldu_name}: the requested dtype",
                    "Call loldu.torch.merge_and_unload(model) first to get plain layers.")
        dtype = self.dtype
        for name in self._adapters:
            self._bound(name)  # (parameters replaced since the last call: their values are the ones to keep)
        saved, shared = _tensors(self), self._base_weight().is_shared()
        result = super()._apply(fn, recurse)  # (z and σ keep their values and type whatever fn does to them)
        if self._factors is None:
            return result
        if not shared and self._base_weight().is_shared():
            warnings.warn("share_memory(): the base weights are shared now, but loldu_z / loldu_sigma live in "
                          "libloldu's memory of this process, so other processes' updates to them are not seen "
                          "here: train LoLDU parameters in one process, or with DistributedDataParallel",
                          LoLDUWarning, stacklevel=3)
        try:
            if LIBRARY_DTYPES[self._base_weight().dtype] != self._factors._dtype_code:
                self._refactor()  # model.to(dtype): factored again in the new type (all or nothing)
            else:
                self._check_weight()  # (share_memory_() moves a borrowed weight: factored where it is now)
                for name in self._adapters:
                    self._bound(name)  # (fn replaced the parameters: their values, bound again)
        except BaseException as error:  # the layer as it was, working: its tensors back in its old type
            _put_back(saved)
            if not isinstance(error, _loldu.LoLDUError):
                raise
            raise type(error)(
                f"{self.loldu_name}: cannot convert the layer to {probe.dtype} ({error.message}); it is left as it "
                f"was, in {dtype}. Modules converted before it keep {probe.dtype}: model.to({dtype}) converts them "
                "back.", error.status) from None
        return result

    def _rebuild(self) -> None:
        """Re-creates the factors and every adapter from the base weight and the parameters'
        values after unpickling (which restores neither), keeping the parameter objects."""
        values = {name: (self.loldu_z[name].detach().clone(), self.loldu_sigma[name].detach().clone())
                  for name in self.loldu_config}
        trains = {name: (self.loldu_z[name].requires_grad, self.loldu_sigma[name].requires_grad) for name in values}
        matrix = self._weight_matrix(self._base_weight().detach())
        rank = max(self._resolved_rank(c, matrix) for c in self.loldu_config.values())
        self._factor(matrix, rank, next(iter(self.loldu_config.values())).borrow_weight)
        for name, config in list(self.loldu_config.items()):
            self.update_layer(name, config, values=values[name])
        for name, (z, sigma) in trains.items():  # (as they were pickled, not as update_layer sets them)
            self.loldu_z[name].requires_grad_(z)
            self.loldu_sigma[name].requires_grad_(sigma)

    def __prepare_scriptable__(self):
        """``torch.jit.script`` calls this first: refused as tracing is (``refuse_tracing``)."""
        raise RuntimeError(JIT_REFUSAL)

    # -- copy and pickle --------------------------------------------------------------------------

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_adapters"], state["_factors"], state["_stamp"], state["_companions"] = {}, None, None, {}
        state["_grouping"], state["_bound_to"], state["_borrowed"] = None, {}, None
        state["_merged_names"] = self._merged_names()
        state["_disable_blocks"] = 0  # (a copy is in no block: it keeps the state it has)
        return state

    def __setstate__(self, state):
        state.pop("_mixed", None)  # (kept in the layer by earlier versions; now in MIXED_BATCH)
        state.setdefault("_disable_blocks", 0)
        state.setdefault("_enabled_before_blocks", True)
        state.setdefault("_grouping", None)
        state.setdefault("_changes", 0)
        state.setdefault("_bound_to", {})
        state.setdefault("_borrowed", None)
        merged = state.pop("_merged_names", [])
        super().__setstate__(state)
        if not self._adapters and self.loldu_config:
            self._rebuild()
            for name in merged:
                self._merge(name)

    def extra_repr(self) -> str:
        parts = []
        for name, c in self.loldu_config.items():
            a = self._adapters.get(name)
            rank = a.rank if a else c.rank
            parts.append(f"{name}: rank={rank}, alpha={c.alpha or rank}, z_init={c.z_init!r}, residual={c.residual!r}, "
                         f"train_sigma={c.train_sigma}")
        return "; ".join(parts) + f"; active={self.active_adapters}"

    def close(self) -> None:
        """Frees the library adapters now (the layer is unusable afterwards)."""
        self._changes += 1
        for adapter in list(self._adapters.values()) + list(self._companions.values()):
            adapter.close()
        if self._factors is not None:
            self._factors.close()


class LoLDULinear(LoLDULayer):
    """``nn.Linear`` with LoLDU adapters; ``y = x W_effᵀ`` runs in the library, ``+ b`` in torch.
    Accepts inputs of shape ``(..., in_features)``; ``adapter_names`` (one per sample, the first
    dimension) runs a mixed batch."""

    base_types = (nn.Linear,)

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    @eager_under_compile
    def forward(self, x: torch.Tensor, *, adapter_names=None) -> torch.Tensor:
        base = self._modules["base_layer"]
        if (adapter_names is None and MIXED_BATCH.get() is None and not self._disabled and type(x) is torch.Tensor
                and x.layout == torch.strided and not x.is_nested and x.dim() == 2 and x.dtype == getattr(base._parameters.get("weight"), "dtype", None)
                and x.device.type == "cpu"
                and len(self.active_adapters) == 1 and self.active_adapters[0] in self._adapters
                and not torch.is_autocast_enabled("cpu") and x.shape[1] == base.in_features):
            # The common call, every check below passed: attributes read once, as cheaply as can be.
            name = self.active_adapters[0]
            return self._forward_one(library_input(x), name, self._prepare(name, call=True), base._parameters["bias"])
        dtype = self._compute_dtype()
        x = self._check_float_input(x, dtype)
        if x.layout != torch.strided or type(x) is not torch.Tensor or x.is_nested:
            x = self._readable_input(x)
        n = base.in_features
        if x.dim() == 0 or x.shape[-1] != n:
            raise ShapeError(
                f"{self.loldu_name}: the input has shape {tuple(x.shape)}; its last dimension must be "
                f"in_features = {n}",
                _capi.LOLDU_ERR_SHAPE,
            )
        names = adapter_names if adapter_names is not None else self._mixed
        mixed = names is not None and not self._disabled
        computing = None if mixed else self._computing_names()
        if not mixed and (self._disabled or not computing):
            return base(x)  # no active adapter here, or disabled: the pretrained module, exactly, as PEFT computes it
        flat = x.dim() == 2
        x2 = library_input(x if flat else x.reshape(-1, n))
        bias = base.bias
        if bias is not None and bias.dtype != dtype:
            bias = bias.to(dtype)
        if mixed:
            y = self._mixed_forward(names, x, x2, bias, dtype)
        elif len(computing) > 1:
            y = self._forward_summed(x2, computing, bias, dtype)
        else:
            name = computing[0]
            y = self._forward_one(x2, name, self._computing_adapter(name, dtype), bias)
        return y if flat else y.reshape(*x.shape[:-1], y.shape[-1])

    def _readable_input(self, x: torch.Tensor) -> torch.Tensor:
        """A sparse input made dense (``nn.Linear`` takes them); a nested tensor, or a tensor
        subclass without memory of its own the library could read (``MaskedTensor``, ...), refused
        by name."""
        if x.is_nested:
            raise InvalidArgumentError(
                f"{self.loldu_name}: the input is a nested tensor, which the library cannot read; pass a dense "
                "tensor (x.to_padded_tensor(0.0), or the samples one by one)", _capi.LOLDU_ERR_INVALID_ARGUMENT)
        if x.layout in (torch.sparse_coo, torch.sparse_csr, torch.sparse_csc, torch.sparse_bsr, torch.sparse_bsc):
            return x.to_dense()
        try:
            readable = x.layout == torch.strided and (x.numel() == 0 or x.data_ptr() != 0)
        except RuntimeError:
            readable = False
        if not readable:
            raise InvalidArgumentError(
                f"{self.loldu_name}: the input is a {type(x).__name__} ({x.layout}) with no memory of its own that "
                "the library could read; pass a plain dense tensor (e.g. masked inputs with their values filled in)",
                _capi.LOLDU_ERR_INVALID_ARGUMENT)
        return x

    def _forward_one(self, x: torch.Tensor, name: str, adapter: Adapter, bias) -> torch.Tensor:
        """``x W_effᵀ + bias`` with adapter ``name`` (computing as ``adapter``), for a 2-D input."""
        z, sigma = self._parameters_of(name)
        if self._training(x, z, sigma, bias):
            keep_h = self._plans.get((name, x.shape[0]))
            if keep_h is None:
                if len(self._plans) >= PLANS_KEPT:  # (batches of ever new sizes: a bounded cache)
                    self._plans.clear()
                keep_h = self._plans[(name, x.shape[0])] = adapter.plan(x.shape[0], keeps_h=True) == "factored"
            return LinearFunction.apply(x, z, sigma, bias, adapter, keep_h)
        return linear(adapter, x, bias)

    def _forward_summed(self, x: torch.Tensor, names: list[str], bias, dtype: torch.dtype) -> torch.Tensor:
        """``x W_effᵀ + bias`` with the sum of several active adapters' updates (``_summed``)."""
        adapter, c, sigma = self._summed(names, dtype)
        if self._training(x, c, bias):
            return SummedLinearFunction.apply(x, c, sigma, bias, adapter, adapter.plan(x.shape[0], keeps_h=True) == "factored")
        return linear(adapter, x, bias)

    def _mixed_forward(self, names, x, x2, bias, dtype) -> torch.Tensor:
        self._check_names(names, x, batched=x.dim() >= 2)
        if not self._adapters:
            return F.linear(x2, self._base_weight().to(dtype), bias)
        self._check_weight(call=True)
        z, sigma = self._modules["loldu_z"]._parameters, self._modules["loldu_sigma"]._parameters
        if dtype == self.dtype:
            group = self._group()
        else:  # autocast: the used adapters' conversions, as a group of their own
            present = self._mixed_rows(names, x)[0]
            adapters = [self._computing_adapter(name, dtype, weight_checked=True) for name in present]
            group = AdapterGroup(self._converted_factors(dtype), present, adapters)
        owners = group.names
        used = [i for i in map(group.position.get, dict.fromkeys(names)) if i is not None]  # each once
        if group is self._grouping:  # (conversions copy z and σ from the bound adapters)
            try:
                for i in used:  # ``_bound``, inline with the group's addresses: this runs per used adapter per batch
                    if (z[owners[i]].data_ptr(), sigma[owners[i]].data_ptr()) != group.memory[i]:
                        if self._bound(owners[i], call=True) is not group.adapters[i]:  # swapped in for this call
                            group = AdapterGroup(self._factors, owners[1:], [self._bound(n, call=True) for n in owners[1:]])
                            break
            except KeyError as missing:
                raise self._computed_parameters(missing.args[0]) from None
        rows = group.rows(names, x2.shape[0] // len(names) if len(names) else 1)
        if torch.is_grad_enabled():
            # (A mixed batch is never on a disabled layer: merged adapters are those that do not compute.)
            parameters = [p.detach() if self._is_merged(owners[i]) else p for i in used for p in (z[owners[i]], sigma[owners[i]])]
            if self._training(x2, bias, *parameters):
                return GroupedLinearFunction.apply(x2, rows, bias, group, used, *parameters)
        return grouped_linear(group, x2, rows, bias)

    def _group(self) -> AdapterGroup:
        """The layer's adapters as one group, kept until an adapter is added, re-created or
        removed. (Read the count, then the adapters: a group built while another thread changes
        them serves that call at most, and one that met an adapter closed meanwhile is built again.)"""
        group = self._grouping
        if group is not None and group.changes == self._changes:
            return group
        while True:
            changes, items = self._changes, list(self._adapters.items())
            try:
                group = AdapterGroup(self._factors, [name for name, _ in items], [adapter for _, adapter in items])
            except _loldu.InvalidHandleError:
                if self._changes == changes:
                    raise
                continue
            group.changes, self._grouping = changes, group
            return group


class _WeightSpaceLayer(LoLDULayer):
    """Layers that use ``W_eff`` in torch (convolution, embedding): a mixed batch runs each
    adapter's samples with that adapter's weight."""

    def _compute(self, x, weight):  # pragma: no cover - defined by subclasses
        raise NotImplementedError

    def _forward_weights(self, x: torch.Tensor, dtype: torch.dtype, batched: bool = True) -> torch.Tensor:
        names = self._mixed
        if names is None or self._disabled:
            computing = self._computing_names()
            if not computing:
                return self.base_layer(x)  # no active adapter here: the pretrained module
            return self._compute(x, self._effective_weight(computing, dtype).reshape(self._base_weight().shape))
        used, index = self._mixed_rows(names, x, batched)
        outputs = [None] * len(names)
        groups: dict[int, list[int]] = {}  # adapter index (-1: the base) → its samples, in one pass
        for b, i in enumerate(index):
            groups.setdefault(int(i), []).append(b)
        for i, samples in sorted(groups.items()):
            part = x[samples]
            if i < 0:  # a copy, as the adapters' weights are: F.embedding(max_norm=) renormalises in place
                weight = self._base_weight().detach().to(dtype, copy=True)
            else:
                weight = self._effective_weight([used[i]], dtype).reshape(self._base_weight().shape)
            out = self._compute(part, weight)
            for k, b in enumerate(samples):
                outputs[b] = out[k]
        if not outputs:  # an empty batch: the shape the base layer gives it
            return self._compute(x, self._base_weight().detach().to(dtype))
        return torch.stack(outputs)


class LoLDUConv(_WeightSpaceLayer):
    """``nn.Conv1d/2d/3d`` with LoLDU adapters on its weight reshaped to
    ``(out_channels, in_channels / groups · kernel size)``; the convolution runs in torch with
    the library's ``W_eff``."""

    base_types = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
    dimension_names = ("out_channels", "in_channels / groups × kernel size")

    def _weight_matrix(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.flatten(1)

    def _compute(self, x, weight):
        base = self.base_layer
        bias = base.bias if base.bias is None or base.bias.dtype == weight.dtype else base.bias.to(weight.dtype)
        return base._conv_forward(x, weight, bias)

    @eager_under_compile
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self._compute_dtype()
        x = self._check_float_input(x, dtype)
        base = self.base_layer
        expected = base.in_channels
        channel_dim = x.dim() - len(base.kernel_size) - 1
        if channel_dim not in (0, 1) or x.shape[channel_dim] != expected:
            raise ShapeError(
                f"{self.loldu_name}: the input has shape {tuple(x.shape)}; expected (N, {expected}, ...) "
                f"with {len(base.kernel_size)} spatial dimension(s)",
                _capi.LOLDU_ERR_SHAPE,
            )
        return self._forward_weights(x, dtype, batched=channel_dim == 1)


class LoLDUEmbedding(_WeightSpaceLayer):
    """``nn.Embedding`` with LoLDU adapters on its ``num_embeddings × embedding_dim`` table; the
    lookup runs in torch with the library's ``W_eff``."""

    base_types = (nn.Embedding,)
    dimension_names = ("num_embeddings", "embedding_dim")

    def _compute(self, x, weight):
        base = self.base_layer
        return F.embedding(x, weight, base.padding_idx, base.max_norm, base.norm_type, base.scale_grad_by_freq,
                           False)  # (sparse=True: a sparse gradient of W_eff, which dz needs dense anyway)

    @eager_under_compile
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._check_input(x)
        if x.dtype not in (torch.int64, torch.int32):
            raise DTypeError(f"{self.loldu_name}: embedding indices must be int64 or int32, got {x.dtype}",
                             _capi.LOLDU_ERR_DTYPE)
        return self._forward_weights(x, self.dtype, batched=x.dim() >= 1)


LAYER_FOR: list[tuple[type, type[LoLDULayer]]] = [
    (nn.Linear, LoLDULinear),
    (nn.Conv1d, LoLDUConv),
    (nn.Conv2d, LoLDUConv),
    (nn.Conv3d, LoLDUConv),
    (nn.Embedding, LoLDUEmbedding),
]


def layer_class(module: nn.Module) -> type[LoLDULayer] | None:
    """The LoLDU layer for ``module``: one of ``LAYER_FOR``'s types, or a subclass that keeps its
    ``forward`` (a LoLDU layer computes the base type's forward, not a subclass's own)."""
    for base, layer in LAYER_FOR:
        if isinstance(module, base):
            return layer if type(module).forward is base.forward else None
    return None
