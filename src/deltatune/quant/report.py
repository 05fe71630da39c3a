"""Measured storage cost of a quantized base: bits per parameter, with the paper's figures beside."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .experts import packed_bytes, quantized_experts
from .layers import Linear4bit, QuantLinear

# QLoRA (Dettmers et al. 2023, §3): 32-bit scales per 64 weights cost 32/64 = 0.5 bits per
# parameter; double quantization stores 8-bit scales plus one 32-bit scale per 256 of them,
# 8/64 + 32/(64·256) ≈ 0.127 bits, saving about 0.373 bits per parameter.
PAPER_BITS = {"4bit": 4.5, "4bit+double_quant": 4.127, "int8": 8.0}


@dataclass
class MemoryReport:
    """What the quantized linear layers (and 4-bit expert weights) of a model cost, counted from the stored
    tensors."""

    quantized_parameters: int
    quantized_bytes: int
    full_precision_parameters: int
    full_precision_bytes: int
    kind: str

    @property
    def bits_per_parameter(self) -> float:
        return 8 * self.quantized_bytes / max(self.quantized_parameters, 1)

    @property
    def total_bytes(self) -> int:
        return self.quantized_bytes + self.full_precision_bytes

    def __str__(self) -> str:
        paper = PAPER_BITS.get(self.kind)
        ref = f" (paper: {paper})" if paper is not None else ""
        return (f"{self.kind}: {self.quantized_parameters:,d} quantized parameters in "
                f"{self.quantized_bytes / 2**20:.1f} MiB = {self.bits_per_parameter:.3f} bits/parameter{ref}; "
                f"{self.full_precision_parameters:,d} other parameters in "
                f"{self.full_precision_bytes / 2**20:.1f} MiB; total {self.total_bytes / 2**20:.1f} MiB")


def memory_report(model: nn.Module) -> MemoryReport:
    """Count the bytes actually stored for quantized and full-precision weights of ``model``."""
    q_params = q_bytes = 0
    kinds = set()
    for module in model.modules():
        if isinstance(module, QuantLinear):
            q_params += module.in_features * module.out_features
            q_bytes += module.storage_bytes()
            if isinstance(module, Linear4bit):
                kinds.add("4bit+double_quant" if module.quant_state.nested is not None else "4bit")
            else:
                kinds.add("int8")
    seen, fp_params, fp_bytes = set(), 0, 0
    for key, name, found in quantized_experts(model):  # 4-bit expert weights (packed bytes as parameters)
        packed = packed_bytes(model.get_submodule(key), name)
        seen.add(id(packed))
        q_params += found.shape.numel()
        q_bytes += packed.numel() * packed.element_size() + found.quant_state.storage_bytes()
        kinds.add("4bit+double_quant" if found.quant_state.nested is not None else "4bit")
    for p in list(model.parameters()) + list(model.buffers()):
        if id(p) not in seen:
            seen.add(id(p))
            fp_params += p.numel()
            fp_bytes += p.numel() * p.element_size()
    kind = kinds.pop() if len(kinds) == 1 else ("mixed" if kinds else "none")
    return MemoryReport(q_params, q_bytes, fp_params, fp_bytes, kind)
