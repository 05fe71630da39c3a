"""LoRA's config (also rsLoRA, DoRA, PiSSA/OLoRA initialisation), PEFT's field names."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional, Union

from .base import TargetedConfig, register_config
from .lora_experts import check_target_parameters
from .lora_init import check_init_sub_configs
from .lora_variants import check_variant_fields
from .selective import check_lora_token_indices

# Fields PEFT writes for LoRA that deltatune does not act on, with PEFT's defaults. They are
# written so our files carry PEFT's exact field set. A loaded file whose value differs is fine
# when the field only matters at initialisation or for bookkeeping ...
_PEFT_PASSIVE_LORA_FIELDS: dict[str, Any] = {
    "megatron_config": None,
    "megatron_core": "megatron.core",
    "ensure_weight_tying": False,
}
# ... but these change what the adapter computes, so a non-default value is refused rather
# than silently giving different outputs.
_PEFT_UNSUPPORTED_LORA_FIELDS: dict[str, Any] = {}

_INIT_CHOICES = (True, False, "gaussian", "pissa", "olora", "orthogonal", "mica", "loftq", "eva", "corda", "lora_ga")


@register_config
@dataclass
class LoraConfig(TargetedConfig):
    """LoRA, rsLoRA and DoRA.

    ``target_modules``: a list of module names matched as the full name or a dotted suffix,
    a regular expression matched against the whole module name, or ``"all-linear"`` (every
    linear layer but the output head). ``None`` picks the usual attention projections for
    known architectures. ``target_parameters``: parameters adapted directly, PEFT's names and
    matching (the fused 3-D expert weights of transformers 5 mixture-of-experts models, e.g.
    ``["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]``; adapters/low_rank/moe_experts.py).

    Variants, PEFT's fields (one per adapter; config/lora_variants.py checks them, each has its
    module under adapters/low_rank/): ``layer_replication`` (a deeper model from ranges of shared
    base layers), ``alora_invocation_tokens`` (aLoRA: active from the invocation tokens on; needs
    task_type "CAUSAL_LM"), ``use_qalora`` + ``qalora_group_size`` (QA-LoRA: A reads group-pooled
    input), ``use_bdlora`` (BD-LoRA: block-diagonal A or B), ``kasa_config`` (KaSA),
    ``velora_config`` (VeLoRA), ``monteclora_config`` (MonteCLoRA), ``arrow_config`` (Arrow: a
    router over task adapters already on the model). Sub-configs are PEFT's dataclasses as
    dicts, as its files hold them.
    """

    peft_type: ClassVar[str] = "LORA"
    passive_fields: ClassVar[dict[str, Any]] = _PEFT_PASSIVE_LORA_FIELDS
    unsupported_fields: ClassVar[dict[str, Any]] = _PEFT_UNSUPPORTED_LORA_FIELDS
    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    layers_to_transform: Optional[Union[list[int], int]] = None
    layers_pattern: Optional[Union[list[str], str]] = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    bias: str = "none"
    lora_bias: bool = False
    fan_in_fan_out: bool = False
    init_lora_weights: Union[bool, str] = True
    use_rslora: bool = False
    use_dora: bool = False
    # init-time sub-configs of LoftQ, EVA, CorDA and LoRA-GA (config/lora_init.py), PEFT's dicts
    loftq_config: dict[str, Any] = field(default_factory=dict)
    eva_config: Optional[dict[str, Any]] = None
    corda_config: Optional[dict[str, Any]] = None
    lora_ga_config: Optional[dict[str, Any]] = None
    # LoRA variants (config/lora_variants.py checks them; adapters/low_rank/ implements them)
    layer_replication: Optional[list[list[int]]] = None
    alora_invocation_tokens: Optional[list[int]] = None
    use_qalora: bool = False
    qalora_group_size: int = 16
    use_bdlora: Optional[dict[str, Any]] = None
    kasa_config: Optional[dict[str, Any]] = None
    velora_config: Optional[dict[str, Any]] = None
    monteclora_config: Optional[dict[str, Any]] = None
    arrow_config: Optional[dict[str, Any]] = None
    # rows of the input embedding (a list) or of named modules (a dict) trained beside LoRA
    # (adapters/selective/trainable_tokens.py)
    trainable_token_indices: Optional[Union[list[int], dict[str, list[int]]]] = None
    # parameters adapted directly, PEFT's names (fused expert weights such as
    # "mlp.experts.gate_up_proj"; config/lora_experts.py checks, adapters/low_rank/moe_experts.py adapts)
    target_parameters: Optional[list[str]] = None

    def validate(self) -> None:
        if not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"LoraConfig.r must be a positive integer, got {self.r!r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"LoraConfig.lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if self.bias not in ("none", "all", "lora_only"):
            raise ValueError(f"LoraConfig.bias must be 'none', 'all' or 'lora_only', got {self.bias!r}")
        if isinstance(self.init_lora_weights, str) and self.init_lora_weights.lower() in ("true", "false"):
            self.init_lora_weights = self.init_lora_weights.lower() == "true"  # written as text (YAML, flags)
        init = self.init_lora_weights
        if init not in _INIT_CHOICES and not (isinstance(init, str) and init.startswith("pissa_niter_")):
            raise ValueError(
                f"LoraConfig.init_lora_weights={init!r} is not supported; "
                "use True, False, 'gaussian', 'pissa', 'pissa_niter_<n>', 'olora', 'orthogonal', 'mica', "
                "'loftq', 'eva', 'corda' or 'lora_ga'"
            )
        check_init_sub_configs(self, type(self).__name__)
        check_variant_fields(self)
        check_target_parameters(self)
        for key, value in self.rank_pattern.items():
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"LoraConfig.rank_pattern[{key!r}] must be a positive integer, got {value!r}")
        if self.layers_pattern and not self.layers_to_transform:
            raise ValueError("LoraConfig.layers_pattern is only meaningful together with layers_to_transform")
        if self.use_dora and self.lora_bias:
            # PEFT refuses this combination, so such an adapter could not be shared as a PEFT file.
            raise ValueError("LoraConfig: lora_bias=True cannot be combined with use_dora=True (PEFT refuses it "
                             "too); set lora_bias=False to train DoRA, or use_dora=False to train a LoRA bias")

    def __post_init__(self) -> None:
        super().__post_init__()
        check_variant_fields(self)  # again for subclasses whose validate() does not call this one
        check_target_parameters(self)  # likewise (AdaLoRA): only plain LoRA adapts parameters
        check_lora_token_indices(self)  # here, so that subclasses without the rows refuse them too

@register_config
@dataclass
class DyLoraConfig(LoraConfig):
    """DyLoRA (nested ranks; QDyLoRA on a 4-bit base): LoRA whose every training step draws a
    rank b uniformly from ``r_min``..``r`` and uses only the first b rows of A and columns of B,
    scaled by alpha / b, so the adapter cut to any rank b up to r is a trained LoRA adapter of
    rank b. PEFT has no DyLoRA: its files are deltatune's own (PEFT's LoRA layout under
    ``peft_type`` "DYLORA"); ``save_adapter(..., rank=b)`` writes a PEFT LoRA adapter of rank b.

    ``rank_seed``: seeds the ranks drawn (step s of any run with the same seed draws the same
    rank, so a resumed run continues exactly).
    """

    peft_type: ClassVar[str] = "DYLORA"
    r_min: int = 1
    rank_seed: int = 0

    def validate(self) -> None:
        super().validate()
        if not isinstance(self.r_min, int) or isinstance(self.r_min, bool) or not 1 <= self.r_min <= self.r:
            raise ValueError(f"DyLoraConfig.r_min must be an integer from 1 to r={self.r}, got {self.r_min!r}")
        if self.use_dora:
            raise ValueError("DyLoraConfig.use_dora: DoRA's magnitudes are fitted to one rank, so DyLoRA "
                             "cannot cut them; train DoRA with the dora method")
        if self.init_lora_weights not in (True, "gaussian"):
            # PiSSA/OLoRA move the base's principal part into A and B: a cut would drop it
            raise ValueError(f"DyLoraConfig.init_lora_weights={self.init_lora_weights!r}: DyLoRA starts from "
                             "a zero update (True or 'gaussian'), so every rank starts at the base model")
