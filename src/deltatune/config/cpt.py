"""Config of Context-aware Prompt Tuning (CPT; Blau et al., arXiv:2410.17222), PEFT's ``CPTConfig``.

CPT puts a few worked examples (a context) in front of every input as embeddings and trains a
small change of each context token's embedding, kept inside a ball around the token's own
embedding. ``cpt_tokens_type_mask`` says what each context token is, by its value modulo 4
(examples are numbered by blocks of four: example ``i`` uses ``4i+1 .. 4i+4``, 0 is a separator):

- ``4i+1`` input template and ``4i+3`` output template: changed within
  ``opt_projection_format_epsilon``;
- ``4i+2`` the example's input text: changed within ``opt_projection_epsilon``;
- ``4i+4`` the example's label: never changed, but a training target (each label of the context
  is predicted, as the input's label is);
- ``0``: never changed and never a target.

Both radii are scaled by ``sqrt(token_dim / 2048)``. With ``opt_weighted_loss_type="decay"`` the
newest label (the input's) weighs 1 in the loss and each older one ``opt_loss_decay_factor``
times the next newer one. ``cpt_mask`` is stored as PEFT stores it; PEFT 0.21.2 never reads it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Optional, Sequence

from .base import register_config
from .prompt import PromptLearningConfig

WEIGHTED_LOSS_TYPES = ("none", "decay")
IGNORE = -100  # a label that takes no loss (the tokenizer layer's IGNORE, not imported: config is the lowest layer)


@register_config
@dataclass
class CPTConfig(PromptLearningConfig):
    """Context-aware prompt tuning (PEFT's field names and defaults; see the module docstring).

    ``cpt_token_ids``: the context's token ids (PEFT's default ``[0]``); ``num_virtual_tokens``
    is always their number. ``cpt_mask`` and ``cpt_tokens_type_mask`` default to ones (every
    token an input template token). Causal language models only.
    """

    peft_type: ClassVar[str] = "CPT"
    passive_fields: ClassVar[dict[str, Any]] = {"modules_to_save": None}
    cpt_token_ids: Optional[list[int]] = None
    cpt_mask: Optional[list[int]] = None
    cpt_tokens_type_mask: Optional[list[int]] = None
    opt_weighted_loss_type: Optional[str] = "none"
    opt_loss_decay_factor: Optional[float] = 1.0
    opt_projection_epsilon: Optional[float] = 0.1
    opt_projection_format_epsilon: Optional[float] = 0.1
    tokenizer_name_or_path: Optional[str] = None

    def __post_init__(self) -> None:
        # PEFT fills these in __post_init__; a file always carries them, filled
        if self.cpt_token_ids is None:
            self.cpt_token_ids = [0]
        _check_ints("cpt_token_ids", self.cpt_token_ids)
        if self.cpt_mask is None:
            self.cpt_mask = [1] * len(self.cpt_token_ids)
        if self.cpt_tokens_type_mask is None:
            self.cpt_tokens_type_mask = [1] * len(self.cpt_token_ids)
        self.num_virtual_tokens = len(self.cpt_token_ids)
        self.num_transformer_submodules = 1
        super().__post_init__()

    def validate(self) -> None:
        owner = "CPTConfig"
        if self.task_type not in (None, "CAUSAL_LM"):
            raise ValueError(f"{owner}.task_type must be CAUSAL_LM (CPT supports causal language models only), "
                             f"got {self.task_type!r}")
        _check_ints("cpt_token_ids", self.cpt_token_ids)
        _check_ints("cpt_mask", self.cpt_mask)
        _check_ints("cpt_tokens_type_mask", self.cpt_tokens_type_mask)
        if not self.cpt_token_ids:
            raise ValueError(f"{owner}.cpt_token_ids must hold at least one token id")
        if not len(self.cpt_token_ids) == len(self.cpt_mask) == len(self.cpt_tokens_type_mask):
            raise ValueError(f"{owner}: cpt_token_ids, cpt_mask and cpt_tokens_type_mask must have the same length "
                             f"(got {len(self.cpt_token_ids)}, {len(self.cpt_mask)}, "
                             f"{len(self.cpt_tokens_type_mask)})")
        if self.opt_weighted_loss_type not in WEIGHTED_LOSS_TYPES:
            raise ValueError(f"{owner}.opt_weighted_loss_type must be 'none' or 'decay', "
                             f"got {self.opt_weighted_loss_type!r}")
        for name in ("opt_loss_decay_factor", "opt_projection_epsilon", "opt_projection_format_epsilon"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value < float("inf"):
                raise ValueError(f"{owner}.{name} must be a finite number >= 0, got {value!r}")


def _check_ints(name: str, values: Any) -> None:
    """Token ids and masks: lists of integers >= 0 (a negative type would read as a template token
    through its remainder, a negative id as a row from the end)."""
    if not isinstance(values, list) or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
                                               for v in values):
        shown = values if not isinstance(values, list) else next(
            (v for v in values if not (isinstance(v, int) and not isinstance(v, bool) and v >= 0)), None)
        raise ValueError(f"CPTConfig.{name} must be a list of integers >= 0, found {shown!r}")


def context_from_examples(examples: Sequence[Any], count: int) -> dict[str, list[int]]:
    """CPT's context from the first ``count`` tokenized training examples (objects with
    ``input_ids`` and ``labels``, -100 where no loss is taken), laid out as PEFT's CPT example lays
    out its demonstrations: example ``i``'s prompt tokens are its input (type ``4i+2``), its
    trained tokens its label (``4i+4``). A chat template's own tokens cannot be told from the text
    after tokenizing, so nothing is marked a template here. Returns ``cpt_token_ids``, ``cpt_mask``
    and ``cpt_tokens_type_mask``."""
    if not isinstance(count, int) or count <= 0:
        raise ValueError(f"CPT context: the number of examples must be a positive integer, got {count!r}")
    ids: list[int] = []
    types: list[int] = []
    for i, example in enumerate(list(examples)[:count]):
        ids += list(example.input_ids)
        types += [4 * i + (2 if label == IGNORE else 4) for label in example.labels]
    if not ids:
        raise ValueError("CPT context: no training example to build cpt_token_ids from")
    return {"cpt_token_ids": ids, "cpt_mask": [1] * len(ids), "cpt_tokens_type_mask": types}
