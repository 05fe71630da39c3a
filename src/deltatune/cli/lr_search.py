"""Choosing a method's learning rate on validation data, for ``deltatune compare --lr-search``.

The search is a walk on a geometric grid: train at the starting rate (the method's recipe) and at
``factor`` times it; then keep stepping by ``factor`` in the better direction while the validation
loss after training keeps falling, at most ``tries`` rates in all. Only validation loss takes part;
the caller scores the chosen rate's adapter on the test file afterwards.
"""

from __future__ import annotations

import math
from typing import Callable, Optional


def grid_rate(lr: float) -> float:
    """``lr`` rounded to three significant digits, so that rates reached by different walks coincide."""
    return float(f"{lr:.3g}")


def search_rate(validation_loss_at: Callable[[float], Optional[float]], start: float, factor: float,
                tries: int) -> tuple[float, dict[float, float]]:
    """(chosen rate, {rate: validation loss}) of the walk described in the module docstring.

    ``validation_loss_at(lr)`` trains at ``lr``; ``None`` or NaN (a failed or diverged run) counts as
    infinitely bad, so the walk turns away from it; when both starting rates fail, the walk ends
    there (the cause is not the rate, and the caller reports the failure).
    """
    if factor <= 1:
        raise ValueError(f"lr_search: the factor {factor} must be above 1")
    if tries < 2:
        raise ValueError(f"lr_search_tries: {tries} is too few; the walk needs at least 2 rates")
    losses: dict[float, float] = {}

    def measure(lr: float) -> float:
        loss = validation_loss_at(lr)
        losses[lr] = math.inf if loss is None or math.isnan(loss) else loss
        return losses[lr]

    low, high = grid_rate(start), grid_rate(start * factor)
    low_loss = measure(low)
    high_loss = measure(high)
    if math.isinf(low_loss) and math.isinf(high_loss):
        return low, losses  # both failed: the method cannot run here (a setting, not a rate)
    rising = high_loss < low_loss
    current, step = (high, factor) if rising else (low, 1 / factor)
    while len(losses) < tries:
        following = grid_rate(current * step)
        if measure(following) >= losses[current]:
            break
        current = following
    return min(losses, key=losses.get), losses
