"""Model-level helpers, PEFT-style: add adapters to an existing model, choose, combine and delete
named adapters, mixed batches, trainable parameters, checkpoints, merging."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re
import threading
import warnings
from collections.abc import Iterator, Mapping

import torch
from torch import nn

import loldu as _loldu

from .. import _capi
from .._arrays import NUMPY_DTYPES, real
from .._interrupts import interrupts_held
from ..adapter import Adapter, AdapterConfig
from ..checkpoint import Checkpoint
from ..errors import DTypeError, InvalidArgumentError, LoLDUWarning, MismatchError, NotFiniteError, ShapeError, StateError
from ._functions import LIBRARY_DTYPES
from .layers import BASE_NAME, LAYER_FOR, MIXED_BATCH, LoLDULayer, check_adapter_name, layer_class


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel / DataParallel wrappers."""
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


ALL_LINEAR = "all-linear"
# Heads a classification model keeps at its top level (PEFT's names for them).
CLASSIFIER_HEADS = ("classifier", "score")


def _is_all_linear(target_modules) -> bool:
    return isinstance(target_modules, str) and target_modules.lower() == ALL_LINEAR


def _heads(root: nn.Module) -> list[str]:
    """The names of the model's output layers that ``"all-linear"`` leaves out: its output
    embeddings and a top-level ``classifier`` or ``score`` head."""
    heads = [getattr(root, name, None) for name in CLASSIFIER_HEADS]
    output = getattr(root, "get_output_embeddings", None)
    heads.append(output() if callable(output) else None)
    ids = {id(h) for h in heads if isinstance(h, nn.Module)}
    return [name for name, module in root.named_modules() if name and id(module) in ids]


def _targets(root: nn.Module, target_modules):
    """``target_modules`` as a test of a module's name and the module (PEFT's rules): a string
    is a regex that must match the whole name; a list holds names that must equal the name or be
    its last dotted components; ``"all-linear"`` (any case) is every ``nn.Linear`` (or LoLDU layer
    around one) but the output layer: the model's output embeddings and a top-level
    ``classifier`` or ``score`` head, with the layers inside it (RoBERTa's ``classifier.dense``
    and ``classifier.out_proj``). (PEFT drops those heads only for ``task_type="SEQ_CLS"``;
    there is no task type here, and a freshly initialised head is trained, not adapted. PEFT
    also takes transformers' ``Conv1D``, which LoLDU does not adapt.)"""
    if _is_all_linear(target_modules):
        heads = _heads(root)
        inside = tuple(h + "." for h in heads)

        def linear(name, module):
            if name in heads or name.startswith(inside):
                return False
            return isinstance(module.base_layer if isinstance(module, LoLDULayer) else module, nn.Linear)
        return linear
    if isinstance(target_modules, str):
        return lambda name, module: re.fullmatch(target_modules, name) is not None
    names = list(target_modules)
    return lambda name, module: any(name == t or name.endswith("." + t) for t in names)


def _read_directly(root: nn.Module) -> set[int]:
    """The modules whose owner reads their weights instead of calling them: ``out_proj`` of an
    ``nn.MultiheadAttention``, ``linear1`` and ``linear2`` of an ``nn.TransformerEncoderLayer``
    (its inference fast path)."""
    owned = []
    for owner in root.modules():
        if isinstance(owner, nn.MultiheadAttention):
            owned += owner.children()
        elif isinstance(owner, nn.TransformerEncoderLayer):
            owned += [owner.linear1, owner.linear2]
    return {id(m) for m in owned}


def _refusal(module: nn.Module, read_directly: set[int]) -> str | None:
    """Why ``module`` cannot become a LoLDU layer (``None``: it can)."""
    if id(module) in read_directly:
        return ("belongs to an nn.MultiheadAttention or nn.TransformerEncoderLayer, which reads its weight "
                "instead of calling it: an adapter there would not compute")
    if layer_class(module) is not None:
        return None
    base = next((b for b, _ in LAYER_FOR if isinstance(module, b)), None)
    if base is not None:
        return (f"is a {type(module).__name__}, a subclass of nn.{base.__name__} with a forward of its own, which "
                "a LoLDU layer would not run: adapt the layers its forward calls")
    return f"is a {type(module).__name__}; LoLDU adapts nn.Linear, nn.Conv1d/2d/3d and nn.Embedding"


def _stage_adapter(layer: LoLDULayer, adapter_name: str, config: AdapterConfig, made: list):
    """A new adapter ``adapter_name`` for ``layer``, made without changing the layer (listed in
    ``made`` until installed): its resolved configuration, the adapter, and the call that
    installs it."""
    config, adapter, factors = layer._new_adapter(config)
    made += [adapter] + ([factors] if factors is not None else [])
    return config, adapter, lambda: layer._install(adapter_name, config, adapter, factors)


def _stage_layer(root: nn.Module, name: str, module: nn.Module, config: AdapterConfig, adapter_name: str,
                 made: list, frozen: dict, active: list[str]):
    """A LoLDU layer around the plain ``module``, not yet in the model (listed in ``made``; the
    base weight's ``requires_grad``, which the layer turns off, in ``frozen``): the layer and the
    call that installs it. As PEFT, a new layer computes the model's ``active`` adapters (its
    own if the model has none)."""
    frozen[module.weight] = module.weight.requires_grad
    layer = layer_class(module)(module, config, name=name, adapter_name=adapter_name)
    made.append(layer)
    if active:
        layer.set_adapter(active)
    return layer, lambda: _set_submodule(root, name, layer)


def _discard(made, frozen: dict) -> None:
    """Undoes what a failed model-level call made before installing anything: closes its new
    layers and adapters and restores the base weights' ``requires_grad``."""
    for thing in made:
        thing.close()
    for p, flag in frozen.items():
        p.requires_grad_(flag)


def _same_config(a: AdapterConfig, b: AdapterConfig) -> bool:
    """Whether two configurations make the same adapter (alpha 0 means alpha = rank; where W
    lives does not matter)."""
    def key(c):
        return dataclasses.replace(c, alpha=c.alpha or float(c.rank), borrow_weight=False)
    return key(a) == key(b)


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def loldu_layers(model: nn.Module) -> dict[str, LoLDULayer]:
    """The LoLDU layers of a model by module name (``DistributedDataParallel`` unwrapped)."""
    return {name: m for name, m in unwrap(model).named_modules() if isinstance(m, LoLDULayer)}


def add_loldu(
    model: nn.Module,
    target_modules,
    rank: int | str = "full",
    alpha: float | None = None,
    z_init: str = "lu",
    residual: str = "pivots",
    *,
    train_sigma: bool = True,
    seed: int = 0,
    borrow_weight: bool = True,
    mark_trainable: bool = True,
    adapter_name: str = "default",
) -> nn.Module:
    """Adds adapter ``adapter_name`` to the modules named by ``target_modules``, in place.

    ``target_modules``: a regex matched against the whole module name
    (``r".*\\.attention\\.self\\.(query|value)"``), a list of names or name suffixes
    (``["query", "value"]``), or ``"all-linear"`` (every ``nn.Linear`` but the output layer), as in
    PEFT. Matched modules must be ``nn.Linear``, ``nn.Conv1d/2d/3d``
    or ``nn.Embedding`` (or subclasses that keep their ``forward``) on the CPU in float32, float64,
    bfloat16 or float16, called by their owner: not the ``out_proj`` of an
    ``nn.MultiheadAttention`` or ``linear1`` / ``linear2`` of an ``nn.TransformerEncoderLayer``,
    whose weights their owners read directly (``"all-linear"`` leaves such layers out, with a
    warning). ``rank``: an int or
    ``"full"`` (``min(m, n)`` per layer, the default); ``alpha``: σ = alpha / rank (``None``: alpha = rank,
    σ = 1). Layer ``i`` (in model order) gets seed ``seed + i``. Modules that are LoLDU layers
    already get the new adapter beside their others (on the same factors); an adapter they have
    already is left as it is. With ``mark_trainable`` (as PEFT's ``get_peft_model``) only the
    LoLDU parameters stay trainable, and ``adapter_name`` becomes the active adapter; without it
    (as PEFT's ``add_adapter``) the new adapter is active and trainable only if it is already
    active or the model has no other (new layers compute the model's active adapters), and
    nothing else changes.
    Returns the model; ``InvalidArgumentError`` (a ``ValueError``) if nothing matches or for an
    ``adapter_name`` the layers cannot hold (``check_adapter_name``). All or nothing: a failure
    leaves the model as it was.
    """
    check_adapter_name(adapter_name)
    root = unwrap(model)
    matched = []
    layers = loldu_layers(root)
    previous = active_adapters(root)
    inside = tuple(name + "." for name in layers)
    targeted, read_directly, left_out = _targets(root, target_modules), _read_directly(root), []
    for name, module in root.named_modules():
        if not name or name.startswith(inside) or not targeted(name, module):
            continue  # (a base layer inside a LoLDU layer)
        refusal = None if isinstance(module, LoLDULayer) else _refusal(module, read_directly)
        if refusal is not None:
            if _is_all_linear(target_modules):
                left_out.append(f"{name} ({refusal})")
                continue
            raise InvalidArgumentError(f"target module {name!r} {refusal}", _capi.LOLDU_ERR_INVALID_ARGUMENT)
        matched.append((name, module))
    if left_out:
        why = (f"target_modules='all-linear' leaves out {len(left_out)} linear layers: "
               + "; ".join(left_out[:3]) + ("; ..." if len(left_out) > 3 else ""))
        if not matched:
            raise InvalidArgumentError(why + "; and the model has no other", _capi.LOLDU_ERR_INVALID_ARGUMENT)
        warnings.warn(why, LoLDUWarning, stacklevel=2)
    if not matched:
        sample = [n for n, m in root.named_modules()
                  if n and not n.startswith(inside) and _refusal(m, read_directly) is None][:8]
        raise InvalidArgumentError(
            f"target_modules {target_modules!r} matched no module of the model; adaptable modules are "
            f"named e.g. {sample}", _capi.LOLDU_ERR_INVALID_ARGUMENT)
    installs, made, frozen = [], [], {}  # every layer's adapter made first; the model changes only once all are
    with warnings.catch_warnings(record=True) as caught:  # one warning for the model, not one per layer
        warnings.simplefilter("always", LoLDUWarning)
        try:
            for i, (name, module) in enumerate(matched):
                config = AdapterConfig(rank=rank, alpha=0.0 if alpha is None else alpha, z_init=z_init,
                                       residual=residual, seed=seed + i, train_sigma=train_sigma,
                                       borrow_weight=borrow_weight)
                if isinstance(module, LoLDULayer):
                    if adapter_name not in module.loldu_config:  # (one it has already is left as it is)
                        _, adapter, install = _stage_adapter(module, adapter_name, config, made)
                        module._warn_init_change(adapter)
                        installs.append(install)
                else:
                    installs.append(_stage_layer(root, name, module, config, adapter_name, made, frozen, previous)[1])
        except BaseException:  # all or nothing: nothing was installed
            _discard(made, frozen)
            raise
    with interrupts_held():
        for install in installs:  # (as PEFT: a new adapter trains only if it is active)
            install()
        if not root.__dict__.get("_loldu_checks_loads"):
            root.register_load_state_dict_pre_hook(_check_loaded_values)
            root._loldu_checks_loads = True
        if mark_trainable:
            set_adapter(model, adapter_name)
            mark_only_loldu_as_trainable(model)
    changed = [w for w in caught if issubclass(w.category, LoLDUWarning)]
    for w in caught:
        if w not in changed:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    if changed:
        warnings.warn(f"{len(changed)} of {len(matched)} adapted layers, e.g. {changed[0].message}", LoLDUWarning,
                      stacklevel=2)
    if mark_trainable and _is_all_linear(target_modules):
        _warn_frozen_heads(root)
    return model


def _check_loaded_values(module: nn.Module, state_dict, prefix: str, *args) -> None:
    """``load_state_dict``'s hook on a model ``add_loldu`` adapted, run before torch copies
    anything into it: every LoLDU layer's refusals (``LoLDULayer._check_state_dict``) come first,
    so that a refused load leaves the whole model as it was, not the layers before the refused
    one loaded (torch loads module by module)."""
    for name, layer in loldu_layers(module).items():
        layer._check_state_dict(state_dict, f"{prefix}{name}." if name else prefix)


def _warn_frozen_heads(root: nn.Module) -> None:
    """Says that the classification head ``"all-linear"`` left out is frozen now, and the fix."""
    for name in CLASSIFIER_HEADS:
        head = getattr(root, name, None)
        if isinstance(head, nn.Module) and any(True for _ in head.parameters()):
            warnings.warn(
                f"target_modules='all-linear' leaves the model's head {name!r} out, and only LoLDU parameters train "
                f"now: to train the head too, call model.{name}.requires_grad_(True) after add_loldu and save its "
                "weights yourself (a LoLDU checkpoint holds the adapters only)", LoLDUWarning, stacklevel=3)


# ---------------------------------------------------------------------------------------------
# Named adapters
# ---------------------------------------------------------------------------------------------

def _names_of(layers: Mapping[str, LoLDULayer]) -> list[str]:
    """Every adapter name any of ``layers`` has, in the order added."""
    seen: dict[str, None] = {}
    for layer in layers.values():
        seen.update(dict.fromkeys(layer.loldu_config))
    return list(seen)


def _check_known(layers: Mapping[str, LoLDULayer], names, argument: str) -> None:
    """``InvalidArgumentError`` naming ``argument`` if one of ``names`` is on no LoLDU layer (as
    PEFT refuses an adapter that is not in the model; a name on some layers only is fine)."""
    known = _names_of(layers)
    known_set = set(known)  # (a mixed batch may name thousands)
    missing = list(dict.fromkeys(n for n in names if n not in known_set))
    if missing:
        raise InvalidArgumentError(
            f"{argument}: no LoLDU layer has adapter {', '.join(map(repr, missing))}; the model's adapters are "
            f"{known}", _capi.LOLDU_ERR_INVALID_ARGUMENT)


def _name_list(value, argument: str, *, single: bool = True, several: bool = True) -> list[str]:
    """``value`` as a list of adapter names: a name (with ``single``) or an iterable of names
    (with ``several``: a list, a tuple, an array of strings, dict keys...); ``InvalidArgumentError``
    naming ``argument`` otherwise (a bare string where several are expected is refused, not read
    as its letters)."""
    if isinstance(value, str):
        if single:
            return [value]
    elif several:
        try:
            names = list(value)
        except TypeError:
            names = None
        if names is not None and all(isinstance(name, str) for name in names):
            return names
    expected = " or ".join(what for what, allowed in (("an adapter name (str)", single),
                                                      ("a list of adapter names", several)) if allowed)
    raise InvalidArgumentError(f"{argument} must be {expected}, got {type(value).__name__} {str(value)[:80]}",
                               _capi.LOLDU_ERR_INVALID_ARGUMENT)


def set_adapter(model: nn.Module, adapter_name) -> None:
    """Makes ``adapter_name`` (a name, or a list) the active adapter(s) of every LoLDU layer, as
    PEFT's ``set_adapter``: a layer that lacks an active adapter skips it (without any, it computes
    its base layer); only the active adapters' parameters require grad. ``InvalidArgumentError``
    if a name is on no layer. A layer that has several of the active adapters computes with the
    sum of their updates, as PEFT's layers add them (exactly: their coefficient vectors add up,
    and each adapter gets the gradient of its own update); ``merge_loldu`` refuses them, and
    ``add_weighted_adapter`` makes their sum one adapter."""
    names = _name_list(adapter_name, "adapter_name")
    layers = loldu_layers(model)
    _check_known(layers, names, "adapter_name")
    with interrupts_held():
        for layer in layers.values():
            layer.set_adapter(names)


def active_adapters(model: nn.Module) -> list[str]:
    """The active adapters, as ``set_adapter`` set them on every layer (including the names some
    layers lack; read from the first LoLDU layer)."""
    layers = list(loldu_layers(model).values())
    return list(layers[0].active_adapters) if layers else []


def adapter_names(model: nn.Module) -> list[str]:
    """Every adapter name any LoLDU layer has, in the order added."""
    return _names_of(loldu_layers(model))


def delete_adapter(model: nn.Module, adapter_name: str) -> None:
    """Deletes ``adapter_name`` from every LoLDU layer that has it (PEFT's ``delete_adapter``). If
    it was active, the other active adapters stay so, or, if none, the model's first remaining
    adapter becomes active, on every layer alike."""
    layers = loldu_layers(model)
    _check_known(layers, _name_list(adapter_name, "adapter_name", several=False), "adapter_name")
    holders = [layer for layer in layers.values() if adapter_name in layer.loldu_config]
    for layer in holders:  # every refusal (merged) before any layer changes
        layer._deletable(adapter_name)
    was_active = [(layer, list(layer.active_adapters)) for layer in layers.values()
                  if adapter_name in layer.active_adapters]
    with interrupts_held():
        for layer in holders:
            layer.delete_adapter(adapter_name)
        first = _names_of(layers)[:1]
        for layer, active in was_active:
            layer.set_adapter([a for a in active if a != adapter_name] or first)


def add_weighted_adapter(model: nn.Module, adapters: list[str], weights: list[float], adapter_name: str) -> None:
    """Adds ``adapter_name`` = Σ weights[i] · adapters[i], exactly: all adapters of a layer share
    its factors, so their updates ``A diag(c) U_r`` combine by combining the coefficient vectors
    ``c`` (no SVD, no loss; PEFT's ``combination_type="linear"`` for LoRA is not exact).
    The new adapter has rank max(ranks), σ = 1 (alpha = rank), ``z_init="zeros"`` and residual
    ``init`` (so ``W_res = W`` and its coefficients are its z): ``z = c = Σ w_i c_i``, summed in
    float64 and rounded once to the parameter type. It saves and loads as any adapter."""
    adapters = _name_list(adapters, "adapters", single=False)
    check_adapter_name(adapter_name)
    if len(adapters) != len(weights) or not adapters:
        raise InvalidArgumentError("adapters and weights must be non-empty lists of the same length",
                                   _capi.LOLDU_ERR_INVALID_ARGUMENT)
    for i, weight in enumerate(weights):
        if not math.isfinite(real(weight, f"weights[{i}]")):
            raise InvalidArgumentError(f"weights[{i}] = {weight!r} must be a finite number", _capi.LOLDU_ERR_INVALID_ARGUMENT)
    every = loldu_layers(model)
    _check_known(every, adapters, "adapters")
    layers = [layer for layer in every.values() if any(a in layer.loldu_config for a in adapters)]
    for layer in layers:  # (every refusal before any layer changes)
        if adapter_name in layer.loldu_config:
            raise InvalidArgumentError(f"{layer.loldu_name} already has an adapter named {adapter_name!r}",
                                       _capi.LOLDU_ERR_INVALID_ARGUMENT)
    with interrupts_held():
        done = []
        try:
            for layer in layers:
                present = [(a, w) for a, w in zip(adapters, weights) if a in layer.loldu_config]
                rank = max(layer.get_adapter(a).rank for a, _ in present)
                c = torch.zeros(rank, dtype=torch.float64)
                for name, weight in present:
                    coefficients = adapter_coefficients(layer, name)
                    c[: coefficients.numel()] += float(weight) * coefficients
                values = c.to(layer.param_dtype)
                if not torch.isfinite(values).all():
                    raise NotFiniteError(f"{layer.loldu_name}: the weighted sum of {adapters} with weights "
                                         f"{list(weights)} overflows {layer.param_dtype}", _capi.LOLDU_ERR_NOT_FINITE)
                config = AdapterConfig(rank=rank, z_init="zeros", residual="init",
                                       borrow_weight=layer.loldu_config[present[0][0]].borrow_weight)
                layer.update_layer(adapter_name, config, values=(values, torch.ones(1)))
                done.append(layer)
                layer.set_adapter(layer.active_adapters)
        except BaseException:
            for layer in done:  # all or nothing
                layer.delete_adapter(adapter_name)
            raise


def adapter_coefficients(layer: LoLDULayer, adapter_name: str) -> torch.Tensor:
    """``c = σ z − σ₀ z_ref`` of one adapter of a layer (float64): its whole update of the weight
    is ``A diag(c) U_r``."""
    return torch.from_numpy(layer.get_adapter(adapter_name).coefficients().astype("float64"))


@contextlib.contextmanager
def mixed_batch(model: nn.Module, adapter_names: list[str]):
    """Within the block, sample ``i`` of every forward uses adapter ``adapter_names[i]``
    (``"__base__"``: the pretrained model), at one adapter's cost per layer, for models whose
    ``forward`` does not pass ``adapter_names=`` down (PEFT's mixed-batch inference, usable for
    training too: each adapter gets the gradient of its own samples). As in PEFT, a layer that
    lacks a sample's adapter gives that sample its base output; ``InvalidArgumentError`` if a
    name is on no layer. With gradient checkpointing, call ``backward()`` inside the block (the
    recomputed forward must see the same rows). The block holds for the thread (or asyncio task)
    that opens it: threads serving different batches through one model do not mix."""
    names = _name_list(adapter_names, "adapter_names", single=False)
    every = loldu_layers(model)
    _check_known(every, [name for name in names if name != BASE_NAME], "adapter_names")
    token = MIXED_BATCH.set({**(MIXED_BATCH.get() or {}), **{layer: names for layer in every.values()}})
    try:
        yield model
    finally:
        MIXED_BATCH.reset(token)


# ---------------------------------------------------------------------------------------------
# Parameters
# ---------------------------------------------------------------------------------------------

def named_loldu_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """``(name, parameter)`` for every adapter's ``loldu_z`` and ``loldu_sigma``
    (``NAME.loldu_z.ADAPTER``)."""
    for name, p in unwrap(model).named_parameters():
        parts = name.rsplit(".", 2)
        if len(parts) == 3 and parts[1] in LoLDULayer.adapter_layer_names:
            yield name, p


def loldu_parameters(model: nn.Module, *, trainable_only: bool = True) -> list[nn.Parameter]:
    """The LoLDU parameters (by default those that require grad: the active adapters' z, and σ
    when trained)."""
    return [p for _, p in named_loldu_parameters(model) if p.requires_grad or not trainable_only]


def mark_only_loldu_as_trainable(model: nn.Module, bias: str = "none") -> None:
    """Freezes everything but the active adapters' ``loldu_z`` (and ``loldu_sigma`` where σ is
    trained). ``bias``: ``"none"``, ``"all"`` (every bias trains) or ``"loldu_only"`` (biases of
    the adapted layers), as PEFT's ``mark_only_lora_as_trainable``."""
    if bias not in ("none", "all", "loldu_only"):
        raise InvalidArgumentError(f"bias must be 'none', 'all' or 'loldu_only', got {bias!r}",
                                   _capi.LOLDU_ERR_INVALID_ARGUMENT)
    root = unwrap(model)
    with interrupts_held():
        for name, p in root.named_parameters():
            p.requires_grad_(bias == "all" and name.rsplit(".", 1)[-1] == "bias")
        for layer in loldu_layers(root).values():
            layer.set_adapter(layer.active_adapters)
            if bias == "loldu_only" and getattr(layer.base_layer, "bias", None) is not None:
                layer.base_layer.bias.requires_grad_(True)


def get_nb_trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts."""
    trainable = total = 0
    for p in unwrap(model).parameters():
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


def loldu_state_dict(model: nn.Module, adapter_name: str | None = None) -> dict[str, torch.Tensor]:
    """``{"NAME.loldu_z": …, "NAME.loldu_sigma": …}`` (copies) of one adapter (the active one by
    default): the tensors a checkpoint holds, without the adapter name (PEFT's
    ``get_peft_model_state_dict``)."""
    out = {}
    for name, (layer, adapter) in _chosen(loldu_layers(model), adapter_name, required=adapter_name is not None).items():
        out[f"{name}.loldu_z"] = layer.loldu_z[adapter].detach().clone()
        out[f"{name}.loldu_sigma"] = layer.loldu_sigma[adapter].detach().clone()
    return out


def set_loldu_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor],
                         adapter_name: str | None = None) -> tuple[list, list]:
    """Copies ``NAME.loldu_z`` / ``NAME.loldu_sigma`` values into one adapter (the active one by
    default); returns ``(missing, unexpected)`` keys. ``StateError`` if it is merged."""
    own = {}
    for name, chosen in _chosen(loldu_layers(model), adapter_name, required=adapter_name is not None).items():
        own[f"{name}.loldu_z"] = own[f"{name}.loldu_sigma"] = chosen
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    targets, given = {}, {}
    for key, value in state_dict.items():  # every refusal before any value changes
        if key not in own:
            continue
        layer, adapter = own[key]
        if not isinstance(value, torch.Tensor):
            raise InvalidArgumentError(f"state_dict[{key!r}] is a {type(value).__name__}; expected a torch.Tensor",
                                       _capi.LOLDU_ERR_INVALID_ARGUMENT)
        a = layer._prepare(adapter)
        if a.merged:
            raise StateError(f"{layer.loldu_name} is merged; unmerge before loading values", _capi.LOLDU_ERR_STATE)
        expected = a.rank if key.endswith(".loldu_z") else 1
        if value.numel() != expected:
            raise ShapeError(f"{key} has {value.numel()} values; the adapter has {expected}", _capi.LOLDU_ERR_SHAPE)
        given.setdefault((layer, adapter, key.rpartition(".")[0]), [None, None])[key.endswith(".loldu_sigma")] = value
        targets[a._params_ptr] = a
    for (layer, adapter, name), (z, sigma) in given.items():
        layer._check_values(adapter, z, sigma, f"state_dict's {name}.loldu_z / {name}.loldu_sigma")
    saved = {ptr: a.params.copy() for ptr, a in targets.items()}
    try:
        for (layer, adapter, _), (z, sigma) in given.items():  # (each pair at once: checked so)
            a = layer._adapters[adapter]
            a.set_values(a.z if z is None else z.detach().cpu().to(layer.param_dtype).reshape(-1).numpy(),
                         a.sigma if sigma is None else float(sigma.reshape(-1)[0]))
    except BaseException:  # (an interruption): every adapter as it was
        for ptr, a in targets.items():
            a.params[:] = saved[ptr]
        raise
    return missing, unexpected


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------

def _active(layer: LoLDULayer) -> str | None:
    """The layer's (first) active adapter; None for a layer whose adapters were all deleted."""
    return layer.active_adapters[0] if layer.active_adapters else None


def _chosen(layers: Mapping, adapter_name: str | None, *, required: bool = False) -> dict:
    """``{key: (layer, adapter)}`` for the layers that have adapter ``adapter_name`` (by default
    each layer's active adapter: ``StateError`` if it has several, naming them, as which one is
    meant is not said); with ``required``, ``InvalidArgumentError`` if none has."""
    out = {}
    for key, layer in layers.items():
        if adapter_name is None and len(layer.active_adapters) > 1:
            raise layer._several_active(layer.active_adapters, "name the one to use (adapter_name=), or make their "
                                                               "sum one adapter (add_weighted_adapter)")
        adapter = adapter_name or _active(layer)
        if adapter in layer.loldu_config:
            out[key] = (layer, adapter)
    if required and not out:
        what = f"adapter {adapter_name!r}" if adapter_name else "an active adapter"
        raise InvalidArgumentError(f"no LoLDU layer has {what}", _capi.LOLDU_ERR_INVALID_ARGUMENT)
    return out


def _names_and_adapters(model: nn.Module, adapter_name: str | None) -> dict[str, Adapter]:
    layers = loldu_layers(model)
    if not layers:
        raise InvalidArgumentError("the model has no LoLDU layer (call add_loldu first)", _capi.LOLDU_ERR_INVALID_ARGUMENT)
    return {name: layer._prepare(adapter) for name, (layer, adapter) in _chosen(layers, adapter_name, required=True).items()}


def save_loldu(model: nn.Module, directory, adapter_name: str | None = None) -> None:
    """Saves one adapter (the active one by default) of every LoLDU layer, z and σ under the
    layer's module name, into ``directory`` (PEFT-like: ``adapter_model.safetensors`` +
    ``adapter_config.json``), atomically as a whole."""
    _loldu.save(directory, _names_and_adapters(model, adapter_name))


def export_merged(model: nn.Module, path, adapter_name: str | None = None) -> None:
    """Writes ``NAME.weight`` = W_eff per LoLDU layer to a safetensors file (reshape conv
    weights to the module's weight shape when loading; biases stay in the base modules): of
    adapter ``adapter_name``, by default the weights the model computes with (several active
    adapters: the base weight plus the sum of their updates; disabled: the base weight)."""
    if adapter_name is not None:
        return _loldu.export_merged(path, _names_and_adapters(model, adapter_name))
    adapters = {}
    for name, layer in loldu_layers(model).items():
        computing = layer._computing_names()
        if len(computing) > 1:
            adapters[name] = layer._summed(computing, layer.dtype)[0]
        elif computing:
            adapters[name] = layer._prepare(computing[0])
    if not adapters:
        raise InvalidArgumentError("no LoLDU layer has an active adapter", _capi.LOLDU_ERR_INVALID_ARGUMENT)
    _loldu.export_merged(path, adapters)


def _lora_kind(name: str, layer: LoLDULayer):
    """The PEFT representation of a LoLDU layer for ``export_lora``, or a refusal naming it."""
    base = layer.base_layer
    if isinstance(base, nn.Embedding):
        if base.max_norm is not None:  # (ours renormalises rows of W_eff; PEFT's, rows of W before adding B A)
            raise InvalidArgumentError(
                f"layer {name!r}: a LoRA export of an nn.Embedding with max_norm is not exact (PEFT renormalises "
                "the base weight's rows, then adds the LoRA update; this layer renormalises the rows of the "
                "adapted weight). Use merge_and_unload or export_merged for it", _capi.LOLDU_ERR_INVALID_ARGUMENT)
        return "embedding"
    if isinstance(base, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        ones = (1,) * len(base.kernel_size)
        if base.groups != 1 or tuple(base.dilation) != ones or base.padding_mode != "zeros":
            raise InvalidArgumentError(
                f"layer {name!r}: a LoRA export of a convolution is exact only with groups=1, dilation=1 and "
                f"padding_mode='zeros' (PEFT's lora_A convolution has no dilation and other groups); this one has "
                f"groups={base.groups}, dilation={tuple(base.dilation)}, padding_mode={base.padding_mode!r}. "
                "Use merge_and_unload or export_merged for it", _capi.LOLDU_ERR_INVALID_ARGUMENT)
        return ("conv", tuple(base.kernel_size))
    return "linear"


def export_lora(model: nn.Module, directory, adapter_name: str | None = None, *,
                base_model_name_or_path: str | None = None, dtype=torch.float32, replace: bool = False) -> None:
    """Writes one adapter (the active one by default) of every LoLDU layer as a PEFT LoRA
    directory, exactly (``loldu.export_lora``): ``PeftModel.from_pretrained(base, directory)`` on
    the same model class then computes what this model computes. Layer names are module names in
    ``model``; ``base_model_name_or_path`` defaults to the model's ``name_or_path`` (transformers).
    Embeddings and convolutions get PEFT's shapes (a convolution with groups, dilation or
    non-zero padding, and an embedding with ``max_norm``, are refused, naming the layer). As PEFT's
    ``save_pretrained``, it writes the adapter whether or not adapters are disabled (``export_merged``
    writes the weights the model computes with). ``dtype``: the tensors' type."""
    adapters = _names_and_adapters(model, adapter_name)
    layers = loldu_layers(model)
    kinds = {name: _lora_kind(name, layers[name]) for name in adapters}
    if base_model_name_or_path is None:
        base_model_name_or_path = getattr(unwrap(model), "name_or_path", None) or None
    if dtype not in LIBRARY_DTYPES:
        raise DTypeError(f"dtype must be one of {list(LIBRARY_DTYPES)}, got {dtype}", _capi.LOLDU_ERR_DTYPE)
    _loldu.export_lora(directory, adapters, base_model_name_or_path=base_model_name_or_path,
                       dtype=NUMPY_DTYPES[LIBRARY_DTYPES[dtype]], kinds=kinds, replace=replace)


def load_loldu(model: nn.Module, directory, *, adapter_name: str = "default", borrow_weight: bool = True,
               mark_trainable: bool = True) -> nn.Module:
    """Restores a ``save_loldu`` checkpoint into ``model`` as adapter ``adapter_name``, in place.

    For each saved layer name: a LoLDU layer that has the adapter with the saved configuration
    gets its z and σ overwritten (the parameter objects stay, so an existing optimiser keeps
    working); a LoLDU layer without it gets it added on its factors (no new factorisation when
    its factors' rank suffices); a plain module is wrapped. ``MismatchError`` if a name is not in
    the model or a base weight is not the one the checkpoint was saved on: every layer is checked
    before any changes, so a failed load leaves the model as it was. With ``mark_trainable``,
    ``adapter_name`` becomes active and trainable; without, the active adapters stay (as
    ``add_loldu``'s: a layer wrapped anew computes the model's active adapters, and the loaded
    adapter trains only if it is one of them).
    """
    check_adapter_name(adapter_name)
    root = unwrap(model)
    modules, read_directly, previous = dict(root.named_modules()), _read_directly(root), active_adapters(root)
    inside = tuple(name + "." for name in loldu_layers(root))
    installs, made, trials = [], [], []  # what to do once every layer is checked; what was made for it
    frozen = {}
    with Checkpoint(directory) as ckpt:
        try:
            for name in ckpt.names:
                module = modules.get(name)
                if module is None:
                    raise MismatchError(f"the checkpoint's layer {name!r} is not a module of the model",
                                        _capi.LOLDU_ERR_MISMATCH)
                if name.startswith(inside):  # (as add_loldu skips them)
                    raise MismatchError(f"the checkpoint's layer {name!r} is inside a LoLDU layer of the model (the "
                                        "checkpoint was saved on another structure)", _capi.LOLDU_ERR_MISMATCH)
                info = ckpt.layer(name)
                base = module.base_layer if isinstance(module, LoLDULayer) else module
                refusal = _refusal(base, read_directly)
                if refusal is not None:
                    raise MismatchError(f"the checkpoint's layer {name!r} {refusal} in the model",
                                        _capi.LOLDU_ERR_MISMATCH)
                code = LIBRARY_DTYPES.get(base.weight.dtype)
                saved_code = _capi.LOLDU_FLOAT64 if info.dtype == "float64" else _capi.LOLDU_FLOAT32
                if code is None or (code == _capi.LOLDU_FLOAT64) != (saved_code == _capi.LOLDU_FLOAT64):
                    raise DTypeError(
                        f"{name}: saved in {info.dtype}, the model's weight is {base.weight.dtype}; convert the "
                        f"model first (model.to(torch.{info.dtype}))", _capi.LOLDU_ERR_DTYPE)
                saved = dataclasses.replace(info.config, borrow_weight=borrow_weight)
                if not isinstance(module, LoLDULayer):
                    layer, install = _stage_layer(root, name, base, saved, adapter_name, made, frozen, previous)
                    ckpt.apply(name, layer.get_adapter(adapter_name))
                    installs.append(install)
                    continue
                current = module.loldu_config.get(adapter_name)
                if current is not None and _same_config(current, saved):
                    adapter = module._prepare(adapter_name)
                    if adapter.merged:
                        raise StateError(f"{name} is merged; unmerge before loading", _capi.LOLDU_ERR_STATE)
                    trial = adapter.clone()  # checked on a clone: the adapter itself changes only at the end
                    trials.append(trial)
                    ckpt.apply(name, trial)
                    installs.append(lambda name=name, adapter=adapter: ckpt.apply(name, adapter))
                    continue
                _, adapter, install = _stage_adapter(module, adapter_name, saved, made)
                ckpt.apply(name, adapter)
                installs.append(install)
        except BaseException:  # all or nothing: nothing was installed
            _discard(made, frozen)
            raise
        finally:
            for trial in trials:
                trial.close()
        with interrupts_held():
            for install in installs:  # every layer checked: now the model changes
                install()
            if mark_trainable:
                set_adapter(model, adapter_name)
                mark_only_loldu_as_trainable(model)
    return model


# ---------------------------------------------------------------------------------------------
# Merging, unloading, switching off
# ---------------------------------------------------------------------------------------------

def merge_loldu(model: nn.Module) -> None:
    """Merges every LoLDU layer's active adapter (faster inference; z and σ frozen until
    ``unmerge_loldu``). Reversible, as PEFT's ``merge_adapter``; ``merge_and_unload`` removes the
    layers instead (what the reference code's ``merge_loldu`` does). All or nothing: a layer with
    several active adapters refuses (``StateError``, see ``LoLDULayer.merge``) before any layer
    merges, and if a merge fails (a float16 weight that would overflow) the others are undone."""
    chosen = [(layer, layer._merge_name()) for layer in loldu_layers(model).values()]
    merged = []
    try:
        for layer, name in chosen:  # (a layer without an active adapter computes its base already)
            if name is not None and not layer._is_merged(name):
                merged.append((layer, name))  # (first: a KeyboardInterrupt just after the library merged is undone too)
                layer._merge(name)
    except BaseException:
        for layer, name in merged:
            if layer._adapters[name].merged:
                layer._adapters[name].unmerge()
        raise


def unmerge_loldu(model: nn.Module) -> None:
    with interrupts_held():
        for layer in loldu_layers(model).values():
            layer.unmerge()


def merge_and_unload(model: nn.Module, adapter_name: str | None = None) -> nn.Module:
    """Replaces every LoLDU layer by its base module carrying the effective weight of adapter
    ``adapter_name`` (by default, of the active adapters: several add their updates, as PEFT merges
    them), whether or not adapters are disabled (as PEFT merges them): a plain PyTorch model again,
    movable to any device and dtype. In place; returns the model. ``InvalidArgumentError`` if no
    layer has ``adapter_name``. All or nothing: every effective weight is computed before any
    layer is replaced (one that does not fit the weight's dtype raises, naming the layer)."""
    root = unwrap(model)
    layers = loldu_layers(root)
    if adapter_name is not None:  # (a name no layer has would unload every layer as its base)
        _check_known(layers, [adapter_name], "adapter_name")
    weights = {}
    for name, layer in layers.items():
        chosen = [adapter_name] if adapter_name else layer._present_active()
        if chosen and chosen[0] in layer.loldu_config:  # (else the layer computes its base module already)
            disabled = layer._disabled  # (merged all the same, as PEFT merges disabled adapters)
            layer.enable_adapters(True)
            try:
                weights[name] = layer.effective_weight(adapter_name)
            except _loldu.LoLDUError as error:
                raise layer._named(error) from None
            finally:
                layer.enable_adapters(not disabled)
    with interrupts_held():
        for name, layer in layers.items():
            base = layer.base_layer
            if name in weights:
                base.weight = nn.Parameter(weights[name], requires_grad=False)
            _set_submodule(root, name, base)
            layer.close()
    return model


def unload(model: nn.Module) -> nn.Module:
    """Replaces every LoLDU layer by its original base module (the adapters are dropped)."""
    root = unwrap(model)
    with interrupts_held():
        for name, layer in loldu_layers(root).items():
            _set_submodule(root, name, layer.base_layer)
            layer.close()
    return model


def _enable_all(model: nn.Module, enabled: bool) -> None:
    with interrupts_held():
        for layer in loldu_layers(model).values():
            layer.enable_adapters(enabled)


def enable_loldu(model: nn.Module) -> None:
    """Turns every LoLDU layer on (the initial state), as the reference code's ``enable_loldu``."""
    _enable_all(model, True)


def disable_loldu(model: nn.Module) -> None:
    """Turns every LoLDU layer off until ``enable_loldu``: the model computes its original
    outputs exactly. See ``disable_adapters`` for a ``with`` block."""
    _enable_all(model, False)


_DISABLE_BLOCKS = threading.Lock()  # (guards the layers' counts of open disable_adapters blocks)


@contextlib.contextmanager
def disable_adapters(model: nn.Module):
    """Within the block the LoLDU layers compute the original model exactly (as PEFT's
    ``model.disable_adapter()``: for the whole model, in every thread); their state from before
    the first open block is restored when the last one closes, so blocks may nest or overlap
    (threads). For base outputs in one thread only, use ``mixed_batch(model, ["__base__"] * n)``."""
    layers, entered = list(loldu_layers(model).values()), False
    try:
        with interrupts_held(), _DISABLE_BLOCKS:
            for layer in layers:
                if layer._disable_blocks == 0:
                    layer._enabled_before_blocks = layer.enabled
                    layer.enable_adapters(False)
                layer._disable_blocks += 1
            entered = True  # (a Ctrl-C held back until here is raised on leaving: the block is left again)
        yield model
    finally:
        if entered:
            with interrupts_held(), _DISABLE_BLOCKS:
                for layer in layers:
                    layer._disable_blocks -= 1
                    if layer._disable_blocks == 0:
                        layer.enable_adapters(layer._enabled_before_blocks)
