"""Configs of the structured weight-delta methods: FourierFT (spectral), SHiRA and Super-Tuning (sparse), MiSS
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
        _check_bias("C3AConfig", self.bias, "c3a_only")
        _check_pattern("C3AConfig", "block_size_pattern", self.block_size_pattern)
        _check_layers("C3AConfig", self)


@register_config
@dataclass
class SupertuningConfig(TargetedConfig):
    """Super-Tuning: the base weight stays frozen and each layer trains a sparse support of single
    entries, ``int(numel · (1 - sparsity))`` of them, picked by weight magnitude (the largest with
    ``select_top``, else the smallest). With ``r`` set (the "Supra" hybrid) a LoRA pair ``A``
    (r, in), ``B`` (out, r) scaled by ``lora_alpha / r`` (``lora_alpha`` defaults to ``2·r``) is
    added, with ``lora_dropout`` on its input only.

    ``init_weights``: values and ``B`` start at zero (no change); false draws them at random.
    ``save_precomputed_indices``: the file stores each layer's support (``supertuning_indices``);
    when false it is picked again from the base weight on load, so the base must be the very
    weights the adapter was trained on (a different base, even by rounding, can pick other entries).
    """

    peft_type: ClassVar[str] = "SUPERTUNING"
    # PEFT's Super-Tuning files carry no exclude_modules field
    omitted_fields: ClassVar[tuple[str, ...]] = ("exclude_modules",)
    sparsity: float = 0.99
    select_top: bool = True
    r: Optional[int] = None
    lora_alpha: Optional[float] = None
    lora_dropout: float = 0.0
    init_weights: bool = True
    save_precomputed_indices: bool = True

    def __post_init__(self) -> None:
        # written to the file as PEFT writes it: an explicit 2·r once r is set
        if self.lora_alpha is None and isinstance(self.r, int) and not isinstance(self.r, bool) and self.r > 0:
            self.lora_alpha = 2 * self.r
        super().__post_init__()

    def validate(self) -> None:
        owner = "SupertuningConfig"
        if isinstance(self.sparsity, bool):
            raise ValueError(f"{owner}.sparsity must be in [0, 1), got {self.sparsity!r}")
        check_probability(owner, "sparsity", self.sparsity)
        for name in ("select_top", "init_weights", "save_precomputed_indices"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{owner}.{name} must be true or false, got {getattr(self, name)!r}")
        if self.r is not None:
            check_positive_int(owner, "r", self.r)
            if isinstance(self.lora_alpha, bool) or not isinstance(self.lora_alpha, (int, float)):
                raise ValueError(f"{owner}.lora_alpha must be a number, got {self.lora_alpha!r}")
        elif self.lora_alpha is not None:
            raise ValueError(f"{owner}.lora_alpha is set but r is None; the LoRA part (Supra) needs an explicit r")
        check_probability(owner, "lora_dropout", self.lora_dropout)


GLORA_AB_KINDS = ("lora", "vector", "constant", "none")
GLORA_C_KINDS = ("lora", "vector", "none")
GLORA_DE_KINDS = ("vector", "constant", "none")


@register_config
@dataclass
class GloraConfig(TargetedConfig):
    """GLoRA (generalized LoRA): ``W' = W0 + W0 ⊙ A + B`` and ``b' = b0 + b0 ⊙ D + E + W0 C``.

    Each term has a form: ``config_A_B`` for A and B (``"lora"``: a rank-``r`` product (out, r)
    @ (r, in); ``"vector"``: one value per output row; ``"constant"``: one number; ``"none"``:
    zero), ``config_C`` for C (``"lora"``: (in, r) @ (r, 1); ``"vector"``: (in, 1); ``"none"``)
    and ``config_D_E`` for D and E (``"vector"``: one per output; ``"constant"``; ``"none"``).
    Layers without a bias get no C, D or E. ``init_weights``: True starts as a no-op (the
    left factors and all vectors and constants zero), False draws them. Plain ``nn.Linear``
    bases only (and deltatune's 4-bit linears); GPT-2's Conv1D is refused, as PEFT refuses it.
    """

    peft_type: ClassVar[str] = "GLORA"
    omitted_fields: ClassVar[tuple[str, ...]] = ("exclude_modules",)  # PEFT's GLoRA has no such field
    r: int = 8
    bias: str = "none"
    config_A_B: str = "lora"
    config_C: str = "lora"
    config_D_E: str = "constant"
    init_weights: bool = True

    def validate(self) -> None:
        check_positive_int("GloraConfig", "r", self.r)
        for name, kinds in (("config_A_B", GLORA_AB_KINDS), ("config_C", GLORA_C_KINDS),
                            ("config_D_E", GLORA_DE_KINDS)):
            if getattr(self, name) not in kinds:
                raise ValueError(f"GloraConfig.{name} must be one of {', '.join(map(repr, kinds))}, "
                                 f"got {getattr(self, name)!r}")
        if not isinstance(self.init_weights, bool):
            raise ValueError(f"GloraConfig.init_weights must be true or false, got {self.init_weights!r}")
        _check_bias("GloraConfig", self.bias, "glora_only")
