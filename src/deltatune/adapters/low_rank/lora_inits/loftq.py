"""LoftQ (Li et al. 2023): quantize the base weight and initialise LoRA together, so that
``Q + B @ A`` is closer to the full-precision weight ``W`` than the quantized weight alone.

Alternation, ``loftq_iter`` times: ``Q = quant(W - B A)`` (first round: ``quant(W)``), then
``B, A`` = the best rank-r fit of the residual ``W - Q`` by SVD (``B = U√S``, ``A = √S Vᵀ``).
As in PEFT, the factors carry no ``1/scale``: LoftQ assumes ``lora_alpha == r``.

The quantizer is deltatune's own (``deltatune.quant``), the bitsandbytes layouts: NF4 in blocks of
64 with float32 block scales (no double quantization, as PEFT's LoftQ) for 4 bits, row-wise int8 for
8 bits. A full-precision layer becomes a quantized one holding ``Q`` (a QLoRA layer ready to
train); its exact bytes are what LoftQ chose, so saving that base and loading it quantized gives
the same model.
"""

from __future__ import annotations

import torch
from torch import nn

from ....quant.blockwise import dequantize_4bit, quantize_4bit
from ....quant.int8 import dequantize_int8, quantize_int8
from ....quant.layers import Linear4bit, Linear8bit, QuantLinear


def quantize_weight(weight: torch.Tensor, bits: int) -> QuantLinear:
    """A bias-free quantized layer of the float32 (out, in) ``weight`` with ``bits`` (4: NF4, 8: int8)."""
    if bits == 4:
        packed, state = quantize_4bit(weight, "nf4", blocksize=64, double_quant=False)
        return Linear4bit(packed, state, None, torch.float32)
    if bits == 8:
        # LLM.int8 quantizes from float16, as bitsandbytes does
        return Linear8bit(*quantize_int8(weight.to(torch.float16)), None, torch.float32)
    raise ValueError(f"loftq_config['loftq_bits'] must be 4 (NF4) or 8 (int8), got {bits}")


def _dequantized(layer: QuantLinear) -> torch.Tensor:
    if isinstance(layer, Linear4bit):
        return dequantize_4bit(layer.weight, layer.quant_state, torch.float32)
    return dequantize_int8(layer.weight, layer.SCB, torch.float32)


def _rank_fit(residual: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) with ``B @ A`` the best rank-r approximation of ``residual``, √S on each side."""
    U, S, Vh = torch.linalg.svd(residual, full_matrices=False)
    root = S[:r].sqrt()
    return root.unsqueeze(1) * Vh[:r], U[:, :r] * root


@torch.no_grad()
def loftq_decompose(weight: torch.Tensor, bits: int, r: int, iters: int
                    ) -> tuple[QuantLinear, torch.Tensor, torch.Tensor]:
    """(quantized layer holding Q, A, B) for the (out, in) ``weight``, alternating ``iters`` times."""
    if iters < 1:
        raise ValueError(f"loftq_config['loftq_iter'] must be >= 1, got {iters}")
    weight = weight.float()
    target = weight
    for i in range(iters):
        quantized = quantize_weight(target, bits)
        A, B = _rank_fit(weight - _dequantized(quantized), r)
        if i + 1 < iters:
            target = weight - B @ A
    return quantized, A, B


def loftq_error(weight: torch.Tensor, quantized: QuantLinear, A: torch.Tensor, B: torch.Tensor) -> float:
    """Frobenius norm of ``W - (Q + B A)``: what LoftQ makes small (B = 0 gives plain QLoRA's error)."""
    return torch.linalg.norm(weight.float() - _dequantized(quantized) - B.float() @ A.float()).item()


def initialise_loftq(layer: torch.nn.Module, name: str, loftq_config: dict) -> None:
    """LoftQ for adapter ``name`` of a full-precision linear ``layer``: its base becomes the
    quantized ``Q`` (bias kept) and its factors the rank-r fit of the quantization error."""
    if layer.quantized:
        raise ValueError("init_lora_weights='loftq' quantizes the base itself and needs its full-precision "
                         "weights: load the model without quantize= and add the LoftQ adapter to it (PEFT asks "
                         "the same)")
    if type(layer).__name__ == "LoraEmbedding":
        raise ValueError("init_lora_weights='loftq' is supported for linear layers only in deltatune")
    base = layer.base_layer
    weight = layer.canonical(base.weight.detach())
    quantized, A, B = loftq_decompose(weight, loftq_config["loftq_bits"], layer.r[name],
                                      loftq_config["loftq_iter"])
    layer.set_factors(name, A, B)
    bias = getattr(base, "bias", None)
    if bias is not None:
        quantized.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
    quantized.compute_dtype = weight.dtype
    quantized._move(weight.device)
    layer.base_layer = quantized
    layer.transposed = False  # the quantized layer stores (out, in), a Conv1D's weight included
