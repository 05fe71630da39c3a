"""What every adapter config shares, the registry by ``peft_type``, and reading configs from files.

A config read from an ``adapter_config.json`` keeps every field it was given, including
ones deltatune does not know, so writing it back loses nothing.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional, Union

PEFT_VERSION_WRITTEN = "0.21.2"  # the PEFT release whose file layout these configs follow

# Written by PEFT for every method; bookkeeping only.
_COMMON_PASSIVE_FIELDS: dict[str, Any] = {"auto_mapping": None, "revision": None}


@dataclass
class AdapterConfig:
    """Fields shared by every method's config.

    Class attributes a method sets:
    ``peft_type`` (the string in files), ``passive_fields`` (fields PEFT writes that do not
    change what the adapter computes, with PEFT's defaults; written so files carry PEFT's
    exact field set) and ``unsupported_fields`` (fields that would change the result and
    that deltatune does not implement: a non-default value in a file is refused).
    ``mergeable`` says whether the update can be folded into the base weights.
    """

    peft_type: ClassVar[str] = ""
    passive_fields: ClassVar[dict[str, Any]] = {}
    unsupported_fields: ClassVar[dict[str, Any]] = {}
    mergeable: ClassVar[bool] = True
    omitted_fields: ClassVar[tuple[str, ...]] = ()  # shared fields this method's files do not carry
    task_type: Optional[str] = None
    base_model_name_or_path: Optional[str] = None
    inference_mode: bool = False
    # Fields read from a file that this class does not define; written back unchanged.
    extra_fields: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        """The ``adapter_config.json`` content, PEFT's keys and meanings."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            if f.name == "extra_fields" or f.name in self.omitted_fields:
                continue
            value = getattr(self, f.name)
            out[f.name] = sorted(value) if isinstance(value, set) else value
        out.update(_COMMON_PASSIVE_FIELDS)
        out.update(self.passive_fields)
        out.update(self.unsupported_fields)
        out.update(self.extra_fields)
        out["peft_type"] = self.peft_type
        out["peft_version"] = self.extra_fields.get("peft_version", PEFT_VERSION_WRITTEN)
        return dict(sorted(out.items()))

    def validate(self) -> None:
        """Raise ValueError naming the field when a value is out of range."""

    def __post_init__(self) -> None:
        self.validate()


@dataclass
class TargetedConfig(AdapterConfig):
    """Methods that wrap chosen modules of the base model.

    ``target_modules``: a list of module names matched as the full name or a dotted suffix,
    a regular expression matched against the whole module name, or ``"all-linear"`` (every
    linear layer but the output head). ``None`` picks the method's usual modules for known
    architectures. ``modules_to_save``: modules trained in full beside the adapter.
    """

    # Defaults per ``model_type`` when target_modules is None; None: the LoRA table.
    default_targets: ClassVar[Optional[dict[str, list[str]]]] = None
    target_modules: Optional[Union[list[str], str]] = None
    exclude_modules: Optional[Union[list[str], str]] = None
    modules_to_save: Optional[list[str]] = None

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = sorted(self.target_modules)
        if isinstance(getattr(self, "layers_to_transform", None), int):
            self.layers_to_transform = [self.layers_to_transform]
        super().__post_init__()


def check_positive_int(owner: str, name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{owner}.{name} must be a positive integer, got {value!r}")


def check_probability(owner: str, name: str, value: Any) -> None:
    if not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"{owner}.{name} must be in [0, 1), got {value!r}")


CONFIG_REGISTRY: dict[str, type[AdapterConfig]] = {}


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
    passive = {**_COMMON_PASSIVE_FIELDS, **cls.passive_fields}
    kwargs: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    unknown: list[str] = []
    for key, value in data.items():
        if key in known:
            kwargs[key] = value
            continue
        if key in cls.unsupported_fields and value != cls.unsupported_fields[key]:
            raise NotImplementedError(f"{source}: field {key!r}={value!r} is not supported by deltatune")
        if key not in passive and key not in cls.unsupported_fields and key != "peft_version":
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
