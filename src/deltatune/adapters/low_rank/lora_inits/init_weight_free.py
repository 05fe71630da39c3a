"""LoRA initialisations that need only the layer itself: ``"orthogonal"`` and MiCA (``"mica"``).

Neither changes the base weight, and both start as a zero update:

- orthogonal: A's rows and B's columns come from the odd and even rows of one random r×r
  orthogonal matrix, each mixed by a random Gaussian and divided by 10, so ``B @ A`` is zero (the
  two row sets are orthogonal) while neither factor is (r must be even). The random draws follow
  PEFT's order (a square normal for the QR, then A's mixer, then B's), so a seed gives PEFT's factors.
- MiCA (Minor Component Adaptation): B holds the r left singular vectors of the base weight with
  the smallest singular values and stays frozen; A starts at zero and is the only factor trained.
"""

from __future__ import annotations

import torch


# the init_lora_weights values whose adapters keep B frozen (PEFT: MiCA's LoRA variant)
FROZEN_B_INITS = ("mica",)


@torch.no_grad()
def orthogonal_factors(in_features: int, out_features: int, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) of the orthogonal initialisation: (r, in) and (out, r), ``B @ A`` = 0 up to rounding."""
    if r % 2:
        raise ValueError(f"init_lora_weights='orthogonal' needs an even rank r, got r={r}")
    Q, _ = torch.linalg.qr(torch.randn(r, r))
    half = r // 2
    A = (torch.randn(in_features, half) @ Q[0::2]).T / 10.0
    B = torch.randn(half, out_features).T @ Q[1::2] / 10.0
    return A.contiguous(), B.contiguous()


@torch.no_grad()
def minor_directions(weight: torch.Tensor, r: int, what: str) -> torch.Tensor:
    """The r left singular vectors of ``weight`` (out, in) with the smallest singular values, (out, r)."""
    weight = weight.float()
    if r > min(weight.shape):
        raise ValueError(f"init_lora_weights='mica' needs r <= min(in, out) of every targeted layer; "
                         f"{what} has weight shape {tuple(weight.shape)}, so r={r} is too large")
    U, _, _ = torch.linalg.svd(weight, full_matrices=False)
    return U[:, -r:].contiguous()


def initialise_weight_free(layer: torch.nn.Module, name: str, init: str) -> None:
    """Set adapter ``name``'s factors on ``layer`` for ``init`` (``"orthogonal"`` or ``"mica"``)."""
    A, B = layer.full_factors(name)
    r = layer.r[name]
    if init == "orthogonal":
        if layer.transposed and type(layer).__name__ == "LoraEmbedding":
            raise ValueError("init_lora_weights='orthogonal' is not supported for embedding layers (PEFT: "
                             "linear layers only)")
        new_A, new_B = orthogonal_factors(A.shape[1], B.shape[0], r)
    elif init == "mica":
        weight = layer.canonical(layer.base_weight().detach())  # (out, in), dequantized for a 4-bit base
        new_B = minor_directions(weight, r, type(layer.base_layer).__name__)
        new_A = torch.zeros_like(A, dtype=torch.float32)
    else:
        raise ValueError(f"init_lora_weights={init!r} is not a weight-free initialisation")
    layer.set_factors(name, new_A, new_B)


def refuse_unimplemented(init) -> None:
    """EVA, CorDA and LoRA-GA initialise from batches of data, which ``add_adapter`` has not: a new
    adapter with one of them is refused, pointing to ``deltatune.lora_from_data.add_lora_from_data``
    (a file that names them loads, its values are kept)."""
    from ....config.lora_init import DATA_INITS

    if init in DATA_INITS:
        raise NotImplementedError(f"init_lora_weights={init!r} initialises from data: add the adapter with "
                                  "deltatune.add_lora_from_data(model, config, batches)")
