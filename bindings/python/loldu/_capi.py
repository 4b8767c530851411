"""Raw ctypes layer: ``include/loldu.h``, one declaration per function, nothing more.

Every function of the header is declared here with its ``argtypes`` and ``restype``, under the
header's name and with the C prototype pasted above it; the structs are mirrored field by field.
Nothing here raises on a status code: the Pythonic layers (``loldu.adapter``, ``loldu.optim``,
``loldu.checkpoint``, ``loldu.torch``) do that.

Finding the library, in this order:

1. ``LOLDU_LIBRARY``: the path of ``libloldu.so`` (or of the folder holding it). When it is set
   it is the only place looked at, so that a wrong setting is an error, not a silent fallback.
2. this package's folder (a wheel may ship the library next to this file);
3. the repository's build folder, ``<repo>/.build/release/libloldu.so`` (``make build``), when
   the package is used from a checkout (``pip install -e bindings/python``);
4. the system's library path (``make install``), through ``ctypes.util.find_library``.

``FileNotFoundError`` lists every place looked at.

OpenBLAS: Debian's OpenBLAS 0.3.21 does not recognise recent Intel cores and falls back to its
slowest kernels unless ``OPENBLAS_CORETYPE`` is set before it is loaded. Before loading
``libloldu.so`` (which loads OpenBLAS), this module sets ``os.environ["OPENBLAS_CORETYPE"]``
when it is unset: ``"SkylakeX"`` if ``/proc/cpuinfo`` lists ``avx512f``, ``"Haswell"`` if it
lists ``avx2``, and leaves it unset otherwise. Set it yourself to override; it has no effect
if OpenBLAS was already loaded by something else in the process.

OpenMP: PyTorch's OpenMP threads spin between parallel regions unless ``OMP_WAIT_POLICY=PASSIVE``
was set when its OpenMP runtime started (at ``import torch``), and then compete with the
library's BLAS threads for the cores (``make bench`` measures the step with the variable unset
against PASSIVE; on a busy machine spinning costs the most). So, before loading the library, this
module sets ``os.environ["OMP_WAIT_POLICY"] = "PASSIVE"`` when it is unset, ``LOLDU_KEEP_OMP_WAIT_POLICY=1``
is not set, and no OpenMP runtime is loaded in the process yet (torch not imported, no
libgomp / libiomp5 / libomp in ``/proc/self/maps``): that is, when ``loldu`` (or ``loldu.torch``)
is imported before torch. Child processes inherit it, as any variable.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import pathlib
import re
import sys
from ctypes import (
    POINTER,
    Structure,
    c_char_p,
    c_double,
    c_int,
    c_int32,
    c_int64,
    c_size_t,
    c_uint,
    c_uint32,
    c_uint64,
    c_void_p,
)

from ._version import HEADER_VERSION

LIBRARY_NAME = "libloldu.so"


# ---------------------------------------------------------------------------------------------
# OpenBLAS core type
# ---------------------------------------------------------------------------------------------

def _cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> set[str]:
    try:
        with open(cpuinfo, encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.partition(":")[2].split())
    except OSError:
        pass
    return set()


def openblas_coretype(flags: set[str]) -> str | None:
    """The ``OPENBLAS_CORETYPE`` to use for a CPU with these ``/proc/cpuinfo`` flags."""
    if "avx512f" in flags:
        return "SkylakeX"
    if "avx2" in flags:
        return "Haswell"
    return None


def configure_openblas(environ=os.environ, cpuinfo: str = "/proc/cpuinfo") -> str | None:
    """Sets ``OPENBLAS_CORETYPE`` in ``environ`` if unset (see the module docstring).

    Returns the value in effect afterwards (``None`` if none).
    """
    if environ.get("OPENBLAS_CORETYPE"):
        return environ["OPENBLAS_CORETYPE"]
    coretype = openblas_coretype(_cpu_flags(cpuinfo))
    if coretype is not None:
        environ["OPENBLAS_CORETYPE"] = coretype
    return coretype


# ---------------------------------------------------------------------------------------------
# OpenMP wait policy
# ---------------------------------------------------------------------------------------------

# The OpenMP runtimes (GNU, Intel, LLVM; torch's wheels bundle libgomp-<hash>.so) as mapped files.
OPENMP_RUNTIME = re.compile(r"/lib(?:gomp|iomp5|omp)[-.][^/]*$")


def openmp_loaded(maps: str = "/proc/self/maps", modules=sys.modules) -> bool:
    """Whether an OpenMP runtime already started in this process (it read ``OMP_WAIT_POLICY``
    then): torch is imported, or a runtime is among the process's mapped files."""
    if "torch" in modules:
        return True
    try:
        with open(maps, encoding="utf-8", errors="replace") as f:
            return any(OPENMP_RUNTIME.search(line.rstrip("\n")) for line in f)
    except OSError:
        return False


def configure_openmp(environ=os.environ, maps: str = "/proc/self/maps", modules=sys.modules) -> str | None:
    """Sets ``OMP_WAIT_POLICY=PASSIVE`` in ``environ`` if unset, unless ``LOLDU_KEEP_OMP_WAIT_POLICY=1`` or an
    OpenMP runtime is loaded already (see the module docstring). Returns the value in effect
    afterwards (``None`` if none)."""
    if "OMP_WAIT_POLICY" in environ or environ.get("LOLDU_KEEP_OMP_WAIT_POLICY") == "1" or openmp_loaded(maps, modules):
        return environ.get("OMP_WAIT_POLICY")
    environ["OMP_WAIT_POLICY"] = "PASSIVE"
    return "PASSIVE"


# ---------------------------------------------------------------------------------------------
# Finding and loading the library
# ---------------------------------------------------------------------------------------------

PACKAGE_DIR = pathlib.Path(__file__).resolve().parent
REPO_BUILD_DIR = PACKAGE_DIR.parents[2] / ".build" / "release"


def candidate_paths(environ=os.environ) -> list[tuple[str, str | None]]:
    """The places looked at, in order, as ``(description, path)``. For the system's library
    path, ``path`` is the name ``ctypes.util.find_library`` gave (``None`` if none)."""
    override = environ.get("LOLDU_LIBRARY")
    if override:
        path = pathlib.Path(override).expanduser()
        if path.is_dir():
            path = path / LIBRARY_NAME
        return [("LOLDU_LIBRARY", str(path))]
    return [
        ("the package folder", str(PACKAGE_DIR / LIBRARY_NAME)),
        ("the repository's build folder", str(REPO_BUILD_DIR / LIBRARY_NAME)),
        ("the system's library path", ctypes.util.find_library("loldu")),
    ]


def find_library(environ=os.environ) -> str:
    """The path (or, from the system's library path, the name) of ``libloldu.so`` to load,
    found as the module docstring says; ``FileNotFoundError`` lists every place looked at."""
    places = candidate_paths(environ)
    for what, path in places:
        if path is not None and (what == "the system's library path" or os.path.isfile(path)):
            return path
    looked = "\n".join(
        f"  - {what}: {path if path is not None else 'no libloldu (ctypes.util.find_library)'}"
        for what, path in places
    )
    hint = (
        "LOLDU_LIBRARY is set, so no other place was tried: point it to an existing libloldu.so."
        if environ.get("LOLDU_LIBRARY")
        else "Build it with `make build` in the repository, or set LOLDU_LIBRARY to its path."
    )
    raise FileNotFoundError(f"libloldu.so not found. Looked in:\n{looked}\n{hint}")


def _load() -> tuple[ctypes.CDLL, str]:
    configure_openblas()
    configure_openmp()
    path = find_library()
    try:
        return ctypes.CDLL(path), path
    except OSError as error:
        hint = ("; it needs OpenBLAS and LAPACKE at run time (Debian, Ubuntu: apt-get install libopenblas0 liblapacke)"
                if "libopenblas" in str(error) or "liblapacke" in str(error) else "")
        raise OSError(f"could not load {path}: {error}{hint}") from error


lib, library_path = _load()


# ---------------------------------------------------------------------------------------------
# Constants (values fixed by the header)
# ---------------------------------------------------------------------------------------------

def _header_number(version: str) -> int:
    major, minor, patch = (int(p) for p in version.split("."))
    return major * 10000 + minor * 100 + patch


LOLDU_VERSION_STRING = HEADER_VERSION
LOLDU_VERSION_NUMBER = _header_number(HEADER_VERSION)
LOLDU_VERSION_MAJOR, LOLDU_VERSION_MINOR, LOLDU_VERSION_PATCH = (int(p) for p in HEADER_VERSION.split("."))

# loldu_status
LOLDU_OK = 0
LOLDU_ERR_INVALID_ARGUMENT = 1
LOLDU_ERR_NULL_POINTER = 2
LOLDU_ERR_SHAPE = 3
LOLDU_ERR_NOT_FINITE = 4
LOLDU_ERR_DTYPE = 5
LOLDU_ERR_STATE = 6
LOLDU_ERR_OUT_OF_MEMORY = 7
LOLDU_ERR_INVALID_HANDLE = 8
LOLDU_ERR_IO = 9
LOLDU_ERR_FORMAT = 10
LOLDU_ERR_MISMATCH = 11
LOLDU_ERR_INTERNAL = 12
LOLDU_ERR_CANCELLED = 13

# loldu_dtype
LOLDU_FLOAT32 = 1
LOLDU_FLOAT64 = 2
LOLDU_BFLOAT16 = 3
LOLDU_FLOAT16 = 4

# loldu_z_init
LOLDU_INIT_LU = 0
LOLDU_INIT_CONSTANT = 1
LOLDU_INIT_UNIFORM = 2
LOLDU_INIT_NORMAL = 3
LOLDU_INIT_S_UNIFORM = 4
LOLDU_INIT_S_NORMAL = 5
LOLDU_INIT_ONES = 6
LOLDU_INIT_ZEROS = 7

# loldu_residual
LOLDU_RESIDUAL_PIVOTS = 0
LOLDU_RESIDUAL_INIT = 1

# loldu_path
LOLDU_PATH_AUTO = 0
LOLDU_PATH_FACTORED = 1
LOLDU_PATH_MERGED = 2
LOLDU_PATH_MERGED_WGRAD = 3

# loldu_factor
LOLDU_FACTOR_LOWER = 0
LOLDU_FACTOR_DIAG = 1
LOLDU_FACTOR_UPPER = 2
LOLDU_FACTOR_WEIGHT = 3
LOLDU_FACTOR_BIAS = 4
LOLDU_FACTOR_RESIDUAL = 5

# loldu_optimizer_kind
LOLDU_SGD = 0
LOLDU_ADAM = 1
LOLDU_ADAMW = 2

# loldu_schedule
LOLDU_SCHEDULE_CONSTANT = 0
LOLDU_SCHEDULE_LINEAR = 1
LOLDU_SCHEDULE_COSINE = 2

# loldu_lora_kind
LOLDU_LORA_LINEAR = 0
LOLDU_LORA_EMBEDDING = 1
LOLDU_LORA_CONV = 2

# loldu_backend
LOLDU_BACKEND_OPENBLAS = 1
LOLDU_BACKEND_ONEDNN = 2
LOLDU_BACKEND_WIDENED = 3


# ---------------------------------------------------------------------------------------------
# Types
# ---------------------------------------------------------------------------------------------

# Opaque handles. The library answers NULL and stale handles with a status.
loldu_adapter_p = c_void_p
loldu_optimizer_p = c_void_p
loldu_checkpoint_p = c_void_p
# Enumerations are C ints.
loldu_status = c_int
loldu_dtype = c_int
loldu_factor = c_int
loldu_path = c_int
loldu_optimizer_kind = c_int
loldu_backend = c_int


class loldu_config(Structure):
    _fields_ = [
        ("struct_size", c_uint32),
        ("z_init", c_int32),
        ("rank", c_int64),
        ("alpha", c_double),
        ("seed", c_uint64),
        ("residual", c_int32),
        ("train_sigma", c_int32),
        ("borrow_weight", c_int32),
    ]


class loldu_adapter_info(Structure):
    _fields_ = [
        ("dtype", c_int32),
        ("param_dtype", c_int32),
        ("backend", c_int32),
        ("z_init", c_int32),
        ("m", c_int64),
        ("n", c_int64),
        ("rank", c_int64),
        ("factor_rank", c_int64),
        ("num_trainable", c_int64),
        ("degenerate_pivots", c_int64),
        ("alpha", c_double),
        ("sigma", c_double),
        ("seed", c_uint64),
        ("residual", c_int32),
        ("path", c_int32),
        ("has_bias", c_int32),
        ("train_sigma", c_int32),
        ("borrow_weight", c_int32),
        ("enabled", c_int32),
        ("merged", c_int32),
        ("bytes_weight", c_int64),
        ("bytes_factors", c_int64),
        ("bytes_state", c_int64),
        ("bytes_merged", c_int64),
        ("bytes_scratch", c_int64),
        ("init_change", c_double),
    ]


class loldu_optimizer_config(Structure):
    _fields_ = [
        ("struct_size", c_uint32),
        ("kind", c_int32),
        ("lr", c_double),
        ("lr_sigma", c_double),
        ("weight_decay", c_double),
        ("weight_decay_sigma", c_double),
        ("momentum", c_double),
        ("dampening", c_double),
        ("nesterov", c_int32),
        ("schedule", c_int32),
        ("beta1", c_double),
        ("beta2", c_double),
        ("eps", c_double),
        ("max_grad_norm", c_double),
        ("warmup_steps", c_int64),
        ("total_steps", c_int64),
    ]


class loldu_lora_layer(Structure):
    _fields_ = [
        ("kind", c_int32),
        ("kernel_dims", c_int32),
        ("kernel", c_int64 * 3),
    ]


class loldu_lora_options(Structure):
    _fields_ = [
        ("struct_size", c_uint32),
        ("dtype", c_int32),
        ("base_model_name_or_path", c_char_p),
        ("layers", POINTER(loldu_lora_layer)),
        ("replace", c_int32),
    ]


# typedef int (*loldu_progress_fn)(void *user, uint64_t done, uint64_t total, const char *tensor);
loldu_progress_fn = ctypes.CFUNCTYPE(c_int, c_void_p, c_uint64, c_uint64, c_char_p)


class loldu_merge_options(Structure):
    _fields_ = [
        ("struct_size", c_uint32),
        ("dtype", c_int32),
        ("progress", loldu_progress_fn),
        ("user", c_void_p),
    ]


def _declare(name: str, restype, argtypes: list):
    function = getattr(lib, name)
    function.restype = restype
    function.argtypes = argtypes
    return function


# ---------------------------------------------------------------------------------------------
# Version
# ---------------------------------------------------------------------------------------------

# LOLDU_API unsigned loldu_version_number(void);
loldu_version_number = _declare("loldu_version_number", c_uint, [])

# LOLDU_API const char *loldu_version_string(void);
loldu_version_string = _declare("loldu_version_string", c_char_p, [])

# ---------------------------------------------------------------------------------------------
# Status codes and errors
# ---------------------------------------------------------------------------------------------

# LOLDU_API const char *loldu_status_string(int status);
loldu_status_string = _declare("loldu_status_string", c_char_p, [c_int])

# LOLDU_API const char *loldu_last_error(void);
loldu_last_error = _declare("loldu_last_error", c_char_p, [])

# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------

# LOLDU_API loldu_status loldu_config_default(loldu_config *config);
loldu_config_default = _declare("loldu_config_default", loldu_status, [POINTER(loldu_config)])

# ---------------------------------------------------------------------------------------------
# Adapters
# ---------------------------------------------------------------------------------------------

# LOLDU_API loldu_status loldu_adapter_create(loldu_adapter **out, loldu_dtype dtype, int64_t m, int64_t n,
#                                             const void *weight, const void *bias,
#                                             const loldu_config *config);
loldu_adapter_create = _declare(
    "loldu_adapter_create",
    loldu_status,
    [POINTER(loldu_adapter_p), loldu_dtype, c_int64, c_int64, c_void_p, c_void_p, POINTER(loldu_config)],
)

# LOLDU_API loldu_status loldu_adapter_clone(loldu_adapter **out, const loldu_adapter *src);
loldu_adapter_clone = _declare("loldu_adapter_clone", loldu_status, [POINTER(loldu_adapter_p), loldu_adapter_p])

# LOLDU_API loldu_status loldu_adapter_derive(loldu_adapter **out, const loldu_adapter *base,
#                                             const loldu_config *config);
loldu_adapter_derive = _declare(
    "loldu_adapter_derive", loldu_status, [POINTER(loldu_adapter_p), loldu_adapter_p, POINTER(loldu_config)]
)

# LOLDU_API loldu_status loldu_adapter_convert(loldu_adapter **out, const loldu_adapter *src, loldu_dtype dtype);
loldu_adapter_convert = _declare(
    "loldu_adapter_convert", loldu_status, [POINTER(loldu_adapter_p), loldu_adapter_p, loldu_dtype]
)

# LOLDU_API void loldu_adapter_free(loldu_adapter *adapter);
loldu_adapter_free = _declare("loldu_adapter_free", None, [loldu_adapter_p])

# LOLDU_API loldu_status loldu_adapter_get_info(const loldu_adapter *adapter, loldu_adapter_info *info,
#                                               size_t info_size);
loldu_adapter_get_info = _declare(
    "loldu_adapter_get_info", loldu_status, [loldu_adapter_p, POINTER(loldu_adapter_info), c_size_t]
)

# ---------------------------------------------------------------------------------------------
# Trainable parameters and gradients
# ---------------------------------------------------------------------------------------------

# LOLDU_API loldu_status loldu_get_z(const loldu_adapter *adapter, void *z);
loldu_get_z = _declare("loldu_get_z", loldu_status, [loldu_adapter_p, c_void_p])

# LOLDU_API loldu_status loldu_set_z(loldu_adapter *adapter, const void *z);
loldu_set_z = _declare("loldu_set_z", loldu_status, [loldu_adapter_p, c_void_p])

# LOLDU_API loldu_status loldu_get_sigma(const loldu_adapter *adapter, double *sigma);
loldu_get_sigma = _declare("loldu_get_sigma", loldu_status, [loldu_adapter_p, POINTER(c_double)])

# LOLDU_API loldu_status loldu_set_sigma(loldu_adapter *adapter, double sigma);
loldu_set_sigma = _declare("loldu_set_sigma", loldu_status, [loldu_adapter_p, c_double])

# LOLDU_API loldu_status loldu_params(loldu_adapter *adapter, void **params, void **grads);
loldu_params = _declare("loldu_params", loldu_status, [loldu_adapter_p, POINTER(c_void_p), POINTER(c_void_p)])

# LOLDU_API loldu_status loldu_bias_grad(loldu_adapter *adapter, void **db);
loldu_bias_grad = _declare("loldu_bias_grad", loldu_status, [loldu_adapter_p, POINTER(c_void_p)])

# LOLDU_API loldu_status loldu_zero_grad(loldu_adapter *adapter);
loldu_zero_grad = _declare("loldu_zero_grad", loldu_status, [loldu_adapter_p])

# ---------------------------------------------------------------------------------------------
# Frozen factors
# ---------------------------------------------------------------------------------------------

# LOLDU_API loldu_status loldu_get_factor(const loldu_adapter *adapter, loldu_factor which, void *out);
loldu_get_factor = _declare("loldu_get_factor", loldu_status, [loldu_adapter_p, loldu_factor, c_void_p])

# LOLDU_API loldu_status loldu_get_pivots(const loldu_adapter *adapter, int32_t *ipiv);
loldu_get_pivots = _declare("loldu_get_pivots", loldu_status, [loldu_adapter_p, POINTER(c_int32)])

# LOLDU_API loldu_status loldu_get_coefficients(const loldu_adapter *adapter, void *c);
loldu_get_coefficients = _declare("loldu_get_coefficients", loldu_status, [loldu_adapter_p, c_void_p])

# ---------------------------------------------------------------------------------------------
# Forward and backward
# ---------------------------------------------------------------------------------------------

# LOLDU_API loldu_status loldu_forward(loldu_adapter *adapter, int64_t batch, const void *x, void *y, void *h);
loldu_forward = _declare("loldu_forward", loldu_status, [loldu_adapter_p, c_int64, c_void_p, c_void_p, c_void_p])

# LOLDU_API loldu_status loldu_forward_bias(loldu_adapter *adapter, int64_t batch, const void *x, const void *bias,
#                                           void *y, void *h);
loldu_forward_bias = _declare(
    "loldu_forward_bias", loldu_status, [loldu_adapter_p, c_int64, c_void_p, c_void_p, c_void_p, c_void_p]
)

# LOLDU_API loldu_status loldu_backward(loldu_adapter *adapter, int64_t batch, const void *x, const void *dy,
#                                       void *dx, const void *h);
loldu_backward = _declare(
    "loldu_backward", loldu_status, [loldu_adapter_p, c_int64, c_void_p, c_void_p, c_void_p, c_void_p]
)

# LOLDU_API loldu_status loldu_backward_into(loldu_adapter *adapter, int64_t batch, const void *x, const void *dy,
#                                            void *dx, const void *h, void *grads);
loldu_backward_into = _declare(
    "loldu_backward_into", loldu_status, [loldu_adapter_p, c_int64, c_void_p, c_void_p, c_void_p, c_void_p, c_void_p]
)

# LOLDU_API loldu_status loldu_effective_weight(loldu_adapter *adapter, void *w);
loldu_effective_weight = _declare("loldu_effective_weight", loldu_status, [loldu_adapter_p, c_void_p])

# LOLDU_API loldu_status loldu_weight_backward(loldu_adapter *adapter, const void *dw);
loldu_weight_backward = _declare("loldu_weight_backward", loldu_status, [loldu_adapter_p, c_void_p])

# LOLDU_API loldu_status loldu_weight_backward_into(loldu_adapter *adapter, const void *dw, void *grads);
loldu_weight_backward_into = _declare("loldu_weight_backward_into", loldu_status, [loldu_adapter_p, c_void_p, c_void_p])

# ---------------------------------------------------------------------------------------------
# Many adapters in one batch
# ---------------------------------------------------------------------------------------------

# LOLDU_API loldu_status loldu_grouped_forward(loldu_adapter *const *adapters, size_t count, int64_t batch,
#                                              const int32_t *rows, const void *x, void *y);
loldu_grouped_forward = _declare(
    "loldu_grouped_forward",
    loldu_status,
    [POINTER(loldu_adapter_p), c_size_t, c_int64, POINTER(c_int32), c_void_p, c_void_p],
)

# LOLDU_API loldu_status loldu_grouped_forward_bias(loldu_adapter *const *adapters, size_t count, int64_t batch,
#                                                   const int32_t *rows, const void *x, const void *bias, void *y);
loldu_grouped_forward_bias = _declare(
    "loldu_grouped_forward_bias",
    loldu_status,
    [POINTER(loldu_adapter_p), c_size_t, c_int64, POINTER(c_int32), c_void_p, c_void_p, c_void_p],
)

# LOLDU_API loldu_status loldu_grouped_backward(loldu_adapter *const *adapters, size_t count, int64_t batch,
#                                               const int32_t *rows, const void *x, const void *dy, void *dx);
loldu_grouped_backward = _declare(
    "loldu_grouped_backward",
    loldu_status,
    [POINTER(loldu_adapter_p), c_size_t, c_int64, POINTER(c_int32), c_void_p, c_void_p, c_void_p],
)

# LOLDU_API loldu_status loldu_grouped_backward_into(loldu_adapter *const *adapters, size_t count, int64_t batch,
#                                                    const int32_t *rows, const void *x, const void *dy, void *dx,
#                                                    void *const *grads);
loldu_grouped_backward_into = _declare(
    "loldu_grouped_backward_into",
    loldu_status,
    [POINTER(loldu_adapter_p), c_size_t, c_int64, POINTER(c_int32), c_void_p, c_void_p, c_void_p, POINTER(c_void_p)],
)

# ---------------------------------------------------------------------------------------------
# Merge, enable, compute path
# ---------------------------------------------------------------------------------------------

# LOLDU_API loldu_status loldu_merge(loldu_adapter *adapter);
loldu_merge = _declare("loldu_merge", loldu_status, [loldu_adapter_p])

# LOLDU_API loldu_status loldu_unmerge(loldu_adapter *adapter);
loldu_unmerge = _declare("loldu_unmerge", loldu_status, [loldu_adapter_p])

# LOLDU_API loldu_status loldu_set_enabled(loldu_adapter *adapter, int enabled);
loldu_set_enabled = _declare("loldu_set_enabled", loldu_status, [loldu_adapter_p, c_int])

# LOLDU_API loldu_status loldu_set_path(loldu_adapter *adapter, loldu_path path);
loldu_set_path = _declare("loldu_set_path", loldu_status, [loldu_adapter_p, loldu_path])

# LOLDU_API loldu_status loldu_plan(const loldu_adapter *adapter, int64_t batch, int keeps_h, loldu_path *path);
loldu_plan = _declare("loldu_plan", loldu_status, [loldu_adapter_p, c_int64, c_int, POINTER(loldu_path)])

# ---------------------------------------------------------------------------------------------
# Optimisers
# ---------------------------------------------------------------------------------------------

# LOLDU_API loldu_status loldu_optimizer_config_default(loldu_optimizer_config *config, loldu_optimizer_kind kind);
loldu_optimizer_config_default = _declare(
    "loldu_optimizer_config_default", loldu_status, [POINTER(loldu_optimizer_config), loldu_optimizer_kind]
)

# LOLDU_API loldu_status loldu_optimizer_create(loldu_optimizer **out, const loldu_optimizer_config *config,
#                                               loldu_adapter *const *adapters, size_t count);
loldu_optimizer_create = _declare(
    "loldu_optimizer_create",
    loldu_status,
    [POINTER(loldu_optimizer_p), POINTER(loldu_optimizer_config), POINTER(loldu_adapter_p), c_size_t],
)

# LOLDU_API void loldu_optimizer_free(loldu_optimizer *optimizer);
loldu_optimizer_free = _declare("loldu_optimizer_free", None, [loldu_optimizer_p])

# LOLDU_API loldu_status loldu_optimizer_step(loldu_optimizer *optimizer, double *grad_norm);
loldu_optimizer_step = _declare("loldu_optimizer_step", loldu_status, [loldu_optimizer_p, POINTER(c_double)])

# LOLDU_API loldu_status loldu_optimizer_zero_grad(loldu_optimizer *optimizer);
loldu_optimizer_zero_grad = _declare("loldu_optimizer_zero_grad", loldu_status, [loldu_optimizer_p])

# LOLDU_API loldu_status loldu_optimizer_get_lr(const loldu_optimizer *optimizer, double *lr, double *lr_sigma);
loldu_optimizer_get_lr = _declare(
    "loldu_optimizer_get_lr", loldu_status, [loldu_optimizer_p, POINTER(c_double), POINTER(c_double)]
)

# LOLDU_API loldu_status loldu_optimizer_get_step(const loldu_optimizer *optimizer, int64_t *steps);
loldu_optimizer_get_step = _declare("loldu_optimizer_get_step", loldu_status, [loldu_optimizer_p, POINTER(c_int64)])

# LOLDU_API loldu_status loldu_optimizer_save(const loldu_optimizer *optimizer, const char *path);
loldu_optimizer_save = _declare("loldu_optimizer_save", loldu_status, [loldu_optimizer_p, c_char_p])

# LOLDU_API loldu_status loldu_optimizer_load(loldu_optimizer *optimizer, const char *path);
loldu_optimizer_load = _declare("loldu_optimizer_load", loldu_status, [loldu_optimizer_p, c_char_p])

# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------

# LOLDU_API loldu_status loldu_checkpoint_save(const char *dir, loldu_adapter *const *adapters,
#                                              const char *const *names, size_t count);
loldu_checkpoint_save = _declare(
    "loldu_checkpoint_save", loldu_status, [c_char_p, POINTER(loldu_adapter_p), POINTER(c_char_p), c_size_t]
)

# LOLDU_API loldu_status loldu_checkpoint_open(loldu_checkpoint **out, const char *dir);
loldu_checkpoint_open = _declare("loldu_checkpoint_open", loldu_status, [POINTER(loldu_checkpoint_p), c_char_p])

# LOLDU_API void loldu_checkpoint_free(loldu_checkpoint *checkpoint);
loldu_checkpoint_free = _declare("loldu_checkpoint_free", None, [loldu_checkpoint_p])

# LOLDU_API loldu_status loldu_checkpoint_count(const loldu_checkpoint *checkpoint, size_t *count);
loldu_checkpoint_count = _declare("loldu_checkpoint_count", loldu_status, [loldu_checkpoint_p, POINTER(c_size_t)])

# LOLDU_API loldu_status loldu_checkpoint_name(const loldu_checkpoint *checkpoint, size_t index, const char **name);
loldu_checkpoint_name = _declare(
    "loldu_checkpoint_name", loldu_status, [loldu_checkpoint_p, c_size_t, POINTER(c_char_p)]
)

# LOLDU_API loldu_status loldu_checkpoint_layer(const loldu_checkpoint *checkpoint, const char *name,
#                                               loldu_dtype *dtype, int64_t *m, int64_t *n, loldu_config *config);
loldu_checkpoint_layer = _declare(
    "loldu_checkpoint_layer",
    loldu_status,
    [loldu_checkpoint_p, c_char_p, POINTER(loldu_dtype), POINTER(c_int64), POINTER(c_int64), POINTER(loldu_config)],
)

# LOLDU_API loldu_status loldu_checkpoint_apply(const loldu_checkpoint *checkpoint, const char *name,
#                                               loldu_adapter *adapter);
loldu_checkpoint_apply = _declare(
    "loldu_checkpoint_apply", loldu_status, [loldu_checkpoint_p, c_char_p, loldu_adapter_p]
)

# LOLDU_API loldu_status loldu_checkpoint_values(const loldu_checkpoint *checkpoint, const char *name, double *z,
#                                                double *sigma, char *weight_fingerprint, char *pivots_fingerprint);
loldu_checkpoint_values = _declare(
    "loldu_checkpoint_values",
    loldu_status,
    [loldu_checkpoint_p, c_char_p, POINTER(c_double), POINTER(c_double), c_char_p, c_char_p],
)

# LOLDU_API loldu_status loldu_checkpoint_create(loldu_adapter **out, const loldu_checkpoint *checkpoint,
#                                                const char *name, const char *base_dir);
loldu_checkpoint_create = _declare(
    "loldu_checkpoint_create", loldu_status, [POINTER(loldu_adapter_p), loldu_checkpoint_p, c_char_p, c_char_p]
)

# LOLDU_API loldu_status loldu_export_merged(const char *path, loldu_adapter *const *adapters,
#                                            const char *const *names, size_t count);
loldu_export_merged = _declare(
    "loldu_export_merged", loldu_status, [c_char_p, POINTER(loldu_adapter_p), POINTER(c_char_p), c_size_t]
)

# ---------------------------------------------------------------------------------------------
# Leaving the library: adapters as a standard LoRA, and merged model files
# ---------------------------------------------------------------------------------------------

# LOLDU_API loldu_status loldu_lora_options_default(loldu_lora_options *options);
loldu_lora_options_default = _declare("loldu_lora_options_default", loldu_status, [POINTER(loldu_lora_options)])

# LOLDU_API loldu_status loldu_export_lora(const char *dir, loldu_adapter *const *adapters, const char *const *names,
#                                          size_t count, const loldu_lora_options *options);
loldu_export_lora = _declare(
    "loldu_export_lora",
    loldu_status,
    [c_char_p, POINTER(loldu_adapter_p), POINTER(c_char_p), c_size_t, POINTER(loldu_lora_options)],
)

# LOLDU_API loldu_status loldu_merge_options_default(loldu_merge_options *options);
loldu_merge_options_default = _declare("loldu_merge_options_default", loldu_status, [POINTER(loldu_merge_options)])

# LOLDU_API loldu_status loldu_merge_model(const char *out_dir, const char *base_dir, const loldu_checkpoint *checkpoint,
#                                          const loldu_merge_options *options);
loldu_merge_model = _declare(
    "loldu_merge_model", loldu_status, [c_char_p, c_char_p, loldu_checkpoint_p, POINTER(loldu_merge_options)]
)

# ---------------------------------------------------------------------------------------------
# Threads
# ---------------------------------------------------------------------------------------------

# LOLDU_API loldu_status loldu_set_num_threads(int threads);
loldu_set_num_threads = _declare("loldu_set_num_threads", loldu_status, [c_int])

# LOLDU_API int loldu_get_num_threads(void);
loldu_get_num_threads = _declare("loldu_get_num_threads", c_int, [])

# ---------------------------------------------------------------------------------------------
# GEMM libraries
# ---------------------------------------------------------------------------------------------

# LOLDU_API loldu_status loldu_gemm_backend(loldu_dtype dtype, loldu_backend *backend, const char **description);
loldu_gemm_backend = _declare(
    "loldu_gemm_backend", loldu_status, [loldu_dtype, POINTER(loldu_backend), POINTER(c_char_p)]
)

# LOLDU_API loldu_status loldu_set_widened_half(int widened);
loldu_set_widened_half = _declare("loldu_set_widened_half", loldu_status, [c_int])


# ---------------------------------------------------------------------------------------------
# Version check at import
# ---------------------------------------------------------------------------------------------

def _check_version() -> None:
    number = int(loldu_version_number())
    text = (loldu_version_string() or b"").decode("utf-8", "replace")
    if number // 100 != LOLDU_VERSION_NUMBER // 100:
        raise ImportError(
            f"{library_path} is libloldu {text} (version number {number}); this binding needs "
            f"{LOLDU_VERSION_MAJOR}.{LOLDU_VERSION_MINOR}.x (header {HEADER_VERSION}). "
            "Rebuild the library with `make build`, or point LOLDU_LIBRARY to a matching one."
        )
    if not re.fullmatch(r"\d+\.\d+\.\d+", text) or _header_number(text) != number:
        raise ImportError(f"{library_path} reports an inconsistent version: {text!r} vs {number}")


_check_version()
