"""Adapter layers, one file per method family."""

from .base import AdapterLayer, ModulesToSave, RowPlan
from .lora import LoraEmbedding, LoraLayer, LoraLinear, make_lora_layer

__all__ = ["AdapterLayer", "LoraEmbedding", "LoraLayer", "LoraLinear", "ModulesToSave", "RowPlan", "make_lora_layer"]
