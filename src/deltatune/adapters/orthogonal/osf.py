"""OSF layers: the weight's SVD split into a frozen top part and a trained rest, whose gradients
stay orthogonal to the frozen singular subspaces.

Per targeted ``nn.Linear`` the float32 SVD ``W = U Σ Vᵀ`` (PEFT's call, so PEFT's bits and signs)
is cut after the top ``k`` (the effective rank) directions. The rest starts as the trained
factors ``U_low`` (out, m), ``S_low`` (m,), ``V_low`` (m, in) (``m = min(out, in) − k``) and is
also kept frozen as ``U₀``, ``S₀``, ``V₀``; the layer adds ``x ΔWᵀ`` with
``ΔW = U_low diag(S_low) V_low − U₀ diag(S₀) V₀``, as one rank-2m product (PEFT's factored forward),
so the model is the base until the factors move. Merging adds ``ΔW`` to the weight, which makes it
``U_high Σ_high V_highᵀ + U_low diag(S_low) V_low`` up to the SVD's rounding.

Files hold the three trained factors only (PEFT's keys); ``U₀``, ``S₀``, ``V₀`` and the frozen
``U_high`` (kept only when out > in) / ``V_high`` (kept only when in > out) are recomputed from the
base weight on every load. On a half-precision base the factors are rounded to the base's dtype and
held in float32, as PEFT's default upcast does.

The gradient projection (PEFT: tensor hooks on ``U_low``/``V_low``) is an autograd function in the
forward pass here, so every backward through the layer projects (deltatune's training loop, a
user's loop, gradient accumulation, per-row routing), and it survives what replaces parameter
objects (PEFT's float32 upcast drops its hooks on a half-precision base, which then trains
unprojected). ``dU ↦ dU − U_high U_highᵀ dU`` and ``dV ↦ dV − dV V_highᵀ V_high``; where the
factor is square the complement is spanned by ``U₀`` / ``V₀`` exactly, and the projection is
``U₀ U₀ᵀ dU`` / ``dV V₀ᵀ V₀`` (PEFT's formulas, in PEFT's order of products).
"""

from __future__ import annotations

import re
from typing import Optional, Union

import torch
from torch import nn
from torch.nn import functional as F

from ...config.osf import OSFConfig
from ...targeting import ALL_LINEAR
from ..linear_base import LinearAdapterLayer, check_plain_linear
from ..low_rank.tinylora import stored_dtype
from ..method import LayerMethod, register_method
from ..shared import UnsavedBuffers


def resolve_effective_rank(config: OSFConfig, key: str, min_dim: int) -> int:
    """PEFT's reading: the first ``rank_pattern`` regex found in ``key`` (``re.search``), else
    ``effective_rank``; ``None`` is half of ``min_dim``, a float in (0, 1] that fraction of it
    (truncated), anything else its integer part; clamped to [0, min_dim]."""
    value: Optional[Union[int, float]] = config.effective_rank
    for pattern, rank in (config.rank_pattern or {}).items():
        if re.search(pattern, key):
            value = rank
            break
    if value is None:
        return max(min_dim // 2, 0)
    rank = int(min_dim * value) if isinstance(value, float) and 0 < value <= 1 else int(value)
    return max(min(min_dim, rank), 0)


def _project_left(grad: torch.Tensor, basis: torch.Tensor, spans_complement: bool) -> torch.Tensor:
    """``dU`` (out, m) without its part in the frozen column space."""
    if spans_complement:  # basis = U₀: U is square, so I − U_high U_highᵀ = U₀ U₀ᵀ
        return basis @ (basis.transpose(0, 1) @ grad)
    return grad - basis @ (basis.transpose(0, 1) @ grad)  # basis = U_high


def _project_right(grad: torch.Tensor, basis: torch.Tensor, spans_complement: bool) -> torch.Tensor:
    """``dV`` (m, in) without its part in the frozen row space."""
    if spans_complement:  # basis = V₀: Vᵀ is square, so I − V_highᵀ V_high = V₀ᵀ V₀
        return (grad @ basis.transpose(0, 1)) @ basis
    return grad - (grad @ basis.transpose(0, 1)) @ basis  # basis = V_high


class _ProjectGradient(torch.autograd.Function):
    """The identity forward; backward passes on the gradient projected off the frozen subspace."""

    @staticmethod
    def forward(ctx, factor: torch.Tensor, basis: torch.Tensor, left: bool, spans_complement: bool) -> torch.Tensor:
        # the basis is a constant buffer: kept on ctx, not saved, so activation offloading and
        # saved-tensor hooks never copy it
        ctx.basis, ctx.left, ctx.spans_complement = basis, left, spans_complement
        return factor.view_as(factor)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        project = _project_left if ctx.left else _project_right
        return project(grad, ctx.basis.to(grad.dtype), ctx.spans_complement), None, None, None


class OsfLinear(LinearAdapterLayer):
    """A linear layer whose weight's lower singular part trains (OSF); the top part stays frozen."""

    adapter_dict_names = ("osf_svd_params",)

    def __init__(self, base_layer: nn.Module):
        super().__init__(base_layer)
        self.osf_svd_params = nn.ModuleDict()  # name -> {U_low, S_low, V_low}: PEFT's file keys
        # frozen, never saved: the low part at the SVD, and the high factors that are not square
        self.osf_U0, self.osf_S0, self.osf_V0 = UnsavedBuffers(), UnsavedBuffers(), UnsavedBuffers()
        self.osf_U_high, self.osf_V_high = UnsavedBuffers(), UnsavedBuffers()
        self.effective_rank: dict[str, int] = {}

    def _forget(self, name: str) -> None:
        super()._forget(name)
        for holder in (self.osf_U0, self.osf_S0, self.osf_V0, self.osf_U_high, self.osf_V_high):
            if name in holder:
                del holder[name]
        self.effective_rank.pop(name, None)

    def add(self, name: str, config: OSFConfig, key: str, from_file: bool = False) -> None:
        """The SVD is computed here, from a file or not: files carry only the trained factors."""
        if self.has_adapter(name):
            raise ValueError(f"adapter {name!r} already exists on this layer")
        in_features, out_features = self.in_out
        min_dim = min(in_features, out_features)
        k = resolve_effective_rank(config, key, min_dim)
        if k <= 0:
            raise ValueError(f"OSFConfig.effective_rank (or its rank_pattern entry) gives {k} frozen directions at "
                             f"{key!r} (smaller side {min_dim}); it must give at least 1")
        weight = self.unmerged_weight()  # the weight the adapter was made for, even with others merged
        if weight.is_meta:
            raise ValueError("OSF decomposes the base weight, but this layer's weight is on the meta device "
                             "(not loaded yet); add the adapter once the weights are loaded")
        W = self.canonical(weight.detach()).to(torch.float32)
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        k = min(k, S.shape[0])
        base_dtype = weight.dtype if weight.dtype.is_floating_point else torch.float32
        held = stored_dtype(base_dtype)

        def frozen(t: torch.Tensor) -> torch.Tensor:  # PEFT's rounding to the base dtype, then its upcast
            return t.contiguous().to(base_dtype)

        U0, S0, V0 = frozen(U[:, k:]), frozen(S[k:]), frozen(Vh[k:, :])
        self.osf_U0[name], self.osf_S0[name], self.osf_V0[name] = U0.to(held), S0.to(held), V0.to(held)
        # a square factor's complement is spanned by its low part; otherwise the high part is kept
        if out_features > in_features:
            self.osf_U_high[name] = frozen(U[:, :k]).to(held)
        if in_features > out_features:
            self.osf_V_high[name] = frozen(Vh[:k, :]).to(held)
        start = [U0, S0, V0]
        if config.init_weights is False and not from_file:  # PEFT's non-identity start (a test aid)
            start = [torch.randn_like(t) for t in start]
        self.osf_svd_params[name] = nn.ParameterDict(
            {n: nn.Parameter(t.to(held).clone()) for n, t in zip(("U_low", "S_low", "V_low"), start)})
        self.effective_rank[name] = k
        self.scaling[name] = 1.0  # no scale; marks the adapter as present

    def file_tensors(self, name: str) -> dict[str, torch.Tensor]:
        return {f"osf_svd_params.{k}": v for k, v in self.osf_svd_params[name].items()}

    def _factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(U_low, S_low, V_low), U and V routed through the gradient projection when they train."""
        p = self.osf_svd_params[name]
        U, S, V = p["U_low"], p["S_low"], p["V_low"]
        if torch.is_grad_enabled():
            if U.requires_grad:
                high = name in self.osf_U_high
                U = _ProjectGradient.apply(U, self.osf_U_high[name] if high else self.osf_U0[name], True, not high)
            if V.requires_grad:
                high = name in self.osf_V_high
                V = _ProjectGradient.apply(V, self.osf_V_high[name] if high else self.osf_V0[name], False, not high)
        return U, S, V

    def apply(self, name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        U, S, V = self._factors(name)
        U0, S0, V0 = self.osf_U0[name], self.osf_S0[name], self.osf_V0[name]
        # ΔW = A B with A = [U diag(S), −U₀ diag(S₀)] (out, 2m) and B = [V; V₀] (2m, in): never (out, in)
        A = torch.cat([U * S.unsqueeze(0), -(U0 * S0.unsqueeze(0))], dim=1)
        B = torch.cat([V, V0], dim=0)
        delta = F.linear(F.linear(x.to(A.dtype), B), A)
        return result + delta.to(x.dtype)

    def delta_weight(self, name: str) -> torch.Tensor:
        """ΔW (out, in) in the factors' dtype: current low part minus the low part at the SVD."""
        p = self.osf_svd_params[name]
        U, S, V = p["U_low"].detach(), p["S_low"].detach(), p["V_low"].detach()
        U0, S0, V0 = self.osf_U0[name], self.osf_S0[name], self.osf_V0[name]
        return torch.mm(U * S.unsqueeze(0), V) - torch.mm(U0 * S0.unsqueeze(0), V0)

    def merge_into(self, name: str, weight: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
        delta = self.delta_weight(name).to(weight.device, torch.float32)
        return self.canonical(self.canonical(weight) + delta)


class OsfMethod(LayerMethod):
    """PEFT's target choice: the OSF table for known architectures, every linear layer otherwise."""

    def prepare(self, model: nn.Module, config: OSFConfig) -> None:  # type: ignore[override]
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if config.target_modules is None and model_type not in (config.default_targets or {}):
            config.target_modules = ALL_LINEAR
        super().prepare(model, config)


def _make(module: nn.Module, config: OSFConfig, key: str) -> OsfLinear:
    # PEFT's OSF wraps nn.Linear only and skips a GPT-2 Conv1D silently (its file then holds nothing)
    check_plain_linear(module, "OSF", "PEFT's OSF adapts nn.Linear only and leaves GPT-2's Conv1D untouched, so "
                                      "deltatune refuses it")
    return OsfLinear(module)


register_method("OSF", OsfMethod(OsfLinear, _make))
