"""Dropout on a LoRA input without a dense mask: draw only the positions that are dropped.

LoRA dropout (usually p = 0.05) zeroes each input element independently with probability p.
The dropped positions of such a Bernoulli process are separated by independent geometric
gaps, so drawing about ``p · numel`` gaps gives exactly the same distribution as drawing
``numel`` uniforms, at a twentieth of the random numbers for p = 0.05 (on a CPU, drawing a
dense mask costs more than the adapter's matmuls). Above ``SPARSE_LIMIT`` a dense mask is
cheaper.
"""

from __future__ import annotations

import math

import torch

SPARSE_LIMIT = 0.25  # above this dropout probability the dense mask path is used


def dropped_positions(numel: int, p: float, device: torch.device) -> torch.Tensor:
    """Sorted flat indices in ``[0, numel)``, each present independently with probability ``p``.

    Uses the default generator of ``device``, so ``torch.manual_seed`` and saved RNG states
    reproduce the draw.
    """
    if not 0.0 < p < 1.0:
        raise ValueError(f"dropout probability must be in (0, 1); got {p}")
    expected = numel * p
    chunk = int(expected + 6 * math.sqrt(expected * (1 - p)) + 16)  # one draw almost always suffices
    parts, reached = [], -1
    while reached < numel - 1:
        gaps = torch.empty(chunk, dtype=torch.float64, device=device).geometric_(p)  # values 1, 2, ...
        positions = gaps.to(torch.int64).cumsum_(0).add_(reached)
        parts.append(positions)
        reached = int(positions[-1])
    positions = torch.cat(parts) if len(parts) > 1 else parts[0]
    return positions[positions < numel]
