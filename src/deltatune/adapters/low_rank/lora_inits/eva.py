"""EVA (Explained Variance Adaptation, Paischer et al. 2024): LoRA's A rows start as the top right
singular vectors (principal directions) of each layer's input activations on a few batches, B at
zero, and the rank budget ``Σ r`` is redistributed across layers by explained variance: every layer
offers its first ``round(r·rho)`` components, the ``Σ r`` largest explained-variance ratios over all
layers win, and a layer keeps as many as it won (zero: no adapter there).

PEFT runs an incremental PCA (randomised SVD per batch) until the components stop moving
(cosine similarity ≥ ``tau``); deltatune computes the exact PCA of all tokens given, which is what
that iteration approaches. This module holds the arithmetic; ``deltatune.lora_from_data`` collects the
activations.
"""

from __future__ import annotations

from collections import Counter

import torch


class ActivationMoments:
    """Running sums of one layer's input rows, enough for an exact PCA: count, sum, Xᵀ X (float64)."""

    def __init__(self, features: int):
        self.count = 0
        self.total = torch.zeros(features, dtype=torch.float64)
        self.gram = torch.zeros(features, features, dtype=torch.float64)

    def add(self, rows: torch.Tensor) -> None:
        rows = rows.detach().to("cpu", torch.float64)
        self.count += rows.shape[0]
        self.total += rows.sum(0)
        self.gram += rows.T @ rows

    def principal(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(components (k, in) float32, explained-variance ratios (k,), singular values (k,)) of the
        centred rows, strongest first (sign: the largest entry of each component positive)."""
        if self.count < 2:
            raise ValueError("EVA needs at least two tokens reaching every targeted layer")
        mean = self.total / self.count
        covariance = self.gram - self.count * torch.outer(mean, mean)  # centred Xᵀ X
        values, vectors = torch.linalg.eigh(covariance)
        values, vectors = values.flip(0).clamp_min(0), vectors.flip(1).T
        signs = torch.sign(vectors.gather(1, vectors.abs().argmax(1, keepdim=True)))
        vectors = vectors * signs
        ratio = values / values.sum().clamp_min(torch.finfo(torch.float64).tiny)
        return vectors.float(), ratio.float(), values.sqrt().float()


def distribute_ranks(ratios: dict[str, torch.Tensor], ranks: dict[str, int], rho: float) -> dict[str, int]:
    """Each layer's rank: the budget ``Σ ranks`` goes to the largest explained-variance ratios among
    every layer's first ``round(rank·rho)`` components (PEFT's rank redistribution)."""
    offers = [(float(value), key) for key, ratio in ratios.items()
              for value in ratio[: round(ranks[key] * rho)].tolist()]
    offers.sort(key=lambda item: -item[0])  # stable: equal ratios keep layer order
    won = Counter(key for _, key in offers[: sum(ranks.values())])
    return {key: won.get(key, 0) for key in ratios}
