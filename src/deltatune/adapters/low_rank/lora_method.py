"""LoRA at the model level: bias training and the base tensors PEFT stores beside LoRA factors."""

from __future__ import annotations

import re
from typing import Optional

import torch
from torch import nn

from ...config import AdapterConfig, LoraConfig
from ...config.lora_experts import check_target_parameters
from ...targeting_experts import convert_former_moe_targets, warn_untargeted_experts
from ..method import FILE_PREFIX, LayerMethod, register_method
from ..selective.trainable_tokens import add_lora_token_rows, lora_token_tensors
from .moe_inject import (align_nesting, expert_file_tensors, inject_lora_parameters, parameters_only,
                         targets_modules)
from .lora import LoraLayer, make_lora_layer
from .lora_options.alora import attach_alora, detach_alora
from .lora_options.arrow import attach_arrow
from .lora_options.bdlora import attach_bdlora
from .lora_options.kasa import attach_kasa, regularization as kasa_regularization
from .lora_options.layer_replication import replicate_layers, restore_layers
from .lora_options.monteclora import attach_monteclora, regularization as monteclora_regularization
from .lora_options.qalora import attach_qalora, match_file_layout
from .lora_options.velora import attach_velora

# PEFT stores the full base weight of the input/output embedding when the config names one
# of these (its "save_embedding_layers" rule), e.g. for adapters trained on a resized vocabulary.
_EMBEDDING_NAMES = ("embed_tokens", "lm_head")


class LoraMethod(LayerMethod):
    """LoRA/DoRA layers, plus the biases and embedding weights PEFT saves with them."""

    def __init__(self) -> None:
        super().__init__(LoraLayer, make_lora_layer, bias_only="lora_only")

    def prepare(self, model: nn.Module, config: AdapterConfig) -> None:
        assert isinstance(config, LoraConfig)
        convert_former_moe_targets(model, config)  # PEFT's reading on transformers 5 MoE models
        check_target_parameters(config)  # again: the reading may have added parameters
        if config.layer_replication:  # before targets resolve, as PEFT does: they may name new layers
            replicate_layers(model, config.layer_replication)
        try:
            if not parameters_only(model, config):
                super().prepare(model, config)
            else:  # expert weights alone: target_modules stays None, as PEFT's
                warn_untargeted_experts(model, config)
        except Exception:
            restore_layers(model)
            raise

    def inject(self, model: nn.Module, config: AdapterConfig, name: str, from_file: bool) -> None:
        assert isinstance(config, LoraConfig)
        if not config.target_parameters or targets_modules(model, config):
            super().inject(model, config, name, from_file)
        inject_lora_parameters(model, config, name, from_file)  # target_parameters (moe_experts.py)
        if config.alora_invocation_tokens:
            attach_alora(model, name, config.alora_invocation_tokens)
        if config.use_qalora:
            attach_qalora(model, name, config.qalora_group_size)
        if config.use_bdlora:
            attach_bdlora(model, name, config.use_bdlora)
        if config.kasa_config is not None:
            attach_kasa(model, name)
        if config.velora_config is not None:
            attach_velora(model, name, config.velora_config)
        if config.monteclora_config is not None:
            attach_monteclora(model, name, config.monteclora_config)
        if config.arrow_config is not None:
            attach_arrow(model, name, config.arrow_config)
        if config.trainable_token_indices is not None:
            add_lora_token_rows(model, config, name)

    def loss_penalty(self, model: nn.Module, name: str, config: AdapterConfig) -> Optional[torch.Tensor]:
        assert isinstance(config, LoraConfig)
        if config.monteclora_config is not None:
            return monteclora_regularization(model, name)
        if config.kasa_config is None:
            return None
        return kasa_regularization(model, name, config.kasa_config["beta"], config.kasa_config["gamma"])

    def prepare_load(self, model: nn.Module, name: str, config: AdapterConfig,
                     tensors: dict[str, torch.Tensor]) -> None:
        assert isinstance(config, LoraConfig)
        if config.use_qalora:
            match_file_layout(model, name, tensors, FILE_PREFIX)
        if config.target_parameters:
            align_nesting(model, name, tensors, FILE_PREFIX)

    def remove(self, model: nn.Module, name: str) -> None:
        detach_alora(model, name)
        restore_layers(model)

    def file_tensors(self, model: nn.Module, name: str, config: AdapterConfig) -> dict[str, torch.Tensor]:
        assert isinstance(config, LoraConfig)
        out = super().file_tensors(model, name, config)
        out.update({FILE_PREFIX + k: v for k, v in _embedding_base_weights(model, name, config).items()})
        out.update(lora_token_tensors(model, name))
        out.update(expert_file_tensors(model, name, FILE_PREFIX))
        return out


def _names_embedding(model: nn.Module, target_modules) -> bool:
    if isinstance(target_modules, str):
        return any(re.fullmatch(target_modules, k) for k, _ in model.named_modules()
                   if re.match(rf"(.*\.)?({'|'.join(_EMBEDDING_NAMES)})$", k))
    return bool(target_modules) and any(n in target_modules for n in _EMBEDDING_NAMES)


def _embedding_base_weights(model: nn.Module, name: str, config: LoraConfig) -> dict[str, torch.Tensor]:
    """The base embedding weights PEFT would store beside adapter ``name``."""
    if config.trainable_token_indices is not None or not _names_embedding(model, config.target_modules):
        return {}  # PEFT leaves the embeddings out where only chosen rows are trained
    out = {}
    layers = {id(m): k for k, m in model.named_modules()}
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        fn = getattr(model, getter, None)
        layer = fn() if callable(fn) else None
        if isinstance(layer, LoraLayer) and name in layer.adapter_names and id(layer) in layers:
            out[f"{layers[id(layer)]}.base_layer.weight"] = layer.base_layer.weight
    return out


register_method("LORA", LoraMethod())
