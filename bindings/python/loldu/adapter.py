"""The numpy layer: ``AdapterConfig`` and ``Adapter``, one LoLDU-adapted linear layer.

For a pretrained weight ``W`` (``m × n``, as ``torch.nn.Linear``: ``m = out_features``) the
adapter computes ``y = x W_effᵀ + b`` with ``W_eff = W_res + σ · P L_r diag(z) U_r``, and trains
the ``r`` entries of ``z`` (and ``σ`` when ``train_sigma``)::

    import numpy as np, loldu
    with loldu.Adapter(weight, bias, rank=16) as a:      # weight: float32 (m, n), C order
        y = a.forward(x)                                  # x: (..., n) -> y: (..., m)
        dx = a.backward(x, dy)                            # accumulates a.grad_z, a.grad_sigma
        a.z -= 0.1 * a.grad_z                             # a.z is a live view, no copy
        a.zero_grad()

Buffers must be C-contiguous numpy arrays of the adapter's dtype; the binding never copies
them silently, it raises ``DTypeError`` / ``ShapeError`` with what to do instead.
"""

from __future__ import annotations

import ctypes
import dataclasses
import warnings

import numpy as np

from . import _capi
from ._arrays import BFLOAT16, NUMPY_DTYPES, check_array, integer, library_dtype, real, row_indices, unmasked, view
from .errors import InvalidArgumentError, InvalidHandleError, LoLDUWarning, ShapeError, StateError, check

# Above this ‖W_eff − W‖ / ‖W‖ at creation, the initial z has replaced much of the pretrained
# weight: warn, with the fix.
INIT_CHANGE_WARNING = 0.1


def init_change_advice(adapter: "Adapter") -> str | None:
    """``None`` if the adapter's initial z moved the pretrained weight by at most
    ``INIT_CHANGE_WARNING``; else why, and only the fixes that bring the change under it:
    residual='init' and z_init='lu' (the change is then 0), and alpha=1 where it suffices (the
    change is proportional to σ₀ = alpha / rank: z₀ does not depend on alpha)."""
    info = adapter._raw_info()
    change = info.init_change
    if change <= INIT_CHANGE_WARNING:
        return None
    at_one = change / info.alpha
    fixes = ["residual='init' (the layer starts unchanged whatever the init)"]
    if info.alpha != 1 and at_one <= INIT_CHANGE_WARNING:
        fixes.append(f"alpha=1 (σ = 1/rank, as the paper's code: {100 * at_one:.1f}% here)")
    fixes.append("z_init='lu' (the default)")
    note = "" if info.alpha == 1 or at_one <= INIT_CHANGE_WARNING else \
        f" (alpha=1 would still move it by {100 * at_one:.1f}%)"
    return (f"z_init={Z_INITS[info.z_init]!r} with residual={RESIDUALS[info.residual]!r} and alpha={info.alpha:g} "
            f"moves the pretrained weight by {100 * change:.1f}% (‖W_eff − W‖/‖W‖) before any training, "
            f"replacing much of the pretrained layer. Use {', '.join(fixes[:-1])} or {fixes[-1]}{note}.")


def _warn_init_change(adapter: "Adapter", stacklevel: int = 3) -> None:
    if (advice := init_change_advice(adapter)) is not None:
        warnings.warn(advice, LoLDUWarning, stacklevel=stacklevel)

def _names(prefix: str, rename=None) -> tuple[str, ...]:
    """The names of a C enum from its ``_capi`` constants (values 0, 1, ... in order), lower-cased
    after ``prefix``: one table, written once, in the raw layer."""
    members = sorted((value, name) for name, value in vars(_capi).items() if name.startswith(prefix))
    if [value for value, _ in members] != list(range(len(members))):
        raise ImportError(f"{prefix}* constants are not 0..n-1")  # pragma: no cover
    names = tuple(name[len(prefix):].lower() for _, name in members)
    return tuple((rename or {}).get(n, n) for n in names)


Z_INITS = _names("LOLDU_INIT_")
RESIDUALS = _names("LOLDU_RESIDUAL_")
PATHS = _names("LOLDU_PATH_")
FACTORS = _names("LOLDU_FACTOR_")
BACKENDS = {value: name[len("LOLDU_BACKEND_"):].lower() for name, value in vars(_capi).items()
            if name.startswith("LOLDU_BACKEND_")}


def _choice(value: str, choices: tuple, what: str) -> int:
    if isinstance(value, str) and value in choices:
        return choices.index(value)
    raise InvalidArgumentError(
        f"{what} must be one of {', '.join(repr(c) for c in choices)}, got {value!r}",
        _capi.LOLDU_ERR_INVALID_ARGUMENT,
    )


@dataclasses.dataclass
class AdapterConfig:
    """Everything that decides an adapter besides its weight (``loldu_config``).

    rank:          r, in [1, min(m, n)], or "full" (the default): min(m, n) (for ``derive``: the
                   shared factors' rank).
    alpha:         σ = alpha / rank; 0 (the default) means alpha = rank, i.e. σ = 1.
    z_init:        'lu' (z = D_r, the paper's default), 'constant', 'uniform', 'normal',
                   's_uniform', 's_normal', 'ones', 'zeros'.
    residual:      'pivots' (W_res removes σ₀ P L_r diag(D_r) U_r, the paper) or 'init' (removes
                   the initial update: the output is unchanged at initialisation for any z_init).
    seed:          for the random inits; the same seed gives the same z on any machine.
    train_sigma:   train σ too (r + 1 parameters, as the paper counts).
    borrow_weight: the library keeps a pointer to the caller's weight instead of a copy; the
                   binding keeps the array alive, the caller must not change it.
    """

    rank: int | str = "full"
    alpha: float = 0.0
    z_init: str = "lu"
    residual: str = "pivots"
    seed: int = 0
    train_sigma: bool = True
    borrow_weight: bool = False

    @staticmethod
    def of(config, fields: dict) -> "AdapterConfig":
        """``config`` (default: ``AdapterConfig()``) with ``fields`` replaced; ``InvalidArgumentError``
        for a config of another kind or a field this class lacks (say, a misspelt option)."""
        if config is None:
            config = AdapterConfig()
        elif not isinstance(config, AdapterConfig):
            raise InvalidArgumentError(f"config must be a loldu.AdapterConfig or None, got {type(config).__name__}",
                                       _capi.LOLDU_ERR_INVALID_ARGUMENT)
        known = [field.name for field in dataclasses.fields(AdapterConfig)]
        unknown = [name for name in fields if name not in known]
        if unknown:
            raise InvalidArgumentError(f"unknown adapter option(s) {unknown}; the options are {known}",
                                       _capi.LOLDU_ERR_INVALID_ARGUMENT)
        return dataclasses.replace(config, **fields)

    def to_c(self) -> _capi.loldu_config:
        """The ``loldu_config`` struct (from ``loldu_config_default``, then these fields)."""
        c = _capi.loldu_config()
        check(_capi.loldu_config_default(ctypes.byref(c)))
        c.z_init = _choice(self.z_init, Z_INITS, "z_init")
        c.residual = _choice(self.residual, RESIDUALS, "residual")
        if self.rank == "full":
            c.rank = 0
        elif isinstance(self.rank, bool) or not isinstance(self.rank, (int, np.integer)):
            raise InvalidArgumentError(f"rank must be an int or 'full', got {self.rank!r}", _capi.LOLDU_ERR_INVALID_ARGUMENT)
        elif not 1 <= int(self.rank) < 2**63:
            raise InvalidArgumentError(f"rank must be >= 1 or 'full', got {self.rank}", _capi.LOLDU_ERR_INVALID_ARGUMENT)
        else:
            c.rank = int(self.rank)
        if self.alpha is not None and (isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float, np.integer, np.floating))):
            raise InvalidArgumentError(f"alpha must be a number or None, got {self.alpha!r}", _capi.LOLDU_ERR_INVALID_ARGUMENT)
        c.alpha = float(self.alpha if self.alpha is not None else 0.0)
        c.seed = integer(self.seed, "seed", ctypes.c_uint64)
        for name in ("train_sigma", "borrow_weight"):
            value = getattr(self, name)
            if not isinstance(value, (bool, np.bool_, int, np.integer)) or value not in (0, 1):
                raise InvalidArgumentError(f"{name} must be True or False, got {value!r}", _capi.LOLDU_ERR_INVALID_ARGUMENT)
            setattr(c, name, int(value))
        return c

    @classmethod
    def from_c(cls, c) -> "AdapterConfig":
        return cls(
            rank=int(c.rank),
            alpha=float(c.alpha),
            z_init=Z_INITS[c.z_init] if 0 <= c.z_init < len(Z_INITS) else str(c.z_init),
            residual=RESIDUALS[c.residual] if 0 <= c.residual < len(RESIDUALS) else str(c.residual),
            seed=int(c.seed),
            train_sigma=bool(c.train_sigma),
            borrow_weight=bool(c.borrow_weight),
        )


class _Handle:
    """Owns one C handle and frees it exactly once: at ``free()``, or when the last reference
    goes (the ``Adapter`` and every numpy view or torch parameter over its memory hold one).
    ``keep`` holds buffers the library borrows (the weight, with ``borrow_weight``)."""

    __slots__ = ("value", "keep", "_free", "__weakref__")

    def __init__(self, value: int, free, keep=None):
        self.value = value
        self.keep = keep
        self._free = free

    def free(self) -> None:
        value, self.value = self.value, None
        if value:
            self._free(value)
        self.keep = None

    def __del__(self):
        # Safe at interpreter shutdown: _free is the ctypes function bound at creation.
        try:
            self.free()
        except Exception:
            pass


class _HandleOwner:
    """``handle``, ``close()`` and ``with`` for an object that owns one ``_Handle`` (the
    optimiser, the checkpoint); ``_what`` names it in the closed-handle and pickling errors."""

    _what = "object"
    _instead = ""  # (what to do instead, for the pickling error)
    _handle: _Handle | None = None

    @property
    def handle(self) -> int:
        if self._handle is None:
            raise InvalidHandleError(f"the {self._what} is closed", _capi.LOLDU_ERR_INVALID_HANDLE)
        return self._handle.value

    def close(self) -> None:
        """Frees the handle (idempotent)."""
        handle, self._handle = self._handle, None
        if handle is not None:
            handle.free()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __reduce_ex__(self, protocol):
        raise TypeError(f"a loldu {self._what} holds library memory and cannot be pickled or copied{self._instead}")


class Adapter:
    """One LoLDU adapter over a pretrained weight (the numpy API over ``loldu_adapter``).

    ``Adapter(weight, bias=None, config=None, **fields)``: ``weight`` is a C-contiguous array of
    shape ``(m, n)`` with finite values, of float32, float64, float16 or bfloat16
    (``ml_dtypes.bfloat16``): the adapter's element type, of every activation passed to it;
    ``bias`` ``None`` or ``(m,)`` of the same dtype; ``fields`` override ``config`` (see
    ``AdapterConfig``). Factors ``W`` (an LU of the ``m × r`` panel), copies it unless
    ``borrow_weight`` and copies the bias.

    ``z``, ``params``, ``grad`` (and ``grad_z``, ``bias_grad``) are numpy views of the library's
    memory, in ``param_dtype`` (float32 for float32 and half-precision adapters, float64 for
    float64): writing to ``z`` changes the adapter (not while merged). A view keeps that memory
    valid even after ``close()``; the handle itself is freed once, at ``close()``, at the end of a
    ``with`` block, or when the adapter and all its views are gone.
    """

    def __init__(self, weight, bias=None, config: AdapterConfig | None = None, **fields):
        config = AdapterConfig.of(config, fields)
        if not isinstance(weight, np.ndarray):
            check_array(weight, "weight", np.dtype(np.float32))
        dtype_code = library_dtype(weight.dtype, "weight")
        dtype = NUMPY_DTYPES[dtype_code]
        if weight.ndim != 2:
            raise ShapeError(
                f"weight must be 2-D (out_features m, in_features n), got shape {weight.shape}; "
                "reshape a convolution's weight to (out, in/groups * kh * kw)",
                _capi.LOLDU_ERR_SHAPE,
            )
        m, n = weight.shape
        w_ptr = check_array(weight, "weight", dtype, (m, n))
        b_ptr = None if bias is None else check_array(bias, "bias", dtype, (m,))
        c = config.to_c()
        out = _capi.loldu_adapter_p()
        check(_capi.loldu_adapter_create(ctypes.byref(out), dtype_code, m, n, w_ptr, b_ptr, ctypes.byref(c)))
        self._adopt(out.value, keep=weight if config.borrow_weight else None)
        _warn_init_change(self)

    @classmethod
    def from_pointers(cls, dtype_code: int, m: int, n: int, weight: int, bias: int | None,
                      config: AdapterConfig, keep=None) -> "Adapter":
        """An adapter over raw buffers (a framework's tensors): ``weight`` and ``bias`` are
        addresses of C-contiguous, aligned ``(m, n)`` and ``(m,)`` buffers of ``dtype_code``;
        ``keep`` is held for as long as the adapter lives (the weight, when borrowed)."""
        out = _capi.loldu_adapter_p()
        check(_capi.loldu_adapter_create(ctypes.byref(out), dtype_code, m, n, weight, bias, ctypes.byref(config.to_c())))
        return cls._from_handle(out.value, keep=keep if config.borrow_weight else None)

    @classmethod
    def _from_handle(cls, value: int, keep=None) -> "Adapter":
        self = cls.__new__(cls)
        self._adopt(value, keep)
        return self

    def _adopt(self, value: int, keep) -> None:
        self._handle = _Handle(value, _capi.loldu_adapter_free, keep)
        info = self._raw_info()
        self._dtype_code, self._param_code = int(info.dtype), int(info.param_dtype)
        self.dtype = NUMPY_DTYPES[self._dtype_code]
        self.param_dtype = NUMPY_DTYPES[self._param_code]
        self.m, self.n, self.rank = int(info.m), int(info.n), int(info.rank)
        params = ctypes.c_void_p()
        check(_capi.loldu_params(value, ctypes.byref(params), None))
        self._params_ptr = params.value
        # (enabled, merged), kept by the setters below, the only calls that change them: what the
        # torch layers read and the autograd Functions compare between forward and backward,
        # without a library call.
        self._state = (bool(info.enabled), bool(info.merged))
        # The library allocates gradients on first use: a served adapter never holds them.
        self._grads_ptr = self._bias_grad_ptr = None
        self._reference_values = None  # (_reference)

    def _gradient_pointers(self) -> tuple[int, int | None]:
        if self._grads_ptr is None:
            grads, db = ctypes.c_void_p(), ctypes.c_void_p()
            check(_capi.loldu_params(self.handle, None, ctypes.byref(grads)))
            check(_capi.loldu_bias_grad(self.handle, ctypes.byref(db)))
            self._grads_ptr, self._bias_grad_ptr = grads.value, db.value
        return self._grads_ptr, self._bias_grad_ptr

    # -- handle --------------------------------------------------------------------------------

    @property
    def handle(self) -> int:
        """The raw ``loldu_adapter *`` (for ``loldu._capi`` calls); ``InvalidHandleError`` once
        closed."""
        handle = self._handle
        if handle is None or handle.value is None:
            raise InvalidHandleError("the adapter is closed", _capi.LOLDU_ERR_INVALID_HANDLE)
        return handle.value

    @property
    def closed(self) -> bool:
        return self._handle is None

    def close(self) -> None:
        """Releases the adapter. The C handle is freed now, or, if numpy views or torch
        parameters over its memory still exist, when the last of them goes. Idempotent."""
        handle, self._handle = getattr(self, "_handle", None), None
        if handle is not None:
            del handle  # frees now unless a view still holds it

    # -- copy and pickle --------------------------------------------------------------------------

    def __copy__(self) -> "Adapter":
        """``clone()``, enabled or disabled as this adapter (unmerged only): the factors are
        immutable and shared, the state copied."""
        if self.merged:
            raise StateError("the adapter is merged; unmerge() it before copying", _capi.LOLDU_ERR_STATE)
        copy = self.clone()
        copy.enabled = self.enabled
        return copy

    def __deepcopy__(self, memo) -> "Adapter":
        return self.__copy__()

    def __reduce_ex__(self, protocol):
        raise TypeError("a loldu.Adapter holds library memory and cannot be pickled: save it with "
                        "loldu.save(directory, {name: adapter}) and load it with loldu.load in the other "
                        "process (copy.copy and copy.deepcopy give a clone())")

    def __enter__(self) -> "Adapter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        if self.closed:
            return "<loldu.Adapter closed>"
        return (
            f"<loldu.Adapter {self.m}×{self.n} rank={self.rank} {self.dtype} "
            f"sigma={self.sigma:g}{' merged' if self.merged else ''}{'' if self.enabled else ' disabled'}>"
        )

    # -- description ---------------------------------------------------------------------------

    def _raw_info(self) -> _capi.loldu_adapter_info:
        info = _capi.loldu_adapter_info()
        check(_capi.loldu_adapter_get_info(self.handle, ctypes.byref(info), ctypes.sizeof(info)))
        return info

    @property
    def info(self) -> dict:
        """``loldu_adapter_get_info`` as a dict (shape, config, state, memory in bytes)."""
        info = self._raw_info()
        d = {name: getattr(info, name) for name, _ in info._fields_}
        d["dtype"] = str(NUMPY_DTYPES[info.dtype])
        d["param_dtype"] = str(NUMPY_DTYPES[info.param_dtype])
        d["backend"] = BACKENDS[info.backend]
        d["z_init"] = Z_INITS[info.z_init]
        d["residual"] = RESIDUALS[info.residual]
        d["path"] = PATHS[info.path]
        for flag in ("has_bias", "train_sigma", "borrow_weight", "enabled", "merged"):
            d[flag] = bool(d[flag])
        return d

    @property
    def config(self) -> AdapterConfig:
        i = self._raw_info()
        return AdapterConfig(
            rank=int(i.rank),
            alpha=float(i.alpha),
            z_init=Z_INITS[i.z_init],
            residual=RESIDUALS[i.residual],
            seed=int(i.seed),
            train_sigma=bool(i.train_sigma),
            borrow_weight=bool(i.borrow_weight),
        )

    @property
    def shape(self) -> tuple[int, int]:
        return (self.m, self.n)

    @property
    def num_trainable(self) -> int:
        return int(self._raw_info().num_trainable)

    @property
    def has_bias(self) -> bool:
        return bool(self._raw_info().has_bias)

    @property
    def train_sigma(self) -> bool:
        return bool(self._raw_info().train_sigma)

    # -- state ---------------------------------------------------------------------------------

    @property
    def enabled(self) -> bool:
        return bool(self._raw_info().enabled)

    @enabled.setter
    def enabled(self, on: bool) -> None:
        check(_capi.loldu_set_enabled(self.handle, 1 if on else 0))
        self._state = (bool(on), self._state[1])

    @property
    def merged(self) -> bool:
        return bool(self._raw_info().merged)

    def merge(self) -> None:
        """Bakes the current update into a merged weight that every call uses until
        ``unmerge()``; z and σ cannot change meanwhile (``StateError``)."""
        check(_capi.loldu_merge(self.handle))
        self._state = (self._state[0], True)

    def unmerge(self) -> None:
        check(_capi.loldu_unmerge(self.handle))
        self._state = (self._state[0], False)

    @property
    def path(self) -> str:
        """The compute path: 'auto' (by FLOP count), 'factored', 'merged' or 'merged_wgrad'."""
        return PATHS[self._raw_info().path]

    @path.setter
    def path(self, name: str) -> None:
        check(_capi.loldu_set_path(self.handle, _choice(name, PATHS, "path")))

    def plan(self, batch: int, keeps_h: bool = False) -> str:
        """The path 'auto' takes for a training step on ``batch`` rows (``loldu_plan``)."""
        path = _capi.loldu_path()
        check(_capi.loldu_plan(self.handle, integer(batch, "batch"), 1 if keeps_h else 0, ctypes.byref(path)))
        return PATHS[path.value]

    # -- parameters and gradients --------------------------------------------------------------

    def _view(self, address: int, count: int, *, writable: bool = True) -> np.ndarray:
        owner = self._handle
        if owner is None:
            raise InvalidHandleError("the adapter is closed", _capi.LOLDU_ERR_INVALID_HANDLE)
        return view(address, count, self._param_code, owner, writable=writable)

    @property
    def params(self) -> np.ndarray:
        """Live view of the ``rank + 1`` trainable values: ``z[0..r-1]``, then σ; read-only while
        merged (as ``z``: a merged adapter computes with the values it merged)."""
        return self._view(self._params_ptr, self.rank + 1, writable=not self.merged)

    @property
    def grad(self) -> np.ndarray:
        """Live view of the ``rank + 1`` accumulated gradients: ``dz``, then ``dσ``."""
        return self._view(self._gradient_pointers()[0], self.rank + 1)

    @property
    def z(self) -> np.ndarray:
        """Live (zero-copy) view of z (``rank`` values); read-only while merged."""
        return self._view(self._params_ptr, self.rank, writable=not self.merged)

    @z.setter
    def z(self, values) -> None:
        self.set_z(values)

    def set_z(self, values) -> None:
        """Sets z from ``rank`` finite real values (``loldu_set_z``, which checks them)."""
        values = self._z_values(values)
        check(_capi.loldu_set_z(self.handle, check_array(values, "z", self.param_dtype, (self.rank,))))

    def set_values(self, z, sigma: float) -> None:
        """Sets z and σ as one pair: each finite in the parameter type, and every σ·z_k − σ₀·z_ref,k
        (``loldu_set_sigma``'s rule, applied to the new z). Setting them one after the other would
        check the new z with the old σ, or the old z with the new σ, and may refuse a valid pair.
        On refusal the adapter keeps its values."""
        if self.merged:
            raise StateError("z and σ cannot be set while the adapter is merged; unmerge first", _capi.LOLDU_ERR_STATE)
        values = self._z_values(z)
        check_array(values, "z", self.param_dtype, (self.rank,))
        params = self.params
        before = params.copy()
        params[:-1] = values
        try:
            self.sigma = sigma
        except BaseException:
            params[:] = before
            raise

    def _z_values(self, values) -> np.ndarray:
        """``values`` as a contiguous array of the parameter type (a finite value beyond its range
        becomes ±inf, for the library to refuse)."""
        given = np.asarray(unmasked(values, "z"))
        if given.dtype.kind not in "fiu" and given.dtype != BFLOAT16:  # (a cast would drop imaginary parts, parse strings, read bools)
            raise InvalidArgumentError(f"z must hold real numbers, got dtype {given.dtype}", _capi.LOLDU_ERR_INVALID_ARGUMENT)
        with np.errstate(over="ignore"):
            return np.ascontiguousarray(given, dtype=self.param_dtype)

    def get_z(self) -> np.ndarray:
        """A copy of z."""
        out = np.empty(self.rank, self.param_dtype)
        check(_capi.loldu_get_z(self.handle, out.ctypes.data))
        return out

    def coefficients(self) -> np.ndarray:
        """``c = σ z − σ₀ z_ref`` (``rank`` values, a copy): the adapter's whole update of the
        weight is ``A diag(c) U_r`` (``loldu_get_coefficients``)."""
        out = np.empty(self.rank, self.param_dtype)
        check(_capi.loldu_get_coefficients(self.handle, out.ctypes.data))
        return out

    def _reference(self) -> np.ndarray:
        """``σ₀ z_ref``, the part of ``c`` that does not move with z and σ (read once; not to be
        written): the coefficients of a clone whose z is zero, negated."""
        if self._reference_values is None:
            with self.clone() as probe:
                probe.set_z(np.zeros(self.rank, self.param_dtype))
                self._reference_values = -probe.coefficients()
        return self._reference_values

    @property
    def sigma(self) -> float:
        value = ctypes.c_double()
        check(_capi.loldu_get_sigma(self.handle, ctypes.byref(value)))
        return value.value

    @sigma.setter
    def sigma(self, value: float) -> None:
        check(_capi.loldu_set_sigma(self.handle, real(value, "sigma")))

    @property
    def grad_z(self) -> np.ndarray:
        """Live view of dz (``rank`` values)."""
        return self._view(self._gradient_pointers()[0], self.rank)

    @property
    def grad_sigma(self) -> float:
        return float(self._view(self._gradient_pointers()[0], self.rank + 1)[self.rank])

    @property
    def bias_grad(self) -> np.ndarray | None:
        """Live view of the accumulated bias gradient (``m`` values), ``None`` without bias."""
        db = self._gradient_pointers()[1]
        return None if not db else self._view(db, self.m)

    def zero_grad(self) -> None:
        """Sets dz, dσ and db to zero."""
        check(_capi.loldu_zero_grad(self.handle))

    # -- compute -------------------------------------------------------------------------------

    def _rows(self, x, what: str, width: int) -> tuple[int, int]:
        ptr = check_array(x, what, self.dtype, min_ndim=1, last_dim=width)
        return ptr, int(np.prod(x.shape[:-1], dtype=np.int64))

    def forward(self, x: np.ndarray, out: np.ndarray | None = None, h: np.ndarray | None = None,
                *, bias: np.ndarray | None = None) -> np.ndarray:
        """``y = x W_effᵀ + b`` for ``x`` of shape ``(..., n)``; returns ``y`` of shape ``(..., m)``
        (written into ``out`` if given). ``h`` (``(B, rank)``, B the number of rows) receives
        ``x U_rᵀ`` for ``backward`` to reuse; worth it only when ``plan(B, True) == 'factored'``.
        ``bias`` (``m`` values of the adapter's dtype): the layer's bias for this call, for an
        adapter created without one (``loldu_forward_bias``)."""
        x_ptr, batch = self._rows(x, "x", self.n)
        if out is None:
            out = np.empty(x.shape[:-1] + (self.m,), self.dtype)
        y_ptr = check_array(out, "out", self.dtype, x.shape[:-1] + (self.m,), writable=True)
        h_ptr = None if h is None else check_array(h, "h", self.param_dtype, (batch, self.rank), writable=True)
        b_ptr = None if bias is None else check_array(bias, "bias", self.dtype, (self.m,))
        check(_capi.loldu_forward_bias(self.handle, batch, x_ptr, b_ptr, y_ptr, h_ptr))
        return out

    __call__ = forward

    def backward(
        self,
        x: np.ndarray,
        dy: np.ndarray,
        dx: np.ndarray | None = None,
        h: np.ndarray | None = None,
        *,
        need_dx: bool = True,
    ) -> np.ndarray | None:
        """Backward of ``forward(x)`` for the upstream gradient ``dy`` (``(..., m)``).
        Accumulates dz, dσ (``grad``) and db (``bias_grad``); returns ``dX = dY W_eff`` (written
        into ``dx`` if given), or ``None`` when ``need_dx`` is false. ``h``: what ``forward``
        wrote for this ``x``, or ``None`` to recompute it."""
        x_ptr, batch = self._rows(x, "x", self.n)
        dy_ptr = check_array(dy, "dy", self.dtype, x.shape[:-1] + (self.m,))
        if dx is None and need_dx:
            dx = np.empty(x.shape, self.dtype)
        dx_ptr = None if dx is None else check_array(dx, "dx", self.dtype, x.shape, writable=True)
        h_ptr = None if h is None else check_array(h, "h", self.param_dtype, (batch, self.rank))
        check(_capi.loldu_backward(self.handle, batch, x_ptr, dy_ptr, dx_ptr, h_ptr))
        return dx

    def effective_weight(self, out: np.ndarray | None = None) -> np.ndarray:
        """The weight the layer computes with, ``(m, n)``: W_eff; W while disabled; the merged
        weight while merged."""
        if out is None:
            out = np.empty((self.m, self.n), self.dtype)
        check(_capi.loldu_effective_weight(self.handle, check_array(out, "out", self.dtype, (self.m, self.n), writable=True)))
        return out

    def weight_backward(self, dw: np.ndarray) -> None:
        """Maps a gradient with respect to W_eff (``(m, n)``) to dz and dσ (accumulated)."""
        check(_capi.loldu_weight_backward(self.handle, check_array(dw, "dw", self.dtype, (self.m, self.n))))

    # -- frozen factors ------------------------------------------------------------------------

    def factor(self, which: str, out: np.ndarray | None = None) -> np.ndarray:
        """A frozen quantity: 'lower' (A = P L_r, (m, r)), 'diag' (D_r, (r,)), 'upper' (U_r,
        (r, n)), 'residual' (W_res, (m, n)) in ``param_dtype``; 'weight' (W, (m, n)) and 'bias'
        ((m,)) in ``dtype``."""
        code = _choice(which, FACTORS, "which")
        m, n, r = self.m, self.n, self.rank
        shape = {"lower": (m, r), "diag": (r,), "upper": (r, n), "weight": (m, n), "bias": (m,), "residual": (m, n)}[which]
        dtype = self.dtype if which in ("weight", "bias") else self.param_dtype
        if out is None:
            out = np.empty(shape, dtype)
        check(_capi.loldu_get_factor(self.handle, code, check_array(out, "out", dtype, shape, writable=True)))
        return out

    def pivots(self) -> np.ndarray:
        """The first ``rank`` pivots as LAPACK's getrf reports them (1-based, int32)."""
        out = np.empty(self.rank, np.int32)
        check(_capi.loldu_get_pivots(self.handle, out.ctypes.data_as(ctypes.POINTER(ctypes.c_int32))))
        return out

    def clone(self) -> "Adapter":
        """A second adapter sharing the frozen factors, with a copy of z and σ, zero gradients,
        enabled and unmerged (``loldu_adapter_clone``)."""
        out = _capi.loldu_adapter_p()
        check(_capi.loldu_adapter_clone(ctypes.byref(out), self.handle))
        return Adapter._from_handle(out.value, keep=self._handle.keep)

    def derive(self, config: AdapterConfig | None = None, **fields) -> "Adapter":
        """A new adapter on these frozen factors with its own configuration (``rank`` at most
        this adapter's ``factor_rank``), in O(rank): no factorisation, no copy of the weight
        (``loldu_adapter_derive``). ``fields`` override ``config`` (default: this adapter's; at
        another ``rank``, alpha keeps its meaning: the default, alpha = rank, stays the default,
        σ = 1, rather than becoming this adapter's rank)."""
        if config is None:
            config = self.config
            if "rank" in fields and "alpha" not in fields and config.alpha == config.rank:
                config = dataclasses.replace(config, alpha=0.0)
        derived = self._derive(AdapterConfig.of(config, fields))
        _warn_init_change(derived)
        return derived

    def _derive(self, config: AdapterConfig) -> "Adapter":
        out = _capi.loldu_adapter_p()
        check(_capi.loldu_adapter_derive(ctypes.byref(out), self.handle, ctypes.byref(config.to_c())))
        return Adapter._from_handle(out.value, keep=self._handle.keep)

    def convert(self, dtype) -> "Adapter":
        """This adapter over its weight rounded to ``dtype`` (a numpy dtype: float32, float16,
        ``ml_dtypes.bfloat16``): the same factorisation, z and σ (``loldu_adapter_convert``)."""
        out = _capi.loldu_adapter_p()
        check(_capi.loldu_adapter_convert(ctypes.byref(out), self.handle, library_dtype(dtype, "dtype")))
        return Adapter._from_handle(out.value)

    @property
    def factor_rank(self) -> int:
        """The rank of the shared factors: the largest rank ``derive`` accepts."""
        return int(self._raw_info().factor_rank)


def _group(adapters, rows, x, what: str):
    """The C arguments of a grouped call: the adapter array, the row indices, x's pointer and
    its number of rows."""
    try:
        adapters = list(adapters)
    except TypeError:
        adapters = []
    if not adapters or not all(isinstance(a, Adapter) for a in adapters):
        raise InvalidArgumentError(f"{what}: adapters must be a non-empty sequence of loldu.Adapter",
                                   _capi.LOLDU_ERR_INVALID_ARGUMENT)
    base = adapters[0]
    x_ptr, batch = base._rows(x, "x", base.n)
    rows = row_indices(rows, len(adapters), batch, what)
    handles = (_capi.loldu_adapter_p * len(adapters))(*[a.handle for a in adapters])
    return base, handles, len(adapters), rows, x_ptr, batch


def grouped_forward(adapters, rows, x: np.ndarray, out: np.ndarray | None = None, *,
                    bias: np.ndarray | None = None) -> np.ndarray:
    """``y`` for a batch whose row ``b`` belongs to ``adapters[rows[b]]`` (``-1``: the pretrained
    layer), at one adapter's cost (``loldu_grouped_forward``). The adapters must share one base's
    factors (``derive``, ``clone``); ``x`` is ``(..., n)``, ``rows`` holds one index per row.
    ``bias``: the layer's bias for this call, for factors created without one (as ``forward``)."""
    base, handles, count, rows, x_ptr, batch = _group(adapters, rows, x, "grouped_forward")
    if out is None:
        out = np.empty(x.shape[:-1] + (base.m,), base.dtype)
    y_ptr = check_array(out, "out", base.dtype, x.shape[:-1] + (base.m,), writable=True)
    b_ptr = None if bias is None else check_array(bias, "bias", base.dtype, (base.m,))
    check(_capi.loldu_grouped_forward_bias(handles, count, batch, rows.ctypes.data_as(ctypes.POINTER(ctypes.c_int32)),
                                           x_ptr, b_ptr, y_ptr))
    return out


def grouped_backward(adapters, rows, x: np.ndarray, dy: np.ndarray, dx: np.ndarray | None = None, *,
                     need_dx: bool = True) -> np.ndarray | None:
    """Backward of ``grouped_forward``: returns ``dX`` and accumulates each adapter's dz, dσ and db
    from its own rows only (``loldu_grouped_backward``)."""
    base, handles, count, rows, x_ptr, batch = _group(adapters, rows, x, "grouped_backward")
    dy_ptr = check_array(dy, "dy", base.dtype, x.shape[:-1] + (base.m,))
    if dx is None and need_dx:
        dx = np.empty(x.shape, base.dtype)
    dx_ptr = None if dx is None else check_array(dx, "dx", base.dtype, x.shape, writable=True)
    check(_capi.loldu_grouped_backward(handles, count, batch, rows.ctypes.data_as(ctypes.POINTER(ctypes.c_int32)),
                                       x_ptr, dy_ptr, dx_ptr))
    return dx
