"""PSOFT layers: a trained r×r (orthogonal) matrix between frozen SVD factors of the weight.

Per targeted ``nn.Linear`` the rank-``r`` SVD ``W ≈ U_r Σ_r V_rᵀ`` gives frozen factors ``A``
(r, in) and ``B`` (out, r) (``ab_svd_init``: ``A = V_rᵀ``, ``B = U_r Σ_r / s`` or both sides
``√(Σ_r / s)``, ``s = psoft_alpha / r``), and the layer adds ``s · x Aᵀ (R − I)ᵀ Bᵀ``:
``ΔW = s · B (R − I) A``. ``R`` is the Cayley map ``(I + Q)(I − Q)⁻¹`` of a skew matrix ``Q``
packed as its strict upper triangle (or its Neumann series; or a free matrix without
``psoft_orth``), its rows and columns scaled by ``vector_b``/``vector_a``.

Files hold only ``psoft_R.weight`` and the vectors (as PEFT writes them); ``A`` and ``B`` are
recomputed from the base weight on every load with PEFT's call (float32 ``torch.linalg.svd``,
or ``torch.svd_lowrank`` under a seeded forked generator), so the same weight gives PEFT's
factors bit for bit. A 4-bit base is decomposed from its dequantized weight (PEFT refuses one).
"""

from __future__ import annotations

import torch
from torch import nn

from ...config.orthogonal import PsoftConfig
from ...quant.layers import QuantLinear
from ..linear_base import LinearAdapterLayer
from ..low_rank.tinylora import stored_dtype
from ..method import LayerMethod, register_method
from ..shared import UnsavedBuffers
from .maps import cayley, cayley_neumann, skew_from_upper


def svd_subspace(weight: torch.Tensor, r: int, scaling: float, init: str, svd: str, niter: int,
                 seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A (r, in), B (out, r)) from ``weight`` (out, in), float32, computed with PEFT's calls and in
    PEFT's order (so the bits, signs included, are PEFT's)."""
    W = weight.to(torch.float32)
    if svd == "full":
        U, S, Vh = torch.linalg.svd(W.data, full_matrices=False)
        left, values, right = U[:, :r], S[:r], Vh[:r, :]
    else:
        # a random projection: seeded on a forked generator so every load redraws the same one
        # without disturbing the caller's random state
        fork = {"devices": []} if W.device.type == "cpu" else {"devices": [W.device], "device_type": W.device.type}
        with torch.random.fork_rng(**fork):
            torch.manual_seed(seed)
            U, S, V = torch.svd_lowrank(W.data, q=r, niter=niter)
        left, values, right = U[:, :r], S[:r], V[:, :r].t()
    values = values / scaling
    if init == "psoft_init":
        A, B = right, left @ torch.diag(values)
    else:  # pissa_init
        root = torch.sqrt(values)
        A, B = torch.diag(root) @ right, left @ torch.diag(root)
    return A.contiguous(), B.contiguous()


class PsoftRotation(nn.Module):
    """One adapter's trained part: ``weight`` (packed skew generator, or the full r×r matrix) and
    the optional scaling vectors; ``matrix()`` is ``R``. Parameter names are PEFT's file keys."""

    def __init__(self, r: int, config: PsoftConfig):
        super().__init__()
        self.r = r
        self.orth = config.psoft_orth
        self.neumann_terms = config.num_cayley_neumann_terms if config.use_cayley_neumann else None
        self.eps = config.cayley_neumann_eps
        self.weight = nn.Parameter(torch.zeros(r * (r - 1) // 2) if self.orth else torch.eye(r))
        self.vector_b = nn.Parameter(torch.ones(r)) if config.psoft_mag_b else None
        self.vector_a = nn.Parameter(torch.ones(r)) if config.psoft_mag_a else None

    def randomize_start(self) -> None:
        """``init_weights=False``: PEFT's non-identity start (a test aid)."""
        with torch.no_grad():
            if self.orth:
                nn.init.normal_(self.weight, mean=0.0, std=0.1)
            else:
                self.weight.add_(torch.randn_like(self.weight) * 0.1)

    def matrix(self) -> torch.Tensor:
        """``R`` (r, r) in the weight's dtype (the exact Cayley map is solved in float32 for half
        precision, as a solver needs)."""
        if not self.orth:
            R = self.weight
            half = False
        else:
            Q = skew_from_upper(self.weight.unsqueeze(0), self.r)[0]
            half = Q.dtype in (torch.float16, torch.bfloat16)
            if self.neumann_terms is not None:
                if self.eps is not None:  # keep the series convergent: ‖Q‖_F at most eps
                    norm = torch.linalg.norm(Q, ord="fro")
                    if torch.isfinite(norm) and norm > self.eps:
                        Q = Q * (self.eps / (norm + 1e-12))
                R = cayley_neumann(Q.unsqueeze(0), self.neumann_terms)[0]
                half = False
            else:
                # maps.cayley is (I − S)(I + S)⁻¹; PSOFT's orientation is that of −Q
                R = cayley(-(Q.float() if half else Q).unsqueeze(0))[0]
        if self.vector_b is not None:
            R = self.vector_b[:, None] * R
        if self.vector_a is not None:
            R = R * self.vector_a[None, :]
        return R.to(self.weight.dtype) if half else R


class PsoftLinear(LinearAdapterLayer):
    adapter_dict_names = ("psoft_R",)

    def __init__(self, base_layer: nn.Module):
        super().__init__(base_layer)
        self.psoft_R = nn.ModuleDict()
        self.psoft_A = UnsavedBuffers()  # frozen SVD factors, float32, never saved
        self.psoft_B = UnsavedBuffers()
        self.psoft_dropout = nn.ModuleDict()
        self.r: dict[str, int] = {}

    def _forget(self, name: str) -> None:
        super()._forget(name)
        for holder in (self.psoft_A, self.psoft_B):
            if name in holder:
                del holder[name]
        if name in self.psoft_dropout:
            del self.psoft_dropout[name]
        self.r.pop(name, None)

    def add(self, name: str, config: PsoftConfig, key: str, from_file: bool = False) -> None:
        """The SVD factors are computed here, from a file or not: files never carry them."""
        if self.has_adapter(name):
            raise ValueError(f"adapter {name!r} already exists on this layer")
        in_features, out_features = self.in_out
        r = config.r
        if r > min(in_features, out_features):
            raise ValueError(f"PsoftConfig.r ({r}) must be at most min(in_features, out_features) = "
                             f"{min(in_features, out_features)} at {key!r}")
        weight = self.unmerged_weight()  # the weight the adapter was made for, even with others merged
        if weight.is_meta:
            raise ValueError("PSOFT decomposes the base weight, but this layer's weight is on the meta device "
                             "(not loaded yet); add the adapter once the weights are loaded")
        scaling = config.psoft_alpha / r
        A, B = svd_subspace(self.canonical(weight.detach()), r, scaling, config.ab_svd_init, config.psoft_svd,
                            config.psoft_svd_lowrank_niter, config.random_seed)
        self.psoft_A[name], self.psoft_B[name] = A, B
        rotation = PsoftRotation(r, config)
        if not from_file and not config.init_weights:
            rotation.randomize_start()
        dtype = weight.dtype if weight.dtype.is_floating_point else torch.float32
        self.psoft_R[name] = rotation.to(weight.device, stored_dtype(dtype))  # float32 on a half base, as PEFT
        p = config.psoft_dropout
        self.psoft_dropout[name] = nn.Dropout(p) if p > 0 else nn.Identity()
        self.r[name] = r
        self.scaling[name] = scaling

    def file_tensors(self, name: str) -> dict[str, torch.Tensor]:
        return {f"psoft_R.{k}": v for k, v in self.psoft_R[name].named_parameters()}

    def apply(self, name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        A, B = self.psoft_A[name], self.psoft_B[name]
        x = self.psoft_dropout[name](x.to(A.dtype))
        A, B = A.to(x.device), B.to(x.device)
        R = self.psoft_R[name].matrix()
        projected = x @ A.t()
        rotated = projected @ R.to(x.dtype).t()
        # added in float32 and rounded once by the layer's forward, as PEFT does
        return result + ((rotated - projected) @ B.t()) * self.scaling[name]

    def delta_weight(self, name: str) -> torch.Tensor:
        """ΔW = s · B (R − I) A in (out, in) layout, float32, PEFT's order of products."""
        A, B = self.psoft_A[name].float(), self.psoft_B[name].float()
        R = self.psoft_R[name].matrix().detach().float().to(A.device)
        eye = torch.eye(self.r[name], device=A.device)
        return (B @ (R - eye) @ A) * self.scaling[name]

    def merge_into(self, name: str, weight: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
        return self.canonical(self.canonical(weight) + self.delta_weight(name).to(weight.device))


def _make(module: nn.Module, config: PsoftConfig, key: str) -> PsoftLinear:
    # PEFT's PSOFT wraps nn.Linear only (its files never name a GPT-2 Conv1D); a 4-bit base works here
    if not isinstance(module, (nn.Linear, QuantLinear)):
        raise TypeError(f"PSOFT cannot wrap a {type(module).__name__}; supported base layers are nn.Linear and "
                        "deltatune's quantized linear layers (PEFT's PSOFT supports nn.Linear only, so GPT-2's "
                        "Conv1D is refused)")
    return PsoftLinear(module)


register_method("PSOFT", LayerMethod(PsoftLinear, _make))
