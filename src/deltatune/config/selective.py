"""Configs of PEFT's methods that train chosen parts of the base itself: LN tuning (copies of the
norm layers) and trainable tokens (chosen rows of the embedding). PEFT's field names and defaults."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional, Union  # Union: inherited field annotations resolve in this module

from .base import TargetedConfig, register_config

# PEFT's LN tuning targets per ``model_type`` (the norms of every block and the final norm;
# llava also trains its projector and both embeddings, as PEFT's table says).
LN_TUNING_TARGETS: dict[str, list[str]] = {
    "llama": ["input_layernorm", "post_attention_layernorm", "norm"],
    "bloom": ["input_layernorm", "post_attention_layernorm", "ln_f"],
    "llava": ["multi_modal_projector", "input_layernorm", "post_attention_layernorm", "norm", "embed_tokens",
              "lm_head"],
    "t5": ["layer_norm", "final_layer_norm"],
    "mt5": ["layer_norm", "final_layer_norm"],
    "bart": ["self_attn_layer_norm", "encoder_attn_layer_norm", "final_layer_norm"],
    "gpt2": ["ln_1", "ln_2", "ln_f"],
    "blip-2": ["layernorm", "LayerNorm", "final_layer_norm", "self_attn_layer_norm"],
    "gptj": ["ln_1", "ln_f"],
    "falcon": ["input_layernorm", "post_attention_layernorm", "ln_f"],
    "mistral": ["input_layernorm", "post_attention_layernorm", "norm"],
    "phi": ["input_layernorm", "final_layernorm"],
    "gemma": ["input_layernorm", "post_attention_layernorm", "norm"],
    "gemma2": ["input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
               "post_feedforward_layernorm", "norm"],
    "gemma3_text": ["input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                    "post_feedforward_layernorm", "norm"],
    "qwen2": ["post_attention_layernorm"],
    "qwen3": ["post_attention_layernorm"],
}


@register_config
@dataclass
class LNTuningConfig(TargetedConfig):
    """LN tuning (Zhao et al., 2023): each targeted module (by default the architecture's norm
    layers) gets a trainable copy per adapter that runs in its place; the original stays frozen.

    ``target_modules``: module names (full names or dotted suffixes) or one regular expression;
    ``None`` picks PEFT's norms for known architectures. A new adapter changes nothing (the copies
    start equal to the originals); merging writes the trained copy into the base module.
    Where several LN tuning adapters are active on one module, the last one runs.
    """

    peft_type: ClassVar[str] = "LN_TUNING"
    default_targets: ClassVar[Optional[dict[str, list[str]]]] = LN_TUNING_TARGETS


def check_token_indices(owner: str, name: str, indices: Any) -> None:
    """Refuse token ids that are not a non-empty list of distinct non-negative integers."""
    if not isinstance(indices, (list, tuple)) or not indices:
        raise ValueError(f"{owner}.{name} must be a non-empty list of token ids, got {indices!r}")
    bad = [i for i in indices if not isinstance(i, int) or isinstance(i, bool) or i < 0]
    if bad:
        raise ValueError(f"{owner}.{name} must hold non-negative integer token ids; got {bad[0]!r}")
    if len(set(indices)) != len(indices):
        repeated = sorted({i for i in indices if indices.count(i) > 1})
        # PEFT writes repeated rows with index_copy, whose result is then undefined
        raise ValueError(f"{owner}.{name} names token id(s) {repeated} more than once")


@register_config
@dataclass
class TrainableTokensConfig(TargetedConfig):
    """Trainable tokens: train only the embedding rows of ``token_indices`` (new or existing
    tokens), keeping the rest of the embedding matrix frozen.

    ``target_modules``: the embedding layer(s); ``None`` picks the model's input embedding. With
    tied input/output embeddings the output head uses the same trained rows.
    ``init_weights``: start from the rows' current values (a no-op until trained); ``False``
    draws random rows. Files hold ``<embedding>.trainable_tokens_delta``, the trained rows.
    """

    peft_type: ClassVar[str] = "TRAINABLE_TOKENS"
    omitted_fields: ClassVar[tuple[str, ...]] = ("exclude_modules", "modules_to_save")  # not in PEFT's files
    token_indices: list[int] = field(default_factory=list)
    init_weights: bool = True

    def validate(self) -> None:
        check_token_indices("TrainableTokensConfig", "token_indices", self.token_indices)
        self.token_indices = list(self.token_indices)


def check_lora_token_indices(config: Any) -> None:
    """LoRA's ``trainable_token_indices``: a list (the input embedding's rows) or a dict module name
    -> rows. deltatune wires it for LoRA and DyLoRA; other subclasses refuse it rather than ignore it."""
    owner, value = type(config).__name__, getattr(config, "trainable_token_indices", None)
    if value is None:
        return
    if config.peft_type not in ("LORA", "DYLORA"):
        raise ValueError(f"{owner}.trainable_token_indices is not supported by deltatune for {config.peft_type} "
                         "(LoRA and DyLoRA only)")
    if isinstance(value, dict):
        if not value:
            raise ValueError(f"{owner}.trainable_token_indices: the dict names no module")
        for module, indices in value.items():
            if not isinstance(module, str) or not module:
                raise ValueError(f"{owner}.trainable_token_indices: keys must be module names, got {module!r}")
            check_token_indices(owner, f"trainable_token_indices[{module!r}]", indices)
        return
    check_token_indices(owner, "trainable_token_indices", value)
