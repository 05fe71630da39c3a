"""deltatune: parameter-efficient fine-tuning with adapters that PEFT, vLLM and SGLang read.

The public names load on first use (PEP 562), so ``import deltatune`` and the ``deltatune``
command start without importing torch until something needs it: the command may first run
itself again under another memory allocator (``allocator.py``).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # what the lazy names are, for type checkers and editors
    from . import quant, train
    from .adapter_ops import (
        active_adapters, adapter_per_row, add_adapter, delete_adapter, disable_adapters, merge,
        print_trainable_parameters, set_adapter, set_adapter_rank, trainable_parameters, unload, unmerge,
    )
    from .combine import add_weighted_adapter
    from .config import (
        AdaLoraConfig, AdapterConfig, BottleneckConfig, DyLoraConfig, IA3Config, LoHaConfig, LoKrConfig,
        LoraConfig, NolaConfig, PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig, SelectiveConfig,
        VeraConfig, config_from_dict,
    )
    from .adapters.task_ids import set_task_ids, use_task_ids
    from .io import load_adapter, read_adapter_config, save_adapter
    from .loading import load_model
    from .lora_from_data import add_lora_from_data
    from .merge_report import MergeReport

# public name -> the module that defines it
_HOMES = {
    **dict.fromkeys(("AdaLoraConfig", "AdapterConfig", "BottleneckConfig", "DyLoraConfig", "IA3Config", "LoHaConfig",
                     "LoKrConfig", "LoraConfig", "NolaConfig", "PrefixTuningConfig", "PromptEncoderConfig",
                     "PromptTuningConfig", "SelectiveConfig", "VeraConfig", "config_from_dict"), ".config"),
    **dict.fromkeys(("active_adapters", "add_adapter", "adapter_per_row", "delete_adapter", "disable_adapters",
                     "merge", "print_trainable_parameters", "set_adapter", "set_adapter_rank",
                     "trainable_parameters", "unload", "unmerge"), ".adapter_ops"),
    **dict.fromkeys(("load_adapter", "read_adapter_config", "save_adapter"), ".io"),
    **dict.fromkeys(("set_task_ids", "use_task_ids"), ".adapters.task_ids"),
    "add_weighted_adapter": ".combine",
    "MergeReport": ".merge_report",
    "load_model": ".loading",
    "add_lora_from_data": ".lora_from_data",
}
_SUBMODULES = ("quant", "train")


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    home = _HOMES.get(name)
    if home is None and name.endswith("Config"):  # every method's config class (config/ imports no torch)
        home = ".config" if name in importlib.import_module(".config", __name__).__all__ else None
    if home is None:
        raise AttributeError(f"module 'deltatune' has no attribute {name!r}")
    value = getattr(importlib.import_module(home, __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


__version__ = "0.1.0"

__all__ = [
    "AdaLoraConfig",
    "AdapterConfig",
    "BottleneckConfig",
    "DyLoraConfig",
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
    "add_lora_from_data",
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
    "set_adapter_rank",
    "set_task_ids",
    "train",
    "trainable_parameters",
    "unload",
    "unmerge",
    "use_task_ids",
]
