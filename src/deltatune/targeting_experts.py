"""Which parameters of a model ``target_parameters`` reaches, and what targeting leaves out.

In transformers 5 a mixture-of-experts layer keeps its experts as fused 3-D parameters (Qwen3-MoE's
``mlp.experts.gate_up_proj`` of shape experts × 2·intermediate × hidden; gpt-oss stores them
transposed), not as ``nn.Linear`` modules, so ``target_modules`` (and ``"all-linear"``, which keeps
PEFT's meaning) never reaches them. This module names them: the matching rule of PEFT's
``target_parameters``, the expert parameters a config leaves untouched (``deltatune`` warns once,
naming them), the names the ``target_experts`` preset adds, and the routers beside the experts.

It is a lower layer: it imports no adapters, only ``module_tree`` (wrappers are recognised there).
"""

from __future__ import annotations

import re
import warnings
from typing import Iterator, Optional

import torch
from torch import nn

from .module_tree import AddedModule

_WRAPPED = ".base_layer"


def unwrapped_name(key: str) -> str:
    """``key`` without the ``.base_layer`` steps that adapter wrappers insert (PEFT's rule)."""
    while _WRAPPED in key:
        prefix, _, suffix = key.rpartition(_WRAPPED)
        key = prefix + suffix
    return key


def base_modules(model: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """(name without wrapper steps, module) for every module of the base model: adapter wrappers
    are looked through (their ``base_layer``, a trainable copy's ``original_module``), never into."""
    for child_name, child in model.named_children():
        key = f"{prefix}.{child_name}" if prefix else child_name
        if isinstance(child, AddedModule):
            inner = getattr(child, "base_layer", None) or getattr(child, "original_module", None)
            if isinstance(inner, nn.Module):  # an adapter layer: the base module keeps the name
                yield from _through_wrapper(inner, key)
            continue
        yield key, child
        yield from base_modules(child, key)


def _through_wrapper(inner: nn.Module, key: str) -> Iterator[tuple[str, nn.Module]]:
    while isinstance(inner, AddedModule) and isinstance(getattr(inner, "base_layer", None), nn.Module):
        inner = inner.base_layer  # nested wrappers (one per adapted parameter of a module)
    if isinstance(inner, AddedModule):
        return
    yield key, inner
    yield from base_modules(inner, key)


def parameter_shape(module: nn.Module, name: str) -> torch.Size:
    """The shape ``module.<name>`` has when read, without reading it: a 4-bit parameter's
    parametrization (``quant.experts``) knows the shape its packed bytes decode to."""
    lists = getattr(module, "parametrizations", None)
    if isinstance(lists, nn.ModuleDict) and name in lists:
        shape = getattr(lists[name][0], "shape", None)
        if shape is not None:
            return torch.Size(shape)
    return getattr(module, name).shape


# The module's own parameter order, recorded on it before deltatune first stores one of its
# parameters in 4 bits (quant/experts.py): merging and unmerging re-register parameters, and the
# order must not follow them.
PARAMETER_ORDER = "_deltatune_parameter_order"


def own_parameters(module: nn.Module) -> list[tuple[str, torch.Size]]:
    """(name, shape) of the parameters ``module`` holds itself, in the module's own order: its plain
    ones, then parametrized ones (as bitsandbytes stores a 4-bit parameter) in the order they were
    parametrized, or in the order recorded before deltatune stored any in 4 bits. So the nesting of
    adapter layers, and an adapter file's keys, do not depend on whether the base is quantized
    (PEFT nests parametrized parameters in name order instead; loading reads either)."""
    out = [(n, p.shape) for n, p in module.named_parameters(recurse=False)]
    lists = getattr(module, "parametrizations", None)
    if isinstance(lists, nn.ModuleDict):
        out += [(n, parameter_shape(module, n)) for n in lists]
    order = getattr(module, PARAMETER_ORDER, None)
    if order:
        out.sort(key=lambda item: order.index(item[0]) if item[0] in order else len(order))
    return out


def matches_parameter(key: str, targets: list[str]) -> bool:
    """PEFT's rule: the full name, or a dotted suffix of it, is one of ``targets``."""
    return key in targets or any(key.endswith(f".{t}") for t in targets)


def matched_parameters(model: nn.Module, targets: list[str]) -> list[tuple[str, str]]:
    """(module name, parameter name) of every parameter ``targets`` reaches, in PEFT's order: the
    model's module order, then each module's own parameter order (which decides how the adapter
    layers of several parameters of one module nest, and so the file's keys)."""
    found = []
    for module_key, module in base_modules(model):
        for param_name, _ in own_parameters(module):
            if matches_parameter(f"{module_key}.{param_name}" if module_key else param_name, targets):
                found.append((module_key, param_name))
    return found


def _num_experts(module: nn.Module) -> Optional[int]:
    count = getattr(module, "num_experts", None)
    return count if isinstance(count, int) and not isinstance(count, bool) and count > 0 else None


def expert_parameters(model: nn.Module) -> list[tuple[str, str]]:
    """(module name, parameter name) of every fused expert weight: a 3-D parameter whose first
    dimension is its module's ``num_experts`` (the experts' biases are left out: they are not
    weight matrices, and LoRA does not adapt biases)."""
    out = []
    for module_key, module in base_modules(model):
        count = _num_experts(module)
        if count is None:
            continue
        for param_name, shape in own_parameters(module):
            if len(shape) == 3 and shape[0] == count:
                out.append((module_key, param_name))
    return out


def _layer_suffix(key: str) -> str:
    """The part of ``key`` after its last layer index ("model.layers.3.mlp.experts.down_proj" ->
    "mlp.experts.down_proj"): a name every layer shares, as PEFT's examples write them."""
    parts = key.split(".")
    last = max((i for i, part in enumerate(parts) if part.isdigit()), default=-1)
    return ".".join(parts[last + 1:]) if 0 <= last < len(parts) - 1 else key


def expert_targets(model: nn.Module) -> list[str]:
    """``target_parameters`` that reach every fused expert weight of ``model`` (the preset)."""
    names = [_layer_suffix(f"{m}.{p}") for m, p in expert_parameters(model)]
    return list(dict.fromkeys(names))


def router_modules(model: nn.Module) -> list[str]:
    """Names of the routers beside the experts: a sibling of an experts module whose ``weight`` is
    (num_experts, hidden) (Qwen3-MoE/Mixtral/OLMoE's ``mlp.gate``, gpt-oss's ``mlp.router``)."""
    out = []
    experts = {m for m, _ in expert_parameters(model)}
    modules = dict(base_modules(model))
    for expert_key in experts:
        parent_key, _, own = expert_key.rpartition(".")
        parent = modules.get(parent_key)
        count = _num_experts(modules[expert_key])
        if parent is None:
            continue
        for child_name, child in parent.named_children():
            child = getattr(child, "original_module", child)  # a router already trained as a copy
            weight = getattr(child, "weight", None)
            if child_name != own and isinstance(weight, nn.Parameter) and weight.dim() == 2 \
                    and weight.shape[0] == count:
                out.append(f"{parent_key}.{child_name}" if parent_key else child_name)
    return sorted(out)


def router_targets(model: nn.Module) -> list[str]:
    """``modules_to_save`` names that make every router trainable (a copy saved with the adapter)."""
    return list(dict.fromkeys(_layer_suffix(k) for k in router_modules(model)))


def untargeted_expert_parameters(model: nn.Module, target_parameters: Optional[list[str]]) -> list[str]:
    """Full names of the fused expert weights that ``target_parameters`` does not reach."""
    targets = list(target_parameters or [])
    return [f"{m}.{p}" for m, p in expert_parameters(model) if not matches_parameter(f"{m}.{p}", targets)]


def _summary(names: list[str]) -> str:
    """"mlp.experts.gate_up_proj, mlp.experts.down_proj (each in 2 layers)"-style short form."""
    by_suffix: dict[str, int] = {}
    for name in names:
        suffix = _layer_suffix(name)
        by_suffix[suffix] = by_suffix.get(suffix, 0) + 1
    return ", ".join(f"{s} ({n} layer{'s' if n != 1 else ''})" for s, n in by_suffix.items())


class UntargetedExpertsWarning(UserWarning):
    """A mixture-of-experts model has fused expert weights that no target of the adapter reaches."""


def warn_untargeted_experts(model: nn.Module, config, adapter: str = "") -> list[str]:
    """Warn once (one warning, naming the parameters) when ``config`` leaves expert weights of
    ``model`` untouched; returns their full names. ``target_modules`` (``"all-linear"`` too) never
    reaches them; LoRA's ``target_parameters`` does."""
    missed = untargeted_expert_parameters(model, getattr(config, "target_parameters", None))
    if not missed:
        return missed
    hint = ("add them with target_parameters=" + repr(expert_targets(model))
            + " (deltatune train: --lora.target-experts)") if hasattr(config, "target_parameters") \
        else f"{config.peft_type} adapts modules only; LoRA's target_parameters reaches them"
    what = f"adapter {adapter!r}" if adapter else "the adapter"
    warnings.warn(f"{what} leaves {len(missed)} fused expert weight(s) of this mixture-of-experts model "
                  f"unadapted: {_summary(missed)}; target_modules (and 'all-linear', as in PEFT) reach "
                  f"nn.Linear modules only; {hint}", UntargetedExpertsWarning, stacklevel=3)
    return missed



# --- PEFT's reading of module names on transformers 5 mixture-of-experts models ---------------------
# PEFT 0.21.2 on transformers 5 rewrites a LoRA config before it targets anything, for the model types
# whose experts transformers fused (those with a checkpoint conversion of the "qwen2_moe" or "mixtral"
# kind): module names of the former per-expert linears and of the router become parameter targets, a
# gate/up pair fused into one tensor doubles rank and alpha there, and "all-linear" (every linear of the
# former model) so reaches the experts and the router's weight. deltatune reads configs the same way,
# so that a config means the same in both tools. Per kind: former name -> parameter, and the pairs fused.
_FORMER_NAMES = {
    "mixtral": {"gate": "gate.weight", "w1": "gate_up_proj", "w3": "gate_up_proj", "w2": "down_proj"},
    "qwen2_moe": {"gate": "gate.weight", "gate_proj": "gate_up_proj", "up_proj": "gate_up_proj",
                  "down_proj": "down_proj"},
}
_FUSED = {"mixtral": {"gate_up_proj": ("w1", "w3")}, "qwen2_moe": {"gate_up_proj": ("gate_proj", "up_proj")}}


def _conversion_kind(model: nn.Module) -> Optional[str]:
    """"qwen2_moe" or "mixtral" where transformers converts this model type's checkpoints so (the
    table PEFT reads too), else None."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type is None:
        return None
    try:
        from transformers.conversion_mapping import _MODEL_TO_CONVERSION_PATTERN, get_checkpoint_conversion_mapping
    except ImportError:  # transformers 4: the experts are linear layers, nothing to rewrite
        return None
    kind = "mixtral" if model_type == "mixtral" else _MODEL_TO_CONVERSION_PATTERN.get(model_type)
    if kind not in _FORMER_NAMES or get_checkpoint_conversion_mapping(model_type) is None:
        return None
    return kind


def _leaf_names(model: nn.Module, config, former: dict[str, str]) -> set[str]:
    """The last name part of every module a string ``target_modules`` (regex or "all-linear") picks,
    plus the former expert and router names it would have picked (PEFT's resolution)."""
    from .targeting import ALL_LINEAR, expand_target_modules

    if config.target_modules.lower() == ALL_LINEAR:
        resolved = expand_target_modules(model, config)
        resolved = [resolved] if isinstance(resolved, str) else resolved
        return {name.rsplit(".", 1)[-1] for name in resolved} | set(former)
    pattern = config.target_modules
    keys = [k for k, _ in model.named_modules()] + [k for k, _ in model.named_parameters()]
    matched = {k.rsplit(".", 1)[-1] for k in keys if re.fullmatch(pattern, k)}
    containers: dict[str, set[str]] = {}
    for key, _ in model.named_parameters():
        holder, _, leaf = key.rpartition(".")
        containers.setdefault(leaf, set()).add(holder)
    for old, new in former.items():  # a former expert name the regex spells out, probed where it lived
        if old not in matched and any(re.fullmatch(pattern, f"{c}.{old}") for c in containers.get(new, ())):
            matched.add(old)
    return matched


def convert_former_moe_targets(model: nn.Module, config) -> None:
    """Rewrite LoRA ``config`` in place as PEFT does on transformers 5 MoE models (see above):
    ``target_modules`` keeps the names that are still modules, ``target_parameters`` gains the fused
    expert weights (and ``gate.weight``) that the other names stood for. A gate/up pair named only in
    part is an error, as in PEFT (the halves share one tensor)."""
    kind = _conversion_kind(model)
    if kind is None or getattr(config, "peft_type", None) != "LORA":
        return
    former, fused = _FORMER_NAMES[kind], _FUSED[kind]
    if isinstance(config.target_modules, str):
        resolved = _leaf_names(model, config, former)
        if not resolved:
            return  # nothing matched: left for the usual error
        config.target_modules = sorted(resolved)
    parameters = list(dict.fromkeys(config.target_parameters or []))
    kept, named = [], {}
    for target in config.target_modules or []:
        old = next((o for o in former if target == o or target.endswith(f".{o}")), None)
        if old is None:
            kept.append(target)
            continue
        named.setdefault(former[old], set()).add(old)
        if former[old] not in parameters:
            parameters.append(former[old])
    for new, halves in fused.items():
        present = named.get(new, set())
        if 0 < len(present) < len(halves):
            raise ValueError(f"target_modules: {sorted(present)} cannot be adapted without "
                             f"{sorted(set(halves) - present)}: on this model they are fused into {new!r} "
                             "(PEFT refuses this too)")
        if len(present) == len(halves) > 1:  # both halves at rank r make one of rank 2r, same scale
            config.rank_pattern = {**config.rank_pattern, rf".*\.{re.escape(new)}": config.r * len(halves)}
            config.alpha_pattern = {**config.alpha_pattern, rf".*\.{re.escape(new)}": config.lora_alpha * len(halves)}
    # a router trained in full (modules_to_save: --lora.train-router) takes no LoRA on top
    saved = [name for name in (config.modules_to_save or []) if isinstance(name, str)]
    parameters = [p for p in parameters if not any(_same_module(p.rpartition(".")[0], s) for s in saved)]
    config.target_parameters = parameters
    config.target_modules = kept


def _same_module(a: str, b: str) -> bool:
    """Whether module names ``a`` and ``b`` name the same module, one as a suffix of the other."""
    return bool(a) and bool(b) and (a == b or a.endswith(f".{b}") or b.endswith(f".{a}"))
