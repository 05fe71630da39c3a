"""Where a training run's wall time goes: named phases, and the rest as "other".

``deltatune train`` times loading, data preparation, a preference run's reference scores, the
training steps (forward, backward, optimizer), validation passes, checkpoint and adapter writes
and the final evaluation, and writes the split to ``summary.json`` (``time_seconds``): a run
that spends its time anywhere but in the steps shows it there.
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from typing import Iterator

# "reference": a preference run's reference log-probabilities, computed once before the first step
PHASES = ("load", "data", "reference", "steps", "validation", "checkpoints", "final_evaluation")


class PhaseTimer:
    """Accumulates wall seconds per phase from its creation on."""

    def __init__(self, started: float | None = None) -> None:
        self.started = time.perf_counter() if started is None else started  # a perf_counter() value
        self.seconds: dict[str, float] = defaultdict(float)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if name not in PHASES:
            raise ValueError(f"unknown phase {name!r}; phases: {PHASES}")
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - start

    def split(self) -> dict[str, float]:
        """Seconds of every phase, ``other`` (the time in none of them) and ``total``, rounded to ms."""
        total = time.perf_counter() - self.started
        parts = {name: self.seconds.get(name, 0.0) for name in PHASES}
        parts["other"] = total - sum(parts.values())
        parts["total"] = total
        return {name: round(value, 3) for name, value in parts.items()}
