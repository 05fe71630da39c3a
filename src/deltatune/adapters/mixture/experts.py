"""X-LoRA's experts: LoRA adapter folders read and added to the LoRA layers under internal names."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from ...config import LoraConfig, config_from_dict
from ...module_tree import replace_module
from ..low_rank.lora import LoraLayer
from ..method import FILE_PREFIX, method_for

# PEFT 0.21.2 writes an expert's tensors under its X-LoRA wrapper's path in the sub-folders it saves.
_PEFT_EXPERT_PREFIX = "base_model.lora_model.model."


def load_expert(model: nn.Module, key: str, expert: str, folders: list[Path]) -> LoraConfig:
    """Add the LoRA adapter of the first complete folder among ``folders`` as frozen expert ``key``
    and return its config. Folders without a config are skipped, unless none has one."""
    folders = [f for i, f in enumerate(folders) if f not in folders[:i]]
    usable = [f for f in folders if (f / "adapter_config.json").is_file()] or folders[-1:]
    for folder, fallback in zip(usable, usable[1:]):
        config, tensors = read_lora_folder(folder, f"XLoraConfig.adapters[{expert!r}]")
        try:
            add_expert(model, key, config, tensors, folder)
            return config
        except IncompleteExpert as err:
            drop_expert(model, key)
            # PEFT 0.21.2 saves sub-folders without the tensors whose key holds another expert's name
            # (".1." of "layers.1"); PEFT itself reads the experts from the paths given at load time
            warnings.warn(f"{err}; reading expert {expert!r} from {fallback} (adapters[{expert!r}])")
    config, tensors = read_lora_folder(usable[-1], f"XLoraConfig.adapters[{expert!r}]")
    add_expert(model, key, config, tensors, usable[-1])
    return config


def read_lora_folder(folder: Path, owner: str) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """An expert's LoRA config and tensors (keys as PEFT's LoRA files name them); errors name the file."""
    config_file, weights = folder / "adapter_config.json", folder / "adapter_model.safetensors"
    for f in (config_file, weights):
        if not f.is_file():
            raise FileNotFoundError(f"{owner}: {f} not found (an X-LoRA expert is a LoRA adapter folder)")
    try:
        data = json.loads(config_file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"{config_file}: invalid JSON ({err})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{config_file}: expected a JSON object")
    config = config_from_dict(data, source=str(config_file))
    if type(config) is not LoraConfig:
        raise ValueError(f"{config_file}: an X-LoRA expert must be a LoRA adapter, got {config.peft_type}")
    for field, plain in (("use_dora", False), ("bias", "none"), ("modules_to_save", None)):
        if getattr(config, field) != plain:
            raise NotImplementedError(f"{config_file}: X-LoRA experts with {field}={getattr(config, field)!r} are "
                                      "not supported (PEFT's X-LoRA applies plain LoRA factors only)")
    try:
        raw = load_file(str(weights))
    except Exception as err:  # safetensors raises several types for damaged files
        raise ValueError(f"{weights}: not a readable safetensors file ({err})") from None
    tensors = {}
    for key, value in raw.items():
        if key.startswith(_PEFT_EXPERT_PREFIX):
            key = FILE_PREFIX + key[len(_PEFT_EXPERT_PREFIX):]
        tensors[key] = value
    return config, tensors


class IncompleteExpert(ValueError):
    """An expert's file lacks tensors its LoRA config targets."""


def drop_expert(model: nn.Module, key: str) -> None:
    """Remove expert ``key`` from every LoRA layer; layers left empty go back to their base modules."""
    for module_key, layer in list(model.named_modules()):
        if isinstance(layer, LoraLayer) and key in layer.adapter_names:
            layer.delete_adapter(key)
            if not layer.adapter_names:
                replace_module(model, module_key, layer.base_layer)


def add_expert(model: nn.Module, key: str, config: LoraConfig, tensors: dict[str, torch.Tensor], folder: Path) -> None:
    """Add expert ``key`` as a frozen LoRA adapter of the layers and copy the folder's values in."""
    lora = method_for(config)
    lora.prepare(model, config)
    lora.inject(model, config, key, from_file=True)
    everything = lora.file_tensors(model, key, config)
    targets = {k: v for k, v in everything.items() if ".lora_" in k}
    where = folder / "adapter_model.safetensors"
    for k, value in tensors.items():
        # Base tensors in the file: the embedding weights a LoRA file keeps when it targets one must be
        # the model's own; anything else (PEFT's X-LoRA sub-folders hold the whole base) is not the expert's.
        if ".lora_" not in k and k in everything and not torch.equal(value.to(everything[k].dtype),
                                                                     everything[k].detach().cpu()):
            raise NotImplementedError(f"{where}: key {k!r} differs from the model's own weight; X-LoRA experts "
                                      "that change base weights are not supported")
    tensors = {k: v for k, v in tensors.items() if ".lora_" in k}
    unexpected = sorted(set(tensors) - set(targets))
    missing = sorted(set(targets) - set(tensors))
    if unexpected:
        raise ValueError(f"{where}: key {unexpected[0]!r} has no matching module in this model "
                         f"({len(unexpected)} such)")
    if missing:
        raise IncompleteExpert(f"{where}: key {missing[0]!r} is missing ({len(missing)} such)")
    with torch.no_grad():
        for k, target in targets.items():
            value = tensors[k]
            if tuple(value.shape) != tuple(target.shape):
                raise ValueError(f"{where}: key {k!r} has shape {tuple(value.shape)} in the file but "
                                 f"{tuple(target.shape)} in the model")
            target.copy_(value.to(target.device, target.dtype))
            target.requires_grad_(False)  # trained only with use_trainable_adapters (extra_parameters)
    for layer in model.modules():
        if isinstance(layer, LoraLayer) and key in layer.variants:
            raise NotImplementedError(f"{folder}: X-LoRA experts must be plain LoRA adapters (a LoRA variant "
                                      "such as aLoRA changes how the expert applies)")

