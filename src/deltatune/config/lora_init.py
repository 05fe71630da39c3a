"""The sub-configs of LoRA's initialisations that need more than the base weight: LoftQ (quantization
bits and alternations), EVA, CorDA and LoRA-GA (how activations or gradients become factors).

``adapter_config.json`` holds each as a plain object (PEFT writes its dataclasses with ``asdict``),
so deltatune keeps them as dicts: missing keys get PEFT's defaults, unknown keys and bad values are
refused with the field named. They only matter when an adapter is initialised; a loaded file's
values are kept as they are written.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

# PEFT's LoftQConfig, EvaConfig, CordaConfig and LoraGAConfig defaults (peft 0.21.2).
LOFTQ_DEFAULTS: dict[str, Any] = {"loftq_bits": 4, "loftq_iter": 1}
EVA_DEFAULTS: dict[str, Any] = {"rho": 2.0, "tau": 0.99, "use_label_mask": True, "label_mask_value": -100,
                                "whiten": False, "adjust_scaling_factors": True}
# cache_file, covariance_file, verbose and prune_temporary_fields steer PEFT's bookkeeping (files of
# intermediate results, progress output); deltatune keeps no such files and ignores them.
CORDA_DEFAULTS: dict[str, Any] = {"cache_file": None, "covariance_file": None, "corda_method": "ipm",
                                  "verbose": False, "use_float16_for_covariance": False,
                                  "prune_temporary_fields": True}
LORA_GA_DEFAULTS: dict[str, Any] = {"direction": "ArB2r", "scale": "stable", "stable_gamma": 16}

# init_lora_weights values that need data (batches of the training set) to initialise
DATA_INITS = ("eva", "corda", "lora_ga")
# init_lora_weights values that move part of the base weight into the adapter (the base changes)
BASE_CHANGING_INITS = ("pissa", "olora", "corda", "lora_ga", "loftq")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


_CHECKS: dict[str, dict[str, tuple[Callable[[Any], bool], str]]] = {
    "loftq_config": {
        "loftq_bits": (lambda v: v in (4, 8) and _is_int(v), "4 (NF4) or 8 (int8)"),
        "loftq_iter": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    },
    "eva_config": {
        "rho": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 1.0, "a number >= 1"),
        "tau": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and 0.0 <= v <= 1.0,
                "a number in [0, 1]"),
        "use_label_mask": (lambda v: isinstance(v, bool), "true or false"),
        "label_mask_value": (_is_int, "an integer"),
        "whiten": (lambda v: isinstance(v, bool), "true or false"),
        "adjust_scaling_factors": (lambda v: isinstance(v, bool), "true or false"),
    },
    "corda_config": {
        "cache_file": (lambda v: v is None or isinstance(v, str), "a path or null"),
        "covariance_file": (lambda v: v is None or isinstance(v, str), "a path or null"),
        "corda_method": (lambda v: v in ("ipm", "kpm"), "'ipm' or 'kpm'"),
        "verbose": (lambda v: isinstance(v, bool), "true or false"),
        "use_float16_for_covariance": (lambda v: isinstance(v, bool), "true or false"),
        "prune_temporary_fields": (lambda v: isinstance(v, bool), "true or false"),
    },
    "lora_ga_config": {
        "direction": (lambda v: v in ("ArBr", "A2rBr", "ArB2r", "random"), "'ArBr', 'A2rBr', 'ArB2r' or 'random'"),
        "scale": (lambda v: v in ("stable", "weight_svd", "gd_scale", "unit"),
                  "'stable', 'weight_svd', 'gd_scale' or 'unit'"),
        "stable_gamma": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0,
                         "a positive number"),
    },
}
_DEFAULTS = {"loftq_config": LOFTQ_DEFAULTS, "eva_config": EVA_DEFAULTS, "corda_config": CORDA_DEFAULTS,
             "lora_ga_config": LORA_GA_DEFAULTS}


def complete_sub_config(owner: str, field_name: str, value: Optional[dict]) -> Optional[dict]:
    """``value`` with PEFT's defaults for missing keys, or a ValueError naming the key that is unknown
    or out of range (``None`` stays ``None``)."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ValueError(f"{owner}.{field_name} must be an object (dict) or null, got {value!r}")
    checks = _CHECKS[field_name]
    unknown = sorted(set(value) - set(checks))
    if unknown:
        raise ValueError(f"{owner}.{field_name} has unknown key(s) {unknown}; known: {sorted(checks)}")
    full = {**_DEFAULTS[field_name], **value}
    for key, (ok, wanted) in checks.items():
        if not ok(full[key]):
            raise ValueError(f"{owner}.{field_name}[{key!r}] must be {wanted}, got {full[key]!r}")
    return full


def check_init_sub_configs(config: Any, owner: str = "LoraConfig") -> None:
    """Fill and check ``config``'s LoftQ/EVA/CorDA/LoRA-GA sub-configs against ``init_lora_weights``,
    as PEFT's ``LoraConfig`` does: LoftQ needs its ``loftq_config``; EVA, CorDA and LoRA-GA get the
    default sub-config when none is given."""
    init = config.init_lora_weights
    if init == "loftq":
        if not config.loftq_config:
            raise ValueError(f"{owner}.loftq_config must be given when init_lora_weights='loftq', "
                             "e.g. {'loftq_bits': 4, 'loftq_iter': 1}")
    elif config.loftq_config:
        # PEFT drops a loftq_config that its initialisation does not use; so do we, to write the same file
        config.loftq_config = {}
    if config.loftq_config:
        config.loftq_config = complete_sub_config(owner, "loftq_config", config.loftq_config)
    for name, wanted_init in (("eva_config", "eva"), ("corda_config", "corda"), ("lora_ga_config", "lora_ga")):
        value = getattr(config, name)
        if value is None and init == wanted_init:
            value = {}
        setattr(config, name, complete_sub_config(owner, name, value))
