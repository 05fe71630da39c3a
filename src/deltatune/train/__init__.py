"""Training: the loop, its settings, optimizers, schedules, checkpoints and outputs."""

from .config import ConfigError, LoraOptions, TrainConfig, load_config
from .loop import StepInfo, train
from .optimizers import AdamW8bit, make_optimizer

__all__ = ["AdamW8bit", "ConfigError", "LoraOptions", "StepInfo", "TrainConfig", "load_config", "make_optimizer",
           "train"]
