"""Which modules of a base model get an adapter, and with which rank and alpha.

The rules follow PEFT so that a config means the same thing in both tools.
"""

from __future__ import annotations

import re
from typing import Iterator, Optional

from torch import nn

from .config import TargetedConfig
from .module_tree import AddedModule, output_head_name
from .quant.layers import QuantLinear

ALL_LINEAR = "all-linear"

# Used when target_modules is None, keyed by ``model.config.model_type``.
DEFAULT_TARGETS: dict[str, list[str]] = {
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "mixtral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
    "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"],
    "phi3": ["qkv_proj"],
    "gpt2": ["c_attn"],
    "t5": ["q", "v"],
    "mt5": ["q", "v"],
    "bart": ["q_proj", "v_proj"],
    "opt": ["q_proj", "v_proj"],
}


def is_linear_like(module: nn.Module) -> bool:
    """nn.Linear, the transposed GPT-2 ``Conv1D``, or a quantized linear layer."""
    return isinstance(module, (nn.Linear, QuantLinear)) or type(module).__name__ == "Conv1D"


def walk_modules(model: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """Named modules, stopping at adapter wrappers so their internals are never targeted."""
    for name, child in model.named_children():
        if isinstance(child, AddedModule) and not child.stands_for_base:
            continue  # soft prompts and shared bases are deltatune's own, never targets
        full = f"{prefix}.{name}" if prefix else name
        yield full, child
        if isinstance(child, AddedModule):
            continue
        yield from walk_modules(child, full)


def _matches_list(key: str, names: list[str]) -> bool:
    return key in names or any(key.endswith(f".{n}") for n in names)


def _layer_index(key: str, layers_pattern: Optional[list[str] | str]) -> Optional[int]:
    if not layers_pattern:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
    else:
        patterns = [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern
        match = None
        for pattern in patterns:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", key)
            if match:
                break
    return int(match.group("idx")) if match else None


def resolve_targets(config: TargetedConfig, model: nn.Module) -> Optional[list[str] | str]:
    """The effective ``target_modules``: the config's, or the architecture default."""
    if config.target_modules is not None:
        return config.target_modules
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    table = config.default_targets or DEFAULT_TARGETS
    if model_type not in table:
        raise ValueError(
            f"{type(config).__name__}.target_modules is None and there is no default for model_type "
            f"{model_type!r}; name the modules, e.g. target_modules=['q_proj', 'v_proj'] or 'all-linear'"
        )
    return table[model_type]


def is_target(config: TargetedConfig, key: str, targets: list[str] | str) -> bool:
    """True when the module named ``key`` should get an adapter under ``config``.

    ``targets`` is ``config.target_modules`` after ``expand_target_modules``.
    """
    if config.exclude_modules:
        ex = config.exclude_modules
        if (re.fullmatch(ex, key) if isinstance(ex, str) else _matches_list(key, ex)):
            return False
    if config.modules_to_save and any(re.match(rf"(^|.*\.){m}($|\..*)", key) for m in config.modules_to_save):
        return False
    if isinstance(targets, str):
        return re.fullmatch(targets, key) is not None
    if not _matches_list(key, targets):
        return False
    layers = getattr(config, "layers_to_transform", None)
    if layers:
        index = _layer_index(key, getattr(config, "layers_pattern", None))
        return index is not None and index in layers
    return True


def expand_target_modules(model: nn.Module, config: TargetedConfig) -> Optional[list[str] | str]:
    """``target_modules`` as saved files record it: ``None`` becomes the architecture default and
    ``"all-linear"`` the full names of every linear layer but the output head (as PEFT writes)."""
    targets = resolve_targets(config, model)
    if isinstance(targets, (list, set, tuple)) and len(targets) >= MIN_NAMES_TO_SHORTEN:
        listed = set(targets)
        others = [k for k, _ in walk_modules(model)
                  if k not in listed and not any(k.endswith("." + t) for t in listed)]
        return sorted(shortest_suffixes(list(listed), others))
    if targets != ALL_LINEAR:
        return targets
    head = output_head_name(model)
    names, others = [], []
    for key, module in walk_modules(model):
        base = getattr(module, "base_layer", module) if isinstance(module, AddedModule) else module
        (names if is_linear_like(base) and key != head else others).append(key)
    if len(names) >= MIN_NAMES_TO_SHORTEN:
        return sorted(shortest_suffixes(names, others))
    return names


# PEFT records a long resolved list by the shortest name suffixes that still pick out exactly
# those modules (e.g. 32 T5 names -> q, k, v, o, wi, wo); files must carry the same list.
MIN_NAMES_TO_SHORTEN = 20


def shortest_suffixes(targets: list[str], others: list[str]) -> set[str]:
    """The fewest dotted suffixes that match every name in ``targets`` and no name in ``others``."""
    def suffixes(name: str) -> list[str]:  # shortest first
        parts = name.split(".")
        return [".".join(parts[i:]) for i in range(len(parts))][::-1]

    taken_by_others = {suffix for name in others for suffix in suffixes(name)}
    chosen: set[str] = set()
    for name, candidates in sorted(((t, suffixes(t)) for t in set(targets)), key=lambda item: item[1]):
        if any(name == c or name.endswith("." + c) for c in chosen):
            continue
        for suffix in candidates:
            if suffix not in taken_by_others:
                chosen.add(suffix)
                break
    return chosen or set(targets)


def find_targets(model: nn.Module, config: TargetedConfig) -> list[tuple[str, nn.Module]]:
    """(name, module) pairs that ``config`` targets in ``model``."""
    targets = expand_target_modules(model, config)
    return [(k, m) for k, m in walk_modules(model) if is_target(config, k, targets)]


def pattern_value(patterns: dict, key: str, default):
    """PEFT's rank/alpha pattern lookup: first pattern that matches a dotted suffix of ``key``."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", key):
            return value
    return default


def modules_to_save_targets(model: nn.Module, names: list[str]) -> list[tuple[str, nn.Module]]:
    """Modules whose name is, or ends with, one of ``names``."""
    return [(k, m) for k, m in walk_modules(model) if _matches_list(k, names)]
