"""LoLDU low-rank adaptation (arXiv 2410.13618) in Python, on top of ``libloldu.so``.

Three layers:

- ``loldu._capi``: the raw ctypes mirror of ``include/loldu.h``;
- the numpy API here: ``Adapter`` (float32, float64, float16 and ``ml_dtypes.bfloat16``
  weights, ``loldu.bfloat16`` for short; ``derive`` more adapters on its factors, ``convert`` to another element type),
  ``grouped_forward`` / ``grouped_backward`` (a batch whose rows belong to different adapters),
  ``AdapterConfig``, ``Optimizer`` (``SGD``, ``Adam``, ``AdamW``, schedules), ``save`` /
  ``load`` (``base=``: many checkpoints on one factored base) / ``load_model`` / ``Checkpoint`` /
  ``export_merged``, ``export_lora`` (an exact PEFT
  LoRA), ``merge_model`` (a checkpoint merged into a model's safetensors files), threads,
  ``gemm_backend``;
- ``loldu.torch`` (imported on demand, needs PyTorch): modules that turn ``nn.Linear``,
  ``nn.Conv1d/2d/3d`` and ``nn.Embedding`` layers of an existing model into LoLDU layers, and
  PEFT-style helpers (``add_loldu``, ``save_loldu``, ``load_loldu``, ...).

Import-time behaviour:

- ``libloldu.so`` is looked for through ``LOLDU_LIBRARY`` (when set, only there), else in this
  package's folder, then the repository's ``.build/release``, then the system's library path
  (see ``loldu._capi``); ``FileNotFoundError`` lists the places tried.
- ``OPENBLAS_CORETYPE``: Debian's OpenBLAS 0.3.21 misdetects recent Intel CPUs and falls back
  to very slow kernels. Unless you set it, the package sets ``OPENBLAS_CORETYPE`` before the
  library (and with it OpenBLAS) is loaded: ``SkylakeX`` when ``/proc/cpuinfo`` has
  ``avx512f``, ``Haswell`` when it has ``avx2``, nothing otherwise.
- ``OMP_WAIT_POLICY``: PyTorch's OpenMP threads spin between parallel regions and take the
  cores from the library's threads, unless ``OMP_WAIT_POLICY=PASSIVE`` was set when its OpenMP
  runtime started. Unless you set it (or ``LOLDU_KEEP_OMP_WAIT_POLICY=1``), the package sets it
  to ``PASSIVE`` when no OpenMP runtime is loaded yet, i.e. when ``loldu`` or ``loldu.torch``
  is imported before torch (``loldu._capi.configure_openmp``).
- The library's version must match the header this binding mirrors (``ImportError`` if not).

Errors are ``LoLDUError`` subclasses, one per status code, carrying the library's message
(see ``loldu.errors``).
"""

from __future__ import annotations

import ctypes

from . import _arrays, _capi
from ._arrays import BFLOAT16 as bfloat16
from ._version import HEADER_VERSION, __version__
from .adapter import BACKENDS, FACTORS, PATHS, RESIDUALS, Z_INITS, Adapter, AdapterConfig, grouped_backward, grouped_forward
from .checkpoint import CONFIG_FILE, MODEL_FILE, Checkpoint, LayerInfo, export_merged, load, load_model, save
from .export import LORA_KINDS, export_lora, merge_model
from .errors import (
    CancelledError,
    DeviceError,
    DTypeError,
    FormatError,
    InternalError,
    InvalidArgumentError,
    InvalidHandleError,
    LoLDUError,
    LoLDUIOError,
    LoLDUWarning,
    MismatchError,
    NotFiniteError,
    NullPointerError,
    OutOfMemoryError,
    ShapeError,
    StateError,
    check,
)
from .optim import KINDS, SCHEDULES, SGD, Adam, AdamW, Optimizer, schedule_factor

library_path = _capi.library_path

_threads_set_by_user = False


def library_version() -> str:
    """The loaded library's version string (``loldu_version_string``)."""
    return _capi.loldu_version_string().decode()


def set_num_threads(threads: int) -> None:
    """Sets the number of BLAS threads of the library for the whole process (>= 1).

    ``OutOfMemoryError``, changing nothing, when an address-space limit (``ulimit -v``) leaves
    no room for the work buffers of the threads OpenBLAS would start. Once called,
    ``loldu.torch`` no longer aligns it with ``torch.get_num_threads()``.
    """
    global _threads_set_by_user
    check(_capi.loldu_set_num_threads(_arrays.integer(threads, "threads", ctypes.c_int)))
    _threads_set_by_user = True


def get_num_threads() -> int:
    """The number of BLAS threads the library uses."""
    return int(_capi.loldu_get_num_threads())


def gemm_backend(dtype) -> tuple[str, str]:
    """``(backend, description)``: which library multiplies adapters of element type ``dtype``
    created now ('openblas', 'onednn' or 'widened' to float32) and the libraries and CPU
    features behind it (``loldu_gemm_backend``)."""
    from ._arrays import library_dtype
    import ctypes

    backend, text = _capi.loldu_backend(), ctypes.c_char_p()
    check(_capi.loldu_gemm_backend(library_dtype(dtype, "dtype"), ctypes.byref(backend), ctypes.byref(text)))
    return BACKENDS[backend.value], text.value.decode()


def set_widened_half(widened: bool) -> None:
    """Half-precision adapters created from now on widen to float32 even where the CPU multiplies
    bf16 natively (``loldu_set_widened_half``); ``False`` gives the choice back to the CPU."""
    check(_capi.loldu_set_widened_half(1 if widened else 0))


def threads_set_by_user() -> bool:
    """Whether ``set_num_threads`` was called in this process."""
    return _threads_set_by_user


__all__ = [
    "Adapter",
    "AdapterConfig",
    "Checkpoint",
    "LayerInfo",
    "Optimizer",
    "SGD",
    "Adam",
    "AdamW",
    "schedule_factor",
    "bfloat16",
    "grouped_forward",
    "grouped_backward",
    "gemm_backend",
    "set_widened_half",
    "save",
    "load",
    "export_merged",
    "load_model",
    "export_lora",
    "merge_model",
    "LORA_KINDS",
    "set_num_threads",
    "get_num_threads",
    "library_version",
    "library_path",
    "HEADER_VERSION",
    "__version__",
    "Z_INITS",
    "RESIDUALS",
    "PATHS",
    "FACTORS",
    "BACKENDS",
    "KINDS",
    "SCHEDULES",
    "MODEL_FILE",
    "CONFIG_FILE",
    "LoLDUError",
    "InvalidArgumentError",
    "NullPointerError",
    "ShapeError",
    "NotFiniteError",
    "DTypeError",
    "StateError",
    "OutOfMemoryError",
    "InvalidHandleError",
    "LoLDUIOError",
    "LoLDUWarning",
    "FormatError",
    "MismatchError",
    "InternalError",
    "CancelledError",
    "DeviceError",
]
