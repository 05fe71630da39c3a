"""Learning-rate schedules: linear warm-up, then cosine, linear, constant or warmup-stable-decay.

``wsd`` holds the peak rate after warm-up and decays linearly to 0 over the last
``WSD_DECAY`` of the steps: most of a run at the full rate, a short anneal at the end.
"""

from __future__ import annotations

import math

import torch

SCHEDULES = ("cosine", "linear", "constant", "wsd")
WSD_DECAY = 0.2  # share of the steps over which wsd decays


def make_scheduler(optimizer: torch.optim.Optimizer, name: str, warmup_steps: int,
                   total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    if name not in SCHEDULES:
        raise ValueError(f"schedule {name!r} is not supported; use one of {list(SCHEDULES)}")

    def factor(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        if name == "constant":
            return 1.0
        if name == "wsd":
            decay_steps = max(1, round(WSD_DECAY * total_steps))
            return min(1.0, max(0.0, (total_steps - step) / decay_steps))
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        progress = min(max(progress, 0.0), 1.0)
        if name == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
