"""LoRA at the model level: bias training and the base tensors PEFT stores beside LoRA factors."""

from __future__ import annotations

import re
from typing import Iterator

import torch
from torch import nn

from ...config import AdapterConfig, LoraConfig
from ..base import adapter_layers, base_parameters
from .lora import LoraLayer, make_lora_layer
from ..method import FILE_PREFIX, LayerMethod, register_method

# PEFT stores the full base weight of the input/output embedding when the config names one
# of these (its "save_embedding_layers" rule), e.g. for adapters trained on a resized vocabulary.
_EMBEDDING_NAMES = ("embed_tokens", "lm_head")


def trained_biases(model: nn.Module, name: str, bias: str, layer_class: type,
                   only: str) -> Iterator[tuple[str, nn.Parameter]]:
    """(key, bias) that an adapter with ``bias`` = ``"all"`` or ``only`` trains."""
    if bias == "all":
        for key, p in base_parameters(model):
            if key.endswith("bias"):
                yield key, p
    elif bias == only:
        for key, layer in adapter_layers(model):
            b = getattr(getattr(layer, "base_layer", None), "bias", None)
            if isinstance(layer, layer_class) and layer.has_adapter(name) and b is not None:
                yield f"{key}.base_layer.bias", b


class LoraMethod(LayerMethod):
    """LoRA/DoRA layers, plus the biases and embedding weights PEFT saves with them."""

    def __init__(self) -> None:
        super().__init__(LoraLayer, make_lora_layer)

    def extra_parameters(self, model: nn.Module, name: str, config: AdapterConfig) -> Iterator[nn.Parameter]:
        assert isinstance(config, LoraConfig)
        for _, p in trained_biases(model, name, config.bias, LoraLayer, "lora_only"):
            yield p

    def file_tensors(self, model: nn.Module, name: str, config: AdapterConfig) -> dict[str, torch.Tensor]:
        assert isinstance(config, LoraConfig)
        out = super().file_tensors(model, name, config)
        for key, p in trained_biases(model, name, config.bias, LoraLayer, "lora_only"):
            out[FILE_PREFIX + key] = p
        out.update({FILE_PREFIX + k: v for k, v in _embedding_base_weights(model, name, config).items()})
        return out


def _names_embedding(model: nn.Module, target_modules) -> bool:
    if isinstance(target_modules, str):
        return any(re.fullmatch(target_modules, k) for k, _ in model.named_modules()
                   if re.match(rf"(.*\.)?({'|'.join(_EMBEDDING_NAMES)})$", k))
    return bool(target_modules) and any(n in target_modules for n in _EMBEDDING_NAMES)


def _embedding_base_weights(model: nn.Module, name: str, config: LoraConfig) -> dict[str, torch.Tensor]:
    """The base embedding weights PEFT would store beside adapter ``name``."""
    if not _names_embedding(model, config.target_modules):
        return {}
    out = {}
    layers = {id(m): k for k, m in model.named_modules()}
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        fn = getattr(model, getter, None)
        layer = fn() if callable(fn) else None
        if isinstance(layer, LoraLayer) and name in layer.adapter_names and id(layer) in layers:
            out[f"{layers[id(layer)]}.base_layer.weight"] = layer.base_layer.weight
    return out


register_method("LORA", LoraMethod())
