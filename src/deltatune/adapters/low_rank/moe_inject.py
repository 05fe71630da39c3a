"""Adding LoRA on parameters (PEFT's ``target_parameters``) to a model, and its file keys: which
module's parameters get an ``ExpertLoraLayer`` (PEFT's refusals included), the warning when only
modules matched, and the nesting of a module's parameters in adapter files, PEFT's either way."""

from __future__ import annotations

import warnings

import torch
from torch import nn

from ...config import LoraConfig
from ...module_tree import replace_module
from ...quant.experts import quantized_parameter
from ...targeting import DEFAULT_TARGETS, find_targets
from ...targeting_experts import expert_parameters, matched_parameters
from ..base import AdapterLayer, ModulesToSave, adapter_layers
from . import moe_grouped
from .moe_experts import ExpertLoraLayer, expert_layers


def inject_parameters(model: nn.Module, config: LoraConfig, name: str, from_file: bool) -> list[str]:
    """Add adapter ``name`` to every parameter ``config.target_parameters`` reaches; returns their
    full names (empty when none matched). Refused as PEFT refuses: a parameter of a module that
    another adapter layer wraps, and adapters that target different sets of parameters."""
    found = matched_parameters(model, list(config.target_parameters or []))
    if not found:
        return []
    by_module: dict[str, list[str]] = {}
    for module_key, parameter in found:
        if not module_key:
            raise ValueError(f"target_parameters: {parameter!r} sits on the top-level model, which cannot be "
                             "wrapped (PEFT refuses it too)")
        by_module.setdefault(module_key, []).append(parameter)
    existing = {k: layer.parameter_names for k, layer in expert_layers(model) if layer.adapter_names}
    if existing and existing != by_module:
        raise ValueError("When using multiple adapters with `target_parameters`, all adapters must target the same "
                         f"set of parameters (as in PEFT); adapter {name!r} targets "
                         f"{sorted(f'{k}.{p}' for k, ps in by_module.items() for p in ps)[:4]}..., the existing "
                         f"ones {sorted(f'{k}.{p}' for k, ps in existing.items() for p in ps)[:4]}...")
    for module_key, parameters in by_module.items():
        module = model.get_submodule(module_key)
        if isinstance(module, (AdapterLayer, ModulesToSave)) and not isinstance(module, ExpertLoraLayer):
            raise ValueError(f"target_parameters: the parameters of {module_key!r} ({parameters}) cannot be "
                             f"adapted, as {type(module).__name__} already wraps it; make sure the module is "
                             "not also targeted with target_modules (PEFT refuses this too)")
        for parameter in parameters:
            if quantized_parameter(module, parameter) is not None:
                why = moe_grouped.unsupported_reason(module)
                if why is not None:
                    raise ValueError(f"target_parameters: {module_key}.{parameter} is stored in 4 bits, and LoRA "
                                     f"on 4-bit parameters runs through the grouped expert compute only: {why}")
                continue
            tensor = getattr(module, parameter, None) if "." not in parameter else None
            if tensor is not None and not tensor.is_floating_point():
                raise ValueError(f"target_parameters: {module_key}.{parameter} is {tensor.dtype} (quantized); LoRA on "
                                 "expert parameters needs them in floating point")
        layer = module
        if not isinstance(module, ExpertLoraLayer):
            layer = ExpertLoraLayer(module, parameters)
            replace_module(model, module_key, layer)
            parent_key = module_key.rpartition(".")[0]
            layer.watch_batch(model.get_submodule(parent_key) if parent_key else model)
        layer.add(name, config, module_key, from_file=from_file)
        layer.train(module.training)
    return [f"{k}.{p}" for k, p in found]


def parameters_only(model: nn.Module, config: LoraConfig) -> bool:
    """``config`` adapts parameters alone: ``target_parameters`` set and ``target_modules`` None on
    an architecture without default modules (PEFT then leaves ``target_modules`` None; where it has
    defaults, as for Mixtral, it fills them in and adapts those modules too)."""
    if not config.target_parameters or config.target_modules is not None:
        return False
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return model_type not in (config.default_targets or DEFAULT_TARGETS)


def targets_modules(model: nn.Module, config: LoraConfig) -> bool:
    """Beside its parameters, ``config`` reaches modules (or trains copies of some)."""
    if parameters_only(model, config):
        return bool(config.modules_to_save)
    return bool(find_targets(model, config)) or bool(config.modules_to_save)


def inject_lora_parameters(model: nn.Module, config: LoraConfig, name: str, from_file: bool) -> None:
    """The ``target_parameters`` part of a LoRA adapter, after its modules (PEFT's order): an error
    when neither matched anything, a warning (as PEFT's) when only the parameters matched nothing."""
    if not config.target_parameters:
        return
    if inject_parameters(model, config, name, from_file):
        return
    if not any(layer.has_adapter(name) for _, layer in adapter_layers(model)):
        known = [f"{m}.{p}" for m, p in expert_parameters(model)][:6]
        raise ValueError(f"target_parameters={config.target_parameters!r} matched no parameter of "
                         f"{type(model).__name__}" + (f"; its expert weights include {known}" if known else ""))
    warnings.warn(f"target_parameters={config.target_parameters} were set but no parameter was matched.",
                  RuntimeWarning, stacklevel=3)


def align_nesting(model: nn.Module, name: str, tensors: dict[str, torch.Tensor], prefix: str) -> None:
    """Read a file that nests a module's two adapted parameters the other way round (PEFT nests the
    parameters it finds parametrized, as on a bitsandbytes 4-bit base, in name order, plain ones in
    the module's order): where the file's shapes fit only the swapped nesting, its inner and outer
    tensors are swapped in ``tensors``. deltatune itself always writes the module's order."""
    for key, layer in expert_layers(model):
        if not layer.has_adapter(name) or len(layer.parameter_names) != 2:
            continue
        live = {f"{prefix}{key}.{k}": tuple(t.shape) for k, t in layer.file_tensors(name).items()}
        if not all(k in tensors for k in live) or all(tuple(tensors[k].shape) == s for k, s in live.items()):
            continue
        swapped = {k: tensors[k.replace(".base_layer.lora_", ".lora_") if ".base_layer.lora_" in k
                           else k.replace(".lora_", ".base_layer.lora_")] for k in live}
        if all(tuple(t.shape) == live[k] for k, t in swapped.items()):
            tensors.update(swapped)


def expert_file_tensors(model: nn.Module, name: str, prefix: str) -> dict[str, torch.Tensor]:
    """File key -> live tensor of adapter ``name``'s parameter factors, PEFT's keys."""
    out = {}
    for key, layer in expert_layers(model):
        if layer.has_adapter(name):
            for sub, tensor in layer.file_tensors(name).items():
                out[f"{prefix}{key}.{sub}"] = tensor
    return out
