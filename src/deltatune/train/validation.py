"""Validation during training: which rows, how often, and the loss over them.

Validation is there to draw the loss curve, keep the best adapter and stop early; it should not
cost a run much. Two bounds keep it cheap. A pass reads at most ``eval_max_rows`` rows (a fixed
seeded sample of a large split). When ``eval_steps`` is 0 the passes are spaced so that all of
them together cost about ``VALIDATION_BUDGET`` of the training steps, estimated from token
counts (a validation token costs about ``FORWARD_SHARE`` of a training token: a forward pass
without backward or optimizer, in larger batches), with at most ``EVAL_POINTS`` passes besides
the one at step 0. The passes at step 0 and at the end always run.
"""

from __future__ import annotations

import math
import random
from typing import Optional, Sequence

import torch

from ..evaluate.generation import loss_sums
from .config import TrainConfig
from .contexts import autocast
from .distributed import Distributed

EVAL_POINTS = 10  # the most validation passes over a run when eval_steps is 0 (besides step 0)
VALIDATION_BUDGET = 0.08  # share of the training steps' time the passes may take together
FORWARD_SHARE = 0.3  # a validation token's cost against a training token's (measured near 0.27 on CPU)


def eval_batch_size(cfg: TrainConfig) -> int:
    """Rows per batch where nothing is kept for backward (validation, final generation)."""
    return cfg.eval_batch_size or 4 * cfg.batch_size


def sample_rows(rows: list, limit: int, seed: int) -> list:
    """At most ``limit`` of ``rows`` (0: all), a fixed sample for the seed, in their order."""
    if not limit or len(rows) <= limit:
        return rows
    keep = sorted(random.Random(seed).sample(range(len(rows)), limit))
    return [rows[i] for i in keep]


def auto_eval_steps(total_steps: int, step_tokens: float, validation_tokens: int) -> int:
    """Steps between validation passes when none is set.

    ``step_tokens`` is the tokens a training step reads, ``validation_tokens`` those of one pass.
    As many passes as ``VALIDATION_BUDGET`` allows, at most ``EVAL_POINTS`` (so the loss plot
    shows a curve where it is cheap), evenly spaced; the passes at step 0 and at the end count.
    """
    if validation_tokens <= 0:
        return total_steps
    affordable = VALIDATION_BUDGET * total_steps * step_tokens / (FORWARD_SHARE * validation_tokens)
    between = min(EVAL_POINTS - 1, max(0, math.floor(affordable) - 2))  # passes besides step 0 and the end
    return max(1, math.ceil(total_steps / (between + 1)))


def eval_points(total_steps: int, every: int) -> list[int]:
    """The steps a run evaluates at (besides step 0)."""
    return [s for s in range(1, total_steps + 1) if s % every == 0 or s == total_steps]


@torch.no_grad()
def evaluate(model, rows: Sequence, cfg: TrainConfig, pad_id: int, dist: Distributed,
             seq2seq: bool = False) -> Optional[float]:
    """Token-weighted mean loss over ``rows`` (all ranks together)."""
    if not rows:
        return None
    was_training = model.training
    model.eval()
    with autocast(cfg.precision, next(model.parameters()).device):
        total = loss_sums(model, list(rows[dist.rank::dist.world]), eval_batch_size(cfg), pad_id, cfg.data.packing,
                          seq2seq)
    total = dist.all_reduce_sum(total)
    model.train(was_training)
    return (total[0] / total[1]).item() if total[1] > 0 else None
