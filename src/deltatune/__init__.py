"""deltatune: parameter-efficient fine-tuning with adapters that PEFT, vLLM and SGLang read."""

from . import quant, train
from .combine import add_weighted_adapter
from .config import (
    AdaLoraConfig,
    AdapterConfig,
    BottleneckConfig,
    IA3Config,
    LoHaConfig,
    LoKrConfig,
    LoraConfig,
    NolaConfig,
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptTuningConfig,
    SelectiveConfig,
    VeraConfig,
    config_from_dict,
)
from .io import load_adapter, read_adapter_config, save_adapter
from .adapter_ops import (
    active_adapters,
    add_adapter,
    adapter_per_row,
    delete_adapter,
    disable_adapters,
    merge,
    print_trainable_parameters,
    set_adapter,
    trainable_parameters,
    unload,
    unmerge,
)
from .merge_report import MergeReport
from .loading import load_model

__version__ = "0.1.0"

__all__ = [
    "AdaLoraConfig",
    "AdapterConfig",
    "BottleneckConfig",
    "IA3Config",
    "LoHaConfig",
    "LoKrConfig",
    "LoraConfig",
    "NolaConfig",
    "PrefixTuningConfig",
    "PromptEncoderConfig",
    "PromptTuningConfig",
    "SelectiveConfig",
    "VeraConfig",
    "MergeReport",
    "active_adapters",
    "add_adapter",
    "add_weighted_adapter",
    "adapter_per_row",
    "config_from_dict",
    "delete_adapter",
    "disable_adapters",
    "load_adapter",
    "load_model",
    "merge",
    "print_trainable_parameters",
    "quant",
    "read_adapter_config",
    "save_adapter",
    "set_adapter",
    "train",
    "trainable_parameters",
    "unload",
    "unmerge",
]
