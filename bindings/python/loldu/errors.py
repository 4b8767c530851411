"""Exceptions: one ``LoLDUError`` subclass per ``loldu_status`` code.

Each carries ``status`` (the C code, e.g. ``LOLDU_ERR_SHAPE = 3``), ``status_name`` and the
library's message (``loldu_last_error()``, which names the argument and what was expected).
They also derive from the matching built-in exception, so ``except ValueError`` catches a bad
shape as it would for numpy or torch:

=====================  ==========================  ==================
status                 exception                   also a
=====================  ==========================  ==================
INVALID_ARGUMENT (1)   ``InvalidArgumentError``    ``ValueError``
NULL_POINTER (2)       ``NullPointerError``        ``ValueError``
SHAPE (3)              ``ShapeError``              ``ValueError``
NOT_FINITE (4)         ``NotFiniteError``          ``ValueError``
DTYPE (5)              ``DTypeError``              ``TypeError``
STATE (6)              ``StateError``              ``RuntimeError``
OUT_OF_MEMORY (7)      ``OutOfMemoryError``        ``MemoryError``
INVALID_HANDLE (8)     ``InvalidHandleError``      ``RuntimeError``
IO (9)                 ``LoLDUIOError``            ``OSError``
FORMAT (10)            ``FormatError``             ``ValueError``
MISMATCH (11)          ``MismatchError``           ``ValueError``
INTERNAL (12)          ``InternalError``           ``RuntimeError``
CANCELLED (13)         ``CancelledError``          ``RuntimeError``
=====================  ==========================  ==================

The binding raises the same classes for the mistakes it catches before calling the library
(an int32 array is a ``DTypeError``, a non-contiguous one a ``ShapeError``...), with the
status the library would have returned. ``DeviceError`` (an ``InvalidArgumentError``) is for
tensors that are not on the CPU.
"""

from __future__ import annotations

from . import _capi


class LoLDUError(Exception):
    """An error reported by libloldu (or caught by the binding before calling it)."""

    status: int = -1

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        if status is not None:
            self.status = status
        self.message = message

    @property
    def status_name(self) -> str:
        return _STATUS_NAMES.get(self.status, "unknown status")

    def __str__(self) -> str:
        return self.message

    def __reduce__(self):  # picklable across processes (DDP workers, multiprocessing)
        return (type(self), (self.message, self.status))


class InvalidArgumentError(LoLDUError, ValueError):
    status = _capi.LOLDU_ERR_INVALID_ARGUMENT


class NullPointerError(LoLDUError, ValueError):
    status = _capi.LOLDU_ERR_NULL_POINTER


class ShapeError(LoLDUError, ValueError):
    status = _capi.LOLDU_ERR_SHAPE


class NotFiniteError(LoLDUError, ValueError):
    status = _capi.LOLDU_ERR_NOT_FINITE


class DTypeError(LoLDUError, TypeError):
    status = _capi.LOLDU_ERR_DTYPE


class StateError(LoLDUError, RuntimeError):
    status = _capi.LOLDU_ERR_STATE


class OutOfMemoryError(LoLDUError, MemoryError):
    status = _capi.LOLDU_ERR_OUT_OF_MEMORY


class InvalidHandleError(LoLDUError, RuntimeError):
    status = _capi.LOLDU_ERR_INVALID_HANDLE


class LoLDUIOError(LoLDUError, OSError):
    status = _capi.LOLDU_ERR_IO


class FormatError(LoLDUError, ValueError):
    status = _capi.LOLDU_ERR_FORMAT


class MismatchError(LoLDUError, ValueError):
    status = _capi.LOLDU_ERR_MISMATCH


class InternalError(LoLDUError, RuntimeError):
    status = _capi.LOLDU_ERR_INTERNAL


class CancelledError(LoLDUError, RuntimeError):
    status = _capi.LOLDU_ERR_CANCELLED


class LoLDUWarning(UserWarning):
    """A configuration that works but is probably not what was meant (e.g. an initial z that
    replaces the pretrained weight)."""


class DeviceError(InvalidArgumentError):
    """A tensor that is not on the CPU: the library computes on the CPU only."""


_BY_STATUS: dict[int, type[LoLDUError]] = {
    cls.status: cls
    for cls in (
        InvalidArgumentError,
        NullPointerError,
        ShapeError,
        NotFiniteError,
        DTypeError,
        StateError,
        OutOfMemoryError,
        InvalidHandleError,
        LoLDUIOError,
        FormatError,
        MismatchError,
        InternalError,
        CancelledError,
    )
}

_STATUS_NAMES = {
    code: name[len("LOLDU_"):]
    for name, code in vars(_capi).items()
    if name.startswith("LOLDU_ERR_") or name == "LOLDU_OK"
}


def error_class(status: int) -> type[LoLDUError]:
    """The exception class for a status code (``LoLDUError`` for unknown codes)."""
    return _BY_STATUS.get(status, LoLDUError)


def error_from_status(status: int, message: str | None = None) -> LoLDUError:
    """Builds the exception for a failed call; reads ``loldu_last_error()`` unless given."""
    if message is None:
        message = (_capi.loldu_last_error() or b"").decode("utf-8", "replace")
    if not message:
        message = (_capi.loldu_status_string(status) or b"unknown status").decode("utf-8", "replace")
    return error_class(status)(message, status)


def check(status: int) -> None:
    """Raises the exception for ``status`` unless it is ``LOLDU_OK``. Call it right after the
    failing call, on the same thread: ``loldu_last_error()`` is per thread."""
    if status != _capi.LOLDU_OK:
        raise error_from_status(status)
