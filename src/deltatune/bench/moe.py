"""The mixture-of-experts part of ``deltatune bench``: the MoE shapes, what the ``moe-*`` cases
adapt, and what a run records about how deltatune computed the experts.

The shapes are Qwen3-MoE layers (transformers 5's fused 3-D expert weights) at random
initialisation: Qwen3-30B-A3B's layer with two layers for a GPU, and a smaller one that a CPU
trains a few steps of in minutes. Both tools adapt the attention projections as modules and the
expert weights through ``target_parameters`` (PEFT's ``ParamWrapper`` path).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

# Qwen3MoeConfig fields per named shape. Qwen3-30B-A3B has 48 layers; two keep its layer shape
# (the part whose speed LoRA changes) at a size one GPU trains quickly.
MOE_SHAPES = {
    "qwen3-30b-a3b-2l": dict(vocab_size=151936, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
                             num_hidden_layers=2, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                             num_experts=128, num_experts_per_tok=8, norm_topk_prob=True, rms_norm_eps=1e-6,
                             rope_theta=1000000.0, max_position_embeddings=40960, tie_word_embeddings=False),
    "qwen3-moe-cpu": dict(vocab_size=32000, hidden_size=512, intermediate_size=1536, moe_intermediate_size=256,
                          num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2, head_dim=64,
                          num_experts=32, num_experts_per_tok=4, norm_topk_prob=True, rms_norm_eps=1e-6,
                          rope_theta=1000000.0, max_position_embeddings=4096, tie_word_embeddings=False),
}

# Named rather than "all-linear": on transformers 5 MoE models PEFT (and deltatune, which reads
# configs as PEFT does) rewrites "all-linear" to also put LoRA on the router's weight and rank 2r on
# the fused gate/up weight, which would make the table's "r" wrong for the experts.
ATTENTION_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
EXPERT_TARGETS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def moe_config(shape: str):
    """The transformers config of named MoE shape ``shape``."""
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(**MOE_SHAPES[shape])


def is_moe_shape(shape: str) -> bool:
    """``shape`` is a named MoE shape or a config folder whose model has experts."""
    if shape in MOE_SHAPES:
        return True
    config = Path(shape) / "config.json"
    if not config.is_file():
        return False
    fields = json.loads(config.read_text())
    return any(isinstance(fields.get(k), int) and fields[k] > 0 for k in ("num_experts", "num_local_experts"))


def lora_targets() -> dict:
    """The LoraConfig fields of the ``moe-*`` cases, the same for both tools."""
    return {"target_modules": list(ATTENTION_TARGETS), "target_parameters": list(EXPERT_TARGETS)}


def expert_notes(tool: str, model: torch.nn.Module) -> dict:
    """What the row records about the experts: transformers' experts implementation (what PEFT's
    side runs on its ``W + ΔW``) and, for deltatune, the path its expert layers took on their last
    call with the reasons (``grouped`` is the per-expert-group compute without a weight copy)."""
    notes = {"experts_implementation": getattr(model.config, "_experts_implementation", None)}
    if tool == "deltatune":
        from ..adapters.low_rank.moe_experts import expert_layers

        layers = [layer for _, layer in expert_layers(model)]
        seen = sorted({layer.last_path for layer in layers if layer.last_path is not None})
        paths = {path for path, _ in seen}
        notes["expert_path"] = paths.pop() if len(paths) == 1 else ("mixed" if paths else "not called")
        notes["expert_path_reasons"] = [f"{path}: {reason}" for path, reason in seen]
        notes["expert_compute"] = sorted({layer.compute for layer in layers})
    return notes
