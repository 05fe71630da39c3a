"""Configs of the soft-prompt methods: prompt tuning, prefix tuning and P-tuning (PEFT's names).

The model-shape fields (``token_dim``, ``num_layers``, ``num_attention_heads``,
``num_transformer_submodules``) are filled from the base model when the adapter is added,
as PEFT fills them, so a saved file describes its tensor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Optional

from .base import AdapterConfig, check_positive_int, register_config


@dataclass
class PromptLearningConfig(AdapterConfig):
    """Fields the soft-prompt methods share."""

    mergeable: ClassVar[bool] = False
    passive_fields: ClassVar[dict[str, Any]] = {"modules_to_save": None}
    num_virtual_tokens: int = 20
    token_dim: Optional[int] = None
    num_transformer_submodules: Optional[int] = None
    num_attention_heads: Optional[int] = None
    num_layers: Optional[int] = None

    def validate(self) -> None:
        check_positive_int(type(self).__name__, "num_virtual_tokens", self.num_virtual_tokens)


@register_config
@dataclass
class PromptTuningConfig(PromptLearningConfig):
    """Prompt tuning: ``num_virtual_tokens`` learned embeddings placed before every input.

    ``prompt_tuning_init``: ``RANDOM``; ``TEXT`` (the embeddings of
    ``prompt_tuning_init_text``, repeated to length, needs a tokenizer); ``SAMPLE_VOCAB``
    (embeddings of random vocabulary rows).
    """

    peft_type: ClassVar[str] = "PROMPT_TUNING"
    prompt_tuning_init: str = "RANDOM"
    prompt_tuning_init_text: Optional[str] = None
    tokenizer_name_or_path: Optional[str] = None
    tokenizer_kwargs: Optional[dict] = None

    def validate(self) -> None:
        super().validate()
        if self.prompt_tuning_init not in ("RANDOM", "TEXT", "SAMPLE_VOCAB"):
            raise ValueError(
                f"PromptTuningConfig.prompt_tuning_init must be RANDOM, TEXT or SAMPLE_VOCAB, got {self.prompt_tuning_init!r}"
            )
        if self.prompt_tuning_init == "TEXT" and not self.prompt_tuning_init_text:
            raise ValueError("PromptTuningConfig.prompt_tuning_init_text is required when prompt_tuning_init is TEXT")


@register_config
@dataclass
class PrefixTuningConfig(PromptLearningConfig):
    """Prefix tuning: learned keys and values for ``num_virtual_tokens`` positions in every
    attention layer. ``prefix_projection``: train them through a two-layer MLP of width
    ``encoder_hidden_size`` (files store the MLP's output, as PEFT does)."""

    peft_type: ClassVar[str] = "PREFIX_TUNING"
    passive_fields: ClassVar[dict[str, Any]] = {"modules_to_save": None, "init_weights": None}
    encoder_hidden_size: Optional[int] = None
    prefix_projection: bool = False

    def validate(self) -> None:
        super().validate()
        if self.prefix_projection and not self.encoder_hidden_size:
            raise ValueError("PrefixTuningConfig.encoder_hidden_size is required when prefix_projection is true")


@register_config
@dataclass
class PromptEncoderConfig(PromptLearningConfig):
    """P-tuning: virtual-token embeddings produced by a small encoder (``MLP``, or ``LSTM``
    followed by an MLP) during training; files store the encoder's output."""

    peft_type: ClassVar[str] = "P_TUNING"
    encoder_reparameterization_type: str = "MLP"
    encoder_hidden_size: Optional[int] = None
    encoder_num_layers: int = 2
    encoder_dropout: float = 0.0

    def validate(self) -> None:
        super().validate()
        if self.encoder_reparameterization_type not in ("MLP", "LSTM"):
            raise ValueError(
                "PromptEncoderConfig.encoder_reparameterization_type must be MLP or LSTM, "
                f"got {self.encoder_reparameterization_type!r}"
            )
