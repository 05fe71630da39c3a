"""What every adapter config shares, the registry by ``peft_type``, and reading configs from files.

A config read from an ``adapter_config.json`` keeps every field it was given, including
ones deltatune does not know, so writing it back loses nothing.
"""

from __future__ import annotations

import dataclasses
import math
import re
import sys
import types
import typing
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
        _check_patterns(self)
        _check_omitted_targeting(self)
        super().__post_init__()


def _check_omitted_targeting(config: TargetedConfig) -> None:
    """Refuse a targeting field that this method's PEFT files do not carry: saving would drop it
    and the reloaded adapter would wrap other modules."""
    for name in ("exclude_modules", "modules_to_save"):
        if name in config.omitted_fields and getattr(config, name):
            raise ValueError(f"{type(config).__name__}.{name}: PEFT's {config.peft_type} files have no such "
                             "field; name the modules in target_modules instead")


def _check_patterns(config: TargetedConfig) -> None:
    """Refuse texts that targeting uses in regular expressions and that do not compile."""
    texts: list[tuple[str, str]] = []
    for name in ("target_modules", "exclude_modules", "layers_pattern"):
        if isinstance(getattr(config, name, None), str):
            texts.append((name, getattr(config, name)))
    # Items of these lists are spliced into larger expressions (a target_modules list holds plain names).
    for name in ("layers_pattern", "modules_to_save"):
        if isinstance(getattr(config, name, None), list):
            texts += [(name, item) for item in getattr(config, name) if isinstance(item, str)]
    for name in ("rank_pattern", "alpha_pattern"):
        if isinstance(getattr(config, name, None), dict):
            texts += [(f"{name} key", key) for key in getattr(config, name) if isinstance(key, str)]
    for name, text in texts:
        try:
            re.compile(text)
        except re.error as err:
            raise ValueError(f"{type(config).__name__}.{name} {text!r} is not a valid regular expression "
                             f"({err})") from None


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
    if not isinstance(peft_type, str):
        raise ValueError(f"{source}: field 'peft_type' must be text, got {short_repr(peft_type)}")
    cls = CONFIG_REGISTRY.get(str(peft_type).upper())
    if cls is None:
        raise ValueError(f"{source}: peft_type {short_repr(peft_type)} is not supported "
                         f"(known: {sorted(CONFIG_REGISTRY)})")
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
            raise NotImplementedError(f"{source}: field {key!r}={short_repr(value)} is not supported by deltatune")
        if key not in passive and key not in cls.unsupported_fields and key != "peft_version":
            unknown.append(key)
        extra[key] = value
    if unknown:
        warnings.warn(f"{source}: deltatune does not know the field(s) {unknown}; they are kept as they are")
    hints = typing.get_type_hints(cls, vars(sys.modules[cls.__module__]))
    for key, value in kwargs.items():
        if not _fits(value, hints[key]):
            raise ValueError(f"{source}: field {key!r} must be {_describe(hints[key])}, got {short_repr(value)}")
    try:
        config = cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{source}: {err}") from None
    config.extra_fields = extra
    return config


def _fits(value: Any, hint: Any) -> bool:
    """Whether a value read from JSON fits a field's annotation (``Optional[list[str]]``, ...)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if hint is type(None):
        return value is None
    if origin in (Union, types.UnionType):
        return any(_fits(value, arg) for arg in args)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:  # sizes and seeds: 64 bits, as torch takes them
        return isinstance(value, int) and not isinstance(value, bool) and -2 ** 63 <= value < 2 ** 63
    if hint is float:  # JSON writes 8.0 as 8; NaN and Infinity are never meaningful settings
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if hint is str:
        return isinstance(value, str)
    if hint is list or origin is list:
        return isinstance(value, list) and (not args or all(_fits(v, args[0]) for v in value))
    if hint is dict or origin is dict:
        if not isinstance(value, dict):
            return False
        return not args or all(_fits(k, args[0]) and _fits(v, args[1]) for k, v in value.items())
    return True  # an annotation this check does not know: leave it to validate()


def _describe(hint: Any) -> str:
    """An annotation in JSON's words: ``Optional[list[str]]`` -> "a list of strings or null"."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(arg) for arg in args)
    plural = {bool: "booleans", int: "integers", float: "numbers", str: "strings"}
    if origin is list:
        return f"a list of {plural.get(args[0], 'values')}" if args else "a list"
    if origin is dict and args and args[1] in plural:
        return f"an object whose values are {plural[args[1]]}"
    names = {bool: "true or false", int: "an integer (64 bits at most)", float: "a finite number", str: "a string",
             dict: "an object", list: "a list", type(None): "null"}
    return names.get(hint, "an object" if origin is dict else getattr(hint, "__name__", str(hint)))


def short_repr(value: Any, limit: int = 80) -> str:
    """``repr(value)`` cut to ``limit`` characters, so that a huge value does not flood a message."""
    try:
        text = repr(value)
    except ValueError:  # an int too long to print (Python's 4300-digit limit)
        text = f"<an integer of about {value.bit_length() * 3 // 10} digits>"
    return text if len(text) <= limit else text[: limit - 3] + "..."
