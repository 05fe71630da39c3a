"""Adapter methods, one sub-package per family (``low_rank``, ``scaling``, ``selective``, ``prompt``,
``inserted``); the protocol (``method.py``) and the layer base (``base.py``, ``linear_base.py``,
``shared.py``) sit here. Importing this package registers every method."""

from . import low_rank  # noqa: F401  (registers LORA and the low-rank family)
from .base import AdapterContainer, AdapterLayer, ModulesToSave, RowPlan, adapter_layers
from .low_rank.lora import LoraEmbedding, LoraLayer, LoraLinear, make_lora_layer
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

from . import inserted, mixture, orthogonal, prompt, scaling, selective, structured  # noqa: E402,F401  (register their methods)
from . import parallel  # noqa: E402,F401  (registers SHADOW: a network beside the decoder)
