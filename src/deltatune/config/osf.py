"""OSF (orthogonal subspace fine-tuning) config, with PEFT's (0.21.2) class name ``OSFConfig``,
fields, defaults and ``peft_type``. Paper: Nayak et al., "Sculpting Subspaces: Constrained Full
Fine-Tuning in LLMs for Continual Learning", arXiv:2504.07097."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Optional, Union  # noqa: F401  (Any: the base fields' hints resolve here)

from .base import TargetedConfig, register_config

# PEFT's per-architecture targets for OSF (TRANSFORMERS_MODELS_TO_OSF_TARGET_MODULES_MAPPING);
# an architecture missing here gets every linear layer but the output head, as in PEFT
_DECODER = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj", "up_proj"]
OSF_TARGETS: dict[str, list[str]] = {
    **{arch: list(_DECODER) for arch in ("llama", "llama4", "mistral", "mixtral", "gemma", "gemma2", "gemma3_text",
                                         "qwen2", "qwen3", "phi")},
    "gpt2": ["c_attn", "c_proj"],
    "bloom": ["query_key_value", "dense_4h_to_h"],
    "opt": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    "gptj": ["q_proj", "k_proj", "v_proj", "out_proj", "fc_in", "fc_out"],
    "gpt_neox": ["query_key_value", "dense_4h_to_h"],
    "falcon": ["query_key_value", "dense_4h_to_h"],
    "gpt_bigcode": ["c_attn", "c_proj"],
}


def _check_rank(owner: str, name: str, value: Any, allow_none: bool) -> None:
    """An effective rank is a positive integer (singular directions kept frozen) or a positive
    float: in (0, 1] a fraction of the layer's smaller side, above 1 truncated to an integer."""
    if value is None and allow_none:
        return
    ok = not isinstance(value, bool) and (
        (isinstance(value, int) and value >= 1)
        or (isinstance(value, float) and math.isfinite(value) and value > 0))
    if not ok:
        raise ValueError(f"{owner}.{name} must be {'None, ' if allow_none else ''}a positive integer (how many top "
                         f"singular directions stay frozen) or a fraction in (0, 1] of the layer's smaller side, "
                         f"got {value!r}")


@register_config
@dataclass
class OSFConfig(TargetedConfig):
    """OSF: each targeted linear weight is split by its SVD ``W = U Σ Vᵀ`` into the top
    ``effective_rank`` singular directions (``U_high Σ_high V_highᵀ``, frozen, never saved) and the
    rest (``U_low``, ``S_low``, ``V_low``: trained and saved). The layer adds
    ``U_low diag(S_low) V_low − U₀ diag(S₀) V₀`` (the trained low part minus its value at the SVD,
    recomputed from the base weight on load), so a new adapter starts as the base. While training,
    the gradients of ``U_low`` and ``V_low`` are projected onto the orthogonal complement of the
    frozen ``U_high`` / ``V_high`` subspaces. ``effective_rank``: ``None`` half the layer's smaller
    side; an integer; or a float in (0, 1], a fraction of the smaller side. ``rank_pattern``: regular
    expressions searched in a module's name (the first that matches wins) -> an effective rank of
    the same kinds. ``init_weights=False`` starts the trained factors at random values (a test aid;
    the frozen SVD stays). ``target_svd_config`` is accepted and ignored, as in PEFT. Linear layers
    only (PEFT skips GPT-2's Conv1D; deltatune refuses it)."""

    peft_type: ClassVar[str] = "OSF"
    default_targets: ClassVar[Optional[dict[str, list[str]]]] = OSF_TARGETS
    omitted_fields: ClassVar[tuple[str, ...]] = ("exclude_modules",)  # PEFT's OSFConfig has no such field
    effective_rank: Optional[Union[int, float]] = None
    rank_pattern: Optional[dict[str, Union[int, float]]] = None
    init_weights: Optional[bool] = True
    target_svd_config: Optional[dict[str, int]] = None

    def validate(self) -> None:
        owner = "OSFConfig"
        _check_rank(owner, "effective_rank", self.effective_rank, allow_none=True)
        if self.rank_pattern is not None:
            if not isinstance(self.rank_pattern, dict):
                raise ValueError(f"{owner}.rank_pattern must be a mapping of module-name patterns to ranks, got "
                                 f"{self.rank_pattern!r}")
            for pattern, rank in self.rank_pattern.items():
                if not isinstance(pattern, str):
                    raise ValueError(f"{owner}.rank_pattern keys must be text (regular expressions), got {pattern!r}")
                _check_rank(owner, f"rank_pattern[{pattern!r}]", rank, allow_none=False)
        if self.init_weights is not None and not isinstance(self.init_weights, bool):
            raise ValueError(f"{owner}.init_weights must be true or false, got {self.init_weights!r}")
        if self.target_svd_config is not None and not isinstance(self.target_svd_config, dict):
            raise ValueError(f"{owner}.target_svd_config must be None or a mapping, got {self.target_svd_config!r}")
