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


# The attention module each architecture's adaption prompts wrap, by ``model_type`` (PEFT 0.21.2
# supports these three; its prompts would not load elsewhere, so deltatune refuses others too).
ADAPTION_PROMPT_TARGETS: dict[str, str] = {"llama": "self_attn", "mistral": "self_attn", "gpt2": "attn"}


@register_config
@dataclass
class AdaptionPromptConfig(AdapterConfig):
    """LLaMA-Adapter (adaption prompts): ``adapter_len`` learned prompt vectors per layer in the
    top ``adapter_layers`` attention layers, attended to by every token through the layer's own
    projections and added to its output times a gate that starts at zero.

    ``target_modules``: the attention module's name (``None``: ``self_attn`` for Llama and
    Mistral, ``attn`` for GPT-2). ``adapter_len`` must be given. ``adapter_layers`` counts from
    the top; deltatune reads ``None`` as every layer and records the number when the adapter is
    added (PEFT needs it given).
    """

    peft_type: ClassVar[str] = "ADAPTION_PROMPT"
    mergeable: ClassVar[bool] = False
    target_modules: Optional[str] = None
    adapter_len: Optional[int] = None
    adapter_layers: Optional[int] = None

    def validate(self) -> None:
        for name in ("adapter_len", "adapter_layers"):
            if getattr(self, name) is not None:
                check_positive_int("AdaptionPromptConfig", name, getattr(self, name))
        if self.target_modules is not None and (not isinstance(self.target_modules, str) or not self.target_modules):
            raise ValueError("AdaptionPromptConfig.target_modules must be the attention module's name (one string, "
                             f"e.g. 'self_attn'), got {self.target_modules!r}")


@register_config
@dataclass
class CartridgeConfig(PrefixTuningConfig):
    """Cartridges: a prefix KV cache trained directly (prefix tuning without a projection).

    ``num_virtual_tokens`` keys and values per layer, stored as PEFT stores prefix tuning's
    (``prompt_embeddings``, ``[num_virtual_tokens, num_layers * 2 * token_dim]``). The first
    ``num_frozen_tokens`` positions stay frozen (the paper keeps the first one as an attention
    sink). Values start random, or from the KV cache of a text run through the base model
    (``deltatune.adapters.prompt.cartridge.initialize_from_text``).
    """

    peft_type: ClassVar[str] = "CARTRIDGE"
    passive_fields: ClassVar[dict[str, Any]] = {"modules_to_save": None}
    omitted_fields: ClassVar[tuple[str, ...]] = ("encoder_hidden_size", "prefix_projection")  # not in PEFT's files
    num_frozen_tokens: int = 1

    def validate(self) -> None:
        super().validate()
        if self.prefix_projection or self.encoder_hidden_size is not None:
            raise ValueError("CartridgeConfig stores the KV cache itself: prefix_projection and encoder_hidden_size "
                             "do not apply")
        if not isinstance(self.num_frozen_tokens, int) or isinstance(self.num_frozen_tokens, bool) \
                or not 0 <= self.num_frozen_tokens <= self.num_virtual_tokens:
            raise ValueError(f"CartridgeConfig.num_frozen_tokens must be in [0, num_virtual_tokens="
                             f"{self.num_virtual_tokens}], got {self.num_frozen_tokens!r}")


# prompt_tuning_init values that start from a saved source adapter (a PEFT prompt-tuning or
# multitask prompt-tuning file named by prompt_tuning_init_state_dict_path)
SOURCE_TASK_INITS = ("AVERAGE_SOURCE_TASKS", "EXACT_SOURCE_TASK", "ONLY_SOURCE_SHARED")


@register_config
@dataclass
class MultitaskPromptTuningConfig(PromptTuningConfig):
    """Multitask prompt tuning (Wang et al., 2023): one shared prompt times a task-specific rank
    ``num_ranks`` matrix ``cols[t] @ rows[t]`` (entry by entry), so ``num_tasks`` tasks share most
    of the prompt; each row of a batch uses its own task (``task_ids``).

    ``prompt_tuning_init``: ``RANDOM``, ``TEXT`` and ``SAMPLE_VOCAB`` as for prompt tuning; or from
    a source adapter file (``prompt_tuning_init_state_dict_path``, safetensors): ``AVERAGE_SOURCE_TASKS``
    (the shared prompt and the mean of the source tasks' factors), ``EXACT_SOURCE_TASK`` (those of
    source task ``prompt_tuning_init_task``) or ``ONLY_SOURCE_SHARED`` (the shared prompt only,
    which a plain prompt-tuning file also holds). The first two give one task's factors, so they
    need ``num_tasks`` 1, as in PEFT.
    """

    peft_type: ClassVar[str] = "MULTITASK_PROMPT_TUNING"
    prompt_tuning_init_state_dict_path: Optional[str] = None
    prompt_tuning_init_task: Optional[int] = 0
    num_ranks: Optional[int] = 1
    num_tasks: Optional[int] = 1

    def validate(self) -> None:
        owner = "MultitaskPromptTuningConfig"
        check_positive_int(owner, "num_virtual_tokens", self.num_virtual_tokens)
        check_positive_int(owner, "num_ranks", self.num_ranks)
        check_positive_int(owner, "num_tasks", self.num_tasks)
        inits = ("RANDOM", "TEXT", "SAMPLE_VOCAB", *SOURCE_TASK_INITS)
        if self.prompt_tuning_init not in inits:
            raise ValueError(f"{owner}.prompt_tuning_init must be one of {', '.join(inits)}, "
                             f"got {self.prompt_tuning_init!r}")
        if self.prompt_tuning_init == "TEXT" and not self.prompt_tuning_init_text:
            raise ValueError(f"{owner}.prompt_tuning_init_text is required when prompt_tuning_init is TEXT")
        if self.prompt_tuning_init in SOURCE_TASK_INITS and not self.prompt_tuning_init_state_dict_path:
            raise ValueError(f"{owner}.prompt_tuning_init_state_dict_path (a source adapter's safetensors file) is "
                             f"required when prompt_tuning_init is {self.prompt_tuning_init}")
        task = self.prompt_tuning_init_task
        if task is not None and (not isinstance(task, int) or isinstance(task, bool) or task < 0):
            raise ValueError(f"{owner}.prompt_tuning_init_task must be a task index (0 or more), got {task!r}")
