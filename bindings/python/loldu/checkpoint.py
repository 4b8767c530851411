"""Checkpoints: a directory like PEFT's ``save_pretrained``.

``adapter_model.safetensors`` holds, per layer NAME, ``NAME.loldu_z`` and ``NAME.loldu_sigma``
(readable with the ``safetensors`` package) and fingerprints of each base weight;
``adapter_config.json`` holds the configuration. Loading checks that each adapter sits on the
base weight it was saved on::

    loldu.save("ckpt", {"encoder.layer.0.attention.self.query": a})
    adapters = loldu.load("ckpt", {"encoder.layer.0.attention.self.query": (weight, bias)})

Many checkpoints on one base: factor each base weight once (an ``Adapter`` at a rank at least the
saved ones, ``rank="full"`` fits any) and pass it as ``base=``; every checkpoint's adapter is then
derived on those factors (``loldu_checkpoint_layer`` + ``loldu_adapter_derive`` +
``loldu_checkpoint_apply``: O(r), no factorisation), and the adapters share them (one
``grouped_forward`` serves them all)::

    base = {"q": loldu.Adapter(weight, bias)}                  # the one factorisation
    fleet = [loldu.load(d, base=base)["q"] for d in directories]
"""

from __future__ import annotations

import ctypes
import dataclasses
import os
from collections.abc import Mapping

import numpy as np

from . import _capi
from ._arrays import NUMPY_DTYPES, c_string, numpy_name
from .adapter import Adapter, AdapterConfig, _Handle, _HandleOwner
from .errors import DTypeError, InvalidArgumentError, LoLDUIOError, MismatchError, check

MODEL_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"


def _named(adapters: Mapping[str, Adapter], what: str):
    if not isinstance(adapters, Mapping) or not adapters:
        raise InvalidArgumentError(f"{what} needs a non-empty mapping of layer name to loldu.Adapter",
                                   _capi.LOLDU_ERR_INVALID_ARGUMENT)
    names, handles = [], []
    for name, adapter in adapters.items():
        if not isinstance(name, str):
            raise InvalidArgumentError(f"layer names must be str, got {name!r}", _capi.LOLDU_ERR_INVALID_ARGUMENT)
        if not isinstance(adapter, Adapter):
            raise InvalidArgumentError(f"{name!r} maps to {type(adapter).__name__}, expected loldu.Adapter",
                                       _capi.LOLDU_ERR_INVALID_ARGUMENT)
        names.append(c_string(name, "layer name"))
        handles.append(adapter.handle)
    return (
        (_capi.loldu_adapter_p * len(handles))(*handles),
        (ctypes.c_char_p * len(names))(*names),
        len(names),
    )


def save(directory, adapters: Mapping[str, Adapter]) -> None:
    """Saves adapters under their layer names into ``directory`` (created with its parents if
    missing, as PEFT's ``save_pretrained``; removed again if the save fails). Each file is written
    atomically."""
    handles, names, count = _named(adapters, "save")
    path = c_string(directory, "directory", path=True)
    missing, parent = [], os.path.abspath(path)
    while not os.path.lexists(parent) and parent != os.path.dirname(parent):
        missing.append(parent)
        parent = os.path.dirname(parent)
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as error:  # (a file, a FIFO... in the way: the library's own refusal, which says what it is)
        if not os.path.lexists(path):
            raise LoLDUIOError(f"cannot create directory {directory!r}: {error.strerror}", _capi.LOLDU_ERR_IO) from None
    try:
        check(_capi.loldu_checkpoint_save(path, handles, names, count))
    except BaseException:
        for made in missing:  # (deepest first; a folder something else has filled meanwhile stays)
            try:
                os.rmdir(made)
            except OSError:
                break
        raise


def export_merged(path, adapters: Mapping[str, Adapter]) -> None:
    """Writes a safetensors file with ``NAME.weight`` = W_eff (and ``NAME.bias``) per layer, for
    serving without this library."""
    handles, names, count = _named(adapters, "export_merged")
    check(_capi.loldu_export_merged(c_string(path, "path", path=True), handles, names, count))


@dataclasses.dataclass(frozen=True)
class LayerInfo:
    """What to create a layer's adapter with (``loldu_checkpoint_layer``)."""

    name: str
    dtype: np.dtype
    m: int
    n: int
    config: AdapterConfig


class Checkpoint(_HandleOwner):
    """A validated checkpoint directory (``loldu_checkpoint_open``): every file is treated as
    hostile; problems are ``FormatError`` (malformed) or ``LoLDUIOError`` (unreadable)."""

    _what = "checkpoint"
    _instead = ": open it again from its directory"

    def __init__(self, directory):
        out = _capi.loldu_checkpoint_p()
        check(_capi.loldu_checkpoint_open(ctypes.byref(out), c_string(directory, "directory", path=True)))
        self._handle = _Handle(out.value, _capi.loldu_checkpoint_free)
        self.directory = os.fspath(directory)

    @property
    def names(self) -> list[str]:
        """The layer names, in saved order."""
        count = ctypes.c_size_t()
        check(_capi.loldu_checkpoint_count(self.handle, ctypes.byref(count)))
        names = []
        for i in range(count.value):
            name = ctypes.c_char_p()
            check(_capi.loldu_checkpoint_name(self.handle, i, ctypes.byref(name)))
            names.append(name.value.decode("utf-8"))
        return names

    def __len__(self) -> int:
        return len(self.names)

    def __contains__(self, name: str) -> bool:
        return name in self.names

    def layer(self, name: str) -> LayerInfo:
        """The dtype, base shape and configuration layer ``name`` was saved with
        (``MismatchError`` if there is no such layer)."""
        dtype, m, n = _capi.loldu_dtype(), ctypes.c_int64(), ctypes.c_int64()
        config = _capi.loldu_config()
        check(_capi.loldu_config_default(ctypes.byref(config)))
        check(_capi.loldu_checkpoint_layer(self.handle, c_string(name, "name"), ctypes.byref(dtype),
                                           ctypes.byref(m), ctypes.byref(n), ctypes.byref(config)))
        return LayerInfo(name, NUMPY_DTYPES[dtype.value], m.value, n.value, AdapterConfig.from_c(config))

    def apply(self, name: str, adapter: Adapter) -> None:
        """Sets the adapter's z and σ from layer ``name``; ``MismatchError`` (nothing changed) if
        its base weight, pivots, shape, parameter type (float32 or float64) or configuration differ
        from the saved ones."""
        check(_capi.loldu_checkpoint_apply(self.handle, c_string(name, "name"), adapter.handle))

    def create(self, name: str, weight: np.ndarray, bias=None, *, borrow_weight: bool = False) -> Adapter:
        """Creates the adapter of layer ``name`` on its base ``weight`` (and ``bias``) with the
        saved configuration, and applies the saved z and σ."""
        info = self.layer(name)
        if isinstance(weight, np.ndarray) and weight.dtype != info.dtype:
            raise DTypeError(f"layer {name!r} was saved in {info.dtype}, its weight is {weight.dtype}; "
                             f"convert it with weight.astype({numpy_name(info.dtype)})", _capi.LOLDU_ERR_DTYPE)
        if isinstance(weight, np.ndarray) and weight.shape != (info.m, info.n):
            raise MismatchError(f"layer {name!r} was saved on a {info.m} × {info.n} weight, got shape {weight.shape}",
                                _capi.LOLDU_ERR_MISMATCH)
        return self._applied(name, Adapter(weight, bias, dataclasses.replace(info.config, borrow_weight=borrow_weight)))

    def derive(self, name: str, base: Adapter) -> Adapter:
        """Creates layer ``name``'s adapter on ``base``'s frozen factors (``Adapter.derive``: no
        factorisation, no copy of the weight) with the saved configuration, and applies the saved
        z and σ. ``base``: an adapter on the layer's base weight whose ``factor_rank`` is at least
        the saved rank; ``MismatchError`` if its weight is not the saved one."""
        if not isinstance(base, Adapter):
            raise InvalidArgumentError(f"base for layer {name!r} must be a loldu.Adapter, got {type(base).__name__}",
                                       _capi.LOLDU_ERR_INVALID_ARGUMENT)
        config = self.layer(name).config
        if config.rank > base.factor_rank:
            raise InvalidArgumentError(
                f"base for layer {name!r}: its factors have rank {base.factor_rank}, the layer was saved at rank "
                f"{config.rank}; create the base adapter with rank >= {config.rank} (or rank='full')",
                _capi.LOLDU_ERR_INVALID_ARGUMENT)
        return self._applied(name, base._derive(config))

    def _applied(self, name: str, adapter: Adapter) -> Adapter:
        """``adapter`` with layer ``name``'s values applied; closed if they do not apply."""
        try:
            self.apply(name, adapter)
        except BaseException:
            adapter.close()
            raise
        return adapter

    def values(self, name: str) -> dict:
        """Layer ``name``'s saved ``z`` (float64), ``sigma`` and the fingerprints of the base weight
        and pivots it was saved on (``loldu_checkpoint_values``)."""
        info = self.layer(name)
        z = np.empty(info.config.rank, np.float64)
        sigma = ctypes.c_double()
        weight, pivots = ctypes.create_string_buffer(17), ctypes.create_string_buffer(17)
        check(_capi.loldu_checkpoint_values(self.handle, c_string(name, "name"),
                                            z.ctypes.data_as(ctypes.POINTER(ctypes.c_double)),
                                            ctypes.byref(sigma), weight, pivots))
        return {"z": z, "sigma": sigma.value, "weight_fingerprint": weight.value.decode(),
                "pivots_fingerprint": pivots.value.decode()}

    def create_from_model(self, name: str, base_dir) -> Adapter:
        """Creates layer ``name``'s adapter on its weight (and bias) in the model directory
        ``base_dir`` (transformers' safetensors layout, read one tensor at a time; see ``loldu_checkpoint_create``
        for how layer names find tensors), with the saved z and σ."""
        out = _capi.loldu_adapter_p()
        check(_capi.loldu_checkpoint_create(ctypes.byref(out), self.handle, c_string(name, "name"),
                                            c_string(base_dir, "base_dir", path=True)))
        return Adapter._from_handle(out.value)

    def __repr__(self) -> str:
        return f"<loldu.Checkpoint {self.directory!r}{' closed' if self._handle is None else ''}>"


def _every_layer(ckpt: Checkpoint, make) -> dict[str, Adapter]:
    """``make(name)`` for every saved layer, in saved order; all or nothing."""
    adapters: dict[str, Adapter] = {}
    try:
        for name in ckpt.names:
            adapters[name] = make(name)
    except BaseException:
        for a in adapters.values():
            a.close()
        raise
    return adapters


def load(directory, weights: Mapping | None = None, *, base: Mapping[str, Adapter] | Adapter | None = None,
         borrow_weight: bool = False) -> dict[str, Adapter]:
    """Opens a checkpoint and creates its adapters, from exactly one of:

    - ``weights``: maps each saved layer name to its weight array or to ``(weight, bias)``; each
      is factored (``Checkpoint.create``; ``borrow_weight``: the adapters borrow the arrays
      instead of copying them);
    - ``base``: maps each saved layer name to a ``loldu.Adapter`` on its base weight (for a
      checkpoint of one layer, that adapter alone will do), whose factors the new adapter shares
      (``Checkpoint.derive``: no factorisation). Loading N checkpoints onto one base this way
      factors it once, and their adapters serve one ``grouped_forward`` together.

    ``MismatchError`` if a saved layer has no entry or a base weight differs from the saved one.
    """
    if (weights is None) == (base is None):
        raise InvalidArgumentError(
            f"load needs exactly one of weights (base weights to factor) and base (adapters whose factors to "
            f"share); got {'neither' if weights is None else 'both'}", _capi.LOLDU_ERR_INVALID_ARGUMENT)
    with Checkpoint(directory) as ckpt:
        names = ckpt.names
        if isinstance(base, Adapter):
            if len(names) != 1:
                raise InvalidArgumentError(
                    f"base: one adapter serves a checkpoint of one layer; this one has {len(names)}: pass a "
                    "mapping of layer name to adapter", _capi.LOLDU_ERR_INVALID_ARGUMENT)
            base = {names[0]: base}
        given, what = (weights, "base weight") if base is None else (base, "base adapter")
        if not isinstance(given, Mapping):
            raise InvalidArgumentError(f"{'weights' if base is None else 'base'} must be a mapping of layer name to "
                                       f"{what}, got {type(given).__name__}", _capi.LOLDU_ERR_INVALID_ARGUMENT)
        missing = [n for n in names if n not in given]
        if missing:
            raise MismatchError(f"no {what} given for saved layer(s) {missing}", _capi.LOLDU_ERR_MISMATCH)
        if base is not None:
            return _every_layer(ckpt, lambda name: ckpt.derive(name, base[name]))

        def create(name):
            entry = weights[name]
            if isinstance(entry, tuple) and len(entry) != 2:
                raise InvalidArgumentError(f"weights[{name!r}] must be a weight array or a (weight, bias) pair, got a "
                                           f"tuple of {len(entry)}", _capi.LOLDU_ERR_INVALID_ARGUMENT)
            weight, bias = entry if isinstance(entry, tuple) else (entry, None)
            return ckpt.create(name, weight, bias, borrow_weight=borrow_weight)
        return _every_layer(ckpt, create)


def load_model(directory, base_dir) -> dict[str, Adapter]:
    """Opens a checkpoint and creates every layer's adapter on its weight in the model directory
    ``base_dir`` (``Checkpoint.create_from_model``): serving an adapter on a model's files without
    building the model."""
    with Checkpoint(directory) as ckpt:
        return _every_layer(ckpt, lambda name: ckpt.create_from_model(name, base_dir))
