"""Loss over rows that begin with the same tokens, with those tokens run through the model once.

Instruction data usually starts every row with the same tokens: a chat template's system
prompt, an instruction preamble. A no-gradient loss pass (validation during training,
perplexity in evaluation) does not need to recompute them per row: the shared beginning runs
once, its key/value cache is repeated for the batch, and the rows continue from it. The
result is the plain pass's up to float rounding (the tests compare them). Only positions
whose next token is not scored may be shared, and each row keeps at least one token of its own.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..data import Example, collate
from ..data.tokenize import IGNORE
from ..loss import TrainingLoss

MIN_SHARED_TOKENS = 8  # a shorter shared beginning is not worth the extra forward call


def loss_batches(rows: list[Example], batch_size: int) -> list[tuple[list[Example], bool]]:
    """``rows`` cut into batches for a loss pass, each with whether its rows share a beginning of
    at least ``MIN_SHARED_TOKENS`` to run once. Batches are cut in length order: a template or
    system prompt that every row starts with is shared within any batch, while batching in token
    order pads short rows to long neighbours (twice the tokens computed on the docstring task's
    validation split, where a template is all the rows share)."""
    ordered = sorted(rows, key=lambda r: len(r.input_ids))
    batches = [ordered[i:i + batch_size] for i in range(0, len(ordered), batch_size)]
    return [(chunk, len(chunk) > 1 and shared_prefix_length(chunk) >= MIN_SHARED_TOKENS) for chunk in batches]


def shared_prefix_length(rows: list[Example]) -> int:
    """How many leading tokens all ``rows`` share, stopping before the first position whose next
    token is scored and leaving every row at least one token."""
    limit = min(len(r.input_ids) for r in rows) - 1
    for r in rows:
        scored = next((i for i in range(1, len(r.labels)) if r.labels[i] != IGNORE), len(r.labels))
        limit = min(limit, scored - 1)  # position t predicts token t + 1
    first, n = rows[0].input_ids, 0
    while n < limit and all(r.input_ids[n] == first[n] for r in rows):
        n += 1
    return n


def prefix_loss_sum(loss_of: TrainingLoss, rows: list[Example], pad_id: int,
                    device: torch.device) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """(mean loss, scored tokens) of ``rows`` with their shared beginning run once, or None when
    they share fewer than ``MIN_SHARED_TOKENS`` tokens or the model's loss cannot take a cache."""
    if loss_of.reason is not None or loss_of.cache_name is None:
        return None
    shared = shared_prefix_length(rows)
    if shared < MIN_SHARED_TOKENS:
        return None
    from transformers import DynamicCache

    cache = DynamicCache(config=loss_of.model.config)
    loss_of.hidden_states({"input_ids": torch.tensor([rows[0].input_ids[:shared]], device=device)}, cache)
    cache.batch_repeat_interleave(len(rows))
    rest = [Example(r.input_ids[shared:], r.labels[shared:]) for r in rows]
    batch = {k: v.to(device) for k, v in collate(rest, pad_id, packed=False).items()}
    batch["attention_mask"] = torch.cat([torch.ones(len(rows), shared, dtype=batch["attention_mask"].dtype,
                                                    device=device), batch["attention_mask"]], dim=1)
    tokens = (batch["labels"][:, 1:] != IGNORE).sum()
    return loss_of(batch, cache), tokens
