"""LoRA-GA (Wang et al. 2024): initialise LoRA so that its first step moves the weight along the
full fine-tuning gradient. From the mean gradient ``G`` of a layer's weight over a few batches,
``G ≈ U S Vᵀ`` (randomised SVD, 4r components, 4 power iterations, as PEFT), A takes r right singular
vectors and B r left ones times their singular values (``lora_ga_config['direction']`` picks which),
scaled per ``lora_ga_config['scale']``; the base keeps ``W - s·BA`` so the model starts unchanged.
The gradients come from ``deltatune.lora_from_data``; this module holds the per-layer arithmetic.
"""

from __future__ import annotations

import torch

from .init_principal import set_residual_base


@torch.no_grad()
def lora_ga_factors(grad: torch.Tensor, weight: torch.Tensor, r: int, scale: float, ga_config: dict,
                    rows_stored: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A (r, in), B (out, r)) from the (out, in) mean gradient ``grad`` of the (out, in) ``weight``;
    ``rows_stored``: the first dimension of the weight as stored, which the "stable" scale reads."""
    grad = grad.float()
    U, S, V = torch.svd_lowrank(grad, q=min(4 * r, min(grad.shape)), niter=4)
    U, S, Vh = U[:, :2 * r], S[:2 * r], V.T[:2 * r]
    direction = ga_config["direction"]
    if direction == "ArBr":  # interleaved: B the even components, A the odd ones
        A, picked = Vh[1:2 * r:2], slice(0, 2 * r, 2)
    elif direction == "A2rBr":
        A, picked = Vh[r:2 * r], slice(0, r)
    elif direction == "ArB2r":
        A, picked = Vh[:r], slice(r, 2 * r)
    else:  # "random": one random draw picks the components of both factors
        picked = torch.randperm(2 * r)[:r]
        A = Vh[picked]
    S_B = S[picked]
    B = U[:, picked] @ torch.diag(S_B)
    how = ga_config["scale"]
    if how == "stable":
        # PEFT reads the stored weight's first dimension: the input size for a GPT-2 Conv1D
        B = B * (rows_stored ** 0.25 / ga_config["stable_gamma"] ** 0.5)
    elif how == "weight_svd":
        _, weight_S, _ = torch.svd_lowrank(weight.float(), q=r, niter=4)
        if S_B[0] > 0:
            B = B * (weight_S[0] / S_B[0])
    elif how == "gd_scale":
        A, B = A / scale, B / scale
    return A.contiguous(), B.contiguous()


def initialise_lora_ga(layer: torch.nn.Module, name: str, grad: torch.Tensor, ga_config: dict) -> None:
    """Set adapter ``name``'s factors on ``layer`` from the stored-layout gradient ``grad`` of its
    base weight, and take ``s·BA`` out of the base."""
    if layer.quantized:
        raise ValueError("init_lora_weights='lora_ga' needs full-precision gradients of the base weights; "
                         "use a model loaded without quantize= (PEFT refuses quantized layers too)")
    weight = layer.canonical(layer.base_weight().detach()).float()
    dtype = layer.base_weight().dtype
    A, B = lora_ga_factors(layer.canonical(grad), weight, layer.r[name], layer.scaling[name], ga_config,
                           layer.base_weight().shape[0])
    # factors in the base dtype before the residual, so W' + s·BA is what the forward pass adds
    layer.set_factors(name, A.to(dtype), B.to(dtype))
    set_residual_base(layer, name, weight)
