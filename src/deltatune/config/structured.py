"""Configs of the structured weight-delta methods: FourierFT (spectral), SHiRA (sparse), MiSS
(shared shards) and C3A (block-circulant). PEFT's class names, field names, defaults and
``peft_type``, so their ``adapter_config.json`` files read both ways."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional, Union

from .base import TargetedConfig, check_positive_int, check_probability, register_config

# target_modules=None: PEFT's FourierFT and C3A tables are LoRA's (deltatune.targeting.DEFAULT_TARGETS,
# which config/ cannot import) except GPT-2, whose MLP output projection they adapt.
GPT2_MLP_TARGETS: dict[str, list[str]] = {
    **dict.fromkeys(("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "bart", "opt"), ["q_proj", "v_proj"]),
    "phi3": ["qkv_proj"],
    "gpt2": ["mlp.c_proj"],
    "t5": ["q", "v"],
    "mt5": ["q", "v"],
}


def _check_bias(owner: str, bias: Any, only: str) -> None:
    if bias not in ("none", "all", only):
        raise ValueError(f"{owner}.bias must be 'none', 'all' or {only!r}, got {bias!r}")


def _check_layers(owner: str, config: TargetedConfig) -> None:
    if getattr(config, "layers_pattern", None) and not getattr(config, "layers_to_transform", None):
        raise ValueError(f"{owner}.layers_pattern is only meaningful together with layers_to_transform")
    if isinstance(config.target_modules, str) and getattr(config, "layers_to_transform", None) is not None:
        raise ValueError(f"{owner}.layers_to_transform cannot be used when target_modules is a regular expression")


def _check_pattern(owner: str, name: str, pattern: Any) -> None:
    if not isinstance(pattern, dict):
        raise ValueError(f"{owner}.{name} must be a mapping of module names to integers, got {pattern!r}")
    for key, value in pattern.items():
        check_positive_int(owner, f"{name}[{key!r}]", value)


@register_config
@dataclass
class FourierFTConfig(TargetedConfig):
    """FourierFT: each layer learns ``n_frequency`` spectral coefficients at positions of the
    (out, in) spectrum drawn from ``random_loc_seed``; ``ΔW = Re(IDFT2(spectrum)) · scaling``.

    ``init_weights``: False (PEFT's default) draws the coefficients from N(0, 1), True starts at
    zero (a no-op). ``n_frequency_pattern`` sets ``n_frequency`` per module name.
    """

    peft_type: ClassVar[str] = "FOURIERFT"
    default_targets: ClassVar[Optional[dict[str, list[str]]]] = GPT2_MLP_TARGETS
    n_frequency: int = 1000
    scaling: float = 150.0
    random_loc_seed: Optional[int] = 777
    fan_in_fan_out: bool = False
    bias: str = "none"
    layers_to_transform: Optional[Union[list[int], int]] = None
    layers_pattern: Optional[Union[list[str], str]] = None
    n_frequency_pattern: dict[str, int] = field(default_factory=dict)
    init_weights: bool = False

    def validate(self) -> None:
        check_positive_int("FourierFTConfig", "n_frequency", self.n_frequency)
        if self.random_loc_seed is None:
            raise ValueError("FourierFTConfig.random_loc_seed must be an integer (the spectrum positions are drawn from it)")
        _check_bias("FourierFTConfig", self.bias, "fourier_only")
        _check_pattern("FourierFTConfig", "n_frequency_pattern", self.n_frequency_pattern)
        _check_layers("FourierFTConfig", self)


@register_config
@dataclass
class ShiraConfig(TargetedConfig):
    """SHiRA: each layer trains ``r·(in + out)`` entries of its weight (LoRA's parameter count,
    at any rank); which entries is a mask drawn from ``random_seed`` (``mask_type="random"``)
    and stored in the file as ``shira_indices``. ``init_weights``: start at zero (a no-op)."""

    peft_type: ClassVar[str] = "SHIRA"
    # PEFT's SHiRA files carry neither field
    omitted_fields: ClassVar[tuple[str, ...]] = ("exclude_modules",)
    r: int = 32
    mask_type: str = "random"
    random_seed: Optional[int] = None
    fan_in_fan_out: bool = False
    init_weights: bool = True

    def validate(self) -> None:
        check_positive_int("ShiraConfig", "r", self.r)
        if not isinstance(self.mask_type, str):
            raise ValueError(f"ShiraConfig.mask_type must be a string, got {self.mask_type!r}")
        if self.exclude_modules:
            raise ValueError("ShiraConfig.exclude_modules: PEFT's SHiRA files have no such field; name the targets instead")


MISS_INITS = (True, False, "bat", "mini")


@register_config
@dataclass
class MissConfig(TargetedConfig):
    """MiSS (matrix shard sharing, Bone's successor): the input is cut into shards of ``r``
    features and one learned (r, out) block is shared by all shards, ``ΔW[o, j] = B[j mod r, o]``.

    ``init_weights``: True (the balanced MiSS, starting at zero), False (random block),
    ``"bat"`` (Bone's block-affine form: block (i, j) of W becomes ``W_ij B_i + W_ij + B_i``,
    in and out divisible by r) or ``"mini"`` (an (r, ``mini_r``) block repeated along the output).
    """

    peft_type: ClassVar[str] = "MISS"
    r: int = 64
    miss_dropout: float = 0.0
    mini_r: int = 1
    init_weights: Union[bool, str] = True
    layers_to_transform: Optional[Union[list[int], int]] = None
    layers_pattern: Optional[str] = None
    bias: str = "none"

    def validate(self) -> None:
        check_positive_int("MissConfig", "r", self.r)
        check_positive_int("MissConfig", "mini_r", self.mini_r)
        check_probability("MissConfig", "miss_dropout", self.miss_dropout)
        if not any(self.init_weights is v or (isinstance(v, str) and self.init_weights == v) for v in MISS_INITS):
            raise ValueError(f"MissConfig.init_weights must be true, false, 'bat' or 'mini', got {self.init_weights!r}")
        _check_bias("MissConfig", self.bias, "MiSS_only")
        _check_layers("MissConfig", self)


C3A_INITS = (True, False, "gaussian", "kaiming_uniform", "xavier_uniform")


@register_config
@dataclass
class C3AConfig(TargetedConfig):
    """C3A: the update is block-circulant, ``ΔW`` made of (block_size × block_size) circulant
    blocks, each defined by one learned vector and applied by FFT; scaled by ``1/in``.

    ``block_size`` must divide the input and output sizes of every targeted layer
    (``block_size_pattern`` sets it per module name). ``init_weights``: True starts at zero (a
    no-op); "xavier_uniform" (the default, also False), "kaiming_uniform" or "gaussian" draw.
    """

    peft_type: ClassVar[str] = "C3A"
    default_targets: ClassVar[Optional[dict[str, list[str]]]] = GPT2_MLP_TARGETS
    omitted_fields: ClassVar[tuple[str, ...]] = ("exclude_modules",)  # PEFT's C3A has no such field
    block_size: int = 256
    bias: str = "none"
    layers_to_transform: Optional[Union[list[int], int]] = None
    layers_pattern: Optional[Union[list[str], str]] = None
    block_size_pattern: dict[str, int] = field(default_factory=dict)
    init_weights: Optional[Union[bool, str]] = "xavier_uniform"

    def validate(self) -> None:
        check_positive_int("C3AConfig", "block_size", self.block_size)
        if not any(self.init_weights is v or (isinstance(v, str) and self.init_weights == v) for v in C3A_INITS):
            raise ValueError("C3AConfig.init_weights must be true, false, 'gaussian', 'kaiming_uniform' or "
                             f"'xavier_uniform', got {self.init_weights!r}")
        if self.exclude_modules:
            raise ValueError("C3AConfig.exclude_modules: PEFT's C3A files have no such field; name the targets instead")
        _check_bias("C3AConfig", self.bias, "c3a_only")
        _check_pattern("C3AConfig", "block_size_pattern", self.block_size_pattern)
        _check_layers("C3AConfig", self)
