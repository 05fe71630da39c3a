"""``add_weighted_adapter``: a new LoRA adapter from a weighted mix of existing ones.

``cat`` is exact (the new update equals ``Σ wᵢ·ΔWᵢ``); ``linear`` mixes the factors of
equal-rank adapters (cheap, not exact: cross terms appear); the task-arithmetic methods
(``svd``, ``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune``) combine the full
updates ``ΔWᵢ`` and return to low rank by a truncated SVD.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from .adapters.low_rank.lora import LoraLayer
from .config import LoraConfig
from .adapter_ops import add_adapter, adapter_layers, config_for_layers, get_state

COMBINATIONS = ("linear", "cat", "svd", "ties", "dare_linear", "dare_ties", "magnitude_prune")


def magnitude_prune(t: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ``density`` fraction of entries with the largest magnitude, zero the rest."""
    k = int(density * t.numel())
    if k <= 0:
        return torch.zeros_like(t)
    threshold = t.abs().flatten().kthvalue(t.numel() - k + 1).values
    return t * (t.abs() >= threshold)


def random_prune(t: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """DARE: drop entries with probability ``1 - density`` and rescale the rest by ``1/density``."""
    keep = torch.rand(t.shape, generator=generator, device="cpu").to(t.device) < density
    return t * keep / density


def sign_consensus_merge(tensors: list[torch.Tensor]) -> torch.Tensor:
    """TIES: elect each entry's sign by the summed values, average the entries that agree."""
    stacked = torch.stack(tensors)
    sign = torch.sign(stacked.sum(dim=0))
    agree = torch.sign(stacked) == sign
    total = (stacked * agree).sum(dim=0)
    return total / agree.sum(dim=0).clamp(min=1)


def combine_deltas(
    deltas: list[torch.Tensor], weights: Sequence[float], combination: str, density: float, generator
) -> torch.Tensor:
    """The combined full update for one layer."""
    weighted = [w * d for w, d in zip(weights, deltas)]
    if combination == "svd":
        return sum(weighted)
    if combination == "magnitude_prune":
        return sum(magnitude_prune(d, density) for d in weighted)
    if combination == "dare_linear":
        return sum(random_prune(d, density, generator) for d in weighted)
    if combination == "ties":
        return sign_consensus_merge([magnitude_prune(d, density) for d in weighted])
    if combination == "dare_ties":
        return sign_consensus_merge([random_prune(d, density, generator) for d in weighted])
    raise ValueError(f"unknown combination {combination!r}; choose from {COMBINATIONS}")


def low_rank(delta: torch.Tensor, rank: int, clamp: Optional[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) with ``B @ A`` the best rank-``rank`` approximation of ``delta``."""
    U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
    rank = min(rank, S.numel())
    B, A = U[:, :rank] * S[:rank], Vh[:rank]
    if clamp is not None:
        limit = torch.quantile(torch.cat([A.flatten(), B.flatten()]).abs(), clamp)
        A, B = A.clamp(-limit, limit), B.clamp(-limit, limit)
    return A, B


def add_weighted_adapter(
    model: torch.nn.Module,
    adapters: Sequence[str],
    weights: Sequence[float],
    name: str,
    combination: str = "svd",
    svd_rank: Optional[int] = None,
    density: float = 1.0,
    svd_clamp: Optional[float] = None,
    seed: int = 0,
) -> str:
    """Create LoRA adapter ``name`` from ``Σ weights[i] · adapters[i]``; returns its name.

    ``density`` is the kept fraction for the pruning methods; ``svd_rank`` defaults to the
    largest rank among the sources; ``seed`` fixes DARE's random drops.
    """
    state = get_state(model)
    if combination not in COMBINATIONS:
        raise ValueError(f"unknown combination {combination!r}; choose from {COMBINATIONS}")
    if len(adapters) != len(weights) or not adapters:
        raise ValueError(f"need one weight per adapter; got {len(adapters)} adapters and {len(weights)} weights")
    for a in adapters:
        cfg = state.configs.get(a)
        if cfg is None:
            raise ValueError(f"unknown adapter {a!r}; this model has {sorted(state.configs)}")
        if type(cfg) is not LoraConfig or cfg.use_dora:
            raise ValueError(f"adapter {a!r} ({cfg.peft_type}): add_weighted_adapter combines plain LoRA adapters "
                             "only (not DoRA or other methods)")
        if cfg.target_parameters:  # PEFT refuses these too
            raise ValueError(f"adapter {a!r}: add_weighted_adapter does not combine LoRA on parameters "
                             f"(target_parameters={cfg.target_parameters}), as PEFT does not")
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}")
    generator = torch.Generator().manual_seed(seed)

    plans: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for key, layer in adapter_layers(model):
        if not isinstance(layer, LoraLayer):
            continue
        present = [(a, w) for a, w in zip(adapters, weights) if a in layer.adapter_names]
        if not present:
            continue
        if combination == "cat":
            plans[key] = _cat(layer, adapters, weights)
        elif combination == "linear":
            plans[key] = _linear(layer, key, present)
        else:
            deltas = [layer.delta_weight(a) for a, _ in present]
            combined = combine_deltas(deltas, [w for _, w in present], combination, density, generator)
            rank = svd_rank or max(layer.r[a] for a, _ in present)
            plans[key] = low_rank(combined, rank, svd_clamp)
    if not plans:
        raise ValueError(f"adapters {list(adapters)} have no LoRA layers to combine")
    config = config_for_layers(model, {k: A.shape[0] for k, (A, _) in plans.items()})
    add_adapter(model, config, name)
    for key, layer in adapter_layers(model):
        if key in plans:
            layer.set_factors(name, *plans[key])
    return name


def _cat(layer: LoraLayer, adapters, weights) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack factors: ``[w₁s₁B₁ … wₙsₙBₙ] @ [A₁; …; Aₙ] = Σ wᵢsᵢBᵢAᵢ`` exactly."""
    A_parts, B_parts = [], []
    for a, w in zip(adapters, weights):
        if a in layer.adapter_names:
            A, B = layer.factors(a)
            A_parts.append(A.detach().float())
            B_parts.append(B.detach().float() * (w * layer.scaling[a]))
    return torch.cat(A_parts, dim=0), torch.cat(B_parts, dim=1)


def _linear(layer: LoraLayer, key: str, present) -> tuple[torch.Tensor, torch.Tensor]:
    ranks = {layer.r[a] for a, _ in present}
    if len(ranks) != 1:
        raise ValueError(f"layer {key!r}: combination 'linear' needs equal ranks, got {sorted(ranks)}; use 'cat' or 'svd'")
    A_sum, B_sum = 0, 0
    for a, w in present:
        A, B = layer.factors(a)
        root = math.sqrt(abs(w * layer.scaling[a]))
        A_sum = A_sum + math.copysign(root, w) * A.detach().float()
        B_sum = B_sum + root * B.detach().float()
    return A_sum, B_sum
