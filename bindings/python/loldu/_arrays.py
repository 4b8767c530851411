"""Checks of the arguments handed to the library (numpy buffers, integers, strings), and
zero-copy views of library memory. Internal."""

from __future__ import annotations

import ctypes
import operator
import os

import numpy as np

from . import _capi
from .errors import DTypeError, InvalidArgumentError, ShapeError

import ml_dtypes  # numpy's bfloat16, as JAX and TensorFlow use it (a dependency of the package)

BFLOAT16 = np.dtype(ml_dtypes.bfloat16)

# The element types: loldu_dtype code -> numpy dtype.
NUMPY_DTYPES = {
    _capi.LOLDU_FLOAT32: np.dtype(np.float32),
    _capi.LOLDU_FLOAT64: np.dtype(np.float64),
    _capi.LOLDU_FLOAT16: np.dtype(np.float16),
    _capi.LOLDU_BFLOAT16: BFLOAT16,
}
LIBRARY_DTYPES = {dtype: code for code, dtype in NUMPY_DTYPES.items()}
# The parameter types (z, σ, gradients, h, factors) and their ctypes, for zero-copy views.
CTYPES = {_capi.LOLDU_FLOAT32: ctypes.c_float, _capi.LOLDU_FLOAT64: ctypes.c_double}


def numpy_name(dtype) -> str:
    """How a numpy user spells ``dtype`` (bfloat16 comes from ml_dtypes)."""
    return "ml_dtypes.bfloat16" if np.dtype(dtype) == BFLOAT16 else f"np.{np.dtype(dtype)}"


def integer(value, what: str, ctype=ctypes.c_int64) -> int:
    """``value`` as a Python int that ``ctype`` holds exactly, or ``InvalidArgumentError``:
    ctypes would silently wrap it (2**32 passed as an int would reach the library as 0)."""
    try:
        number = operator.index(value)
    except TypeError:
        raise InvalidArgumentError(f"{what} must be an integer, got {value!r}", _capi.LOLDU_ERR_INVALID_ARGUMENT) from None
    bits = 8 * ctypes.sizeof(ctype)
    low, high = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if ctype(-1).value == -1 else (0, (1 << bits) - 1)
    if not low <= number <= high:
        raise InvalidArgumentError(f"{what} = {number} is outside [{low}, {high}]", _capi.LOLDU_ERR_INVALID_ARGUMENT)
    return number


def real(value, what: str) -> float:
    """``value`` as a Python float, or ``InvalidArgumentError`` naming ``what`` (a string, None, a
    sequence: ``float()`` would raise a bare error, or parse a string)."""
    if not isinstance(value, (str, bytes)):
        try:
            return float(value)
        except (TypeError, ValueError):
            pass
    raise InvalidArgumentError(f"{what} must be a number, got {value!r}", _capi.LOLDU_ERR_INVALID_ARGUMENT)


def c_string(value, what: str, *, path: bool = False) -> bytes:
    """``value`` as the NUL-terminated string the library reads: a ``str`` in UTF-8 or, for a
    ``path``, anything ``os.fsencode`` takes. ``InvalidArgumentError`` naming ``what`` for other
    types, text UTF-8 cannot hold (a lone surrogate) and a NUL inside, which would end the string
    early: a layer name or a path silently cut short."""
    try:
        data = os.fsencode(value) if path else value.encode("utf-8")
    except (TypeError, AttributeError, UnicodeError):
        raise InvalidArgumentError(f"{what} must be {'a path' if path else 'a str'} that UTF-8 encodes, got {value!r}",
                                   _capi.LOLDU_ERR_INVALID_ARGUMENT) from None
    if b"\0" in data:
        raise InvalidArgumentError(f"{what} contains a NUL character, which would end it early: {value!r}",
                                   _capi.LOLDU_ERR_INVALID_ARGUMENT)
    return data


def unmasked(a, what: str):
    """``a``, unless it is a numpy masked array with masked elements: the library reads every
    element, so a mask would be ignored silently."""
    if np.ma.isMaskedArray(a) and np.ma.getmask(a) is not np.ma.nomask and np.ma.getmask(a).any():
        raise InvalidArgumentError(
            f"{what} is a masked array with masked elements, which libloldu would read as their "
            f"underlying values; pass {what}.filled(value) to choose them, or np.asarray({what}) to keep them",
            _capi.LOLDU_ERR_INVALID_ARGUMENT,
        )
    return a


def row_indices(rows, count: int, batch: int, what: str) -> np.ndarray:
    """A grouped call's row → adapter indices (one per row of the batch) as int32, refusing what
    a cast would change: values that are not integers, and values outside [-1, count) that
    int32 cannot hold (the library names the others)."""
    given = unmasked(rows, "rows")
    rows = np.asarray(rows)
    if rows.shape != (batch,):
        raise ShapeError(f"{what}: rows must hold one adapter index per row of x ({batch}), got shape {rows.shape}",
                         _capi.LOLDU_ERR_SHAPE)
    if rows.size == 0:
        return np.zeros(0, np.int32)
    if rows.dtype.kind == "f" and not hasattr(given, "__array__"):
        rows = np.asarray(given, dtype=object)  # Python ints numpy made floats (2**63), or floats: checked below
    low, high = int(np.iinfo(np.int32).min), int(np.iinfo(np.int32).max)
    if rows.dtype == object:  # Python ints beyond int64, or other objects
        try:
            values = [operator.index(v) for v in rows]
        except TypeError:
            raise DTypeError(f"{what}: rows must be integers", _capi.LOLDU_ERR_DTYPE) from None
        bad = [i for i, v in enumerate(values) if not low <= v <= high]
    elif rows.dtype.kind in "iu":
        bad = np.flatnonzero((rows < low) | (rows > high)) if rows.dtype.itemsize >= 4 else ()
        values = rows
    else:
        raise DTypeError(f"{what}: rows must be integers, got {rows.dtype}", _capi.LOLDU_ERR_DTYPE)
    if len(bad):
        i = int(bad[0])
        raise InvalidArgumentError(f"{what}: rows[{i}] = {int(values[i])} is not in [-1, {count})",
                                   _capi.LOLDU_ERR_INVALID_ARGUMENT)
    return np.ascontiguousarray(values, dtype=np.int32)


def library_dtype(dtype, what: str) -> int:
    """The ``loldu_dtype`` of a numpy dtype, or ``DTypeError`` (also for None, which numpy would
    read as float64, and for what is not a dtype)."""
    try:
        if dtype is None:
            raise TypeError
        dtype = np.dtype(dtype)
    except TypeError:
        raise DTypeError(f"{what} = {dtype!r} is not a dtype; libloldu takes float32, float64, float16 or "
                         "bfloat16 (ml_dtypes.bfloat16)", _capi.LOLDU_ERR_DTYPE) from None
    code = LIBRARY_DTYPES.get(dtype)
    if code is None:
        raise DTypeError(
            f"{what} has dtype {dtype}; libloldu takes float32, float64, float16 or bfloat16 "
            f"(ml_dtypes.bfloat16): convert it first, e.g. {what}.astype(np.float32)",
            _capi.LOLDU_ERR_DTYPE,
        )
    return code


def check_array(
    a,
    what: str,
    dtype: np.dtype,
    shape: tuple | None = None,
    *,
    writable: bool = False,
    min_ndim: int | None = None,
    last_dim: int | None = None,
) -> int:
    """Checks that ``a`` is a C-contiguous, aligned numpy array of ``dtype`` (and ``shape``, or
    at least ``min_ndim`` dimensions with the last one ``last_dim``) and returns its address.
    Raises ``DTypeError`` or ``ShapeError`` saying what to do."""
    if not isinstance(a, np.ndarray):
        raise DTypeError(
            f"{what} must be a numpy.ndarray of {dtype}, got {type(a).__name__}; "
            f"use np.ascontiguousarray({what}, dtype={numpy_name(dtype)})",
            _capi.LOLDU_ERR_DTYPE,
        )
    unmasked(a, what)
    if a.dtype != dtype:
        raise DTypeError(
            f"{what} has dtype {a.dtype}, expected {dtype}; convert it with {what}.astype({numpy_name(dtype)})",
            _capi.LOLDU_ERR_DTYPE,
        )
    if shape is not None and a.shape != tuple(shape):
        raise ShapeError(f"{what} has shape {a.shape}, expected {tuple(shape)}", _capi.LOLDU_ERR_SHAPE)
    if min_ndim is not None and (a.ndim < min_ndim or (last_dim is not None and a.shape[-1] != last_dim)):
        raise ShapeError(
            f"{what} has shape {a.shape}, expected (..., {last_dim}) with at least {min_ndim} dimension(s)",
            _capi.LOLDU_ERR_SHAPE,
        )
    if not a.flags.c_contiguous:
        raise ShapeError(
            f"{what} must be C-contiguous (row-major) for libloldu, got strides {a.strides}; "
            f"pass np.ascontiguousarray({what})",
            _capi.LOLDU_ERR_SHAPE,
        )
    if not a.flags.aligned:
        raise ShapeError(f"{what} is not aligned for {dtype}; pass a copy ({what}.copy())", _capi.LOLDU_ERR_SHAPE)
    if writable and not a.flags.writeable:
        raise ShapeError(f"{what} is read-only; pass a writable array", _capi.LOLDU_ERR_SHAPE)
    return a.ctypes.data


def view(address: int, count: int, dtype_code: int, owner, *, writable: bool = True) -> np.ndarray:
    """A numpy array over ``count`` elements of library memory at ``address``. The array keeps
    ``owner`` (the object that frees that memory) alive for as long as it or any view of it
    exists, so it can never point to freed memory."""
    buffer = (CTYPES[dtype_code] * count).from_address(address)
    buffer._loldu_owner = owner
    array = np.frombuffer(buffer, dtype=NUMPY_DTYPES[dtype_code], count=count)
    if not writable:
        array.flags.writeable = False
    return array
