"""LoRA initialisations that move the base weight's principal part into the adapter: PiSSA
(``"pissa"``, or ``"pissa_niter_<n>"`` for a randomised SVD) and OLoRA (``"olora"``).

The adapter starts as ``B A`` = the top-r part of W (from its SVD, or from its QR
factorisation for OLoRA) and the base keeps the rest, ``W - scale·B A``, so the model's outputs
do not change. LoRA-GA and CorDA change the base the same way (``set_residual_base``).
"""

from __future__ import annotations

import torch


def set_residual_base(layer, name: str, weight: torch.Tensor) -> None:
    """base := ``weight`` - scale·B A (``weight`` in (out, in) layout, float32)."""
    residual = weight - layer.delta_weight(name).to(weight.device)
    if layer.quantized:  # the residual is stored quantized, as PEFT does for 4-bit PiSSA
        layer.base_layer.set_weight(residual)
        return
    base = layer.base_weight()
    base.data.copy_(layer.canonical(residual).to(base.dtype))


@torch.no_grad()
def initialise_pissa(layer, name: str, init: str) -> None:
    """A = √S Vᴴ, B = U √S over the top r singular triplets (S divided by the adapter's scale)."""
    weight = layer.canonical(layer.base_weight().detach()).float()
    r, scale = layer.r[name], layer.scaling[name]
    if init == "pissa":
        U, S, Vh = torch.linalg.svd(weight, full_matrices=False)
        U, S, Vh = U[:, :r], S[:r], Vh[:r]
    else:
        niter = int(init.split("_niter_")[-1])
        U, S, V = torch.svd_lowrank(weight, q=r, niter=niter)
        Vh = V.T
    S = S / scale
    layer.set_factors(name, torch.diag(S.sqrt()) @ Vh, U @ torch.diag(S.sqrt()))
    set_residual_base(layer, name, weight)


@torch.no_grad()
def initialise_olora(layer, name: str) -> None:
    """W = Q R: A = the first r rows of R, B = the first r columns of Q."""
    weight = layer.canonical(layer.base_weight().detach()).float()
    r = layer.r[name]
    Q, R = torch.linalg.qr(weight)
    layer.set_factors(name, R[:r].contiguous(), Q[:, :r].contiguous())
    set_residual_base(layer, name, weight)
