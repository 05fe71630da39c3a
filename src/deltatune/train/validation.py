"""Validation during training: which rows, how often, and the loss over them.

Validation is there to draw the loss curve, keep the best adapter and stop early; it should not
cost a run much. Two bounds keep it cheap. A pass reads at most ``eval_max_rows`` rows (a fixed
seeded sample of a large split). When ``eval_steps`` is 0 the passes are spaced so that all of
them together cost about ``VALIDATION_BUDGET`` of the training steps, estimated from token
counts (a validation token costs about ``FORWARD_SHARE`` of a training token: a forward pass
without backward or optimizer), with at most ``EVAL_POINTS`` passes besides the one at step 0.
The pass at the end always runs; the one at step 0 (the untrained adapter's loss) runs when the
budget pays for two, or when ``eval_steps`` is set.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from ..evaluate.generation import loss_sums
from .config import TrainConfig
from .contexts import autocast
from ..distributed import Distributed

EVAL_POINTS = 10  # the most validation passes over a run when eval_steps is 0 (besides step 0)
VALIDATION_BUDGET = 0.08  # share of the training steps' time the passes may take together
# a validation token's cost against a training token's: a LoRA step's backward gives the frozen
# base no weight gradient, so it costs about what the forward does. Measured on 2 CPU cores:
# 0.25 for the default job's short rows in batches of 32, 0.4 to 0.5 for rows of 100 to 400 tokens
FORWARD_SHARE = 0.4


def eval_batch_size(cfg: TrainConfig) -> int:
    """Rows per batch where nothing is kept for backward (validation, final generation)."""
    return cfg.eval_batch_size or 4 * cfg.batch_size


def sample_rows(rows: list, limit: int, seed: int) -> list:
    """At most ``limit`` of ``rows`` (0: all), a fixed sample for the seed, in their order."""
    if not limit or len(rows) <= limit:
        return rows
    keep = sorted(random.Random(seed).sample(range(len(rows)), limit))
    return [rows[i] for i in keep]


@dataclass(frozen=True)
class ValidationPlan:
    """When a run validates: every ``every`` steps and at its last step, and before the first
    step when ``at_start``."""

    every: int
    at_start: bool

    def passes(self, steps: int) -> int:
        """Validation passes over a run that ends after ``steps`` steps."""
        return int(self.at_start) + len(eval_points(steps, self.every))


def plan_validation(total_steps: int, step_tokens: float, validation_tokens: int,
                    eval_steps: int = 0) -> ValidationPlan:
    """The passes of a run: ``eval_steps`` apart (and at step 0) when it is set, else as many as
    ``VALIDATION_BUDGET`` allows, at most ``EVAL_POINTS`` besides step 0, evenly spaced.

    ``step_tokens`` is the tokens a training step reads, ``validation_tokens`` those of one pass.
    The pass at the end always runs; the one at step 0 only when the budget pays for both.
    """
    if eval_steps:
        return ValidationPlan(eval_steps, True)
    if validation_tokens <= 0:
        return ValidationPlan(total_steps, True)
    affordable = VALIDATION_BUDGET * total_steps * step_tokens / (FORWARD_SHARE * validation_tokens)
    if affordable < 2:
        return ValidationPlan(total_steps, False)
    between = min(EVAL_POINTS - 1, math.floor(affordable) - 2)  # passes besides step 0 and the end
    return ValidationPlan(max(1, math.ceil(total_steps / (between + 1))), True)


def eval_points(total_steps: int, every: int) -> list[int]:
    """The steps a run evaluates at (besides step 0)."""
    return [s for s in range(1, total_steps + 1) if s % every == 0 or s == total_steps]


@torch.no_grad()
def evaluate(model, rows: Sequence, cfg: TrainConfig, pad_id: int, dist: Distributed,
             seq2seq: bool = False) -> Optional[float]:
    """Token-weighted mean loss over ``rows`` (all ranks together). ``model`` is the model, or
    under FSDP2 the sharded root module (a ``TrainingLoss``) that every rank runs in step: each
    rank then scores every row, since the ranks must run the same number of forward passes."""
    if not rows:
        return None
    was_training = model.training
    model.eval()
    mine = list(rows) if dist.sharded else list(rows[dist.rank::dist.world])
    with autocast(cfg.precision, next(model.parameters()).device):
        total = loss_sums(model, mine, eval_batch_size(cfg), pad_id, cfg.data.packing, seq2seq,
                          share_prefix=not dist.sharded)
    total = total if dist.sharded else dist.all_reduce_sum(total)
    model.train(was_training)
    return (total[0] / total[1]).item() if total[1] > 0 else None
