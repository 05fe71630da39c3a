"""Adapter layers, one file per method family; importing this package registers every method."""

from . import lora_method  # noqa: F401  (registers LORA)
from .base import AdapterContainer, AdapterLayer, ModulesToSave, RowPlan, adapter_layers
from .lora import LoraEmbedding, LoraLayer, LoraLinear, make_lora_layer
from .method import METHODS, LayerMethod, Method, method_for, register_method

__all__ = [
    "METHODS",
    "AdapterContainer",
    "AdapterLayer",
    "LayerMethod",
    "LoraEmbedding",
    "LoraLayer",
    "LoraLinear",
    "Method",
    "ModulesToSave",
    "RowPlan",
    "adapter_layers",
    "make_lora_layer",
    "method_for",
    "register_method",
]

from . import adalora, bottleneck, dylora, ia3, lokr_loha, nola, prompt, selective, vera  # noqa: E402,F401  (register their methods)
