"""DoRA's column norm ``||W + s·BA||`` per output row without forming ``W + s·BA``.

``||W_i + s(BA)_i||² = ||W_i||² + 2s·(W Aᵀ)_i·B_i + s²·B_i (A Aᵀ) B_iᵀ``: one (out, in) × (in, r)
matmul and rank-r products, instead of an (out, in) update, an (out, in) sum and a pass over
it. ``||W_i||²`` depends on the frozen weight only, so callers keep it between steps. The
reference (``kernels.reference.dora_factor``) forms the sum; the tests compare the two.
"""

from __future__ import annotations

from typing import Optional

import torch


def _accumulation_dtype(weight: torch.Tensor) -> torch.dtype:
    return torch.promote_types(weight.dtype, torch.float32)  # float32, or float64 for float64 weights


def weight_row_norms_sq(weight: torch.Tensor) -> torch.Tensor:
    """``||W_i||²`` per row of an (out, in) weight, in float32 (float64 for a float64 weight)."""
    return torch.linalg.vector_norm(weight, dim=1, dtype=_accumulation_dtype(weight)).square()


@torch.no_grad()
def dora_weight_norm(weight: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float,
                     row_norms_sq: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``||W + scale·B A||`` per output row in float32 (float64 for float64 weights), without
    gradient (DoRA treats the norm as a constant).

    ``weight`` is (out, in), ``A`` (r, in), ``B`` (out, r).
    """
    if row_norms_sq is None:
        row_norms_sq = weight_row_norms_sq(weight)
    return dora_norm_from_product(weight @ A.to(weight.dtype).T, A, B, scale, row_norms_sq)


@torch.no_grad()
def dora_norm_from_product(weight_a: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float,
                           row_norms_sq: torch.Tensor) -> torch.Tensor:
    """``dora_weight_norm`` from ``W Aᵀ`` (out, r) and ``||W_i||²``: for a weight that is never
    formed in full precision (a 4-bit base multiplies ``A`` by its packed weight)."""
    dtype = row_norms_sq.dtype
    A32, B32 = A.to(dtype), B.to(dtype)
    WA = weight_a.to(dtype)
    cross = (WA * B32).sum(1)
    update_sq = ((B32 @ (A32 @ A32.T)) * B32).sum(1)
    return (row_norms_sq + 2 * scale * cross + scale * scale * update_sq).clamp_min(0).sqrt()
