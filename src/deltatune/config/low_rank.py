"""Configs of the low-rank methods added beside LoRA: DeLoRA, RandLoRA and VB-LoRA.
PEFT's class names, field names, defaults and ``peft_type`` strings."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional, Union  # noqa: F401  (the fields' hints are resolved here)

from .base import TargetedConfig, check_positive_int, check_probability, register_config


def _check_layers(owner: str, config: TargetedConfig) -> None:
    if getattr(config, "layers_pattern", None) and not getattr(config, "layers_to_transform", None):
        raise ValueError(f"{owner}.layers_pattern is only meaningful together with layers_to_transform")
    if getattr(config, "layers_to_transform", None) is not None and isinstance(config.target_modules, str) \
            and config.target_modules != "all-linear":
        raise ValueError(f"{owner}.layers_to_transform cannot be combined with a regular expression in target_modules")


def _check_bias(owner: str, bias: str, only: str) -> None:
    if bias not in ("none", "all", only):
        raise ValueError(f"{owner}.bias must be 'none', 'all' or {only!r}, got {bias!r}")


@register_config
@dataclass
class DeloraConfig(TargetedConfig):
    """DeLoRA (decoupled low-rank adaptation): ``ΔW = (λ / r) · B · diag(1 / (‖A_i‖·‖B^i‖)) · A · diag(‖W‖_col)``.

    Each rank-one term ``B^i A_i`` is normalised to unit size, so the update's size is set by
    the learned strength ``λ`` alone (``delora_lambda`` is its start value, per layer through
    ``lambda_pattern``), decoupled from the direction in ``A`` and ``B``. ``‖W‖_col`` are the
    base weight's column norms, fixed when the adapter is added and saved with it.
    ``module_dropout``: dropout on the adapter's input, as PEFT applies it.
    ``init_weights``: ``B`` starts at zero (no change); false draws ``B`` at random too.
    """

    peft_type: ClassVar[str] = "DELORA"
    r: int = 8
    delora_lambda: float = 15
    module_dropout: float = 0.0
    bias: str = "none"
    init_weights: bool = True
    layers_to_transform: Optional[Union[list[int], int]] = None
    layers_pattern: Optional[Union[list[str], str]] = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    lambda_pattern: dict[str, float] = field(default_factory=dict)

    def validate(self) -> None:
        check_positive_int("DeloraConfig", "r", self.r)
        check_probability("DeloraConfig", "module_dropout", self.module_dropout)
        _check_bias("DeloraConfig", self.bias, "delora_only")
        for key, value in self.rank_pattern.items():
            check_positive_int("DeloraConfig", f"rank_pattern[{key!r}]", value)
        _check_layers("DeloraConfig", self)


@register_config
@dataclass
class RandLoraConfig(TargetedConfig):
    """RandLoRA: full-rank updates from frozen random low-rank bases shared by all layers.

    One random ``A`` (r, 1, min dim) and ``n = ⌈min dim / r⌉`` random bases ``B`` (max dim, n, r)
    are drawn from ``projection_prng_key`` (sized for the largest targeted layer); each layer
    learns ``randlora_lambda`` (r, n) and ``randlora_gamma`` (n, its smaller side), which scale
    the bases, and the update sums all ``n`` rank-r products times ``randlora_alpha / r``.
    ``sparse``/``very_sparse``: ternary bases (−1, 0, 1) in place of uniform ones.
    ``save_projection``: write the bases into the file (otherwise they are rebuilt from the key).
    ``init_weights``: ``λ`` starts at zero (no change); false draws it at random.
    """

    peft_type: ClassVar[str] = "RANDLORA"
    omitted_fields: ClassVar[tuple[str, ...]] = ("exclude_modules",)  # PEFT's RandLoRA has no such field
    r: int = 32
    projection_prng_key: int = 0
    save_projection: bool = True
    sparse: bool = False
    very_sparse: bool = False
    randlora_dropout: float = 0.0
    fan_in_fan_out: bool = False
    randlora_alpha: float = 640
    bias: str = "none"
    init_weights: bool = True
    layers_to_transform: Optional[Union[list[int], int]] = None
    layers_pattern: Optional[Union[list[str], str]] = None

    def validate(self) -> None:
        check_positive_int("RandLoraConfig", "r", self.r)
        check_probability("RandLoraConfig", "randlora_dropout", self.randlora_dropout)
        _check_bias("RandLoraConfig", self.bias, "randlora_only")
        _check_layers("RandLoraConfig", self)


# VB-LoRA's usual targets per model_type where they differ from LoRA's (PEFT's table).
VBLORA_TARGETS: dict[str, list[str]] = {
    "t5": ["q", "k", "v", "o", "wi", "wo"],
    "mt5": ["q", "k", "v", "o", "wi_0", "wi_1", "wo"],
    "bart": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    "opt": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    "gpt2": ["c_attn"],
    "llama": ["q_proj", "v_proj"],
    "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
}


@register_config
@dataclass
class VBLoRAConfig(TargetedConfig):
    """VB-LoRA: LoRA factors assembled from one bank of ``num_vectors`` vectors of length
    ``vector_length``, shared by all layers (and trained with them).

    Each row of ``A`` (r, in) and column of ``B`` (out, r) is cut into sub-vectors of
    ``vector_length``; each sub-vector is a softmax-weighted mix of the ``topk`` bank vectors
    with the highest learned logits. Every targeted layer's input and output sizes must be
    multiples of ``vector_length``. The bank starts uniform in ±``init_vector_bank_bound``, the
    logits normal with std ``init_logits_std`` (so a new adapter changes outputs slightly).
    ``save_only_topk_weights``: files keep only each sub-vector's top-k indices and weights
    (smaller; such an adapter can be used and merged, not trained further).
    """

    peft_type: ClassVar[str] = "VBLORA"
    default_targets: ClassVar[Optional[dict[str, list[str]]]] = VBLORA_TARGETS
    r: int = 4
    num_vectors: int = 256
    vector_length: int = 256
    topk: int = 2
    save_only_topk_weights: bool = False
    vblora_dropout: float = 0.0
    fan_in_fan_out: bool = False
    bias: str = "none"
    init_vector_bank_bound: float = 0.02
    init_logits_std: float = 0.1
    layers_to_transform: Optional[Union[list[int], int]] = None
    layers_pattern: Optional[Union[list[str], str]] = None

    def validate(self) -> None:
        for name in ("r", "num_vectors", "vector_length", "topk"):
            check_positive_int("VBLoRAConfig", name, getattr(self, name))
        if self.topk > self.num_vectors:
            raise ValueError(f"VBLoRAConfig.topk ({self.topk}) cannot exceed num_vectors ({self.num_vectors})")
        check_probability("VBLoRAConfig", "vblora_dropout", self.vblora_dropout)
        if self.init_vector_bank_bound < 0 or self.init_logits_std < 0:
            raise ValueError("VBLoRAConfig.init_vector_bank_bound and init_logits_std must not be negative")
        _check_bias("VBLoRAConfig", self.bias, "vblora_only")
        _check_layers("VBLoRAConfig", self)


@register_config
@dataclass
class HiraConfig(TargetedConfig):
    """HiRA (high-rank adaptation through Hadamard fusion): ``ΔW = W0 ⊙ (B A)``.

    ``A`` (r, in) and ``B`` (out, r) are LoRA-shaped, but their product multiplies the frozen
    weight ``W0`` entry by entry, so the update can have full rank. ``rank_pattern`` gives other
    ranks per layer. ``init_weights``: True draws ``A`` as LoRA does and zeroes ``B`` (no change),
    ``"gaussian"`` draws ``A`` normal with std ``1/r``, False (or None) leaves both random.
    ``hira_dropout``: dropout on the adapter's input. Linear layers (and GPT-2's Conv1D) only;
    ``fan_in_fan_out`` is kept for the file, the layer's type decides the layout (as in PEFT).
    """

    peft_type: ClassVar[str] = "HIRA"
    r: int = 32
    hira_dropout: float = 0.0
    fan_in_fan_out: bool = False
    init_weights: Optional[Union[bool, str]] = True
    layers_to_transform: Optional[Union[list[int], int]] = None
    layers_pattern: Optional[Union[list[str], str]] = None
    rank_pattern: Optional[dict[str, int]] = field(default_factory=dict)

    def validate(self) -> None:
        check_positive_int("HiraConfig", "r", self.r)
        check_probability("HiraConfig", "hira_dropout", self.hira_dropout)
        if not (self.init_weights is None or isinstance(self.init_weights, bool)
                or str(self.init_weights).lower() == "gaussian"):
            raise ValueError(f"HiraConfig.init_weights must be true, false or 'gaussian', got {self.init_weights!r}")
        for key, value in (self.rank_pattern or {}).items():
            check_positive_int("HiraConfig", f"rank_pattern[{key!r}]", value)
        _check_layers("HiraConfig", self)


@register_config
@dataclass
class PveraConfig(TargetedConfig):
    """PVeRA (probabilistic VeRA): VeRA's frozen shared projections, with ``A`` twice as tall.

    ``pvera_A`` (2r, max in) and ``pvera_B`` (max out, r) are drawn from ``projection_prng_key``
    and shared by all layers; each layer learns ``λ_d`` (2r) and ``λ_b`` (out). ``λ_d · A x`` is
    split into a mean and a log-variance half; training samples ``mean + ε·exp(logvar/2)``
    (``ε`` from a generator seeded with ``generator_seed`` in each layer, or the global one when
    it is None), inference uses the mean unless ``sample_at_inference``. Merging folds the mean
    path in (refused with ``sample_at_inference``, whose outputs are random).
    """

    peft_type: ClassVar[str] = "PVERA"
    omitted_fields: ClassVar[tuple[str, ...]] = ("exclude_modules",)  # PEFT's PVeRA has no such field
    r: int = 256
    projection_prng_key: int = 0
    save_projection: bool = True
    pvera_dropout: float = 0.0
    d_initial: float = 0.1
    fan_in_fan_out: bool = False
    bias: str = "none"
    init_weights: bool = True
    layers_to_transform: Optional[Union[list[int], int]] = None
    layers_pattern: Optional[Union[list[str], str]] = None
    sample_at_inference: bool = False
    generator_seed: Optional[int] = None

    def validate(self) -> None:
        check_positive_int("PveraConfig", "r", self.r)
        check_probability("PveraConfig", "pvera_dropout", self.pvera_dropout)
        _check_bias("PveraConfig", self.bias, "pvera_only")
        _check_layers("PveraConfig", self)


@register_config
@dataclass
class GraloraConfig(TargetedConfig):
    """GraLoRA (granular low-rank adaptation): LoRA cut into a ``gralora_k`` × ``gralora_k`` grid of blocks.

    The input and output are split into ``gralora_k`` equal parts; every (output part, input
    part) block of ``ΔW`` has its own rank-``r/gralora_k`` product, so the whole update can reach
    rank ``r·gralora_k`` with the parameters of a rank-``r`` LoRA. ``hybrid_r`` > 0 adds a plain
    LoRA of that rank over the whole matrix. Both parts are scaled by ``alpha / (r + hybrid_r)``.
    Every targeted layer's input and output sizes must be multiples of ``gralora_k``, and ``r``
    a multiple of ``gralora_k``. ``init_weights``: the ``B`` factors start at zero (no change).
    """

    peft_type: ClassVar[str] = "GRALORA"
    omitted_fields: ClassVar[tuple[str, ...]] = ("exclude_modules",)  # PEFT's GraLoRA has no such field
    r: int = 32
    hybrid_r: int = 0
    alpha: int = 64
    gralora_dropout: float = 0.0
    gralora_k: int = 2
    fan_in_fan_out: bool = False
    bias: str = "none"
    init_weights: bool = True
    layers_to_transform: Optional[Union[list[int], int]] = None
    layers_pattern: Optional[Union[list[str], str]] = None

    def validate(self) -> None:
        check_positive_int("GraloraConfig", "r", self.r)
        check_positive_int("GraloraConfig", "gralora_k", self.gralora_k)
        if self.r % self.gralora_k:
            raise ValueError(f"GraloraConfig.r ({self.r}) must be a multiple of gralora_k ({self.gralora_k})")
        if not isinstance(self.hybrid_r, int) or isinstance(self.hybrid_r, bool) or self.hybrid_r < 0:
            raise ValueError(f"GraloraConfig.hybrid_r must be a non-negative integer, got {self.hybrid_r!r}")
        check_probability("GraloraConfig", "gralora_dropout", self.gralora_dropout)
        _check_bias("GraloraConfig", self.bias, "gralora_only")
        _check_layers("GraloraConfig", self)


@register_config
@dataclass
class UniLoraConfig(TargetedConfig):
    """Uni-LoRA: every LoRA factor entry of every targeted layer is read from one trained vector.

    One vector ``theta_d`` of ``theta_d_length`` numbers serves the whole model. Each entry of
    each layer's ``A`` (r, in) and ``B`` (out, r) is ``theta_d[i]`` for a fixed index ``i``
    assigned from ``proj_seed`` (every index used equally often, up to one), times
    ``1/√(uses of i)``; the update is ``B @ A`` (no other scale). ``theta_d`` starts uniform in
    ±``init_theta_d_bound`` (``init_weights``; otherwise standard normal), so a new adapter
    already changes outputs slightly. ``save_indices``: write each layer's indices and scales
    into the file (otherwise they are rebuilt from ``proj_seed`` and the targeted layers).
    """

    peft_type: ClassVar[str] = "UNILORA"
    omitted_fields: ClassVar[tuple[str, ...]] = ("exclude_modules",)  # PEFT's Uni-LoRA has no such field
    r: int = 4
    proj_seed: int = 42
    theta_d_length: int = 256
    unilora_dropout: float = 0.0
    fan_in_fan_out: bool = False
    bias: str = "none"
    init_theta_d_bound: float = 0.02
    init_weights: bool = True
    save_indices: bool = False
    layers_to_transform: Optional[Union[list[int], int]] = None
    layers_pattern: Optional[Union[list[str], str]] = None

    def validate(self) -> None:
        check_positive_int("UniLoraConfig", "r", self.r)
        check_positive_int("UniLoraConfig", "theta_d_length", self.theta_d_length)
        if not 0 <= self.proj_seed < 2 ** 63:
            raise ValueError(f"UniLoraConfig.proj_seed must be a non-negative integer, got {self.proj_seed!r}")
        check_probability("UniLoraConfig", "unilora_dropout", self.unilora_dropout)
        if not self.init_theta_d_bound > 0:
            raise ValueError(f"UniLoraConfig.init_theta_d_bound must be positive, got {self.init_theta_d_bound!r}")
        _check_bias("UniLoraConfig", self.bias, "unilora_only")
        _check_layers("UniLoraConfig", self)


@register_config
@dataclass
class TinyLoraConfig(TargetedConfig):
    """TinyLoRA: a rank-``r`` truncated SVD of each frozen weight, steered by a tiny trained vector.

    Per targeted layer ``W ≈ U_r Σ_r V_rᵀ`` is frozen as ``A = √Σ_r V_rᵀ`` (r, in) and
    ``B = U_r √Σ_r`` (out, r) (the SVD of a 4-bit base is that of its dequantized weight); the
    update is ``ΔW = B R A`` with ``R = Σ_i v[i] P[i]``: ``v`` holds ``u`` trained numbers and
    ``P`` (u, r, r) is drawn from N(0, 1/r) with seed ``projection_seed`` + the layer's position
    among the targets. ``weight_tying`` (0..1) lets neighbouring layers share one ``v``: 0 gives
    each layer its own, 1 one ``v`` for the whole model. ``save_projection``: write ``P`` into
    the file (otherwise it is redrawn from the seed). ``init_weights``: True starts ``v`` at zero
    (no change), ``"uniform"`` uniform in ±``init_v_bound``, False zero as well (PEFT leaves the
    memory unset). Linear layers and GPT-2's Conv1D; the layer's type decides the layout.
    """

    peft_type: ClassVar[str] = "TINYLORA"
    omitted_fields: ClassVar[tuple[str, ...]] = ("exclude_modules",)  # PEFT's TinyLoRA has no such field
    r: int = 2
    u: int = 64
    weight_tying: float = 0.0
    projection_seed: int = 42
    save_projection: bool = True
    init_v_bound: float = 0.02
    tinylora_dropout: float = 0.0
    fan_in_fan_out: bool = False
    bias: str = "none"
    init_weights: Union[bool, str] = True
    layers_to_transform: Optional[Union[list[int], int]] = None
    layers_pattern: Optional[Union[list[str], str]] = None

    def validate(self) -> None:
        check_positive_int("TinyLoraConfig", "r", self.r)
        check_positive_int("TinyLoraConfig", "u", self.u)
        if isinstance(self.weight_tying, bool) or not isinstance(self.weight_tying, (int, float)) \
                or not 0.0 <= self.weight_tying <= 1.0:
            raise ValueError(f"TinyLoraConfig.weight_tying must be a number from 0.0 to 1.0, got {self.weight_tying!r}")
        if isinstance(self.projection_seed, bool) or not isinstance(self.projection_seed, int) \
                or not 0 <= self.projection_seed < 2 ** 63:
            raise ValueError(f"TinyLoraConfig.projection_seed must be a non-negative integer, "
                             f"got {self.projection_seed!r}")
        if not isinstance(self.init_v_bound, (int, float)) or not self.init_v_bound > 0:
            raise ValueError(f"TinyLoraConfig.init_v_bound must be positive, got {self.init_v_bound!r}")
        if not (isinstance(self.init_weights, bool) or self.init_weights == "uniform"):
            raise ValueError(f"TinyLoraConfig.init_weights must be true, false or 'uniform', got {self.init_weights!r}")
        check_probability("TinyLoraConfig", "tinylora_dropout", self.tinylora_dropout)
        _check_bias("TinyLoraConfig", self.bias, "tinylora_only")
        _check_layers("TinyLoraConfig", self)


@register_config
@dataclass
class LilyConfig(TargetedConfig):
    """Lily (low-rank interconnected adaptation across layers): ``ΔW x = s · Σ_e p_e B_e (A x)``.

    Per target suffix (and weight shape), every ``stride_A`` adjacent adapted layers share one
    ``A`` (r × in), and all of them share ``num_B`` output factors ``B_e`` (r × out). Each layer
    has a router (num_B × r) whose softmax over ``A x`` is averaged over every token of the
    batch into one mixing weight per ``B_e``, so a row's output depends on the other rows: no
    merge and no per-row routing. ``scaling`` multiplies the update directly (no ``alpha/r``).
    ``init_weights``: the ``B`` factors start at zero (no change); false draws them at random.
    nn.Linear layers only (as in PEFT; GPT-2's Conv1D is refused).
    """

    peft_type: ClassVar[str] = "LILY"
    mergeable: ClassVar[bool] = False  # the batch-averaged router makes the update batch-dependent
    r: int = 32
    stride_A: int = 1
    num_B: int = 2
    scaling: float = 1.0
    layers_to_transform: Optional[Union[list[int], int]] = None
    layers_pattern: Optional[Union[list[str], str]] = None
    init_weights: bool = True

    def validate(self) -> None:
        check_positive_int("LilyConfig", "r", self.r)
        check_positive_int("LilyConfig", "stride_A", self.stride_A)
        if not isinstance(self.num_B, int) or isinstance(self.num_B, bool) or self.num_B < 2:
            raise ValueError(f"LilyConfig.num_B must be an integer of at least 2 (the router mixes the B "
                             f"factors, as PEFT requires), got {self.num_B!r}")
        if isinstance(self.scaling, bool) or not isinstance(self.scaling, (int, float)) \
                or self.scaling != self.scaling or abs(self.scaling) == float("inf"):
            raise ValueError(f"LilyConfig.scaling must be a finite number, got {self.scaling!r}")
        if not isinstance(self.init_weights, bool):
            raise ValueError(f"LilyConfig.init_weights must be true or false, got {self.init_weights!r}")
        _check_layers("LilyConfig", self)
