"""Which layers get quantized, and turning a model's linear layers into quantized ones and back.

As bitsandbytes does by default, every ``nn.Linear`` is quantized except the output head
(and any module the user names); embeddings and norms stay in full precision. The fused 3-D
expert weights of mixture-of-experts models are stored in 4 bits too (``experts.py``).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Optional, Union

import torch
from torch import nn

from ..module_tree import output_head_name, replace_module
from ..targeting_experts import expert_parameters
from .experts import dequantize_experts, quantize_experts
from .layers import Linear4bit, Linear8bit, QuantLinear

QUANT_TYPES = ("nf4", "fp4", "int8")


def check_quant_type(value: str, flag: str = "--quantize") -> None:
    """Refuse a quantization name early (before a model loads); empty means none."""
    if value and value not in QUANT_TYPES:
        raise ValueError(f"{flag}: {value!r} is not one of {', '.join(QUANT_TYPES)}")


@dataclass
class QuantizeConfig:
    """How to store a base model's linear weights."""

    quant_type: str = "nf4"
    """"nf4" (NormalFloat4), "fp4" or "int8" (row-wise, LLM.int8 layout)."""
    blocksize: int = 64
    """Values per 4-bit block sharing one scale."""
    double_quant: bool = True
    """Quantize the 4-bit block scales too (8-bit, blocks of 256): about 0.37 bits/parameter less."""
    compute_dtype: torch.dtype = torch.float32
    """dtype the weights are dequantized to for each matmul."""
    keep: list[str] = field(default_factory=list)
    """Module names (or name suffixes) kept in full precision, besides the output head."""
    experts: bool = True
    """Also store the fused expert weights of mixture-of-experts models in 4 bits (bitsandbytes'
    parameter layout); int8 keeps them in full precision."""

    def __post_init__(self):
        if self.quant_type not in QUANT_TYPES:
            raise ValueError(f"quantize={self.quant_type!r} is not supported; use one of {list(QUANT_TYPES)}")

    def to_hf(self, head: Optional[str]) -> dict:
        """The ``quantization_config`` transformers + bitsandbytes write for these settings."""
        four = self.quant_type != "int8"
        skip = list(self.keep) + ([head] if head and self.keep else [])
        return {
            "quant_method": "bitsandbytes", "load_in_4bit": four, "load_in_8bit": not four,
            "_load_in_4bit": four, "_load_in_8bit": not four,
            "bnb_4bit_quant_type": self.quant_type if four else "fp4",
            "bnb_4bit_use_double_quant": self.double_quant if four else False,
            "bnb_4bit_compute_dtype": str(self.compute_dtype).removeprefix("torch."),
            "bnb_4bit_quant_storage": "uint8", "llm_int8_skip_modules": skip or None,
            "llm_int8_threshold": 6.0, "llm_int8_has_fp16_weight": False,
            "llm_int8_enable_fp32_cpu_offload": False,
        }

    @classmethod
    def from_hf(cls, d: dict, where: str = "quantization_config",
                compute_dtype: Optional[torch.dtype] = None) -> "QuantizeConfig":
        """Read a bitsandbytes ``quantization_config``; anything else is refused with its name."""
        if d.get("quant_method") != "bitsandbytes":
            raise ValueError(f"{where}: quant_method={d.get('quant_method')!r}; deltatune reads bitsandbytes "
                             "(NF4/FP4/int8) checkpoints only")
        if d.get("load_in_4bit"):
            quant_type = d.get("bnb_4bit_quant_type", "fp4")
            if d.get("bnb_4bit_quant_storage", "uint8") != "uint8":
                raise ValueError(f"{where}: bnb_4bit_quant_storage={d['bnb_4bit_quant_storage']!r}; only uint8 "
                                 "storage is supported")
        elif d.get("load_in_8bit"):
            quant_type = "int8"
        else:
            raise ValueError(f"{where}: neither load_in_4bit nor load_in_8bit is set")
        dtype = compute_dtype or getattr(torch, str(d.get("bnb_4bit_compute_dtype") or "float32"))
        return cls(quant_type, 64, bool(d.get("bnb_4bit_use_double_quant", False)), dtype,
                   list(d.get("llm_int8_skip_modules") or []))


def as_quantize_config(quantize: Union[str, QuantizeConfig], compute_dtype: Optional[torch.dtype] = None,
                       keep: Optional[list[str]] = None, double_quant: bool = True,
                       blocksize: int = 64) -> QuantizeConfig:
    if isinstance(quantize, QuantizeConfig):
        return quantize
    return QuantizeConfig(quantize, blocksize, double_quant, compute_dtype or torch.float32, list(keep or []))


def _named(key: str, names: list[str]) -> bool:
    return any(key == n or key.endswith("." + n) or key.startswith(n + ".") for n in names)


def is_conv1d(module: nn.Module) -> bool:
    """GPT-2's ``Conv1D``: a linear layer whose weight is stored (in, out)."""
    return type(module).__name__ == "Conv1D"


def _kept(model: nn.Module, config: QuantizeConfig) -> list[str]:
    # Modules the model asks to keep in float32 (T5's "wo") stay unquantized, as transformers does.
    return list(config.keep) + list(getattr(model, "_keep_in_fp32_modules", None) or [])


def quantizable_linears(model: nn.Module, config: QuantizeConfig) -> list[str]:
    """Names of the linear modules (``nn.Linear``, GPT-2 ``Conv1D``) that ``config`` quantizes."""
    head = output_head_name(model)
    keep = _kept(model, config)
    return [key for key, module in model.named_modules()
            if (isinstance(module, nn.Linear) or is_conv1d(module)) and key != head
            and not _named(key, keep)]


def quantizable_experts(model: nn.Module, config: QuantizeConfig) -> list[tuple[str, str]]:
    """(module name, parameter name) of the fused expert weights ``config`` stores in 4 bits: all
    but those of modules (or parameters) it keeps in full precision."""
    keep = _kept(model, config)
    return [(m, p) for m, p in expert_parameters(model) if not _named(m, keep) and not _named(f"{m}.{p}", keep)]


def linear_weight(module: nn.Module, weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The (out, in) weight of a linear module (``Conv1D`` stores it transposed)."""
    weight = module.weight if weight is None else weight
    return weight.T.contiguous() if is_conv1d(module) else weight


def make_quant_linear(linear: nn.Module, config: QuantizeConfig) -> QuantLinear:
    """A quantized copy of ``linear`` (a ``Conv1D`` becomes an (out, in) layer, as bitsandbytes does)."""
    if is_conv1d(linear):
        out_features, in_features = linear_weight(linear).shape
        plain = nn.Linear(in_features, out_features, bias=linear.bias is not None, device="meta")
        plain.weight = nn.Parameter(linear_weight(linear).detach(), requires_grad=False)
        if linear.bias is not None:
            plain.bias = nn.Parameter(linear.bias.detach(), requires_grad=False)
        linear = plain
    if config.quant_type == "int8":
        return Linear8bit.from_linear(linear, config.compute_dtype)
    return Linear4bit.from_linear(linear, config.quant_type, config.blocksize, config.double_quant,
                                  config.compute_dtype)


def quantize_model(model: nn.Module, config: QuantizeConfig) -> nn.Module:
    """Replace the quantizable linear layers of ``model`` in place, one at a time, and store its
    fused expert weights (mixture-of-experts models) in 4 bits where ``config`` says so."""
    for key in quantizable_linears(model, config):
        linear = model.get_submodule(key)
        replace_module(model, key, make_quant_linear(linear, config))
        del linear
    if quantizes_experts(model, config):
        quantize_experts(model, config.quant_type, config.blocksize, config.double_quant, config.compute_dtype,
                         only=quantizable_experts(model, config))
    mark_quantized(model, config)
    return model


def quantizes_experts(model: nn.Module, config: QuantizeConfig) -> bool:
    """``config`` stores ``model``'s fused expert weights in 4 bits (int8 has no expert layout in
    bitsandbytes: they then stay in full precision, with a warning naming how many)."""
    if not config.experts:
        return False
    found = expert_parameters(model)
    if found and config.quant_type == "int8":
        warnings.warn(f"quantize=int8 keeps the {len(found)} fused expert weights of this mixture-of-experts "
                      "model in full precision (bitsandbytes has no 8-bit layout for them); nf4 or fp4 "
                      "stores them in 4 bits", stacklevel=3)
        return False
    return bool(found)


def mark_quantized(model: nn.Module, config: QuantizeConfig) -> None:
    """Record the settings on the model and its config, as transformers does for bitsandbytes."""
    model.deltatune_quantization = config
    if getattr(model, "config", None) is not None:
        model.config.quantization_config = config.to_hf(output_head_name(model))


def dequantize_model(model: nn.Module, dtype: Optional[torch.dtype] = None) -> nn.Module:
    """Replace every quantized layer by a plain ``nn.Linear`` (in place); the model becomes ordinary."""
    for key, module in list(model.named_modules()):
        if isinstance(module, QuantLinear):
            replace_module(model, key, module.to_linear(dtype))
    dequantize_experts(model, dtype)
    if hasattr(model, "deltatune_quantization"):
        del model.deltatune_quantization
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    return model


def quantized_layers(model: nn.Module) -> list[tuple[str, QuantLinear]]:
    return [(k, m) for k, m in model.named_modules() if isinstance(m, QuantLinear)]
