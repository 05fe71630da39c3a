"""A LoRA adapter whose initialisation changed the base (PiSSA, OLoRA, CorDA, LoRA-GA, LoftQ) as a
plain LoRA adapter on the original base, PEFT's ``path_initial_model_for_weight_conversion``.

With ``W = W' + s·B₀A₀`` at initialisation (``W'`` the changed base) and ``W' + s·BA`` after
training, the update on ``W`` is ``s·(BA - B₀A₀) = s·[B | -B₀] @ [A ; A₀]``: a LoRA adapter of rank
2r whose alpha is doubled too (×√2 with rsLoRA), so the scale stays ``s``. It is exact where the
initialisation split ``W`` exactly (PiSSA, OLoRA, CorDA, LoRA-GA); LoftQ's split leaves its
quantization error ``W - Q - s·B₀A₀``, which the converted adapter on ``W`` keeps.
"""

from __future__ import annotations

import copy
import math

import torch

from ....config import LoraConfig


def converted_to_plain_lora(config: LoraConfig, tensors: dict[str, torch.Tensor],
                            initial: dict[str, torch.Tensor], where: str = "initial adapter"
                            ) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """(config, tensors) of the rank-2r plain LoRA adapter equal to ``tensors`` (trained) applied on
    the changed base, from the tensors ``initial`` the adapter had right after initialisation."""
    if not isinstance(config, LoraConfig) or config.peft_type != "LORA":
        raise ValueError(f"only LoRA adapters can be converted to a plain LoRA, not {config.peft_type}")
    if config.use_dora:
        raise ValueError("a DoRA adapter cannot be converted to a plain LoRA adapter: its magnitudes rescale "
                         "the whole weight, not a low-rank part")
    out: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        part = key.rsplit(".", 2)
        factor = next((f for f in ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B") if f in part), None)
        if factor is None or key.endswith(".bias"):
            out[key] = value
            continue
        if key not in initial:
            raise ValueError(f"{where}: key {key!r} is missing; it must be the adapter saved right after "
                             "initialisation, on the same modules")
        start = initial[key].to(value.dtype)
        if start.shape != value.shape:
            raise ValueError(f"{where}: key {key!r} has shape {tuple(start.shape)}, the trained adapter "
                             f"{tuple(value.shape)}")
        if factor.endswith("A"):
            out[key] = torch.cat([value, start], dim=0)
        else:
            out[key] = torch.cat([value, -start], dim=1)
    new = copy.deepcopy(config)
    new.init_lora_weights = True
    new.loftq_config = {}
    new.r = 2 * config.r
    new.lora_alpha = config.lora_alpha * (math.sqrt(2) if config.use_rslora else 2)
    new.rank_pattern = {k: 2 * v for k, v in config.rank_pattern.items()}
    new.alpha_pattern = {k: 2 * v for k, v in config.alpha_pattern.items()}
    new.validate()
    return new, out
