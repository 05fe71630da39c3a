"""Config of BEFT: a learned bias vector added to chosen linear layers (PEFT's ``BeftConfig``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Optional, Union  # noqa: F401  (config_from_dict resolves the inherited hints here)

from .base import TargetedConfig, register_config

# PEFT 0.21.2's default targets per model_type: the attention value projection.
BEFT_TARGETS: dict[str, list[str]] = {
    **dict.fromkeys(("t5", "mt5"), ["v"]),
    **dict.fromkeys(("roberta", "bert"), ["value"]),
    "deberta-v2": ["value_proj"],
    **dict.fromkeys(("opt", "gptj", "gpt_neo", "bart", "llama", "llama4", "mistral", "mixtral", "phi", "gemma",
                     "gemma2", "gemma3_text", "qwen2", "qwen3"), ["v_proj"]),
}


@register_config
@dataclass
class BeftConfig(TargetedConfig):
    """BEFT (arXiv:2509.15974): train one vector per targeted linear layer, added to its output
    (an extra bias), by default on the attention value projections.

    ``init_weights``: start the vectors at zero, so a new adapter changes nothing (``False``:
    standard normal values). Merging adds the vector to the layer's bias; a layer without a
    bias cannot be merged into (as in PEFT).
    """

    peft_type: ClassVar[str] = "BEFT"
    default_targets: ClassVar[Optional[dict[str, list[str]]]] = BEFT_TARGETS
    omitted_fields: ClassVar[tuple[str, ...]] = ("exclude_modules",)  # PEFT's BeftConfig has no such field
    init_weights: bool = True

    def validate(self) -> None:
        if not isinstance(self.init_weights, bool):
            raise ValueError(f"BeftConfig.init_weights must be true or false, got {self.init_weights!r}")
