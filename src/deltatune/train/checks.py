"""Settings checked before any work: a bad value stops ``deltatune train`` with one line that
names the setting and what it accepts, before a model loads or a folder is touched."""

from __future__ import annotations

from pathlib import Path

import torch

from ..data.formats import FORMATS
from ..data.preference import FORMAT as PREFERENCE_FORMAT
from ..quant.convert import QUANT_TYPES
from .config import ConfigError, TrainConfig
from ..distributed import STRATEGIES
from .methods import adapter_config
from .objectives import OBJECTIVES
from .optimizers import OPTIMIZERS
from .schedule import SCHEDULES

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
FINAL_EVAL = ("auto", "on", "off")


def _one_of(name: str, value: str, choices) -> None:
    if value not in choices:
        shown = ", ".join(c or "'' (none)" for c in choices)
        raise ConfigError(f"{name}: {value!r} is not one of {shown}")


def _at_least(name: str, value: float, low: float) -> None:
    if value < low:
        raise ConfigError(f"{name}: {value!r} must be at least {low}")


def _fraction(name: str, value: float) -> None:
    if not 0.0 <= value < 1.0:
        raise ConfigError(f"{name}: {value!r} must be in [0, 1)")


def check_settings(cfg: TrainConfig) -> None:
    """Refuse settings no run can use; method-specific fields are checked by the method's config."""
    _one_of("quantize", cfg.quantize, ("", *QUANT_TYPES))
    _one_of("precision", cfg.precision, PRECISIONS)
    _one_of("schedule", cfg.schedule, ("", *SCHEDULES))
    _one_of("optimizer", cfg.optimizer, OPTIMIZERS)
    _one_of("final_eval", cfg.final_eval, FINAL_EVAL)
    _one_of("distributed", cfg.distributed, STRATEGIES)
    _one_of("data.format", cfg.data.format, ("auto", *FORMATS, PREFERENCE_FORMAT))
    _one_of("objective", cfg.objective, OBJECTIVES)
    for name in ("batch_size", "grad_accum", "logging_steps", "data.max_seq_len", "lora.r"):
        group, _, field = name.rpartition(".")
        _at_least(name, getattr(getattr(cfg, group) if group else cfg, field), 1)
    for name in ("max_steps", "batch_tokens", "eval_max_rows", "eval_batch_size", "warmup_steps", "eval_steps", "save_steps",
                 "early_stopping_patience", "lr", "weight_decay", "max_grad_norm", "eval_max_new_tokens"):
        _at_least(name, getattr(cfg, name), 0)
    _at_least("lora_plus_ratio", cfg.lora_plus_ratio, 0)
    if cfg.lora_plus_ratio and cfg.method not in ("lora", "dora", "dylora"):
        raise ConfigError(f"lora_plus_ratio: {cfg.lora_plus_ratio:g} sets the learning rate of LoRA's B matrices; "
                          f"method {cfg.method!r} has none (use lora or dora, or leave it at 0)")
    if cfg.batch_tokens and cfg.batch_tokens < cfg.data.max_seq_len:
        raise ConfigError(f"batch_tokens: {cfg.batch_tokens} is below data.max_seq_len ({cfg.data.max_seq_len}); "
                          "a batch must hold the longest row")
    if cfg.batch_tokens and cfg.auto_batch:
        raise ConfigError("batch_tokens sets the micro-batch by a token budget and auto_batch by memory: give one")
    if cfg.epochs < 0:
        raise ConfigError(f"epochs: {cfg.epochs!r} must be above 0 (or 0: the method's usual number)")
    _fraction("lora.lora_dropout", cfg.lora.lora_dropout)
    _fraction("data.validation_fraction", cfg.data.validation_fraction)
    _fraction("warmup_ratio", cfg.warmup_ratio)
    for name, path in (("model", cfg.model), ("data.path", cfg.data.path),
                       ("data.validation_path", cfg.data.validation_path), ("data.test_path", cfg.data.test_path)):
        if path and not Path(path).exists():
            raise ConfigError(f"{name}: {path} does not exist")
    # The method's config checks its own fields; the run's length is not known yet, so AdaLoRA's
    # schedule is checked against a long nominal run here and against the real one later.
    adapter_config(cfg, "CAUSAL_LM", total_steps=10**6)
    if cfg.activation_offload and not torch.cuda.is_available():
        raise ConfigError("activation_offload moves saved activations from GPU to CPU memory; this machine has no "
                          "CUDA device (use gradient_checkpointing to save memory on a CPU)")
    if cfg.fsdp_offload and cfg.distributed == "ddp":
        raise ConfigError("fsdp_offload keeps FSDP2's shards in CPU memory; it needs distributed fsdp (or auto), "
                          "not ddp")
    if cfg.distributed == "fsdp" or cfg.fsdp_offload:
        check_sharding(cfg)
    if cfg.resume and cfg.overwrite:
        raise ConfigError("--resume continues the run in output_dir and --overwrite replaces it: give one of them")
    check_objective(cfg)


def check_objective(cfg: TrainConfig) -> None:
    """Refuse objective settings that do not fit the objective (a TRL user's ORPO ``beta`` is
    ``orpo_lambda`` here) or what preference runs do not do yet."""
    if cfg.beta <= 0:
        raise ConfigError(f"beta: {cfg.beta!r} must be above 0 (DPO's reward scale; 0.1 is usual)")
    if not 0.0 <= cfg.label_smoothing < 0.5:
        raise ConfigError(f"label_smoothing: {cfg.label_smoothing!r} must be in [0, 0.5)")
    _at_least("orpo_lambda", cfg.orpo_lambda, 0)
    defaults = TrainConfig()
    owners = {"beta": "dpo", "label_smoothing": "dpo", "orpo_lambda": "orpo"}
    for name, owner in owners.items():
        if getattr(cfg, name) != getattr(defaults, name) and cfg.objective != owner:
            hint = " (ORPO's weight is orpo_lambda; TRL's ORPOConfig calls it beta)" if name == "beta" else ""
            raise ConfigError(f"{name}: a setting of objective {owner}, and this run's objective is "
                              f"{cfg.objective}{hint}")
    if cfg.objective == "sft":
        if cfg.init_adapter:
            raise ConfigError("init_adapter: starts a preference run (objective dpo or orpo) from a supervised adapter")
        if cfg.data.format == PREFERENCE_FORMAT:
            raise ConfigError("data.format: preference pairs train with objective dpo or orpo, not sft")
        return
    if cfg.data.format not in ("auto", PREFERENCE_FORMAT):
        raise ConfigError(f"data.format: objective {cfg.objective} reads preference pairs (prompt, chosen, rejected); "
                          f"{cfg.data.format!r} is an SFT format (leave it at auto, or use {PREFERENCE_FORMAT})")
    refused = [("data.packing", cfg.data.packing, "a pair's chosen and rejected rows are compared whole"),
               ("auto_batch", cfg.auto_batch, "its memory probe measures SFT rows"),
               ("distributed", cfg.distributed == "fsdp" or cfg.fsdp_offload, "preference runs are not sharded yet")]
    for name, bad, why in refused:
        if bad:
            raise ConfigError(f"{name} with objective {cfg.objective}: {why}; leave {name} at its default")
    if cfg.init_adapter:
        folder = Path(cfg.init_adapter)
        if not (folder / "adapter_config.json").is_file():
            raise ConfigError(f"init_adapter: {folder} is not an adapter folder (no adapter_config.json)")
        if cfg.method != defaults.method or cfg.lora != defaults.lora or cfg.adapter:
            raise ConfigError("init_adapter: the adapter's own config (its adapter_config.json) is trained; leave "
                              "method, lora.* and adapter at their defaults")
        from ..io import read_adapter_config

        try:
            peft_type = read_adapter_config(folder).peft_type
        except (FileNotFoundError, ValueError) as err:
            raise ConfigError(f"init_adapter: {err}") from None
        if peft_type != "LORA":
            raise ConfigError(f"init_adapter: {folder} holds a {peft_type} adapter; preference runs start from "
                              "LoRA or DoRA adapters for now")


SHARDED_METHODS = ("lora", "dora")  # and so QLoRA and QDoRA, on a 4-bit base


def check_sharding(cfg: TrainConfig) -> None:
    """Refuse what FSDP2 training does not run yet (checked again when ``auto`` picks it)."""
    refused = [("method", cfg.method not in SHARDED_METHODS, f"{cfg.method!r}: FSDP2 trains {', '.join(SHARDED_METHODS)}"),
               ("quantize", cfg.quantize == "int8", "an 8-bit base is not sharded yet (nf4 and fp4 are)"),
               ("auto_batch", cfg.auto_batch, "the memory probe runs one process's model"),
               ("compile", cfg.compile, "compiled blocks are not sharded yet")]
    for field_name, bad, why in refused:
        if bad:
            raise ConfigError(f"{field_name} with distributed fsdp: {why}; use distributed ddp, or leave {field_name} "
                              "at its default")
