"""Adapter configs: one dataclass per method, PEFT's field names, a registry by ``peft_type``."""

from .base import (
    CONFIG_REGISTRY,
    PEFT_VERSION_WRITTEN,
    AdapterConfig,
    TargetedConfig,
    config_from_dict,
    register_config,
)
from .lora import DyLoraConfig, LoraConfig
from .methods import (
    AdaLoraConfig,
    BottleneckConfig,
    IA3Config,
    LoHaConfig,
    LoKrConfig,
    NolaConfig,
    SelectiveConfig,
    VeraConfig,
)
from .prompt import PrefixTuningConfig, PromptEncoderConfig, PromptLearningConfig, PromptTuningConfig

__all__ = [
    "AdaLoraConfig",
    "AdapterConfig",
    "BottleneckConfig",
    "DyLoraConfig",
    "IA3Config",
    "LoHaConfig",
    "LoKrConfig",
    "NolaConfig",
    "PrefixTuningConfig",
    "PromptEncoderConfig",
    "PromptLearningConfig",
    "PromptTuningConfig",
    "SelectiveConfig",
    "VeraConfig",
    "CONFIG_REGISTRY",
    "LoraConfig",
    "PEFT_VERSION_WRITTEN",
    "TargetedConfig",
    "config_from_dict",
    "register_config",
]
