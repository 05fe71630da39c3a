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
from .prompt import AdaptionPromptConfig
from .prompt import CartridgeConfig
from .wavelet import WaveFTConfig
from .beft import BeftConfig
from .low_rank import DeloraConfig, RandLoraConfig, VBLoRAConfig
from .low_rank import GraloraConfig, UniLoraConfig
from .low_rank import TinyLoraConfig
from .weight_derived import DeftConfig, PeanutConfig
from .low_rank import HiraConfig, PveraConfig  # catalogue A
from .low_rank import LilyConfig
from .scaling import RoadConfig
from .selective import LNTuningConfig, TrainableTokensConfig
from .structured import C3AConfig, FourierFTConfig, MissConfig, ShiraConfig
from .structured import SupertuningConfig
from .structured import GloraConfig
from .orthogonal import BOFTConfig, HRAConfig, OFTConfig, PsoftConfig
from .osf import OSFConfig
from .frod import FrodConfig
from .mixture import XLoraConfig
from .mixture import PolyConfig
from .prompt import MultitaskPromptTuningConfig
from .shadow import ShadowConfig
from .cpt import CPTConfig
from .adamss import AdamssConfig

__all__ = [
    "AdaLoraConfig",
    "AdaptionPromptConfig",
    "MultitaskPromptTuningConfig",
    "ShadowConfig",
    "CPTConfig",
    "AdamssConfig",
    "PolyConfig",
    "AdapterConfig",
    "BeftConfig",
    "BottleneckConfig",
    "DeloraConfig",
    "DyLoraConfig",
    "IA3Config",
    "LoHaConfig",
    "LoKrConfig",
    "NolaConfig",
    "PrefixTuningConfig",
    "PromptEncoderConfig",
    "PromptLearningConfig",
    "PromptTuningConfig",
    "RandLoraConfig",
    "RoadConfig",
    "VBLoRAConfig",
    "GraloraConfig",
    "UniLoraConfig",
    "TinyLoraConfig",
    "DeftConfig",
    "PeanutConfig",
    "LNTuningConfig",
    "TrainableTokensConfig",
    "SelectiveConfig",
    "VeraConfig",
    "C3AConfig",
    "FourierFTConfig",
    "MissConfig",
    "ShiraConfig",
    "SupertuningConfig",
    "GloraConfig",
    "BOFTConfig",
    "HRAConfig",
    "OFTConfig",
    "PsoftConfig",
    "OSFConfig",
    "FrodConfig",
    "XLoraConfig",
    "HiraConfig",
    "PveraConfig",
    "LilyConfig",
    "CartridgeConfig",
    "WaveFTConfig",
    "CONFIG_REGISTRY",
    "LoraConfig",
    "PEFT_VERSION_WRITTEN",
    "TargetedConfig",
    "config_from_dict",
    "register_config",
]
