"""LoRA's ``layer_replication``: a deeper model built from ranges of the base's own layers.

``layer_replication=[[0, 4], [2, 5]]`` turns layers ``[0, 1, 2, 3, 4]`` into ``[0, 1, 2, 3, 2, 3,
4]`` (mergekit's pass-through ranges, as PEFT reads them). Every position is its own module, so
it gets its own LoRA factors (file keys use the new positions, as PEFT's do), while the base
parameters of repeated layers are shared, not copied: memory stays close to the original model.

The stack is found where PEFT looks for it (``model(.model)*.layers``, ``.bert.encoder.layer``,
``.h``), so files name the same layers. The original stack is remembered: when no adapter is
left on the stack and nothing was merged into its copies, it is put back as it was.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Optional

from torch import nn

from ...base import AdapterContainer, AdapterLayer

_RECORD_ATTR = "_deltatune_layer_replication"
# Set on the base modules of a replicated stack: their parameters are shared with other positions.
SHARED_BASE_ATTR = "_deltatune_shared_base"


@dataclass
class _Replication:
    """What ``replicate_layers`` changed, to undo it. Held as a plain attribute of the model (not a
    submodule), so the original layers appear in no state dict or module walk."""

    layer_map: list[list[int]]
    owner: nn.Module
    attr: str
    original: tuple[nn.ModuleList]
    num_hidden_layers: Optional[int]
    layer_types: Optional[list]


def _layer_stack(model: nn.Module) -> tuple[nn.Module, str]:
    """(module holding the layer list, attribute name), where PEFT looks for it."""
    while hasattr(model, "model") and isinstance(model.model, nn.Module):
        model = model.model
    if isinstance(getattr(model, "bert", None), nn.Module):
        model = model.bert
    if isinstance(getattr(model, "layers", None), nn.ModuleList):
        return model, "layers"
    encoder = getattr(model, "encoder", None)
    if encoder is not None and isinstance(getattr(encoder, "layer", None), nn.ModuleList):
        return encoder, "layer"
    if isinstance(getattr(model, "h", None), nn.ModuleList):
        return model, "h"
    raise ValueError(
        "LoraConfig.layer_replication: found no layer list where PEFT looks for one "
        "(model(.model)*.layers, .bert.encoder.layer or .h, as in Llama, BERT or Falcon); "
        f"{type(model).__name__} has none, so its layers cannot be replicated"
    )


def _config_of(model: nn.Module):
    while True:
        config = getattr(model, "config", None)
        if config is not None or not isinstance(getattr(model, "model", None), nn.Module):
            return config
        model = model.model


def _shared_copy(layer: nn.Module) -> nn.Module:
    """A new module tree like ``layer`` whose parameters are ``layer``'s own (buffers are copied)."""
    memo = {id(p): p for p in layer.parameters()}
    clone = copy.deepcopy(layer, memo)
    for module in clone.modules():
        setattr(module, SHARED_BASE_ATTR, True)
    return clone


def current_map(model: nn.Module) -> Optional[list[list[int]]]:
    """The ``layer_replication`` the model is built with now, or None."""
    record = getattr(model, _RECORD_ATTR, None)
    return None if record is None else record.layer_map


def replicate_layers(model: nn.Module, layer_map: list[list[int]]) -> None:
    """Rebuild the model's layer stack from ``layer_map``'s [start, end) ranges of its layers.

    A model already replicated with the same map is left as it is (several adapters may be
    trained on one replicated stack); another map is refused, since file keys would no longer
    name the layers the adapter was trained on.
    """
    record = getattr(model, _RECORD_ATTR, None)
    if record is not None:
        if record.layer_map != layer_map:
            raise ValueError(f"LoraConfig.layer_replication={layer_map} differs from the replication this model "
                             f"already has ({record.layer_map}); delete those adapters first")
        return
    owner, attr = _layer_stack(model)
    layers = getattr(owner, attr)
    for start, end in layer_map:
        if end > len(layers):
            raise ValueError(f"LoraConfig.layer_replication range [{start}, {end}) goes past the model's "
                             f"{len(layers)} layers")
    sources = [i for start, end in layer_map for i in range(start, end)]
    stack = nn.ModuleList()
    for position, source in enumerate(sources):
        clone = _shared_copy(layers[source])
        for module in clone.modules():  # the KV cache is indexed by position, not by source layer
            if hasattr(module, "layer_idx"):
                module.layer_idx = position
        stack.append(clone)
    config = _config_of(model)
    count = getattr(config, "num_hidden_layers", None)
    types = getattr(config, "layer_types", None)
    setattr(model, _RECORD_ATTR, _Replication([list(r) for r in layer_map], owner, attr, (layers,), count,
                                              None if types is None else list(types)))
    setattr(owner, attr, stack)
    if count is not None:
        config.num_hidden_layers = len(stack)
    if isinstance(types, list) and len(types) == len(layers):
        # PEFT 0.21 leaves layer_types at the old length, which breaks Qwen2-style models
        config.layer_types = [types[i] for i in sources]


def restore_layers(model: nn.Module) -> None:
    """Put the original stack back when no adapter holds a layer of the replicated one and no
    merge gave its copies weights of their own (then the deeper model is the result: kept)."""
    record: Optional[_Replication] = getattr(model, _RECORD_ATTR, None)
    if record is None:
        return
    stack = getattr(record.owner, record.attr)
    if any(isinstance(m, (AdapterLayer, AdapterContainer)) for m in stack.modules()):
        return
    delattr(model, _RECORD_ATTR)
    original = {id(p) for p in record.original[0].parameters()}
    if any(id(p) not in original for p in stack.parameters()):
        return  # merged and unloaded: the replicated model is now the plain model
    setattr(record.owner, record.attr, record.original[0])
    config = _config_of(model)
    if record.num_hidden_layers is not None:
        config.num_hidden_layers = record.num_hidden_layers
    if record.layer_types is not None:
        config.layer_types = record.layer_types
