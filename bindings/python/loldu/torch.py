"""PyTorch integration: LoLDU layers whose forward and backward run in libloldu, and PEFT-style
helpers for existing models and training scripts::

    import loldu.torch as lt

    lt.add_loldu(model, target_modules=["query", "value"], rank=64)   # or a regex string
    lt.print_trainable_parameters(model)          # only loldu_z (and loldu_sigma) train
    opt = torch.optim.AdamW(lt.loldu_parameters(model), lr=1e-3)     # or lt.Optimizer(model, ...)
    ...the usual training loop...
    lt.save_loldu(model, "ckpt")                  # adapter_model.safetensors + adapter_config.json
    lt.load_loldu(fresh_model, "ckpt")            # wraps the saved layers, restores z and σ

Layers (``LoLDULinear``, ``LoLDUConv`` for ``nn.Conv1d/2d/3d``, ``LoLDUEmbedding``) wrap the
original module as ``base_layer`` (its weight frozen, its bias kept and trainable if you want).
``loldu_z`` (``[rank]``) and ``loldu_sigma`` (``[1]``) are ``nn.Parameter`` that *share memory*
with the library: ``torch.optim`` updates them in place and the library sees the new values; the
library's optimisers (``Optimizer`` here) update the same memory.

- ``LoLDULinear``: ``y = x W_effᵀ`` runs in the library through a ``torch.autograd.Function``
  (forward, then dX, dz, dσ in backward); the bias is added by PyTorch, so that it stays an
  ordinary parameter that can be trained or changed.
- ``LoLDUConv`` / ``LoLDUEmbedding``: weight space. The library builds ``W_eff`` (the weight
  reshaped to ``out × in/groups·k…``, or ``num_embeddings × dim``), PyTorch runs the
  convolution or lookup, and the library maps the weight gradient back to dz and dσ.

Inputs must be CPU tensors of the layer's dtype (float32 or float64); anything else raises
``DeviceError`` or ``DTypeError`` saying what to do (under CPU autocast, half-precision inputs
are converted to the layer's dtype).

The base weight is *borrowed* by default (``borrow_weight=True``): the library reads the
module's weight memory instead of keeping a copy, so adapting a model costs no extra memory
for its weights. The layer keeps a reference to that exact tensor, so replacing the
parameter's storage (``module.to()``, ``load_state_dict(assign=True)``) can never free memory
the library reads. Before each forward the layer checks that the base weight is unchanged
(same storage and version, else a CRC-32 of its bytes taken when it was factored): an in-place
change of its values raises ``StateError`` (call ``layer.refactor()`` to factor the new
weight), while rewriting the same values (DDP's broadcast, reloading the same state dict) is
accepted. ``model.double()`` / ``model.float()`` re-create the adapters in the new dtype keeping
z and σ; moving a model to another device or to half precision raises before anything is
converted (``merge_and_unload`` first to get plain layers).

Threads: on first use, unless ``loldu.set_num_threads`` was called, the library's BLAS threads
are set to ``torch.get_num_threads()`` so that the two pools do not oversubscribe the cores.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import zlib
from collections.abc import Iterator, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import loldu as _loldu

from . import _capi
from .adapter import Adapter, AdapterConfig
from .checkpoint import Checkpoint
from .errors import DeviceError, DTypeError, InvalidArgumentError, MismatchError, ShapeError, StateError, check

__all__ = [
    "LoLDULayer",
    "LoLDULinear",
    "LoLDUConv",
    "LoLDUEmbedding",
    "add_loldu",
    "loldu_layers",
    "loldu_parameters",
    "named_loldu_parameters",
    "mark_only_loldu_as_trainable",
    "get_nb_trainable_parameters",
    "print_trainable_parameters",
    "loldu_state_dict",
    "set_loldu_state_dict",
    "save_loldu",
    "load_loldu",
    "export_merged",
    "merge_loldu",
    "unmerge_loldu",
    "merge_and_unload",
    "unload",
    "disable_adapters",
    "enable_loldu",
    "disable_loldu",
    "get_loldu_params",
    "get_loldu_state_dict",
    "remove_loldu",
    "Optimizer",
]

_SUPPORTED_DTYPES = (torch.float32, torch.float64)
_NUMPY = {torch.float32: np.float32, torch.float64: np.float64}
_threads_configured = False


def _configure_threads() -> None:
    """Aligns the library's BLAS threads with torch's pool, once, unless the user chose."""
    global _threads_configured
    if not _threads_configured:
        _threads_configured = True
        if not _loldu.threads_set_by_user():
            check(_capi.loldu_set_num_threads(max(1, torch.get_num_threads())))


def _unwrap(model: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel / DataParallel wrappers."""
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


def _check_dtype(dtype: torch.dtype, what: str, advice: str) -> None:
    if dtype not in _SUPPORTED_DTYPES:
        raise DTypeError(
            f"{what} is {dtype}; libloldu computes in float32 or float64 only. {advice}",
            _capi.LOLDU_ERR_DTYPE,
        )


def _crc(t: torch.Tensor) -> int:
    return zlib.crc32(t.detach().contiguous().numpy().reshape(-1).view(np.uint8))


# ---------------------------------------------------------------------------------------------
# autograd Functions
# ---------------------------------------------------------------------------------------------

class _LinearFunction(torch.autograd.Function):
    """``y = x W_effᵀ + b`` (x: ``B × n``, contiguous) through ``loldu_forward`` / ``loldu_backward``.
    ``z`` and ``sigma`` are the layer's parameters (views of the library's memory): inputs so
    that autograd routes dz and dσ to them, saved so that an in-place change between forward
    and backward is detected by autograd's version check. The bias (the base layer's, maybe
    None) is added here, in place, so that no second ``B × m`` buffer or copy-on-view is needed."""

    @staticmethod
    def forward(ctx, x, z, sigma, bias, adapter: Adapter, training: bool):
        batch = x.shape[0]
        y = torch.empty((batch, adapter.m), dtype=x.dtype)
        h = None
        if training and batch > 0 and adapter.plan(batch, keeps_h=True) == "factored":
            h = torch.empty((batch, adapter.rank), dtype=x.dtype)
        check(_capi.loldu_forward(adapter.handle, batch, x.data_ptr(), y.data_ptr(), None if h is None else h.data_ptr()))
        if bias is not None:
            y.add_(bias)
        ctx.save_for_backward(x, z, sigma)
        ctx.adapter, ctx.h = adapter, h
        return y

    @staticmethod
    def backward(ctx, dy):
        x, z, sigma = ctx.saved_tensors
        adapter, h = ctx.adapter, ctx.h
        need_x, need_z, need_sigma, need_bias = ctx.needs_input_grad[:4]
        dy = dy.contiguous()
        if dy.dtype != x.dtype:
            dy = dy.to(x.dtype)
        dx = torch.empty_like(x) if need_x else None
        r = adapter.rank
        check(_capi.loldu_zero_grad(adapter.handle))
        check(_capi.loldu_backward(adapter.handle, x.shape[0], x.data_ptr(), dy.data_ptr(),
                                   None if dx is None else dx.data_ptr(), None if h is None else h.data_ptr()))
        grads = torch.from_numpy(adapter.grad.copy())
        ctx.h = None
        return (dx, grads[:r] if need_z else None, grads[r:] if need_sigma else None,
                dy.sum(0) if need_bias else None, None, None)


class _WeightFunction(torch.autograd.Function):
    """``W_eff`` (``m × n``) through ``loldu_effective_weight``; backward maps ``dW`` to dz, dσ
    through ``loldu_weight_backward``."""

    @staticmethod
    def forward(ctx, z, sigma, adapter: Adapter):
        w = torch.empty((adapter.m, adapter.n), dtype=z.dtype)
        check(_capi.loldu_effective_weight(adapter.handle, w.data_ptr()))
        ctx.save_for_backward(z, sigma)
        ctx.adapter = adapter
        return w

    @staticmethod
    def backward(ctx, dw):
        ctx.saved_tensors  # version check
        adapter = ctx.adapter
        if dw.layout != torch.strided:  # sparse embedding gradients
            dw = dw.to_dense()
        dw = dw.to(LoLDULayer.dtype_of(adapter)).contiguous()
        r = adapter.rank
        check(_capi.loldu_zero_grad(adapter.handle))
        check(_capi.loldu_weight_backward(adapter.handle, dw.data_ptr()))
        grads = torch.from_numpy(adapter.grad.copy())
        need_z, need_sigma = ctx.needs_input_grad[:2]
        return grads[:r] if need_z else None, grads[r:] if need_sigma else None, None


# ---------------------------------------------------------------------------------------------
# Layers
# ---------------------------------------------------------------------------------------------

class LoLDULayer(nn.Module):
    """Base of the LoLDU layers: owns the library adapter over ``base_layer``'s weight and the
    ``loldu_z`` / ``loldu_sigma`` parameters that view its memory."""

    adapter_layer_names = ("loldu_z", "loldu_sigma")
    base_types: tuple[type, ...] = ()

    def __init__(
        self,
        base_layer: nn.Module,
        config: AdapterConfig | None = None,
        *,
        name: str | None = None,
        **fields,
    ):
        super().__init__()
        if not isinstance(base_layer, self.base_types):
            raise InvalidArgumentError(
                f"{type(self).__name__} wraps {' or '.join(t.__name__ for t in self.base_types)}, "
                f"got {type(base_layer).__name__}",
                _capi.LOLDU_ERR_INVALID_ARGUMENT,
            )
        fields.setdefault("borrow_weight", True)
        self.base_layer = base_layer
        self.loldu_config = dataclasses.replace(config or AdapterConfig(), **fields)
        self.loldu_name = name or type(base_layer).__name__
        self.base_layer.weight.requires_grad_(False)
        self._adapter: Adapter | None = None
        self._stamp = None
        self._create_adapter(values=None)

    # -- the weight as a matrix ----------------------------------------------------------------

    def _weight_matrix(self, weight: torch.Tensor) -> torch.Tensor:
        """The base weight as the ``m × n`` matrix the library factors (a view when possible)."""
        return weight

    def _base_weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def adapter(self) -> Adapter:
        """The numpy-level ``loldu.Adapter`` (paths, factors, info...)."""
        return self._adapter

    @property
    def dtype(self) -> torch.dtype:
        return torch.float64 if self._adapter.dtype == np.float64 else torch.float32

    @property
    def rank(self) -> int:
        return self._adapter.rank

    @property
    def train_sigma(self) -> bool:
        return self.loldu_config.train_sigma

    # -- creating the adapter and binding the parameters ----------------------------------------

    def _create_adapter(self, values) -> None:
        """Factors the current base weight and (re)binds ``loldu_z`` / ``loldu_sigma`` to the new
        adapter's memory; ``values`` = (z, σ) to restore, or ``None`` for the configured init."""
        weight = self._base_weight()
        if weight.device.type != "cpu":
            raise DeviceError(
                f"{self.loldu_name}: the base weight is on {weight.device}; libloldu computes on the CPU. "
                "Add LoLDU to the model while it is on the CPU.",
                _capi.LOLDU_ERR_INVALID_ARGUMENT,
            )
        _check_dtype(weight.dtype, f"{self.loldu_name}: the base weight",
                     "Convert the model first with model.float() (or model.double()).")
        matrix = self._weight_matrix(weight.detach())
        if not matrix.is_contiguous():
            matrix = matrix.contiguous()
        config = self.loldu_config
        if config.rank == "full":
            config = dataclasses.replace(config, rank=min(matrix.shape))
        try:
            adapter = Adapter(matrix.numpy(), None, config)
        except _loldu.LoLDUError as error:
            raise type(error)(f"{self.loldu_name}: {error.message}", error.status) from None
        if values is not None:
            z, sigma = values
            adapter.set_z(z.detach().cpu().to(self.dtype_of(adapter)).numpy())
            adapter.sigma = float(sigma.reshape(-1)[0])
        old, self._adapter = self._adapter, adapter
        self._bind_parameters()
        self._stamp = (weight._version, weight.data_ptr(), weight.dtype, _crc(matrix))
        if old is not None:
            old.close()

    @staticmethod
    def dtype_of(adapter: Adapter) -> torch.dtype:
        return torch.float64 if adapter.dtype == np.float64 else torch.float32

    def _bind_parameters(self) -> None:
        adapter = self._adapter
        params = adapter.params  # writable live view: z then σ
        z = torch.from_numpy(params[: adapter.rank])
        sigma = torch.from_numpy(params[adapter.rank:])
        if "loldu_z" in self._parameters and self._parameters["loldu_z"] is not None:
            with torch.no_grad():
                self.loldu_z.data = z
                self.loldu_sigma.data = sigma
            self.loldu_z.grad = None
            self.loldu_sigma.grad = None
        else:
            self.loldu_z = nn.Parameter(z, requires_grad=True)
            self.loldu_sigma = nn.Parameter(sigma, requires_grad=self.loldu_config.train_sigma)

    def _parameters_bound(self) -> bool:
        a = self._adapter
        z, sigma = self._parameters["loldu_z"], self._parameters["loldu_sigma"]  # no Module.__getattr__
        return (
            z.data_ptr() == a._params_ptr
            and sigma.data_ptr() == a._params_ptr + a.rank * a.dtype.itemsize
            and z.dtype == self.dtype
            and z.device.type == "cpu"
        )

    def refactor(self) -> None:
        """Factors the base weight again (after its values changed), keeping z and σ."""
        self._create_adapter(values=(self.loldu_z.detach().clone(), self.loldu_sigma.detach().clone()))

    # -- checks before use ----------------------------------------------------------------------

    def _prepare(self) -> Adapter:
        """Cheap checks before each use: threads, base weight unchanged, parameters bound."""
        _configure_threads()
        weight = self._base_weight()
        version, ptr, dtype, crc = self._stamp
        if weight._version != version or weight.data_ptr() != ptr:
            if weight.device.type != "cpu" or weight.dtype != dtype or _crc(self._weight_matrix(weight.detach())) != crc:
                raise StateError(
                    f"{self.loldu_name}: the base weight changed after it was factored (in-place update, "
                    "load_state_dict or a new tensor). Call .refactor() on this layer to factor the new "
                    "weight (z and σ are kept), or restore the original weight.",
                    _capi.LOLDU_ERR_STATE,
                )
            self._stamp = (weight._version, weight.data_ptr(), dtype, crc)
        if not self._parameters_bound():
            self._rebind_from_parameters()
        return self._adapter

    def _rebind_from_parameters(self) -> None:
        """The parameters were replaced (e.g. load_state_dict(assign=True)): their values win."""
        if self._adapter.merged:
            raise StateError(f"{self.loldu_name}: loldu_z / loldu_sigma were replaced while merged; unmerge first",
                             _capi.LOLDU_ERR_STATE)
        z = self.loldu_z.detach().cpu().to(self.dtype).contiguous().numpy()
        sigma = float(self.loldu_sigma.detach().reshape(-1)[0])
        self._adapter.set_z(z)
        self._adapter.sigma = sigma
        self._bind_parameters()

    def _check_input(self, x: torch.Tensor) -> torch.Tensor:
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

    def _check_float_input(self, x: torch.Tensor) -> torch.Tensor:
        x = self._check_input(x)
        if x.dtype != self.dtype:
            if x.dtype in (torch.float16, torch.bfloat16) and torch.is_autocast_enabled("cpu"):
                return x.to(self.dtype)
            if x.dtype in (torch.float16, torch.bfloat16):
                advice = (f"Pass x.to({self.dtype}) (LoLDU layers compute in float32 or float64), "
                          "or merge_and_unload(model) to run the merged model in half precision.")
            elif x.dtype in _SUPPORTED_DTYPES:
                advice = f"Convert the input with x.to({self.dtype}), or the model with model.to({x.dtype})."
            else:
                advice = f"Convert the input with x.to({self.dtype})."
            raise DTypeError(f"{self.loldu_name}: the input is {x.dtype}, the layer computes in {self.dtype}. {advice}",
                             _capi.LOLDU_ERR_DTYPE)
        return x

    def _training(self, *tensors) -> bool:
        return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)

    def _effective_weight(self) -> torch.Tensor:
        adapter = self._prepare()
        z, sigma = self.loldu_z, self.loldu_sigma
        if self._training(z, sigma):
            return _WeightFunction.apply(z, sigma, adapter)
        w = torch.empty((adapter.m, adapter.n), dtype=self.dtype)
        check(_capi.loldu_effective_weight(adapter.handle, w.data_ptr()))
        return w

    def effective_weight(self) -> torch.Tensor:
        """The weight the layer computes with, in the base weight's shape (a copy)."""
        with torch.no_grad():
            return self._effective_weight().reshape(self._base_weight().shape)

    # -- merge, enable ------------------------------------------------------------------------

    @property
    def merged(self) -> bool:
        return self._adapter.merged

    def merge(self) -> None:
        """Computes with a merged weight until ``unmerge()`` (z and σ must not change meanwhile)."""
        self._prepare()
        self._adapter.merge()

    def unmerge(self) -> None:
        self._adapter.unmerge()

    @property
    def enabled(self) -> bool:
        return self._adapter.enabled

    def enable_adapters(self, enabled: bool = True) -> None:
        """Disabled, the layer computes the original module exactly; z gets zero gradients."""
        self._adapter.enabled = enabled

    # -- dtype / device conversions -------------------------------------------------------------

    def _apply(self, fn, recurse=True):
        probe = fn(torch.zeros(1, dtype=self.dtype))
        if probe.device.type != "cpu":
            raise DeviceError(
                f"{self.loldu_name}: cannot move a LoLDU layer to {probe.device}: libloldu computes on the CPU. "
                "Call loldu.torch.merge_and_unload(model) first to get plain layers with the merged weights.",
                _capi.LOLDU_ERR_INVALID_ARGUMENT,
            )
        _check_dtype(probe.dtype, f"{self.loldu_name}: the requested dtype",
                     "Call loldu.torch.merge_and_unload(model) first to run the merged model in half precision.")
        result = super()._apply(fn, recurse)
        if self._adapter is not None:
            if self._base_weight().dtype != self.dtype:
                self._create_adapter(values=(self.loldu_z.detach().clone(), self.loldu_sigma.detach().clone()))
            elif not self._parameters_bound():
                self._rebind_from_parameters()
        return result

    # -- copy and pickle --------------------------------------------------------------------------

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_adapter"] = None
        state["_stamp"] = None
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        if self.__dict__.get("_adapter") is None and "loldu_z" in self._parameters:
            self._create_adapter(values=(self.loldu_z.detach().clone(), self.loldu_sigma.detach().clone()))

    def extra_repr(self) -> str:
        c = self.loldu_config
        a = self._adapter
        return (f"rank={a.rank if a else c.rank}, alpha={c.alpha or (a.rank if a else c.rank)}, z_init={c.z_init!r}, "
                f"residual={c.residual!r}, train_sigma={c.train_sigma}, borrow_weight={c.borrow_weight}")

    def close(self) -> None:
        """Frees the library adapter now (the layer is unusable afterwards)."""
        if self._adapter is not None:
            self._adapter.close()


class LoLDULinear(LoLDULayer):
    """``nn.Linear`` with a LoLDU adapter; ``y = x W_effᵀ`` runs in the library, ``+ b`` in torch.
    Accepts inputs of shape ``(..., in_features)``."""

    base_types = (nn.Linear,)

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._check_float_input(x)
        adapter = self._prepare()
        if x.shape[-1] != adapter.n:
            raise ShapeError(
                f"{self.loldu_name}: the input has shape {tuple(x.shape)}; its last dimension must be "
                f"in_features = {adapter.n}",
                _capi.LOLDU_ERR_SHAPE,
            )
        flat = x.dim() == 2
        x2 = (x if flat else x.reshape(-1, adapter.n)).contiguous()
        z, sigma = self._parameters["loldu_z"], self._parameters["loldu_sigma"]
        bias = self.base_layer.bias
        tensors = (x2, z, sigma) if bias is None else (x2, z, sigma, bias)
        y = _LinearFunction.apply(x2, z, sigma, bias, adapter, self._training(*tensors))
        return y if flat else y.reshape(*x.shape[:-1], adapter.m)


class LoLDUConv(LoLDULayer):
    """``nn.Conv1d/2d/3d`` with a LoLDU adapter on its weight reshaped to
    ``(out_channels, in_channels / groups · kernel size)``; the convolution runs in torch with
    the library's ``W_eff``."""

    base_types = (nn.Conv1d, nn.Conv2d, nn.Conv3d)

    def _weight_matrix(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.reshape(weight.shape[0], -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._check_float_input(x)
        base = self.base_layer
        expected = base.in_channels
        channel_dim = x.dim() - len(base.kernel_size) - 1
        if channel_dim not in (0, 1) or x.shape[channel_dim] != expected:
            raise ShapeError(
                f"{self.loldu_name}: the input has shape {tuple(x.shape)}; expected (N, {expected}, ...) "
                f"with {len(base.kernel_size)} spatial dimension(s)",
                _capi.LOLDU_ERR_SHAPE,
            )
        w = self._effective_weight().reshape(base.weight.shape)
        return base._conv_forward(x, w, base.bias)


class LoLDUEmbedding(LoLDULayer):
    """``nn.Embedding`` with a LoLDU adapter on its ``num_embeddings × embedding_dim`` table; the
    lookup runs in torch with the library's ``W_eff``."""

    base_types = (nn.Embedding,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._check_input(x)
        if x.dtype not in (torch.int64, torch.int32):
            raise DTypeError(f"{self.loldu_name}: embedding indices must be int64 or int32, got {x.dtype}",
                             _capi.LOLDU_ERR_DTYPE)
        base = self.base_layer
        w = self._effective_weight()
        return F.embedding(x, w, base.padding_idx, base.max_norm, base.norm_type, base.scale_grad_by_freq, base.sparse)


_LAYER_FOR: list[tuple[type, type[LoLDULayer]]] = [
    (nn.Linear, LoLDULinear),
    (nn.Conv1d, LoLDUConv),
    (nn.Conv2d, LoLDUConv),
    (nn.Conv3d, LoLDUConv),
    (nn.Embedding, LoLDUEmbedding),
]


def _layer_class(module: nn.Module) -> type[LoLDULayer] | None:
    for base, layer in _LAYER_FOR:
        if type(module) is base or isinstance(module, base):
            return layer
    return None


# ---------------------------------------------------------------------------------------------
# Model-level helpers
# ---------------------------------------------------------------------------------------------

def _matches(name: str, target_modules) -> bool:
    """PEFT's rule: a string is a regex that must match the whole module name; a list holds
    names that must equal the module name or be its last dotted components."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith("." + t) for t in target_modules)


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def loldu_layers(model: nn.Module) -> dict[str, LoLDULayer]:
    """The LoLDU layers of a model by module name (``DistributedDataParallel`` unwrapped)."""
    return {name: m for name, m in _unwrap(model).named_modules() if isinstance(m, LoLDULayer)}


def add_loldu(
    model: nn.Module,
    target_modules,
    rank: int | str = 8,
    alpha: float | None = None,
    z_init: str = "lu",
    residual: str = "pivots",
    *,
    train_sigma: bool = True,
    seed: int = 0,
    borrow_weight: bool = True,
    mark_trainable: bool = True,
) -> nn.Module:
    """Replaces the modules named by ``target_modules`` with LoLDU layers, in place.

    ``target_modules``: a regex matched against the whole module name
    (``r".*\\.attention\\.self\\.(query|value)"``), or a list of names or name suffixes
    (``["query", "value"]``), as in PEFT. Matched modules must be ``nn.Linear``, ``nn.Conv1d/2d/3d``
    or ``nn.Embedding`` on the CPU in float32/float64. ``rank``: an int or ``"full"``
    (``min(m, n)`` per layer); ``alpha``: σ = alpha / rank (``None``: alpha = rank, σ = 1).
    Layer ``i`` (in model order) gets seed ``seed + i``. With ``mark_trainable`` (the default,
    as PEFT's ``get_peft_model``) only the LoLDU parameters stay trainable.

    Modules that are LoLDU layers already are left as they are. Returns the model;
    ``InvalidArgumentError`` (a ``ValueError``) if nothing matches.
    """
    root = _unwrap(model)
    matched = []
    existing = tuple(name + "." for name in loldu_layers(root))
    adapted_already = 0
    for name, module in root.named_modules():
        if not name or not _matches(name, target_modules) or name.startswith(existing):
            continue  # (a base layer inside a LoLDU layer)
        if isinstance(module, LoLDULayer):
            adapted_already += 1
            continue
        if _layer_class(module) is None:
            raise InvalidArgumentError(
                f"target module {name!r} is a {type(module).__name__}; LoLDU adapts nn.Linear, "
                "nn.Conv1d/2d/3d and nn.Embedding", _capi.LOLDU_ERR_INVALID_ARGUMENT)
        matched.append((name, module))
    if not matched and adapted_already:
        return model
    if not matched:
        sample = [n for n, m in root.named_modules()
                  if _layer_class(m) is not None and not n.startswith(existing)][:8]
        raise InvalidArgumentError(
            f"target_modules {target_modules!r} matched no module of the model; adaptable modules are "
            f"named e.g. {sample}", _capi.LOLDU_ERR_INVALID_ARGUMENT)
    for i, (name, module) in enumerate(matched):
        config = AdapterConfig(rank=rank, alpha=0.0 if alpha is None else alpha, z_init=z_init, residual=residual,
                               seed=seed + i, train_sigma=train_sigma, borrow_weight=borrow_weight)
        layer = _layer_class(module)(module, config, name=name)
        _set_submodule(root, name, layer)
    if mark_trainable:
        mark_only_loldu_as_trainable(model)
    return model


def named_loldu_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """``(name, parameter)`` for every ``loldu_z`` and ``loldu_sigma``."""
    for name, p in _unwrap(model).named_parameters():
        if name.rsplit(".", 1)[-1] in LoLDULayer.adapter_layer_names:
            yield name, p


def loldu_parameters(model: nn.Module, *, trainable_only: bool = True) -> list[nn.Parameter]:
    """The LoLDU parameters (by default those that require grad: z, and σ when trained)."""
    return [p for _, p in named_loldu_parameters(model) if p.requires_grad or not trainable_only]


def mark_only_loldu_as_trainable(model: nn.Module, bias: str = "none") -> None:
    """Freezes everything but ``loldu_z`` (and ``loldu_sigma`` of layers with ``train_sigma``).
    ``bias``: ``"none"``, ``"all"`` (every bias trains) or ``"loldu_only"`` (biases of the
    adapted layers), as PEFT's ``mark_only_lora_as_trainable``."""
    if bias not in ("none", "all", "loldu_only"):
        raise InvalidArgumentError(f"bias must be 'none', 'all' or 'loldu_only', got {bias!r}",
                                   _capi.LOLDU_ERR_INVALID_ARGUMENT)
    root = _unwrap(model)
    for name, p in root.named_parameters():
        p.requires_grad_(bias == "all" and name.rsplit(".", 1)[-1] == "bias")
    for layer in loldu_layers(root).values():
        layer.loldu_z.requires_grad_(True)
        layer.loldu_sigma.requires_grad_(layer.train_sigma)
        if bias == "loldu_only" and getattr(layer.base_layer, "bias", None) is not None:
            layer.base_layer.bias.requires_grad_(True)


def get_nb_trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts."""
    trainable = total = 0
    for p in _unwrap(model).parameters():
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    return trainable, total


def print_trainable_parameters(model: nn.Module, file=None) -> str:
    """Prints and returns PEFT's report: ``trainable params: … || all params: … || trainable%: …``."""
    trainable, total = get_nb_trainable_parameters(model)
    report = (f"trainable params: {trainable:,d} || all params: {total:,d} || "
              f"trainable%: {100 * trainable / max(total, 1):.4f}")
    print(report, file=file)
    return report


def loldu_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{"NAME.loldu_z": …, "NAME.loldu_sigma": …}`` (copies), the tensors a checkpoint holds."""
    return {name: p.detach().clone() for name, p in named_loldu_parameters(model)}


def set_loldu_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> tuple[list, list]:
    """Copies ``loldu_z`` / ``loldu_sigma`` values into the model; returns ``(missing,
    unexpected)`` keys. ``StateError`` if a layer is merged."""
    own = dict(named_loldu_parameters(model))
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    layers = loldu_layers(model)
    for key, value in state_dict.items():
        if key in own:
            layer = layers[key.rsplit(".", 1)[0]]
            if layer.merged:
                raise StateError(f"{layer.loldu_name} is merged; unmerge before loading values", _capi.LOLDU_ERR_STATE)
            layer._prepare()
            if key.endswith(".loldu_z"):
                layer.adapter.set_z(value.detach().cpu().to(layer.dtype).numpy())  # checks finiteness
            else:
                layer.adapter.sigma = float(value.reshape(-1)[0])
    return missing, unexpected


def _names_and_adapters(model: nn.Module) -> dict[str, Adapter]:
    layers = loldu_layers(model)
    if not layers:
        raise InvalidArgumentError("the model has no LoLDU layer (call add_loldu first)", _capi.LOLDU_ERR_INVALID_ARGUMENT)
    adapters = {}
    for name, layer in layers.items():
        layer._prepare()
        adapters[name] = layer.adapter
    return adapters


def save_loldu(model: nn.Module, directory) -> None:
    """Saves every LoLDU layer's z and σ under its module name into ``directory`` (PEFT-like:
    ``adapter_model.safetensors`` + ``adapter_config.json``), atomically per file."""
    _loldu.save(directory, _names_and_adapters(model))


def export_merged(model: nn.Module, path) -> None:
    """Writes ``NAME.weight`` = W_eff per LoLDU layer to a safetensors file (reshape conv
    weights to the module's weight shape when loading; biases stay in the base modules)."""
    _loldu.export_merged(path, _names_and_adapters(model))


def load_loldu(model: nn.Module, directory, *, borrow_weight: bool = True, mark_trainable: bool = True) -> nn.Module:
    """Restores a ``save_loldu`` checkpoint into ``model``, in place.

    For each saved layer name: if the module is already a LoLDU layer with the saved
    configuration, its z and σ are overwritten (the parameter objects stay the same, so an
    existing optimiser keeps working); otherwise the module (or its base layer) is wrapped
    anew with the saved configuration. ``MismatchError`` if a name is not in the model or a base
    weight is not the one the checkpoint was saved on (nothing is changed then for that layer).
    """
    root = _unwrap(model)
    with Checkpoint(directory) as ckpt:
        modules = dict(root.named_modules())
        for name in ckpt.names:
            module = modules.get(name)
            if module is None:
                raise MismatchError(f"the checkpoint's layer {name!r} is not a module of the model",
                                    _capi.LOLDU_ERR_MISMATCH)
            info = ckpt.layer(name)
            base = module.base_layer if isinstance(module, LoLDULayer) else module
            if _layer_class(base) is None:
                raise MismatchError(f"the checkpoint's layer {name!r} is a {type(base).__name__} in the model",
                                    _capi.LOLDU_ERR_MISMATCH)
            weight_dtype = _NUMPY.get(base.weight.dtype)
            if weight_dtype is None or np.dtype(weight_dtype) != info.dtype:
                raise DTypeError(
                    f"{name}: saved in {info.dtype}, the model's weight is {base.weight.dtype}; convert the "
                    f"model first (model.to(torch.{info.dtype}))", _capi.LOLDU_ERR_DTYPE)
            saved = dataclasses.replace(info.config, borrow_weight=borrow_weight)
            if isinstance(module, LoLDULayer):
                current = dataclasses.replace(module.adapter.config, borrow_weight=borrow_weight)
                if current == saved:
                    if module.merged:
                        raise StateError(f"{name} is merged; unmerge before loading", _capi.LOLDU_ERR_STATE)
                    module._prepare()
                    ckpt.apply(name, module.adapter)
                    continue
            layer = _layer_class(base)(base, saved, name=name)
            try:
                ckpt.apply(name, layer.adapter)
            except BaseException:
                layer.close()
                raise
            _set_submodule(root, name, layer)
            modules[name] = layer
    if mark_trainable:
        mark_only_loldu_as_trainable(model)
    return model


def merge_loldu(model: nn.Module) -> None:
    """Merges every LoLDU layer (faster inference; z and σ frozen until ``unmerge_loldu``).
    Reversible, as PEFT's ``merge_adapter``; ``merge_and_unload`` removes the layers instead
    (what the reference code's ``merge_loldu`` does)."""
    for layer in loldu_layers(model).values():
        layer.merge()


def unmerge_loldu(model: nn.Module) -> None:
    for layer in loldu_layers(model).values():
        layer.unmerge()


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Replaces every LoLDU layer by its base module carrying the effective weight (a plain
    PyTorch model again, movable to any device and dtype). In place; returns the model."""
    root = _unwrap(model)
    for name, layer in loldu_layers(root).items():
        weight = layer.effective_weight()
        base = layer.base_layer
        base.weight = nn.Parameter(weight, requires_grad=False)
        _set_submodule(root, name, base)
        layer.close()
    return model


def unload(model: nn.Module) -> nn.Module:
    """Replaces every LoLDU layer by its original base module (the adapters are dropped)."""
    root = _unwrap(model)
    for name, layer in loldu_layers(root).items():
        _set_submodule(root, name, layer.base_layer)
        layer.close()
    return model


def enable_loldu(model: nn.Module) -> None:
    """Turns every LoLDU layer on (the initial state), as the reference code's ``enable_loldu``."""
    for layer in loldu_layers(model).values():
        layer.enable_adapters(True)


def disable_loldu(model: nn.Module) -> None:
    """Turns every LoLDU layer off until ``enable_loldu``: the model computes its original
    outputs exactly. See ``disable_adapters`` for a ``with`` block."""
    for layer in loldu_layers(model).values():
        layer.enable_adapters(False)


# The reference code's names (github.com/SKDDJ/LoLDU, minloldu).
get_loldu_params = loldu_parameters
get_loldu_state_dict = loldu_state_dict
remove_loldu = unload


@contextlib.contextmanager
def disable_adapters(model: nn.Module):
    """Within the block the LoLDU layers compute the original model exactly (as PEFT's
    ``model.disable_adapter()``); their previous state is restored afterwards."""
    layers = list(loldu_layers(model).values())
    previous = [layer.enabled for layer in layers]
    try:
        for layer in layers:
            layer.enable_adapters(False)
        yield model
    finally:
        for layer, on in zip(layers, previous):
            layer.enable_adapters(on)


class Optimizer:
    """The library's optimiser (``loldu.Optimizer``) over the LoLDU layers of a model, for
    training loops driven by PyTorch's autograd.

    ``Optimizer(model_or_layers, kind="adamw", lr=1e-3, **options)`` (options as
    ``loldu.Optimizer``: schedule, warm-up, clipping, σ's rate...). ``step()`` first copies each
    parameter's ``.grad`` (as autograd, and ``DistributedDataParallel``'s all-reduce, left it)
    into the library's gradient buffers, then updates z and σ in place; ``zero_grad()`` clears
    both. ``step()`` returns the global gradient norm before clipping. A parameter without
    ``.grad`` counts as a zero gradient (``torch.optim`` would skip it; momentum and weight
    decay still apply here). A layer given twice is updated once.
    """

    def __init__(self, model_or_layers, kind: str = "adamw", lr: float = 1e-3, **options):
        if isinstance(model_or_layers, nn.Module):
            layers = list(loldu_layers(model_or_layers).values())
        else:
            layers = list(model_or_layers)
        if not layers or not all(isinstance(layer, LoLDULayer) for layer in layers):
            raise InvalidArgumentError("Optimizer needs a model with LoLDU layers or a list of LoLDU layers",
                                       _capi.LOLDU_ERR_INVALID_ARGUMENT)
        layers = list(dict.fromkeys(layers))  # a layer shared by two modules is updated once
        self.layers = layers
        self._optimizer = _loldu.Optimizer([layer._prepare() for layer in layers], kind, lr, **options)

    def _sync_grads(self) -> None:
        for layer in self.layers:
            grad = layer.adapter.grad
            for param, part in ((layer.loldu_z, grad[: layer.rank]), (layer.loldu_sigma, grad[layer.rank:])):
                if param.grad is None or not param.requires_grad:
                    part[:] = 0
                else:
                    part[:] = param.grad.detach().cpu().to(layer.dtype).numpy()

    def step(self) -> float:
        for layer, adapter in zip(self.layers, self._optimizer.adapters):
            if layer.adapter is not adapter:
                raise StateError(f"{layer.loldu_name} was re-created (refactor, load or dtype change) after "
                                 "this optimiser; create a new optimiser", _capi.LOLDU_ERR_STATE)
        self._sync_grads()
        return self._optimizer.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self._optimizer.zero_grad()
        for layer in self.layers:
            for param in (layer.loldu_z, layer.loldu_sigma):
                if set_to_none:
                    param.grad = None
                elif param.grad is not None:
                    param.grad.zero_()

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

    def close(self) -> None:
        self._optimizer.close()
