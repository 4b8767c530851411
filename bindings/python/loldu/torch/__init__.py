"""PyTorch integration: LoLDU layers whose forward and backward run in libloldu, and PEFT-style
helpers for existing models and training scripts::

    import loldu.torch as lt

    lt.add_loldu(model, target_modules="all-linear")  # full rank; or names, a regex; rank=64
    lt.print_trainable_parameters(model)          # only loldu_z (and loldu_sigma) train
    opt = torch.optim.AdamW(lt.loldu_parameters(model), lr=3e-4)     # or lt.Optimizer(model, ...)
    ...the usual training loop...
    lt.save_loldu(model, "ckpt")                  # adapter_model.safetensors + adapter_config.json
    lt.load_loldu(fresh_model, "ckpt")            # wraps the saved layers, restores z and σ

Several named adapters per layer, as PEFT: ``add_loldu(..., adapter_name="b")``,
``load_loldu(model, dir, adapter_name="b")``, ``set_adapter``, ``delete_adapter``,
``active_adapters`` (several: their updates add up, as in PEFT), ``add_weighted_adapter`` (exact:
adapters on one weight share its factors, so their updates combine by their coefficient
vectors), and mixed batches where each sample uses its own adapter at one adapter's cost
(``layer(x, adapter_names=[...])``, or ``with lt.mixed_batch(model, names): model(...)`` for
models whose forward does not pass the argument down). Training two adapters in one mixed
batch works with ``torch.optim`` and ``lt.Optimizer``. An adapter may be on some layers only:
``set_adapter`` makes it active on every layer, and a layer without it computes its base layer
(for its rows, in a mixed batch).

The package is split as PEFT splits its tuners:

- ``loldu.torch.layers``: ``LoLDULinear``, ``LoLDUConv`` (``nn.Conv1d/2d/3d``),
  ``LoLDUEmbedding``: the original module as ``base_layer``, the adapters' ``loldu_z[name]`` /
  ``loldu_sigma[name]`` parameters sharing memory with the library (``torch.optim`` updates them
  in place and the library sees the new values). Linear layers run ``y = x W_effᵀ`` in the
  library (one call forward, one ``loldu_backward_into`` backward); convolutions and
  embeddings get ``W_eff`` from the library and run in PyTorch.
- ``loldu.torch.model``: ``add_loldu`` and the other model-level helpers.
- ``loldu.torch.optim``: ``Optimizer``, the library's optimiser over the adapters.
- ``loldu.torch._functions``: the autograd Functions.

Element types: layers compute in their base weight's dtype: float32, float64, bfloat16 or
float16; z, σ and their gradients are float32 (float64 for float64 models). Under
``torch.autocast("cpu", dtype=torch.bfloat16)`` a float32 layer computes in bf16 as
``nn.Linear`` does. Inputs must be CPU tensors; anything else raises ``DeviceError`` or
``DTypeError`` saying what to do.

The base weight is *borrowed* by default (``borrow_weight=True``): the library reads the
module's weight memory instead of keeping a copy. The layer keeps a reference to that exact
tensor, and before each forward checks that it is unchanged (same storage and version, else a
CRC-32 of its bytes taken when it was factored): an in-place change of its values raises
``StateError`` (call ``layer.refactor()``), while rewriting the same values (DDP's broadcast,
reloading the same state dict) is accepted. ``model.to(dtype)`` re-creates the adapters in the
new dtype keeping z and σ; moving a model to another device raises before anything is converted
(``merge_and_unload`` first to get plain layers).

Threads: on first use, unless ``loldu.set_num_threads`` was called, the library's threads are
set to ``torch.get_num_threads()`` so that the two pools do not oversubscribe the cores.
Memory: on first use, glibc's malloc is asked to keep freed blocks up to 32 MiB mapped, so that
each step's fresh outputs are not page-faulted in again (``layers.configure_malloc``;
``LOLDU_KEEP_MALLOC=1`` opts out).
"""

from __future__ import annotations

try:
    import torch as _torch  # noqa: F401  (here, to say what to install)
except ModuleNotFoundError as _error:
    if _error.name != "torch":
        raise
    raise ModuleNotFoundError("loldu.torch needs PyTorch: pip install torch (or the package as loldu[torch]); "
                              "the numpy API, import loldu, works without it", name="torch") from None

from . import layers as _layers
from .layers import BASE_NAME, LoLDUConv, LoLDUEmbedding, LoLDULayer, LoLDULinear
from .model import (
    active_adapters,
    adapter_coefficients,
    adapter_names,
    add_loldu,
    add_weighted_adapter,
    delete_adapter,
    disable_adapters,
    disable_loldu,
    enable_loldu,
    export_lora,
    export_merged,
    get_nb_trainable_parameters,
    load_loldu,
    loldu_layers,
    loldu_parameters,
    loldu_state_dict,
    mark_only_loldu_as_trainable,
    merge_and_unload,
    merge_loldu,
    mixed_batch,
    named_loldu_parameters,
    print_trainable_parameters,
    save_loldu,
    set_adapter,
    set_loldu_state_dict,
    unload,
    unmerge_loldu,
)
from .optim import Optimizer

# The reference code's names (github.com/SKDDJ/LoLDU, minloldu).
get_loldu_params = loldu_parameters
get_loldu_state_dict = loldu_state_dict
remove_loldu = unload


def __getattr__(name):
    # Module state lives in loldu.torch.layers; read it from there (tests set it back).
    if name == "_threads_configured":
        return _layers._threads_configured
    raise AttributeError(name)


__all__ = [
    "BASE_NAME",
    "LoLDULayer",
    "LoLDULinear",
    "LoLDUConv",
    "LoLDUEmbedding",
    "add_loldu",
    "loldu_layers",
    "set_adapter",
    "active_adapters",
    "adapter_names",
    "delete_adapter",
    "add_weighted_adapter",
    "adapter_coefficients",
    "mixed_batch",
    "loldu_parameters",
    "named_loldu_parameters",
    "mark_only_loldu_as_trainable",
    "get_nb_trainable_parameters",
    "print_trainable_parameters",
    "loldu_state_dict",
    "export_lora",
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
