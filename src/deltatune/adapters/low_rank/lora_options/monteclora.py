"""MonteCLoRA (``monteclora_config``): LoRA whose A is a Monte Carlo mixture while training.

Each training forward draws ``num_samples`` Gaussian perturbations of A (covariance from a
Wishart draw scaled by the learned ``std_prior``, times ``sample_scaler``) and mixes the
perturbed copies with weights from a Gaussian approximation of a Dirichlet around the learned
``expert_weights_prior``; evaluation and merging use A itself, so a trained adapter is plain
LoRA. The KL terms against the priors (times ``kl_loss_weight``, plus ``Σ w²`` with
``use_entropy``), averaged over layers, are the training penalty (``regularization``; PEFT
leaves adding it to the user).

PEFT's file holds the sampler's state under ``lora_monteclora_sampler.``: the parameters
``std_prior`` (r) and ``expert_weights_prior`` (num_samples) and the last draw's
``gaussian_var_prior`` (r × r) and ``expert_weights``. Draws come from torch's own random
stream here (PEFT pre-draws batches of ``buffer_size``), so training steps are not PEFT's draw
for draw; everything else is.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..lora import LoraLayer, LoraLinear
from .lora_variant import LoraVariant

_EPS = 1e-3


def _wishart_identity(dim: int) -> torch.Tensor:
    """A draw of Wishart(df=dim, I) by Bartlett's decomposition ``L Lᵀ``: L lower-triangular with
    ``√χ²(dim - i)`` on the diagonal and standard normals below (torch's own sampler rejects
    the near-singular draws this degree of freedom gives)."""
    chi2 = torch.distributions.Chi2(torch.arange(dim, 0, -1, dtype=torch.float32)).sample()
    lower = torch.randn(dim, dim).tril(-1) + torch.diag(chi2.sqrt())
    return lower @ lower.T


class MonteCLoraSampler(nn.Module):
    """One adapter's variational state on one layer (PEFT's attribute names, so keys match)."""

    def __init__(self, rank: int, settings: dict[str, Any], device=None, dtype=None):
        super().__init__()
        self.rank, self.settings = rank, settings
        samples = settings["num_samples"]
        self.std_prior = nn.Parameter(torch.rand(rank, device=device, dtype=dtype))
        self.expert_weights_prior = nn.Parameter(torch.rand(samples, device=device, dtype=dtype))
        self.register_buffer("gaussian_var_prior", torch.eye(rank, device=device, dtype=dtype))
        self.register_buffer("expert_weights", torch.ones(samples, device=device, dtype=dtype) / samples)

    def draw(self, features: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(perturbations (num_samples, in, r), mixing weights (num_samples,)) for one forward."""
        n, r = self.settings["num_samples"], self.rank
        device, dtype = self.std_prior.device, self.std_prior.dtype
        wishart = _wishart_identity(r)
        std = torch.diag(torch.exp(self.std_prior))
        var = std @ wishart.to(device, dtype) @ std.T
        self.gaussian_var_prior = torch.diag(var.diagonal().clamp(min=_EPS))
        chol = torch.linalg.cholesky(self.gaussian_var_prior.float()).to(dtype)
        noise = torch.randn(n, features, r, device=device, dtype=dtype) @ chol
        noise = torch.nan_to_num(noise, nan=_EPS) * self.settings["sample_scaler"]
        self.expert_weights = torch.softmax(self._dirichlet_logits(torch.randn(n, device=device, dtype=dtype)), -1)
        return noise, self.expert_weights

    def _dirichlet_logits(self, z: torch.Tensor) -> torch.Tensor:
        # the Laplace approximation of a Dirichlet in the softmax basis: mean and diagonal covariance
        alpha = torch.exp(self.expert_weights_prior).clamp(min=1e-6)
        n = alpha.shape[0]
        mean = torch.log(alpha) - torch.log(alpha).mean()
        spread = (1 / alpha * (1 - 2 / n) + (1 / alpha).sum() / n ** 2).clamp(min=1e-6)
        cov = torch.diag(spread) + 1e-6 * torch.eye(n, device=alpha.device)
        return torch.linalg.cholesky(cov.float()).to(cov.dtype) @ z + mean

    def variational_loss(self) -> torch.Tensor:
        """KL divergences to the priors (times kl_loss_weight) plus the entropy term."""
        s, r, n = self.settings, self.rank, self.settings["num_samples"]
        alpha = torch.exp(self.expert_weights_prior)
        prior = torch.full_like(alpha, s["dirichlet_prior"])
        # lgamma differences stand for PEFT's log(Γ(a)/Γ(b)), the same value without overflow
        kl_dirichlet = (torch.lgamma(alpha.sum()) - torch.lgamma(prior.sum())
                        + (torch.lgamma(alpha) - torch.lgamma(prior)).sum()
                        + ((alpha - prior) * (torch.digamma(alpha) - torch.digamma(alpha.sum()))).sum())
        var = torch.exp(self.std_prior) ** 2
        kl_wishart = 0.5 * (-torch.log(var).sum() * r + var.sum() * r - r ** 2)
        g = self.gaussian_var_prior.clamp(min=1e-6)
        kl_gauss = n * 0.5 * (g.trace() - torch.log(g).trace() - r)
        loss = s["kl_loss_weight"] * (kl_dirichlet + kl_wishart + kl_gauss)
        return (loss + (self.expert_weights ** 2).sum()) if s["use_entropy"] else loss


class MonteCLoraVariant(LoraVariant):
    """MonteCLoRA on one layer: training forwards mix perturbed copies of A."""

    def apply(self, layer: nn.Module, name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        A, B = layer.lora_A[name], layer.lora_B[name]
        x = layer.lora_dropout[name](x.to(A.weight.dtype))
        weight = A.weight
        if layer.training:
            noise, mix = layer.lora_monteclora_sampler[name].draw(weight.shape[1])
            if not (torch.isnan(noise).any() or torch.isnan(mix).any()):
                weight = torch.einsum("n,nij->ij", mix, weight.T + noise).T
        return (result + B(F.linear(x, weight)) * layer.scaling[name]).to(result.dtype)

    def file_tensors(self, layer: nn.Module, name: str) -> dict[str, torch.Tensor]:
        sampler = layer.lora_monteclora_sampler[name]
        return {f"lora_monteclora_sampler.{k}": v for k, v in sampler.state_dict(keep_vars=True).items()}


def attach_monteclora(model: nn.Module, name: str, settings: dict[str, Any]) -> None:
    """Give adapter ``name`` a MonteCLoRA sampler on every layer that holds it."""
    for key, layer in model.named_modules():
        if not (isinstance(layer, LoraLayer) and layer.has_adapter(name)):
            continue
        if not isinstance(layer, LoraLinear):
            raise ValueError(f"LoraConfig.monteclora_config: module {key!r} is a {type(layer.base_layer).__name__}; "
                             "MonteCLoRA adapts linear layers only")
        if not hasattr(layer, "lora_monteclora_sampler"):  # the first one: a dict the layer's bookkeeping walks
            layer.lora_monteclora_sampler = nn.ModuleDict()
            layer.adapter_dict_names = type(layer).adapter_dict_names + ("lora_monteclora_sampler",)
        A = layer.lora_A[name].weight
        layer.lora_monteclora_sampler[name] = MonteCLoraSampler(layer.r[name], settings, A.device, A.dtype)
        layer.variants[name] = MonteCLoraVariant()


def regularization(model: nn.Module, name: str) -> Optional[torch.Tensor]:
    """The variational loss of adapter ``name``, averaged over its layers (PEFT's ``_get_monteclora_loss``)."""
    losses = [m.lora_monteclora_sampler[name].variational_loss() for m in model.modules()
              if isinstance(m, LoraLayer) and isinstance(m.variants.get(name), MonteCLoraVariant)]
    return torch.stack(losses).mean() if losses else None
