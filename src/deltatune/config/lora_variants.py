"""Checks of LoRA's variant fields (``layer_replication``, aLoRA, QA-LoRA, ...), PEFT's meanings.

Kept apart from ``config/lora.py`` so each variant adds its checks here, not to ``LoraConfig``.
Subclasses of ``LoraConfig`` (DyLoRA, AdaLoRA) inherit the fields but not every variant's code:
``VARIANTS_BY_TYPE`` lists what each ``peft_type`` implements, and the rest is refused.
"""

from __future__ import annotations

from typing import Any

# peft_type -> the variant fields its method implements; other peft_types implement none
VARIANTS_BY_TYPE: dict[str, tuple[str, ...]] = {
    "LORA": ("layer_replication", "alora_invocation_tokens", "use_qalora", "use_bdlora", "kasa_config",
             "velora_config", "monteclora_config", "arrow_config"),
    "DYLORA": ("layer_replication",),
}
# variant field -> its "off" value
VARIANT_DEFAULTS: dict[str, Any] = {
    "layer_replication": None,
    "alora_invocation_tokens": None,
    "use_qalora": False,
    "use_bdlora": None,
    "kasa_config": None,
    "velora_config": None,
    "monteclora_config": None,
    "arrow_config": None,
}


def check_variant_fields(config: Any) -> None:
    """Raise naming the field when a variant field is malformed or not implemented for the config's type."""
    owner = type(config).__name__
    implemented = VARIANTS_BY_TYPE.get(config.peft_type, ())
    for name, off in VARIANT_DEFAULTS.items():
        if getattr(config, name, off) != off and name not in implemented:
            raise NotImplementedError(f"{owner}.{name} is not supported for {config.peft_type} adapters "
                                      f"(deltatune implements it for {[t for t, v in VARIANTS_BY_TYPE.items() if name in v]})")
    _check_layer_replication(owner, config)
    _check_alora(owner, config)
    _check_qalora(owner, config)
    _check_bdlora(owner, config)
    _check_kasa(owner, config)
    _check_velora(owner, config)
    _check_monteclora(owner, config)
    _check_arrow(owner, config)


def _check_layer_replication(owner: str, config: Any) -> None:
    value = getattr(config, "layer_replication", None)
    if value is None:
        return
    pairs = value if isinstance(value, (list, tuple)) else None
    ok = bool(pairs) and all(
        isinstance(p, (list, tuple)) and len(p) == 2
        and all(isinstance(i, int) and not isinstance(i, bool) for i in p) and 0 <= p[0] < p[1]
        for p in pairs)
    if not ok:
        raise ValueError(f"{owner}.layer_replication must be a non-empty list of [start, end) layer ranges with "
                         f"0 <= start < end, e.g. [[0, 4], [2, 5]]; got {value!r}")
    # JSON has no tuples: keep lists so the saved file reads as PEFT's
    config.layer_replication = [list(p) for p in pairs]


def _check_alora(owner: str, config: Any) -> None:
    tokens = getattr(config, "alora_invocation_tokens", None)
    if tokens is None:
        return
    if (not isinstance(tokens, (list, tuple)) or not tokens
            or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in tokens)):
        raise ValueError(f"{owner}.alora_invocation_tokens must be a non-empty list of token ids, got {tokens!r}")
    if config.task_type != "CAUSAL_LM":
        # PEFT refuses other task types (its generate finds the tokens), so files stay loadable there
        raise ValueError(f"{owner}.alora_invocation_tokens needs task_type='CAUSAL_LM' (as in PEFT), "
                         f"got task_type={config.task_type!r}")
    config.alora_invocation_tokens = list(tokens)


def _check_qalora(owner: str, config: Any) -> None:
    size = getattr(config, "qalora_group_size", 16)
    if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
        raise ValueError(f"{owner}.qalora_group_size must be a positive integer, got {size!r}")
    if not getattr(config, "use_qalora", False):
        return
    others = [n for n in ("use_dora", "lora_bias", "alora_invocation_tokens") if getattr(config, n, None)]
    if others:
        # PEFT's QA-LoRA has no DoRA and no LoRA bias; aLoRA would need both variants at once
        raise ValueError(f"{owner}.use_qalora cannot be combined with {others[0]}")
    if config.init_lora_weights not in (True, False, "gaussian"):
        raise ValueError(f"{owner}.use_qalora: init_lora_weights={config.init_lora_weights!r} initialises a full-size "
                         "A from the base weight; QA-LoRA's A is pooled (use True, False or 'gaussian')")


_BDLORA_DEFAULTS = {"target_modules_bd_a": None, "target_modules_bd_b": None, "nblocks": 1, "match_strict": True}


def _check_bdlora(owner: str, config: Any) -> None:
    value = getattr(config, "use_bdlora", None)
    if value is None:
        return
    if not isinstance(value, dict):
        raise ValueError(f"{owner}.use_bdlora must be a dict of PEFT's BdLoraConfig fields or None, got {value!r}")
    unknown = set(value) - set(_BDLORA_DEFAULTS)
    if unknown:
        raise ValueError(f"{owner}.use_bdlora has unknown key(s) {sorted(unknown)}; known: {sorted(_BDLORA_DEFAULTS)}")
    for side in ("target_modules_bd_a", "target_modules_bd_b"):
        patterns = value.get(side)
        if patterns is not None and not (isinstance(patterns, list) and all(isinstance(p, str) for p in patterns)):
            raise ValueError(f"{owner}.use_bdlora[{side!r}] must be a list of module-name patterns, got {patterns!r}")
    overlap = set(value.get("target_modules_bd_a") or []) & set(value.get("target_modules_bd_b") or [])
    if overlap:
        raise ValueError(f"{owner}.use_bdlora lists {sorted(overlap)} in both target_modules_bd_a and _bd_b")
    nblocks = value.get("nblocks", 1)
    if not isinstance(nblocks, int) or isinstance(nblocks, bool) or nblocks <= 0:
        raise ValueError(f"{owner}.use_bdlora['nblocks'] must be a positive integer, got {nblocks!r}")
    if not isinstance(value.get("match_strict", True), bool):
        raise ValueError(f"{owner}.use_bdlora['match_strict'] must be true or false, got {value['match_strict']!r}")
    others = [n for n in ("use_dora", "alora_invocation_tokens", "use_qalora") if getattr(config, n, None)]
    if others:  # PEFT picks one variant per layer
        raise ValueError(f"{owner}.use_bdlora cannot be combined with {others[0]}")
    config.use_bdlora = {**_BDLORA_DEFAULTS, **value}  # every field, as PEFT writes its sub-config


def _check_kasa(owner: str, config: Any) -> None:
    value = getattr(config, "kasa_config", None)
    if value is None:
        return
    if not isinstance(value, dict) or set(value) - {"beta", "gamma"}:
        raise ValueError(f"{owner}.kasa_config must be a dict of PEFT's KasaConfig fields (beta, gamma), got {value!r}")
    value = {"beta": 1e-4, "gamma": 1e-3, **value}  # PEFT's defaults
    for key, number in value.items():
        if isinstance(number, bool) or not isinstance(number, (int, float)) or not number >= 0:
            raise ValueError(f"{owner}.kasa_config[{key!r}] must be a non-negative number, got {number!r}")
    others = [n for n in ("use_dora", "alora_invocation_tokens", "use_qalora", "use_bdlora") if getattr(config, n, None)]
    if others:  # PEFT picks one variant per layer
        raise ValueError(f"{owner}.kasa_config cannot be combined with {others[0]}")
    if config.init_lora_weights not in (True, False, "gaussian"):
        raise ValueError(f"{owner}.kasa_config: init_lora_weights={config.init_lora_weights!r} changes the base "
                         "weight too; KaSA starts from B = 0 (use True, False or 'gaussian')")
    config.kasa_config = value


_VELORA_DEFAULTS = {"num_groups": 64, "scale": 1.0, "init_type": "batch_average"}


def _check_velora(owner: str, config: Any) -> None:
    value = getattr(config, "velora_config", None)
    if value is None:
        return
    if not isinstance(value, dict) or set(value) - set(_VELORA_DEFAULTS):
        raise ValueError(f"{owner}.velora_config must be a dict of PEFT's VeloraConfig fields "
                         f"({', '.join(_VELORA_DEFAULTS)}), got {value!r}")
    value = {**_VELORA_DEFAULTS, **value}
    groups, scale = value["num_groups"], value["scale"]
    if not isinstance(groups, int) or isinstance(groups, bool) or groups <= 0:
        raise ValueError(f"{owner}.velora_config['num_groups'] must be a positive integer, got {groups!r}")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0:
        raise ValueError(f"{owner}.velora_config['scale'] must be a positive number, got {scale!r}")
    if value["init_type"] not in ("batch_average", "batch_average_once", "random"):
        raise ValueError(f"{owner}.velora_config['init_type'] must be 'batch_average', 'batch_average_once' or "
                         f"'random', got {value['init_type']!r}")
    others = [n for n in ("use_dora", "alora_invocation_tokens", "use_qalora", "use_bdlora", "kasa_config", "lora_bias")
              if getattr(config, n, None)]
    if others:  # PEFT picks one variant per layer; its VeLoRA op has no LoRA bias
        raise ValueError(f"{owner}.velora_config cannot be combined with {others[0]}")
    config.velora_config = value


_MONTECLORA_DEFAULTS = {"num_samples": 8, "use_entropy": False, "dirichlet_prior": 0.1, "sample_scaler": 1e-4,
                        "kl_loss_weight": 1e-5, "buffer_size": 150}


def _check_monteclora(owner: str, config: Any) -> None:
    value = getattr(config, "monteclora_config", None)
    if value is None:
        return
    if not isinstance(value, dict) or set(value) - set(_MONTECLORA_DEFAULTS):
        raise ValueError(f"{owner}.monteclora_config must be a dict of PEFT's MontecloraConfig fields "
                         f"({', '.join(_MONTECLORA_DEFAULTS)}), got {value!r}")
    value = {**_MONTECLORA_DEFAULTS, **value}
    for key in ("num_samples", "buffer_size"):
        if not isinstance(value[key], int) or isinstance(value[key], bool) or value[key] <= 0:
            raise ValueError(f"{owner}.monteclora_config[{key!r}] must be a positive integer, got {value[key]!r}")
    for key in ("dirichlet_prior", "sample_scaler", "kl_loss_weight"):
        number = value[key]
        if isinstance(number, bool) or not isinstance(number, (int, float)) or not number >= 0:
            raise ValueError(f"{owner}.monteclora_config[{key!r}] must be a non-negative number, got {number!r}")
    if not isinstance(value["use_entropy"], bool):
        raise ValueError(f"{owner}.monteclora_config['use_entropy'] must be true or false")
    others = [n for n in ("use_dora", "alora_invocation_tokens", "use_qalora", "use_bdlora", "kasa_config",
                          "velora_config") if getattr(config, n, None)]
    if others:  # PEFT picks one variant per layer
        raise ValueError(f"{owner}.monteclora_config cannot be combined with {others[0]}")
    config.monteclora_config = value


_ARROW_DEFAULTS = {"top_k": 3, "router_temperature": 1.0, "use_gks": False, "task_adapter_names": None,
                   "gks_adapter_names": None, "rng_seed": None}


def _check_arrow(owner: str, config: Any) -> None:
    value = getattr(config, "arrow_config", None)
    if value is None:
        return
    if not isinstance(value, dict) or set(value) - set(_ARROW_DEFAULTS):
        raise ValueError(f"{owner}.arrow_config must be a dict of PEFT's ArrowConfig fields "
                         f"({', '.join(_ARROW_DEFAULTS)}), got {value!r}")
    value = {**_ARROW_DEFAULTS, **value}
    top_k, temperature = value["top_k"], value["router_temperature"]
    if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k <= 0:
        raise ValueError(f"{owner}.arrow_config['top_k'] must be a positive integer, got {top_k!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ValueError(f"{owner}.arrow_config['router_temperature'] must be a positive number, got {temperature!r}")
    for key in ("task_adapter_names", "gks_adapter_names"):
        names = value[key]
        if names is not None and not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
            raise ValueError(f"{owner}.arrow_config[{key!r}] must be a list of adapter names, got {names!r}")
    if not value["task_adapter_names"]:
        raise ValueError(f"{owner}.arrow_config['task_adapter_names'] must name the task adapters to route over")
    if value["use_gks"] and not value["gks_adapter_names"]:
        raise ValueError(f"{owner}.arrow_config: use_gks=True needs gks_adapter_names (the general adapters)")
    seed = value["rng_seed"]
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise ValueError(f"{owner}.arrow_config['rng_seed'] must be an integer or None, got {seed!r}")
    others = [n for n in ("use_dora", "alora_invocation_tokens", "use_qalora", "use_bdlora", "kasa_config",
                          "velora_config", "monteclora_config") if getattr(config, n, None)]
    if others:  # PEFT picks one variant per layer
        raise ValueError(f"{owner}.arrow_config cannot be combined with {others[0]}")
    config.arrow_config = value
