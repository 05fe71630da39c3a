"""Configs of the weight-delta methods beside LoRA: LoHa, LoKr, (IA)³, VeRA, AdaLoRA, NOLA,
bottleneck adapters and selective tuning. PEFT's field names and defaults where PEFT has the method."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional, Union

from .base import AdapterConfig, TargetedConfig, check_positive_int, check_probability, register_config
from .lora import LoraConfig


def _check_layers(owner: str, config) -> None:
    if getattr(config, "layers_pattern", None) and not getattr(config, "layers_to_transform", None):
        raise ValueError(f"{owner}.layers_pattern is only meaningful together with layers_to_transform")


@dataclass
class _LycorisConfig(TargetedConfig):
    """Fields LoHa and LoKr share (PEFT's LyCORIS family)."""

    passive_fields: ClassVar[dict[str, Any]] = {"use_effective_conv2d": False}
    r: int = 8
    alpha: float = 8
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    init_weights: Union[bool, str] = True
    layers_to_transform: Optional[Union[list[int], int]] = None
    layers_pattern: Optional[Union[list[str], str]] = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)

    def validate(self) -> None:
        owner = type(self).__name__
        check_positive_int(owner, "r", self.r)
        check_probability(owner, "rank_dropout", self.rank_dropout)
        check_probability(owner, "module_dropout", self.module_dropout)
        for key, value in self.rank_pattern.items():
            check_positive_int(owner, f"rank_pattern[{key!r}]", value)
        _check_layers(owner, self)


@register_config
@dataclass
class LoHaConfig(_LycorisConfig):
    """LoHa: the update is the Hadamard product of two rank-r products,
    ``(w1_a @ w1_b) * (w2_a @ w2_b) * alpha / r``; rank up to r² for 2r(in+out) numbers."""

    peft_type: ClassVar[str] = "LOHA"

    def validate(self) -> None:
        super().validate()
        if self.init_weights not in (True, False):
            raise ValueError(f"LoHaConfig.init_weights must be true or false, got {self.init_weights!r}")


@register_config
@dataclass
class LoKrConfig(_LycorisConfig):
    """LoKr: the update is a Kronecker product ``kron(w1, w2) * alpha / r``; the larger factor is
    itself a rank-r product when r is small against its size (``decompose_both`` for both)."""

    peft_type: ClassVar[str] = "LOKR"
    decompose_both: bool = False
    decompose_factor: int = -1
    rank_dropout_scale: bool = False

    def validate(self) -> None:
        super().validate()
        if self.init_weights not in (True, False, "lycoris"):
            raise ValueError(f"LoKrConfig.init_weights must be true, false or 'lycoris', got {self.init_weights!r}")


# (IA)³'s usual targets and which of them are feed-forward (scaled on the input side).
IA3_TARGETS = {
    "llama": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    "mistral": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    "qwen2": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    "qwen3": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    "gemma": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    "gpt2": (["c_attn", "mlp.c_proj"], ["mlp.c_proj"]),
    "t5": (["k", "v", "wo"], ["wo"]),
    "mt5": (["k", "v", "wo"], ["wo"]),
    "bart": (["k_proj", "v_proj", "fc2"], ["fc2"]),
    "opt": (["k_proj", "v_proj", "fc2"], ["fc2"]),
}


@register_config
@dataclass
class IA3Config(TargetedConfig):
    """(IA)³: learned vectors rescale the outputs of attention layers and the inputs of the
    feed-forward layers named in ``feedforward_modules``; starts at ones (no change)."""

    peft_type: ClassVar[str] = "IA3"
    default_targets: ClassVar[Optional[dict[str, list[str]]]] = {k: v[0] for k, v in IA3_TARGETS.items()}
    feedforward_modules: Optional[Union[list[str], str]] = None
    fan_in_fan_out: bool = False
    init_ia3_weights: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.feedforward_modules, (set, tuple)):
            self.feedforward_modules = sorted(self.feedforward_modules)
        super().__post_init__()


@register_config
@dataclass
class VeraConfig(TargetedConfig):
    """VeRA: one pair of frozen random matrices (seeded by ``projection_prng_key``) shared by all
    layers; each layer learns two vectors, ``Δ = diag(λ_b) B diag(λ_d) A``."""

    peft_type: ClassVar[str] = "VERA"
    omitted_fields: ClassVar[tuple[str, ...]] = ("exclude_modules",)  # PEFT's VeRA has no such field
    r: int = 256
    projection_prng_key: int = 0
    save_projection: bool = True
    vera_dropout: float = 0.0
    d_initial: float = 0.1
    fan_in_fan_out: bool = False
    bias: str = "none"
    init_weights: bool = True
    layers_to_transform: Optional[Union[list[int], int]] = None
    layers_pattern: Optional[Union[list[str], str]] = None

    def validate(self) -> None:
        check_positive_int("VeraConfig", "r", self.r)
        check_probability("VeraConfig", "vera_dropout", self.vera_dropout)
        if self.bias not in ("none", "all", "vera_only"):
            raise ValueError(f"VeraConfig.bias must be 'none', 'all' or 'vera_only', got {self.bias!r}")
        _check_layers("VeraConfig", self)


@register_config
@dataclass
class AdaLoraConfig(LoraConfig):
    """AdaLoRA: LoRA in SVD form ``P diag(E) Q`` whose rank budget shrinks from ``init_r`` to
    ``target_r`` per layer on average during training, keeping the most important triplets.

    Schedule: ``tinit`` warm-up steps at full rank, then the budget falls (cubically) until
    ``total_step - tfinal``, re-allocated every ``deltaT`` steps; the last ``tfinal`` steps keep
    the final ranks. ``orth_reg_weight`` weighs the orthogonality penalty on P and Q. The
    final ranks are saved in ``rank_pattern`` (a mask per layer), as PEFT saves them.
    """

    peft_type: ClassVar[str] = "ADALORA"
    rank_pattern: Optional[dict[str, Any]] = None  # type: ignore[assignment]
    target_r: int = 8
    init_r: int = 12
    tinit: int = 0
    tfinal: int = 0
    deltaT: int = 1
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    total_step: Optional[int] = None

    def validate(self) -> None:
        check_positive_int("AdaLoraConfig", "init_r", self.init_r)
        check_positive_int("AdaLoraConfig", "target_r", self.target_r)
        check_positive_int("AdaLoraConfig", "deltaT", self.deltaT)
        if self.use_dora:
            raise ValueError("AdaLoraConfig.use_dora: AdaLoRA does not support DoRA")
        if self.total_step is not None and self.total_step <= 0:
            raise ValueError(f"AdaLoraConfig.total_step must be positive, got {self.total_step!r}")
        if self.total_step is not None and self.tinit >= self.total_step - self.tfinal:
            raise ValueError(
                f"AdaLoraConfig: tinit ({self.tinit}) must be below total_step - tfinal "
                f"({self.total_step} - {self.tfinal}): no steps would be left to reallocate ranks"
            )
        for name in ("beta1", "beta2"):
            if not 0.0 < getattr(self, name) < 1.0:
                raise ValueError(f"AdaLoraConfig.{name} must be in (0, 1), got {getattr(self, name)!r}")
        if self.orth_reg_weight < 0:
            raise ValueError(f"AdaLoraConfig.orth_reg_weight must be >= 0, got {self.orth_reg_weight!r}")


@register_config
@dataclass
class NolaConfig(TargetedConfig):
    """NOLA (deltatune's own format): LoRA factors built as learned mixtures of frozen random
    bases, ``A = Σ_i a_i A_i``, ``B = Σ_j b_j B_j``; the bases come from ``basis_seed`` and are
    shared by every layer (cut to each layer's size), so only the mixing coefficients and the
    seed are stored. The update is scaled by ``alpha / r``; ``b`` starts at zero."""

    peft_type: ClassVar[str] = "NOLA"
    r: int = 8
    alpha: float = 8
    num_basis_A: int = 64
    num_basis_B: int = 64
    basis_seed: int = 0
    nola_dropout: float = 0.0
    init_weights: bool = True
    layers_to_transform: Optional[Union[list[int], int]] = None
    layers_pattern: Optional[Union[list[str], str]] = None

    def validate(self) -> None:
        for name in ("r", "num_basis_A", "num_basis_B"):
            check_positive_int("NolaConfig", name, getattr(self, name))
        check_probability("NolaConfig", "nola_dropout", self.nola_dropout)
        _check_layers("NolaConfig", self)


# Where the adapters go: attention output projections and feed-forward output projections.
BOTTLENECK_TARGETS = {
    "llama": (["o_proj"], ["down_proj"]),
    "mistral": (["o_proj"], ["down_proj"]),
    "qwen2": (["o_proj"], ["down_proj"]),
    "qwen3": (["o_proj"], ["down_proj"]),
    "gemma": (["o_proj"], ["down_proj"]),
    "gpt2": (["attn.c_proj"], ["mlp.c_proj"]),
    "t5": (["SelfAttention.o", "EncDecAttention.o"], ["wo"]),
    "mt5": (["SelfAttention.o", "EncDecAttention.o"], ["wo"]),
    "bart": (["self_attn.out_proj", "encoder_attn.out_proj"], ["fc2"]),
    "opt": (["self_attn.out_proj"], ["fc2"]),
}
ACTIVATIONS = ("relu", "gelu", "silu", "tanh")


@register_config
@dataclass
class BottleneckConfig(TargetedConfig):
    """Bottleneck adapters (deltatune's own format; PEFT has none): a small down-project,
    activation, up-project block on the output of a sublayer, ``h + up(act(down(h)))``.

    ``variant``: ``houlsby`` puts one after the attention block and one after the
    feed-forward block of every layer; ``pfeiffer`` only after the feed-forward block.
    ``target_modules`` overrides the placement. ``reduction_factor``: hidden size divided by
    the bottleneck width. ``residual``: add the sublayer output back (the usual form; with
    ``False`` the adapter's output replaces it). ``up`` starts at zero, so a new adapter
    changes nothing. The block is nonlinear, so it cannot be merged into the base weights.
    """

    peft_type: ClassVar[str] = "BOTTLENECK"
    mergeable: ClassVar[bool] = False
    variant: str = "houlsby"
    reduction_factor: int = 16
    non_linearity: str = "relu"
    residual: bool = True
    init_weights: bool = True
    layers_to_transform: Optional[Union[list[int], int]] = None
    layers_pattern: Optional[Union[list[str], str]] = None

    def validate(self) -> None:
        if self.variant not in ("houlsby", "pfeiffer"):
            raise ValueError(f"BottleneckConfig.variant must be 'houlsby' or 'pfeiffer', got {self.variant!r}")
        check_positive_int("BottleneckConfig", "reduction_factor", self.reduction_factor)
        if self.non_linearity not in ACTIVATIONS:
            raise ValueError(f"BottleneckConfig.non_linearity must be one of {ACTIVATIONS}, got {self.non_linearity!r}")
        _check_layers("BottleneckConfig", self)

    @property
    def default_targets(self) -> dict[str, list[str]]:  # type: ignore[override]
        pick = (lambda a, f: a + f) if self.variant == "houlsby" else (lambda a, f: f)
        return {k: pick(*v) for k, v in BOTTLENECK_TARGETS.items()}


@register_config
@dataclass
class SelectiveConfig(AdapterConfig):
    """Selective tuning (deltatune's own format): train chosen tensors of the base model itself.

    ``bitfit``: every bias. ``parameters``: parameter names (full names or dotted suffixes such
    as ``post_attention_layernorm.weight``) or one regular expression matched against full
    names. ``top_k_layers``: every tensor of the last k transformer layers. The choices add up.
    Each adapter keeps its own trained copies, so disabling, switching and unmerging give the
    base back exactly; merging writes the copies into the base. Files hold the trained tensors
    under their own names.
    """

    peft_type: ClassVar[str] = "SELECTIVE"
    bitfit: bool = False
    parameters: Optional[Union[list[str], str]] = None
    top_k_layers: int = 0
    layers_pattern: Optional[Union[list[str], str]] = None

    def validate(self) -> None:
        if not self.bitfit and not self.parameters and not self.top_k_layers:
            raise ValueError("SelectiveConfig: choose what to train: bitfit=True, parameters=[...] or top_k_layers=k")
        if not isinstance(self.top_k_layers, int) or self.top_k_layers < 0:
            raise ValueError(f"SelectiveConfig.top_k_layers must be a non-negative integer, got {self.top_k_layers!r}")
