"""Quantized base models: NF4/FP4 (with double quantization) and int8, bitsandbytes-compatible.

``blockwise`` and ``int8`` hold the reference quantizers, ``layers`` the frozen quantized
linear modules, ``convert`` the model-level swap, ``loading`` layer-by-layer loading and
saving, ``report`` the measured storage cost.
"""

from .blockwise import QuantState, dequantize_4bit, dequantize_blockwise_8bit, quantize_4bit, quantize_blockwise_8bit
from .codes import code_4bit, dynamic_map
from .convert import QuantizeConfig, dequantize_model, quantize_model, quantized_layers
from .int8 import dequantize_int8, quantize_int8
from .layers import Linear4bit, Linear8bit, QuantLinear
from .loading import save_model
from .report import memory_report

__all__ = [
    "QuantState", "QuantizeConfig", "Linear4bit", "Linear8bit", "QuantLinear", "code_4bit", "dynamic_map",
    "quantize_4bit", "dequantize_4bit", "quantize_blockwise_8bit", "dequantize_blockwise_8bit",
    "quantize_int8", "dequantize_int8", "quantize_model", "dequantize_model", "quantized_layers",
    "save_model", "memory_report",
]
