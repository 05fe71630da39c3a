"""The value tables ("codes") behind 4-bit and 8-bit blockwise quantization.

A code lists the values a quantized index stands for, as multiples of the block's absmax.
The tables are bit-identical to bitsandbytes', so packed weights mean the same in both.
"""

from __future__ import annotations

import functools

import torch

# NormalFloat4 (QLoRA, Dettmers et al. 2023, appendix E): quantiles of N(0, 1) scaled to
# [-1, 1], with an exact zero; index order is value order.
_NF4 = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)

# FP4 with 1 sign, 2 exponent and 1 mantissa bit, listed by bit pattern: index bit 3 is the
# sign, so index 8 is -0. Divided by the largest magnitude (12) to lie in [-1, 1].
_FP4_RAW = (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, -0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0)


@functools.lru_cache(maxsize=None)
def _code_4bit_cpu(quant_type: str) -> torch.Tensor:
    if quant_type == "nf4":
        return torch.tensor(_NF4, dtype=torch.float32)
    if quant_type == "fp4":
        raw = torch.tensor(_FP4_RAW, dtype=torch.float32)
        return raw / raw.abs().max()
    raise ValueError(f"quant_type must be 'nf4' or 'fp4', got {quant_type!r}")


def code_4bit(quant_type: str, device: torch.device | str = "cpu") -> torch.Tensor:
    """The 16 values of ``"nf4"`` or ``"fp4"``, indexed by the 4-bit pattern."""
    return _code_4bit_cpu(quant_type).to(device)


@functools.lru_cache(maxsize=None)
def dynamic_map(signed: bool = True, max_exponent_bits: int = 7, total_bits: int = 8) -> torch.Tensor:
    """The 8-bit dynamic tree code (Dettmers 2015) used for nested scales and optimizer states.

    Each exponent ``10^(i - max_exponent_bits + 1)`` gets a linear fraction grid between 0.1
    and 1 whose size doubles with ``i``; zero and 1.0 are added and the result is sorted.
    Computed in float32 exactly as bitsandbytes computes it, so the tables are identical.
    """
    values: list[float] = []
    non_sign_bits = total_bits - 1
    extra = 2 ** (non_sign_bits - max_exponent_bits) - 1

    def add_grid(items: int, exponent: int) -> None:
        edges = torch.linspace(0.1, 1, items, dtype=torch.float32)
        means = (edges[:-1] + edges[1:]) / 2.0
        scaled = (10 ** exponent) * means
        values.extend(scaled.tolist())
        if signed:
            values.extend((-(10 ** exponent) * means).tolist())

    exponent = -(max_exponent_bits - 1)
    for i in range(max_exponent_bits):
        exponent = -(max_exponent_bits - 1) + i
        fraction_bits = i + non_sign_bits - max_exponent_bits + (0 if signed else 1)
        add_grid(2 ** fraction_bits + 1, exponent)
    if extra > 0:
        add_grid(extra + 1, exponent)
    values += [0.0, 1.0]
    if len(values) != 2 ** total_bits:
        raise ValueError(f"dynamic map of {len(values)} values for {total_bits} bits")
    values.sort()
    return torch.tensor(values, dtype=torch.float32)
