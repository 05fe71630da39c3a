"""Row-wise int8 weights as LLM.int8() stores them (Dettmers et al. 2022).

Each output row is scaled by 127 / its absolute maximum and rounded to the nearest integer
(ties to even); the row maxima (``SCB``) are kept in float32. bitsandbytes stores the same
``weight`` (int8) and ``SCB`` tensors.
"""

from __future__ import annotations

from typing import Optional

import torch

_CHUNK_VALUES = 1 << 18


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(int8 weight, float32 row absmax)`` for a 2-D ``weight`` (out, in)."""
    if weight.dim() != 2:
        raise ValueError(f"int8 quantization takes a 2-D weight, got shape {tuple(weight.shape)}")
    row_max = weight.abs().amax(dim=1).float()
    out = torch.empty(weight.shape, dtype=torch.int8, device=weight.device)
    # A few rows at a time keeps the float temporaries small (see blockwise._CHUNK_BLOCKS).
    rows = max(1, _CHUNK_VALUES // max(weight.shape[1], 1))
    for start in range(0, weight.shape[0], rows):
        part = slice(start, start + rows)
        scaled = weight[part].float() * (127.0 / row_max[part].unsqueeze(1))
        # Rows of zeros divide 0 by 0; bitsandbytes gives them zeros, and so do we.
        out[part] = torch.round(torch.nan_to_num(scaled, nan=0.0)).to(torch.int8)
    return out, row_max


def dequantize_int8(weight: torch.Tensor, row_max: torch.Tensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """The float weight that int8 ``weight`` with row maxima ``row_max`` stands for."""
    # (q · max) · (1/127), in this order, as bitsandbytes computes it, for identical floats.
    out = (weight.float() * row_max.float().unsqueeze(1)) * (1.0 / 127.0)
    return out.to(dtype or torch.float32)
