"""Training: optimizers (and, with the training issue, the loop, schedules and checkpoints)."""

from .optimizers import AdamW8bit, make_optimizer

__all__ = ["AdamW8bit", "make_optimizer"]
