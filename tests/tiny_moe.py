"""Tiny random mixture-of-experts models (transformers 5's fused 3-D experts) built from configs:
Qwen3-MoE, Mixtral, gpt-oss (transposed, interleaved gate/up, expert biases) and OLMoE."""

from __future__ import annotations

import torch
from transformers import (
    GptOssConfig, GptOssForCausalLM, MixtralConfig, MixtralForCausalLM, OlmoeConfig, OlmoeForCausalLM,
    Qwen3MoeConfig, Qwen3MoeForCausalLM,
)

from tiny_models import VOCAB

MOE_ARCHS = ("qwen3_moe", "mixtral", "gpt_oss", "olmoe")
# the fused expert weights of every architecture above, as PEFT's examples name them
EXPERT_TARGETS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def _config(arch: str):
    common = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, bos_token_id=1, eos_token_id=2,
                  pad_token_id=0)
    if arch == "qwen3_moe":
        return Qwen3MoeForCausalLM, Qwen3MoeConfig(**common, intermediate_size=64, moe_intermediate_size=16,
                                                   num_experts=4, num_experts_per_tok=2, head_dim=8)
    if arch == "mixtral":
        return MixtralForCausalLM, MixtralConfig(**common, intermediate_size=16, num_local_experts=4,
                                                 num_experts_per_tok=2)
    if arch == "gpt_oss":
        return GptOssForCausalLM, GptOssConfig(**common, intermediate_size=16, num_local_experts=4,
                                               num_experts_per_tok=2, head_dim=8)
    if arch == "olmoe":
        return OlmoeForCausalLM, OlmoeConfig(**common, intermediate_size=16, num_experts=4, num_experts_per_tok=2)
    raise ValueError(arch)


# (hidden, expert intermediate) widths whose rows are whole 64-value blocks: bitsandbytes' CPU
# kernel decodes shorter rows wrongly on some CPUs (seen on an Intel Xeon, not on AMD EPYC)
BNB_WIDTHS = (64, 128)


def tiny_moe(arch: str = "qwen3_moe", seed: int = 0, widths: tuple[int, int] = (0, 0)) -> torch.nn.Module:
    """A fresh tiny MoE model of ``arch`` in eval mode; the same seed gives the same weights. Every
    parameter is drawn at random (routers and expert biases too: some start at zero), so that tokens
    spread over the experts and biases are exercised. ``widths``: (hidden, expert intermediate),
    0 for the defaults (32 and 16); tests that decode 4-bit experts with bitsandbytes use
    ``BNB_WIDTHS``."""
    cls, config = _config(arch)
    hidden, intermediate = widths
    if hidden:
        config.hidden_size = hidden
    if intermediate:
        field = "moe_intermediate_size" if arch == "qwen3_moe" else "intermediate_size"
        setattr(config, field, intermediate)
    torch.manual_seed(seed)
    model = cls(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "experts" in name or "gate.weight" in name or "router" in name:
                p.normal_(0, 0.2 if p.dim() > 1 else 0.05)
    return model


def tiny_moe_dir(folder, tokenizer, arch: str = "qwen3_moe", seed: int = 0):
    """A tiny random MoE model of ``arch`` sized to ``tokenizer``'s vocabulary, saved with the tokenizer."""
    cls, config = _config(arch)
    config.vocab_size = len(tokenizer)
    config.bos_token_id, config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    config.max_position_embeddings = 256
    torch.manual_seed(seed)
    model = cls(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "experts" in name or "gate.weight" in name or "router" in name:
                p.normal_(0, 0.2 if p.dim() > 1 else 0.05)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
