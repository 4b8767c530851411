"""The autograd Functions: one library call per direction.

- ``LinearFunction``: ``y = x W_effᵀ (+ b)`` through one adapter, the module's bias passed to the
  library with the call (``loldu_forward_bias``); backward is one
  ``loldu_backward_into``, which writes this call's dz and dσ straight into the gradient tensor
  autograd receives (no zero_grad, no copy).
- ``SummedLinearFunction``: ``LinearFunction`` for several active adapters at once, through
  an adapter whose coefficients are the sum of theirs.
- ``GroupedLinearFunction``: a batch whose rows belong to different adapters on one base
  (``loldu_grouped_forward`` / ``loldu_grouped_backward_into``, over an ``AdapterGroup``); the
  z and σ of every adapter the rows use are inputs, so each gets the gradient of its own rows.
  Without gradients, ``grouped_linear`` is the one library call.
- ``WeightFunction``: ``W_eff`` itself, for convolutions and embeddings
  (``loldu_effective_weight`` / ``loldu_weight_backward_into``).

The backward passes write gradients into tensors they return and never touch the adapters' own
gradient buffers, which ``loldu.torch.Optimizer`` lends to autograd as ``.grad``.

``z`` and ``sigma`` are passed as inputs so that autograd routes their gradients, and saved so that
an in-place change between forward and backward is caught by autograd's version check. Each
forward records its adapters' enabled / merged state; a backward run after that state changed (a
forward inside ``disable_adapters`` differentiated after the block, a merge in between) computes
with a clone of the adapter in the recorded state (``at_forward``): the gradients of what the
forward computed, as autograd's graph would give them. An adapter closed in between (deleted,
re-created by ``refactor`` or a dtype change) raises ``StateError`` saying so.

Tensors handed to the library go through ``library_input``: contiguous, and with torch's lazy
negation resolved (the library reads memory, not torch's negative bit); saved inputs also back
in the forward's dtype, whatever a ``saved_tensors_hooks`` unpack returns.

Under ``create_graph=True`` the single-adapter backward passes run as torch operations on the
adapter's factors instead (``differentiable_by``), so that autograd differentiates them again:
gradient penalties and Hessian-vector products get every term. A mixed batch refuses.
"""

from __future__ import annotations

import ctypes
import itertools

import numpy as np
import torch

from .. import _capi
from ..errors import ShapeError, StateError, check

# loldu_dtype codes of the torch dtypes the library takes, and back.
LIBRARY_DTYPES = {
    torch.float32: _capi.LOLDU_FLOAT32,
    torch.float64: _capi.LOLDU_FLOAT64,
    torch.bfloat16: _capi.LOLDU_BFLOAT16,
    torch.float16: _capi.LOLDU_FLOAT16,
}
TORCH_DTYPES = {code: dtype for dtype, code in LIBRARY_DTYPES.items()}


def parameter_dtype(adapter) -> torch.dtype:
    """The torch dtype of an adapter's z, σ, gradients and h."""
    return TORCH_DTYPES[adapter._param_code]


def library_input(t: torch.Tensor) -> torch.Tensor:
    """``t`` as the library reads it: contiguous memory holding its values. A lazy negation
    (``torch._neg_view``, the imaginary part of a conjugated complex tensor) is resolved, only
    when there is one. (The conjugate bit exists only on complex tensors, which the layers refuse.)"""
    t = t.contiguous()
    return t.resolve_neg() if t.is_neg() else t


def at_forward(adapter, state: tuple[bool, bool]):
    """The adapter a backward computes with: ``adapter`` if its (enabled, merged) ``state`` is
    still the one its forward recorded, else a clone (same factors, z and σ) put in that state, so
    that the gradients are those of what the forward computed. ``StateError`` if it was closed."""
    if adapter.closed:
        raise StateError(
            "the LoLDU adapter this forward computed with was closed before backward: its layer's adapter was "
            "deleted or re-created (delete_adapter, refactor, a dtype change, unload or merge_and_unload) between "
            "forward and backward. Run backward before changing the model.", _capi.LOLDU_ERR_STATE)
    return adapter if adapter._state == state else clone_in_state(adapter, state)


def clone_in_state(adapter, state: tuple[bool, bool]):
    """A clone of ``adapter`` (same factors, z, σ and path) in the (enabled, merged) ``state``."""
    stand_in = adapter.clone()  # (enabled, unmerged)
    stand_in.path = adapter.path
    if not state[0]:
        stand_in.enabled = False
    if state[1]:
        stand_in.merge()
    return stand_in


def _library_bias(bias, x: torch.Tensor, m: int):
    """The module's bias as the library reads it: ``m`` contiguous values of x's dtype. A bias
    that is one row (``(m,)``, ``(1, m)``, or one value, which ``F.linear`` broadcasts) is
    taken as ``(m,)``; any other shape is a ``ShapeError``."""
    if bias is None:
        return None
    if bias.shape != (m,):
        if bias.numel() not in (1, m) or bias.dim() > 2 or any(d != 1 for d in bias.shape[:-1]):
            raise ShapeError(f"the layer's bias has shape {tuple(bias.shape)}; a LoLDU linear layer adds a bias of "
                             f"shape ({m},), or one that broadcasts as a single row", _capi.LOLDU_ERR_SHAPE)
        bias = bias.reshape(-1).expand(m)
    if bias.dtype != x.dtype or not bias.is_contiguous() or bias.is_neg():
        bias = library_input(bias.to(x.dtype))
    return bias


def differentiable_by(twin):
    """A backward the library computes (first order); under ``create_graph=True`` (grad mode on
    during backward) ``twin`` computes it instead, in torch operations that autograd
    differentiates again (gradient penalties, Hessian-vector products)."""
    def wrap(backward):
        def run(ctx, *grads):
            return twin(ctx, *grads) if torch.is_grad_enabled() else backward(ctx, *grads)
        return run
    return wrap


def _torch_factors(adapter) -> tuple[torch.Tensor, torch.Tensor]:
    """``A = P L_r`` and ``U_r`` as tensors (copies), for the ``create_graph=True`` backward."""
    return torch.from_numpy(adapter.factor("lower")), torch.from_numpy(adapter.factor("upper"))


def _torch_weight(adapter, a, u, z, sigma, dtype: torch.dtype) -> torch.Tensor:
    """``W_eff`` as torch operations on ``z`` and ``σ`` (``W_res + σ A diag(z) U_r``) for an
    enabled, unmerged adapter; else the constant weight it computes with."""
    if adapter.merged or not adapter.enabled:
        return torch.from_numpy(adapter.effective_weight()).to(dtype)
    return (torch.from_numpy(adapter.factor("residual")) + sigma * (a * z) @ u).to(dtype)


def _torch_parameter_grads(a, u, z, sigma, dw: torch.Tensor):
    """dz and dσ of ``dw`` (the gradient of ``W_eff``) as torch operations:
    ``s_k = (Aᵀ dW U_rᵀ)_kk``, ``dz = σ s``, ``dσ = Σ z_k s_k``."""
    s = ((a.mT @ dw.to(a.dtype)) * u).sum(1)
    return sigma * s, (z * s).sum().reshape(1)


def _saved_input(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A saved input as the library reads it, in the forward's dtype, whatever a
    ``saved_tensors_hooks`` unpack returned (another dtype, other strides)."""
    return library_input(x if x.dtype == dtype else x.to(dtype))


def _bias_grad(dy: torch.Tensor, shape):
    """dY summed to the bias's shape: over the rows, or (``shape`` given: a broadcast bias of
    ``_library_bias``'s other shapes) down to it."""
    return dy.sum(0) if shape is None else dy.sum_to_size(shape)


def _bias_shape(bias) -> torch.Size | None:
    """What ``_bias_grad`` needs of a bias: None for none or a plain ``(m,)`` one."""
    return None if bias is None or bias.dim() == 1 and bias.numel() > 1 else bias.shape


def eager_under_compile(forward):
    """``forward`` of a layer whose work happens in the library, which ``torch.compile`` cannot
    see into: under it the layer runs eagerly (a graph break: the rest of the model is
    compiled, and Dynamo never traces or recompiles the layer's own frames); outside it, about
    0.3 µs per call."""
    return torch.compiler.disable(forward)


JIT_REFUSAL = ("loldu.torch layers cannot be traced or scripted by torch.jit (the library's work is invisible to "
               "it); trace or script loldu.torch.merge_and_unload(model) instead")


def refuse_tracing() -> None:
    """``torch.jit.trace`` cannot see into the library: it would record an empty output."""
    if torch._C._is_tracing():  # (torch.jit.is_tracing, without its Python layers)
        raise RuntimeError(JIT_REFUSAL)


def linear(adapter, x: torch.Tensor, bias, h=None) -> torch.Tensor:
    """``x W_effᵀ + bias`` in one library call: the module's bias is added by the library
    (``loldu_forward_bias``, in the GEMM where the backend can), not by a pass over y here."""
    refuse_tracing()
    bias = _library_bias(bias, x, adapter.m)
    y = torch.empty((x.shape[0], adapter.m), dtype=x.dtype)
    check(_capi.loldu_forward_bias(adapter.handle, x.shape[0], x.data_ptr(), None if bias is None else bias.data_ptr(),
                                   y.data_ptr(), None if h is None else h.data_ptr()))
    return y


class LinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, z, sigma, bias, adapter, keep_h: bool):
        h = torch.empty((x.shape[0], adapter.rank), dtype=parameter_dtype(adapter)) if keep_h else None
        y = linear(adapter, x, bias, h)
        ctx.save_for_backward(x, z, sigma)
        ctx.adapter, ctx.state, ctx.h, ctx.bias_shape, ctx.dtype = adapter, adapter._state, h, _bias_shape(bias), x.dtype
        return y

    @staticmethod
    def twin(ctx, dy):
        x, z, sigma = ctx.saved_tensors
        adapter = at_forward(ctx.adapter, ctx.state)
        x, dy = x.to(ctx.dtype), dy.to(ctx.dtype)
        need_x, need_z, need_sigma, need_bias = ctx.needs_input_grad[:4]
        a, u = _torch_factors(adapter)
        dz = dsigma = None
        if need_z or need_sigma:
            dz, dsigma = _torch_parameter_grads(a, u, z, sigma, dy.mT @ x)
        return (dy @ _torch_weight(adapter, a, u, z, sigma, ctx.dtype) if need_x else None, dz if need_z else None,
                dsigma if need_sigma else None, _bias_grad(dy, ctx.bias_shape) if need_bias else None, None, None)

    @staticmethod
    @differentiable_by(twin)
    def backward(ctx, dy):
        x, z, sigma = ctx.saved_tensors
        adapter, h = at_forward(ctx.adapter, ctx.state), ctx.h
        ctx.h = None
        x = _saved_input(x, ctx.dtype)
        need_x, need_z, need_sigma, need_bias = ctx.needs_input_grad[:4]
        if dy.dtype != x.dtype:
            dy = dy.to(x.dtype)
        dy = library_input(dy)
        dx = torch.empty_like(x) if need_x else None
        grads = torch.empty(adapter.rank + 1, dtype=parameter_dtype(adapter))
        check(_capi.loldu_backward_into(adapter.handle, x.shape[0], x.data_ptr(), dy.data_ptr(),
                                        None if dx is None else dx.data_ptr(),
                                        None if h is None else h.data_ptr(), grads.data_ptr()))
        r = adapter.rank
        return (dx, grads[:r] if need_z else None, grads[r:] if need_sigma else None,
                _bias_grad(dy, ctx.bias_shape) if need_bias else None, None, None)


class SummedLinearFunction(LinearFunction):
    """``LinearFunction`` through the adapter a layer keeps for the sum of several active
    adapters, whose z (the sum's ``c``) a later forward may overwrite: the backward computes
    with the ``c`` of its forward, through a clone holding it if that changed. (dX depends on
    ``c``; dz, and ``WeightFunction``'s backward, do not.)"""

    @staticmethod
    def forward(ctx, x, c, sigma, bias, adapter, keep_h: bool):
        ctx.coefficients = c.detach().numpy()  # (c is this call's own; saved_tensors unpack once)
        return LinearFunction.forward(ctx, x, c, sigma, bias, adapter, keep_h)

    @staticmethod
    def backward(ctx, dy):
        adapter = ctx.adapter
        if not adapter.closed and not np.array_equal(adapter.params[:adapter.rank], ctx.coefficients):
            ctx.adapter = clone_in_state(adapter, ctx.state)
            ctx.adapter.set_z(ctx.coefficients)
        return LinearFunction.backward(ctx, dy)


class AdapterGroup:
    """Adapters on one base as the grouped calls take them: every handle in one array, each
    name's place in it, and where each adapter's z and σ live. Place 0 is ``base``, an adapter
    on the same factors that no row uses, from which the library reads the factors: a layer's
    own factors, which outlive any named adapter. A layer keeps the group of its adapters until
    one is added or removed, so that a mixed batch does no per-adapter work in Python beyond the
    adapters its rows use."""

    def __init__(self, base, names: list[str], adapters: list):
        self.names, self.adapters = [None, *names], [base, *adapters]
        self.position = {name: i for i, name in enumerate(names, 1)}
        self.handles = (_capi.loldu_adapter_p * len(self.adapters))(*[a.handle for a in self.adapters])
        self.ranks = np.fromiter((a.rank for a in self.adapters), np.int64, len(self.adapters))
        self.memory = [(a._params_ptr, a._params_ptr + a.rank * a.param_dtype.itemsize) for a in self.adapters]
        self.changes = 0  # (the layer's count of adapter changes it was built at)

    def rows(self, names, repeat: int = 1) -> torch.Tensor:
        """Each sample's place in the group (-1: a name the group lacks, ``"__base__"``), as the
        int32 row map of ``repeat`` rows per sample."""
        index = np.fromiter(map(self.position.get, names, itertools.repeat(-1)), np.int32, len(names))
        return torch.from_numpy(index if repeat == 1 else np.repeat(index, repeat))


def grouped_linear(group: AdapterGroup, x: torch.Tensor, rows: torch.Tensor, bias) -> torch.Tensor:
    """``y`` of a mixed batch (``rows`` index ``group``) in one library call."""
    refuse_tracing()
    y = torch.empty((x.shape[0], group.adapters[0].m), dtype=x.dtype)
    bias = _library_bias(bias, x, y.shape[1])
    check(_capi.loldu_grouped_forward_bias(group.handles, len(group.adapters), x.shape[0],
                                           ctypes.cast(rows.data_ptr(), ctypes.POINTER(ctypes.c_int32)),
                                           x.data_ptr(), None if bias is None else bias.data_ptr(), y.data_ptr()))
    return y


class GroupedLinearFunction(torch.autograd.Function):
    """``forward(ctx, x, rows, bias, group, used, *parameters)``: ``rows`` (int32, one per row of
    ``x``) index ``group``; ``used`` lists the group's adapters the rows use, and ``parameters``
    are their z then σ, in that order."""

    @staticmethod
    def forward(ctx, x, rows, bias, group, used, *parameters):
        ctx.bias_shape, ctx.dtype = _bias_shape(bias), x.dtype
        y = grouped_linear(group, x, rows, bias)
        ctx.save_for_backward(x, rows, *parameters)
        ctx.group, ctx.used = group, used
        ctx.states = [group.adapters[i]._state for i in used]
        return y

    @staticmethod
    def twin(ctx, dy):
        raise RuntimeError("create_graph=True through a mixed batch (adapter_names / mixed_batch) is not supported: "
                           "take second derivatives with one adapter per batch")

    @staticmethod
    @differentiable_by(twin)
    def backward(ctx, dy):
        x, rows, *parameters = ctx.saved_tensors
        x, rows = _saved_input(x, ctx.dtype), library_input(rows.to(torch.int32))
        group, used = ctx.group, ctx.used
        handles = group.handles
        if group.adapters[0]._handle is None:  # the layer's factors were replaced (refactor, dtype change)
            at_forward(group.adapters[0], None)  # (raises: closed)
        changed = [k for k, (i, state) in enumerate(zip(used, ctx.states))
                   if group.adapters[i]._handle is None or group.adapters[i]._state != state]
        if changed:
            handles = type(handles).from_buffer_copy(handles)
            stand_ins = [at_forward(group.adapters[used[k]], ctx.states[k]) for k in changed]  # (clones share the factors)
            for k, stand_in in zip(changed, stand_ins):
                handles[used[k]] = stand_in.handle
        need_x, _, need_bias = ctx.needs_input_grad[:3]
        if dy.dtype != x.dtype:
            dy = dy.to(x.dtype)
        dy = library_input(dy)
        dx = torch.empty_like(x) if need_x else None
        # Every used adapter's dz, dσ in one tensor, split into its z and σ views in one call;
        # one gradient pointer per adapter of the group (NULL: unused).
        ranks = group.ranks[used]
        # (No rows: the library touches no gradient, and they are zeros.)
        storage = (torch.zeros if x.shape[0] == 0 else torch.empty)(int(ranks.sum()) + len(used),
                                                                  dtype=parameter_dtype(group.adapters[0]))
        pointers = np.zeros(len(group.adapters), np.uint64)
        pointers[used] = (np.cumsum(ranks + 1) - (ranks + 1)) * storage.element_size() + storage.data_ptr()
        check(_capi.loldu_grouped_backward_into(handles, len(group.adapters), x.shape[0],
                                                ctypes.cast(rows.data_ptr(), ctypes.POINTER(ctypes.c_int32)),
                                                x.data_ptr(), dy.data_ptr(), None if dx is None else dx.data_ptr(),
                                                ctypes.cast(pointers.ctypes.data, ctypes.POINTER(ctypes.c_void_p))))
        sizes = np.stack([ranks, np.ones_like(ranks)], axis=1).reshape(-1).tolist()
        grads = torch.split(storage, sizes)  # z_0, σ_0, z_1, σ_1, …
        needs = ctx.needs_input_grad[5:]
        if not all(needs):
            grads = [g if need else None for g, need in zip(grads, needs)]
        return (dx, None, _bias_grad(dy, ctx.bias_shape) if need_bias else None, None, None, *grads)


class WeightFunction(torch.autograd.Function):
    """``W_eff`` (``m × n``) through ``loldu_effective_weight``; backward maps ``dW`` to dz, dσ
    through ``loldu_weight_backward``."""

    @staticmethod
    def forward(ctx, z, sigma, adapter, dtype: torch.dtype):
        refuse_tracing()
        w = torch.empty((adapter.m, adapter.n), dtype=dtype)
        check(_capi.loldu_effective_weight(adapter.handle, w.data_ptr()))
        ctx.save_for_backward(z, sigma)
        ctx.adapter, ctx.state, ctx.dtype = adapter, adapter._state, dtype
        return w

    @staticmethod
    def twin(ctx, dw):
        z, sigma = ctx.saved_tensors
        dz, dsigma = _torch_parameter_grads(*_torch_factors(at_forward(ctx.adapter, ctx.state)), z, sigma, dw.to_dense())
        need_z, need_sigma = ctx.needs_input_grad[:2]
        return dz if need_z else None, dsigma if need_sigma else None, None, None

    @staticmethod
    @differentiable_by(twin)
    def backward(ctx, dw):
        ctx.saved_tensors  # (autograd's version check)
        adapter = at_forward(ctx.adapter, ctx.state)
        if dw.layout != torch.strided:  # sparse embedding gradients
            dw = dw.to_dense()
        dw = library_input(dw.to(ctx.dtype))
        grads = torch.empty(adapter.rank + 1, dtype=parameter_dtype(adapter))
        check(_capi.loldu_weight_backward_into(adapter.handle, dw.data_ptr(), grads.data_ptr()))
        r = adapter.rank
        need_z, need_sigma = ctx.needs_input_grad[:2]
        return grads[:r] if need_z else None, grads[r:] if need_sigma else None, None, None
