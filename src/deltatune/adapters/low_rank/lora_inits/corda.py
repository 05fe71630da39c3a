"""CorDA (Yang et al. 2024, context-oriented decomposition): LoRA factors from the SVD of ``W C``,
``C`` the covariance of the layer's inputs on a few batches, so the decomposition follows the
directions the data excites. ``W C = U S Vhᵀ`` and ``V = (Vh C⁻¹)ᵀ`` give ``W = U S Vᵀ``; IPM
("instruction-previewed") moves the r largest components into the adapter, KPM ("knowledge-preserved")
the r smallest, leaving the rest in the base (``W - s·BA``), with ``A = √(S/s) Vᵀ``, ``B = U √(S/s)``.

The covariance follows PEFT's ``preprocess_corda``: each forward call's input rows, divided by the
absolute value of their largest entry, add ``xᵀx``; the sum is divided by the number of calls (PEFT
runs one sequence per call). ``C`` gets a damping ``λ·mean(diag C)·I`` (λ from 0.01, doubled until
the inverse is accurate). This module holds the arithmetic; ``deltatune.lora_from_data`` runs the model.
"""

from __future__ import annotations

import torch

from .init_principal import set_residual_base


class InputCovariance:
    """PEFT's CorDA covariance of one layer's inputs, summed call by call."""

    def __init__(self, half: bool = False):
        self.half = half
        self.calls = 0
        self.total = None

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1])
        x = x if self.half else x.float()
        x = x / torch.max(x).abs()
        if not torch.isfinite(x).all():
            raise ValueError("CorDA: a layer input holds NaN or infinite values (or is all zero)")
        product = x.T @ x
        self.total = product if self.total is None else self.total + product
        self.calls += 1

    def value(self) -> torch.Tensor:
        if not self.calls:
            raise ValueError("CorDA: no batch reached this layer")
        return self.total / self.calls


@torch.no_grad()
def corda_factors(weight: torch.Tensor, covariance: torch.Tensor, r: int, scale: float, method: str
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(A (r, in), B (out, r)) of CorDA for the (out, in) ``weight`` and its input ``covariance``."""
    weight, covariance = weight.float(), covariance.float()
    eye = torch.eye(covariance.shape[0], device=covariance.device)
    damp = 0.01
    while True:  # damp until C is safely invertible (PEFT's rule)
        damped = covariance + eye * (torch.mean(torch.diag(covariance)) * damp)
        inverse = torch.linalg.inv(damped)
        if torch.dist(damped @ inverse, eye).item() < 0.05:
            break
        damp *= 2
    U, S, Vh = torch.linalg.svd(weight @ damped, full_matrices=False)
    V = (Vh @ inverse).T
    if method == "ipm":
        U, S, V = U[:, :r], S[:r], V[:, :r]
    elif method == "kpm":
        U, S, V = U[:, -r:], S[-r:], V[:, -r:]
    else:
        raise ValueError(f"corda_config['corda_method'] must be 'ipm' or 'kpm', got {method!r}")
    root = (S / scale).sqrt()
    return (V.T * root.view(-1, 1)).contiguous(), (U * root).contiguous()


def initialise_corda(layer: torch.nn.Module, name: str, covariance: torch.Tensor, method: str) -> None:
    """Set adapter ``name``'s factors on ``layer`` from its input covariance and take ``s·BA`` out of
    the base weight."""
    if layer.quantized:
        raise ValueError("init_lora_weights='corda' changes the base weight; use a model loaded without "
                         "quantize= (PEFT initialises CorDA in full precision too)")
    weight = layer.canonical(layer.base_weight().detach()).float()
    A, B = corda_factors(weight, covariance, layer.r[name], layer.scaling[name], method)
    layer.set_factors(name, A, B)
    set_residual_base(layer, name, weight)
