"""Model-level operations: add, activate, disable, route per row, merge, unload, delete.

Adapters are injected in place: targeted modules are replaced by adapter layers that wrap
them, and the model keeps a small registry (configs and the active set) as an attribute.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import re
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional, Sequence, Union

from torch import nn

from . import adapters  # noqa: F401  (registers every method)
from .adapters.base import AdapterLayer, ModulesToSave, RowPlan, adapter_layers
from .adapters.method import METHODS, method_for
from .config import AdapterConfig, LoraConfig
from .merge_report import MergeReport, measure_merge
from .module_tree import replace_module

_STATE_ATTR = "deltatune_state"


@dataclass
class AdapterState:
    """What a model with adapters remembers: each adapter's config and which are active."""

    configs: dict[str, AdapterConfig] = field(default_factory=dict)
    active: list[str] = field(default_factory=list)


def get_state(model: nn.Module) -> AdapterState:
    """The model's adapter registry; raises when the model has no adapters."""
    state = getattr(model, _STATE_ATTR, None)
    if state is None:
        raise ValueError("this model has no deltatune adapters; call dt.add_adapter or dt.load_adapter first")
    return state


def _check_name(name: str) -> None:
    if not name or not re.fullmatch(r"[A-Za-z0-9_\-]+", name):
        raise ValueError(f"adapter name {name!r} must be non-empty letters, digits, '_' or '-' (no dots)")


def add_adapter(
    model: nn.Module,
    config: AdapterConfig,
    name: str = "default",
    trainable: bool = True,
    _fill: Optional[Callable[[nn.Module], None]] = None,
) -> nn.Module:
    """Add adapter ``name`` to ``model`` in place and return the model.

    Any registered method's config works (``dt.LoraConfig``, ``dt.LoHaConfig``, ...). The first
    adapter freezes the base model and becomes active; later ones are added inactive
    (activate them with ``set_adapter``). Only adapter parameters (and biases, where the
    config asks) require grad. ``_fill`` (used by ``load_adapter``) sets the values instead of
    initialising them. All or nothing: on any error the model is left as it was.
    """
    _check_name(name)
    method = method_for(config)
    state = getattr(model, _STATE_ATTR, None)
    if state is not None and name in state.configs:
        raise ValueError(f"adapter {name!r} already exists; delete it first or choose another name")
    config = copy.deepcopy(config)
    method.prepare(model, config)
    if config.base_model_name_or_path is None:
        config.base_model_name_or_path = getattr(model, "name_or_path", None) or None

    requires_grad = {id(p): p.requires_grad for p in model.parameters()}
    if state is None:  # the first adapter freezes the base model
        for p in model.parameters():
            p.requires_grad_(False)
    try:
        method.inject(model, config, name, from_file=_fill is not None)
        registry = state or AdapterState()
        setattr(model, _STATE_ATTR, registry)
        registry.configs[name] = config
        for _, layer in adapter_layers(model):
            for p in layer.adapter_parameters(name):
                p.requires_grad_(trainable)
        for p in method.extra_parameters(model, name, config):
            p.requires_grad_(trainable)
        if _fill is not None:
            _fill(model)
    except Exception:  # leave the model exactly as it was
        _remove_from_layers(model, name)
        method.remove(model, name)
        if state is None:
            if hasattr(model, _STATE_ATTR):
                delattr(model, _STATE_ATTR)
        else:
            state.configs.pop(name, None)
        for p in model.parameters():
            p.requires_grad_(requires_grad.get(id(p), False))
        raise
    set_adapter(model, registry.active or [name])
    return model


def set_adapter(model: nn.Module, names: Union[str, Sequence[str], None]) -> None:
    """Make ``names`` (one, several, or ``None`` for none) the active adapters."""
    state = get_state(model)
    wanted = [] if names is None else [names] if isinstance(names, str) else list(names)
    unknown = [n for n in wanted if n not in state.configs]
    if unknown:
        raise ValueError(f"unknown adapter(s) {unknown}; this model has {sorted(state.configs)}")
    state.active = wanted
    for _, layer in adapter_layers(model):
        layer.active_adapters = list(wanted)


def set_adapter_rank(model: nn.Module, rank: Optional[int], name: str = "default") -> None:
    """Run DyLoRA adapter ``name`` cut to its first ``rank`` components (``None``: all ``r``), as
    the LoRA adapter of that rank it holds; training steps keep drawing their own ranks."""
    from .adapters.low_rank.dylora import check_rank, dylora_layers

    state = get_state(model)
    if name not in state.configs:
        raise ValueError(f"unknown adapter {name!r}; this model has {sorted(state.configs)}")
    if rank is not None:
        check_rank(state.configs[name], rank)
    for layer in dylora_layers(model, name):
        layer.set_rank_limit(name, rank)


def active_adapters(model: nn.Module) -> list[str]:
    """Names of the active adapters."""
    return list(get_state(model).active)


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block the model computes exactly what the base model computes.

    Merged layers are unmerged for the block and afterwards get their merged state back as it
    was (the same tensors, quantized bytes and flags), not merged again. ``dt.unmerge`` inside
    the block keeps the model unmerged; ``dt.merge`` and deleting a merged adapter are refused.
    """
    layers = [layer for _, layer in adapter_layers(model)]
    was_disabled = [layer.disabled for layer in layers]
    set_aside: list[AdapterLayer] = []  # only these are restored: a nested block leaves the outer one's alone
    try:
        for layer in layers:
            if isinstance(layer, AdapterLayer) and layer.merged_adapters:
                layer.set_merge_aside()
                set_aside.append(layer)
            layer.disabled = True
        yield model
    finally:
        for layer in set_aside:
            layer.restore_merge()
        for layer, flag in zip(layers, was_disabled):
            layer.disabled = flag


@contextlib.contextmanager
def adapter_per_row(model: nn.Module, names: Sequence[Optional[str]]) -> Iterator[nn.Module]:
    """Within the block, row ``i`` of every batch uses adapter ``names[i]`` (``None``: base only).

    Works for ``forward`` and ``generate`` (beam search and several samples per prompt
    repeat each row's choice). Rows are grouped per adapter, not looped one by one.
    """
    state = get_state(model)
    unknown = sorted({n for n in names if n is not None and n not in state.configs})
    if unknown:
        raise ValueError(f"unknown adapter(s) {unknown}; this model has {sorted(state.configs)}")
    layers = [layer for _, layer in adapter_layers(model)]
    if any(getattr(layer, "merged_adapters", None) for layer in layers):
        raise RuntimeError("adapters are merged into the base weights; call dt.unmerge(model) before routing per row")
    plan = RowPlan(names)
    for layer in layers:
        layer.row_plan = plan
    try:
        yield model
    finally:
        for layer in layers:
            layer.row_plan = None


def merge(model: nn.Module, names: Optional[Sequence[str]] = None, *, requantize: bool = False,
          tokenizer=None, verbose: bool = True) -> MergeReport:
    """Fold adapters (default: the active ones) into the base weights; ``unmerge`` undoes it exactly.

    A quantized base is dequantized and merged in float32; ``requantize=True`` stores the
    result quantized again (smaller, lossy), otherwise in full precision. Every merge
    measures and prints its error against the unmerged model on a fixed probe text
    (``tokenizer`` makes the probe real text) and returns it as a ``MergeReport``.
    """
    state = get_state(model)
    names = list(state.active if names is None else [names] if isinstance(names, str) else names)
    unknown = [n for n in names if n not in state.configs]
    if unknown:
        raise ValueError(f"unknown adapter(s) {unknown}; this model has {sorted(state.configs)}")
    _check_mergeable(model, state, names)
    return measure_merge(model, lambda: _merge_layers(model, names, requantize), tokenizer, requantize, verbose)


_VIRTUAL_TOKENS = "it adds virtual tokens in front of the input"
# why a method's update cannot live in the base weights, by peft_type (default: not linear)
_WHY_NOT_MERGEABLE = {
    "SHADOW": "its shadow network's state depends on the input and steers every block's input, which is not a "
              "weight update",
    **dict.fromkeys(("PROMPT_TUNING", "PREFIX_TUNING", "P_TUNING", "CARTRIDGE", "MULTITASK_PROMPT_TUNING", "CPT"),
                    _VIRTUAL_TOKENS),
    "POLY": "it mixes its LoRA skills per task from each row's task_ids, so rows of different tasks need "
            "different weights (and training samples the mixture)",
    "ADAPTION_PROMPT": "it adds an attention over learned prompts, not a weight update",
    "XLORA": "its mixture of LoRA experts is chosen per token from the input",
    "LILY": "its router averages the mixing weights of its shared B factors over the whole batch, so the update "
            "depends on the batch",
}


def _check_mergeable(model: nn.Module, state: AdapterState, names: Sequence[str]) -> None:
    """Refuse a merge before any layer changes (the layers check again, as a last guard)."""
    for n in names:
        config = state.configs[n]
        if not config.mergeable:
            reason = _WHY_NOT_MERGEABLE.get(config.peft_type, "its update is not linear in the input")
            raise ValueError(
                f"adapter {n!r} ({config.peft_type}) cannot be merged into the base weights: {reason}; "
                "keep it as an adapter, or use dt.unload(model, merge=False) for the base model"
            )
    for key, layer in adapter_layers(model):
        if not isinstance(layer, AdapterLayer):
            continue
        if layer.merge_set_aside:
            raise RuntimeError("cannot merge inside dt.disable_adapters (the merged adapters are set aside "
                               "until the block ends); merge after the block")
        for n in names:
            problem = n in layer.adapter_names and n not in layer.merged_adapters and layer.merge_problem(n)
            if problem:
                raise ValueError(f"adapter {n!r} cannot be merged into {key}: {problem}")


def _merge_layers(model: nn.Module, names: Sequence[str], requantize: bool = False) -> None:
    shared = _shared_parameter_ids(model)
    for _, layer in adapter_layers(model):
        if isinstance(layer, AdapterLayer):
            layer.merge([n for n in names if n in layer.adapter_names], untie=_is_shared(layer, shared),
                        requantize=requantize)


def _is_shared(layer: AdapterLayer, shared: set[int]) -> bool:
    """The layer's base weight is tied to another module (a quantized base never is)."""
    return not layer.quantized and id(layer.base_weight()) in shared


def _shared_parameter_ids(model: nn.Module) -> set[int]:
    """Ids of parameters reachable under more than one name (tied weights)."""
    seen: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        seen[id(p)] = seen.get(id(p), 0) + 1
    return {i for i, n in seen.items() if n > 1}


def unmerge(model: nn.Module) -> None:
    """Restore every merged base weight bit for bit."""
    for _, layer in adapter_layers(model):
        if isinstance(layer, AdapterLayer):
            layer.unmerge()


def unload(model: nn.Module, merge: bool = True, *, requantize: bool = False, tokenizer=None,
           verbose: bool = True) -> nn.Module:
    """Remove all adapter layers and return the plain model.

    With ``merge=True`` the active adapters are folded in (the merge error is printed, as
    ``merge`` prints it, when anything was left to merge) and trainable copies
    (``modules_to_save``) replace their originals; with ``merge=False`` the original base
    model comes back unchanged.
    """
    state = get_state(model)
    if merge:
        _check_mergeable(model, state, state.active)
    if merge and _has_unmerged(model, state.active):
        measure_merge(model, lambda: _merge_layers(model, state.active, requantize), tokenizer, requantize,
                      verbose)
    for key, layer in list(adapter_layers(model)):
        if isinstance(layer, AdapterLayer):
            if not merge:
                layer.unmerge()
            elif layer.untied_for_merge:
                _untie_config(model)
            replace_module(model, key, layer.base_layer)
        elif isinstance(layer, ModulesToSave):
            chosen = layer.current() if merge else layer.original_module
            if chosen is not layer.original_module:
                _untie_config(model)
            replace_module(model, key, chosen)
    for name, config in state.configs.items():
        METHODS[config.peft_type].remove(model, name)
    delattr(model, _STATE_ATTR)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _has_unmerged(model: nn.Module, names: Sequence[str]) -> bool:
    return any(n in layer.adapter_names and n not in layer.merged_adapters
               for _, layer in adapter_layers(model) if isinstance(layer, AdapterLayer) for n in names)


def _untie_config(model: nn.Module) -> None:
    """A merged or trained copy of a tied head/embedding must not be re-tied to its twin on reload."""
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "tie_word_embeddings", False):
        config.tie_word_embeddings = False


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter ``name``; layers left without adapters go back to their base modules."""
    state = get_state(model)
    if name not in state.configs:
        raise ValueError(f"unknown adapter {name!r}; this model has {sorted(state.configs)}")
    merged = [key for key, layer in adapter_layers(model)
              if isinstance(layer, AdapterLayer) and layer.holds_merged(name)]
    if merged:  # refused before any layer changes, so the model is never left half deleted
        raise RuntimeError(f"adapter {name!r} is merged into {len(merged)} layer(s) ({merged[0]}, ...); "
                           "call dt.unmerge(model) first (after any dt.disable_adapters block)")
    _remove_from_layers(model, name)
    METHODS[state.configs[name].peft_type].remove(model, name)
    del state.configs[name]
    state.active = [a for a in state.active if a != name]
    if not state.configs:
        delattr(model, _STATE_ATTR)


def _remove_from_layers(model: nn.Module, name: str) -> None:
    for key, layer in list(adapter_layers(model)):
        layer.delete_adapter(name)
        if not layer.adapter_names and isinstance(layer, (AdapterLayer, ModulesToSave)):
            base = layer.base_layer if isinstance(layer, AdapterLayer) else layer.original_module
            replace_module(model, key, base)


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(number of parameters that require grad, number of all parameters).

    Quantized weights count as the parameters they stand for, not as packed bytes.
    """
    from .quant.layers import QuantLinear

    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    total += sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, QuantLinear))
    return trainable, total


def print_trainable_parameters(model: nn.Module) -> str:
    """Print and return a one-line summary, as PEFT prints it."""
    trainable, total = trainable_parameters(model)
    line = f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"
    print(line)
    return line


def config_for_layers(model: nn.Module, ranks: dict[str, int], **fields) -> LoraConfig:
    """A LoraConfig that targets exactly the layers in ``ranks`` (full names) with those ranks.

    Alphas equal ranks, so the scale is 1: factors built by a caller carry the scale.
    """
    names = sorted(ranks)
    default = max(ranks.values())
    pattern = {re.escape(n): r for n, r in ranks.items() if r != default}
    return dataclasses.replace(
        LoraConfig(r=default, lora_alpha=default, target_modules=names, init_lora_weights=False),
        rank_pattern=pattern, alpha_pattern=dict(pattern), **fields,
    )
