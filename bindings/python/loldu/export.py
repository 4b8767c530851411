"""Adapters leaving the library: an exact PEFT LoRA, and checkpoints merged into model files.

Every LoLDU adapter is a rank-r LoRA: ``ΔW = A diag(c) U_r`` with ``c = σ z − σ₀ z_ref``, so
``lora_B = A diag(c)``, ``lora_A = U_r`` and ``lora_alpha = r`` reproduce it to rounding::

    loldu.export_lora("lora", {"encoder.layer.0.attention.self.query": adapter},
                      base_model_name_or_path="sentence-transformers/all-MiniLM-L6-v2")
    loldu.merge_model("ckpt", "base-model-dir", "merged-model-dir", dtype="bfloat16")

``loldu.torch.export_lora(model, directory)`` exports the adapters of a PyTorch model (layer
kinds and names taken from the model).
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable, Mapping

from . import _capi
from ._arrays import c_string, integer, library_dtype
from ._interrupts import interrupts_held
from .adapter import Adapter, _names
from .checkpoint import Checkpoint, _named
from .errors import InvalidArgumentError, check

LORA_KINDS = _names("LOLDU_LORA_")  # ("linear", "embedding", "conv")


def _dtype_code(dtype, what: str, *, allow_keep: bool = False) -> int:
    if dtype is None and allow_keep:
        return 0
    code = library_dtype(dtype, what)
    if code == _capi.LOLDU_FLOAT64 and allow_keep:
        raise InvalidArgumentError(f"{what} must be float32, bfloat16 or float16 (None keeps each tensor's type)",
                                   _capi.LOLDU_ERR_INVALID_ARGUMENT)
    return code


def export_lora(directory, adapters: Mapping[str, Adapter], *, base_model_name_or_path: str | None = None,
                dtype="float32", kinds: Mapping[str, str | tuple[str, tuple[int, ...]]] | None = None,
                replace: bool = False) -> None:
    """Writes ``adapters`` (module name → adapter) as a PEFT LoRA directory (``loldu_export_lora``):
    ``adapter_config.json`` and ``adapter_model.safetensors``, exact, atomically.

    ``kinds`` gives the layers that are not ``nn.Linear``: ``"embedding"``, or ``("conv",
    kernel_size)`` for a convolution whose weight was reshaped to ``out × in·k``. ``replace``
    swaps out an earlier export at ``directory`` (never a directory holding other files).
    """
    handles, names, count = _named(adapters, "export_lora")
    options = _capi.loldu_lora_options()
    check(_capi.loldu_lora_options_default(ctypes.byref(options)))
    options.dtype = _dtype_code(dtype, "dtype")
    options.replace = 1 if replace else 0
    if base_model_name_or_path is not None:
        options.base_model_name_or_path = c_string(base_model_name_or_path, "base_model_name_or_path", path=True)
    unknown = [name for name in (kinds or {}) if name not in adapters]
    if unknown:
        raise InvalidArgumentError(f"kinds names layers that are not exported: {unknown[:3]}",
                                   _capi.LOLDU_ERR_INVALID_ARGUMENT)
    layers = (_capi.loldu_lora_layer * count)()
    for i, name in enumerate(adapters):
        given = (kinds or {}).get(name, "linear")
        if isinstance(given, str):
            kind, kernel = given, ()
        elif isinstance(given, (tuple, list)) and len(given) == 2 and isinstance(given[1], (tuple, list)):
            kind, kernel = given
        else:
            kind = kernel = None
        if kind not in LORA_KINDS or (kind == "conv") != bool(kernel):
            raise InvalidArgumentError(f"kinds[{name!r}] must be 'linear', 'embedding' or ('conv', kernel_size) with "
                                       f"kernel_size a tuple of ints, got {given!r}", _capi.LOLDU_ERR_INVALID_ARGUMENT)
        layers[i].kind = LORA_KINDS.index(kind)
        layers[i].kernel_dims = len(kernel)
        for k, size in enumerate(tuple(kernel)[:3]):
            layers[i].kernel[k] = integer(size, f"kinds[{name!r}] kernel size")
    options.layers = layers
    check(_capi.loldu_export_lora(c_string(directory, "directory", path=True), handles, names, count,
                                  ctypes.byref(options)))


def merge_model(checkpoint, base_dir, out_dir, *, dtype=None,
                progress: Callable[[int, int, str], None] | None = None) -> None:
    """Writes the model in ``base_dir`` (transformers' layout: ``model.safetensors`` or shards with
    their index, config, tokenizer) with the checkpoint merged into its weights to the new
    directory ``out_dir`` (``loldu_merge_model``): same files, names and types (or every float
    tensor converted to ``dtype``), written atomically; ``progress(done, total, tensor)`` after
    each tensor. ``checkpoint`` is a ``loldu.Checkpoint`` or a checkpoint directory."""
    if progress is not None and not callable(progress):
        raise InvalidArgumentError(f"progress must be a function (done, total, tensor) or None, got {type(progress).__name__}",
                                   _capi.LOLDU_ERR_INVALID_ARGUMENT)
    options = _capi.loldu_merge_options()
    check(_capi.loldu_merge_options_default(ctypes.byref(options)))
    options.dtype = _dtype_code(dtype, "dtype", allow_keep=True)
    errors: list[BaseException] = []
    opened = checkpoint if isinstance(checkpoint, Checkpoint) else Checkpoint(checkpoint)
    try:
        # Ctrl-C is held back during the call (raised in a callback, it would be lost in ctypes):
        # the callback stops the merge once one arrived, and it is raised after the call.
        with interrupts_held() as interrupted:
            def report(_user, done, total, tensor):
                if interrupted or errors:
                    return 1
                try:
                    if progress is not None:
                        progress(int(done), int(total), tensor.decode("utf-8", "replace"))
                    return 0
                except BaseException as error:  # stops the merge; raised again after the call
                    errors.append(error)
                    return 1
            options.progress = _capi.loldu_progress_fn(report)
            status = _capi.loldu_merge_model(c_string(out_dir, "out_dir", path=True),
                                             c_string(base_dir, "base_dir", path=True), opened.handle,
                                             ctypes.byref(options))
    finally:
        if opened is not checkpoint:
            opened.close()
    if errors:
        raise errors[0]
    check(status)
