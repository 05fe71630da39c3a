"""What the structured methods share: a layer method that also trains and saves base biases
(``bias="all"`` or ``"<method>_only"``, as PEFT's configs offer), and PEFT's per-module size lookup."""

from __future__ import annotations

import re
from typing import Iterator

import torch
from torch import nn

from ...config import AdapterConfig
from ..linear_base import check_linear_like
from ..low_rank.lora_method import trained_biases
from ..method import FILE_PREFIX, LayerMethod


def size_for(patterns: dict[str, int], key: str, default: int) -> int:
    """A per-module size (``n_frequency_pattern``, ``block_size_pattern``): the first pattern
    that matches the end of ``key`` after a dot, else an entry named exactly ``key``, else
    ``default``: the rule PEFT applies to these two fields, so both pick the same sizes."""
    for pattern in patterns:
        if re.match(rf".*\.{pattern}$", key):
            return patterns[pattern]
    return patterns.get(key, default)


class BiasTrainingMethod(LayerMethod):
    """A ``LayerMethod`` whose config's ``bias`` may train base biases: ``"all"`` every bias of
    the model, ``only`` the biases of the layers this method wraps; they are saved in the file."""

    def __init__(self, layer_class: type, only: str) -> None:
        super().__init__(layer_class, self._make)
        self.only = only

    def _make(self, module: nn.Module, config: AdapterConfig, key: str):
        check_linear_like(module, config.peft_type)
        return self.layer_class(module)

    def _biases(self, model: nn.Module, name: str, config: AdapterConfig):
        return trained_biases(model, name, getattr(config, "bias", "none"), self.layer_class, self.only)

    def extra_parameters(self, model: nn.Module, name: str, config: AdapterConfig) -> Iterator[nn.Parameter]:
        for _, p in self._biases(model, name, config):
            yield p

    def file_tensors(self, model: nn.Module, name: str, config: AdapterConfig) -> dict[str, torch.Tensor]:
        out = super().file_tensors(model, name, config)
        for key, p in self._biases(model, name, config):
            out[FILE_PREFIX + key] = p
        return out
