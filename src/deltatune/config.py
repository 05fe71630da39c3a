"""Adapter configs: one dataclass per method, PEFT's field names, a registry by ``peft_type``.

A config read from an ``adapter_config.json`` keeps every field it was given, including
ones deltatune does not know, so writing it back loses nothing.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional, Union

# Fields PEFT writes for LoRA that deltatune does not act on, with PEFT's defaults. They are
# written so our files carry PEFT's exact field set. A loaded file whose value differs is fine
# when the field only matters at initialisation or for bookkeeping ...
_PEFT_PASSIVE_LORA_FIELDS: dict[str, Any] = {
    "auto_mapping": None,
    "corda_config": None,
    "eva_config": None,
    "loftq_config": {},
    "lora_ga_config": None,
    "megatron_config": None,
    "megatron_core": "megatron.core",
    "qalora_group_size": 16,
    "revision": None,
    "ensure_weight_tying": False,
}
# ... but these change what the adapter computes, so a non-default value is refused rather
# than silently giving different outputs.
_PEFT_UNSUPPORTED_LORA_FIELDS: dict[str, Any] = {
    "alora_invocation_tokens": None,
    "arrow_config": None,
    "kasa_config": None,
    "layer_replication": None,
    "monteclora_config": None,
    "target_parameters": None,
    "trainable_token_indices": None,
    "use_bdlora": None,
    "use_qalora": False,
    "velora_config": None,
}

PEFT_VERSION_WRITTEN = "0.21.2"  # the PEFT release whose file layout these configs follow

_INIT_CHOICES = (True, False, "gaussian", "pissa", "olora")


@dataclass
class AdapterConfig:
    """Fields shared by every method's config."""

    peft_type: ClassVar[str] = ""
    task_type: Optional[str] = None
    base_model_name_or_path: Optional[str] = None
    inference_mode: bool = False
    # Fields read from a file that this class does not define; written back unchanged.
    extra_fields: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        """The ``adapter_config.json`` content, PEFT's keys and meanings."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            if f.name == "extra_fields":
                continue
            value = getattr(self, f.name)
            out[f.name] = sorted(value) if isinstance(value, set) else value
        out.update(self._passive_fields())
        out.update(self.extra_fields)
        out["peft_type"] = self.peft_type
        out["peft_version"] = self.extra_fields.get("peft_version", PEFT_VERSION_WRITTEN)
        return dict(sorted(out.items()))

    def _passive_fields(self) -> dict[str, Any]:
        return {}

    def validate(self) -> None:
        """Raise ValueError naming the field when a value is out of range."""


@dataclass
class LoraConfig(AdapterConfig):
    """LoRA, rsLoRA and DoRA.

    ``target_modules``: a list of module names matched as the full name or a dotted suffix,
    a regular expression matched against the whole module name, or ``"all-linear"`` (every
    linear layer but the output head). ``None`` picks the usual attention projections for
    known architectures.
    """

    peft_type: ClassVar[str] = "LORA"
    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    target_modules: Optional[Union[list[str], str]] = None
    exclude_modules: Optional[Union[list[str], str]] = None
    layers_to_transform: Optional[Union[list[int], int]] = None
    layers_pattern: Optional[Union[list[str], str]] = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    bias: str = "none"
    lora_bias: bool = False
    modules_to_save: Optional[list[str]] = None
    fan_in_fan_out: bool = False
    init_lora_weights: Union[bool, str] = True
    use_rslora: bool = False
    use_dora: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = sorted(self.target_modules)
        if isinstance(self.layers_to_transform, int):
            self.layers_to_transform = [self.layers_to_transform]
        self.validate()

    def validate(self) -> None:
        if not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"LoraConfig.r must be a positive integer, got {self.r!r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"LoraConfig.lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if self.bias not in ("none", "all", "lora_only"):
            raise ValueError(f"LoraConfig.bias must be 'none', 'all' or 'lora_only', got {self.bias!r}")
        init = self.init_lora_weights
        if init not in _INIT_CHOICES and not (isinstance(init, str) and init.startswith("pissa_niter_")):
            raise ValueError(
                f"LoraConfig.init_lora_weights={init!r} is not supported; "
                "use True, False, 'gaussian', 'pissa', 'pissa_niter_<n>' or 'olora'"
            )
        for key, value in self.rank_pattern.items():
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"LoraConfig.rank_pattern[{key!r}] must be a positive integer, got {value!r}")
        if self.layers_pattern and not self.layers_to_transform:
            raise ValueError("LoraConfig.layers_pattern is only meaningful together with layers_to_transform")

    def _passive_fields(self) -> dict[str, Any]:
        return {**_PEFT_PASSIVE_LORA_FIELDS, **_PEFT_UNSUPPORTED_LORA_FIELDS}


CONFIG_REGISTRY: dict[str, type[AdapterConfig]] = {"LORA": LoraConfig}


def register_config(cls: type[AdapterConfig]) -> type[AdapterConfig]:
    """Class decorator: make ``config_from_dict`` know a method's ``peft_type``."""
    CONFIG_REGISTRY[cls.peft_type] = cls
    return cls


def config_from_dict(data: dict[str, Any], source: str = "adapter config") -> AdapterConfig:
    """Build the right config class from the content of an ``adapter_config.json``.

    Unknown fields are kept (and written back on save) with a warning; fields that would
    change what the adapter computes and that deltatune does not implement raise.
    """
    data = dict(data)
    peft_type = data.pop("peft_type", None)
    if peft_type is None:
        raise ValueError(f"{source}: field 'peft_type' is missing")
    cls = CONFIG_REGISTRY.get(str(peft_type).upper())
    if cls is None:
        raise ValueError(f"{source}: peft_type {peft_type!r} is not supported (known: {sorted(CONFIG_REGISTRY)})")
    known = {f.name for f in dataclasses.fields(cls)} - {"extra_fields"}
    passive = cls()._passive_fields() if cls is LoraConfig else {}
    kwargs: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    unknown: list[str] = []
    for key, value in data.items():
        if key in known:
            kwargs[key] = value
            continue
        if key in _PEFT_UNSUPPORTED_LORA_FIELDS and value != _PEFT_UNSUPPORTED_LORA_FIELDS[key]:
            raise NotImplementedError(f"{source}: field {key!r}={value!r} is not supported by deltatune")
        if key not in passive and key != "peft_version":
            unknown.append(key)
        extra[key] = value
    if unknown:
        warnings.warn(f"{source}: deltatune does not know the field(s) {unknown}; they are kept as they are")
    try:
        config = cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{source}: {err}") from err
    config.extra_fields = extra
    return config
