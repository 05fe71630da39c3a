"""``deltatune train --method NAME``: each method's config class, its settings for a training
run (where they differ from the config class's defaults) and its usual learning rate."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from ..config import CONFIG_REGISTRY, AdapterConfig, LoraConfig
from .config import ConfigError, TrainConfig, to_dict


@dataclass(frozen=True)
class MethodRecipe:
    """What ``deltatune train --method NAME`` uses unless told otherwise."""

    peft_type: str
    lr: float
    options: dict[str, Any] = field(default_factory=dict)
    epochs: float = 3.0  # passes over the data when neither --epochs nor --max-steps is given
    schedule: str = "cosine"  # when --schedule is not given
    # with the recipe's epochs: more passes, up to MAX_EPOCHS, until a run reads this many tokens
    min_tokens: int = 0


MAX_EPOCHS = 3.0  # the most passes min_tokens adds


RECIPES: dict[str, MethodRecipe] = {
    # LoRA: one epoch at 1e-3, cosine after warm-up, and at least 24k tokens (a small set gets
    # up to three passes): chosen on the validation splits of the default job and the docstring
    # task (benchmarks/sweep_defaults.py, docs/training.md)
    "lora": MethodRecipe("LORA", 1e-3, epochs=1.0, min_tokens=24_000),
    # DyLoRA/QDyLoRA: LoRA's recipe; every step trains a rank drawn from 1..r (adapters/low_rank/dylora.py)
    "dylora": MethodRecipe("DYLORA", 1e-3, epochs=1.0, min_tokens=24_000),
    "dora": MethodRecipe("LORA", 2e-4, {"use_dora": True}),
    # LoHa, LoKr and AdaLoRA at 4e-3: chosen over 1e-3 by validation loss (benchmarks/choose_lr.py)
    "loha": MethodRecipe("LOHA", 4e-3, {"r": 8, "alpha": 16, "target_modules": "all-linear"}),
    "lokr": MethodRecipe("LOKR", 4e-3, {"r": 8, "alpha": 16, "target_modules": "all-linear"}),
    "adalora": MethodRecipe("ADALORA", 4e-3, {"init_r": 12, "target_r": 8, "lora_alpha": 32,
                                              "target_modules": "all-linear", "deltaT": 5}),
    "ia3": MethodRecipe("IA3", 3e-3),
    "vera": MethodRecipe("VERA", 1e-2, {"r": 256, "target_modules": "all-linear"}),
    "nola": MethodRecipe("NOLA", 5e-3, {"r": 8, "alpha": 16, "target_modules": "all-linear"}),
    "bottleneck": MethodRecipe("BOTTLENECK", 1e-3, {"variant": "houlsby", "reduction_factor": 16}),
    "pfeiffer": MethodRecipe("BOTTLENECK", 1e-3, {"variant": "pfeiffer", "reduction_factor": 16}),
    "prompt_tuning": MethodRecipe("PROMPT_TUNING", 3e-2, {"num_virtual_tokens": 20,
                                                           "prompt_tuning_init": "SAMPLE_VOCAB"}),
    "prefix_tuning": MethodRecipe("PREFIX_TUNING", 1e-2, {"num_virtual_tokens": 20}),
    "p_tuning": MethodRecipe("P_TUNING", 1e-3, {"num_virtual_tokens": 20, "encoder_hidden_size": 128}),
    "bitfit": MethodRecipe("SELECTIVE", 1e-3, {"bitfit": True}),
    "top_layers": MethodRecipe("SELECTIVE", 1e-4, {"top_k_layers": 1}),
}


def recipe_for(cfg: TrainConfig) -> MethodRecipe:
    name = cfg.method.lower()
    if name not in RECIPES:
        raise ConfigError(f"method: {cfg.method!r} is not known; choose one of {sorted(RECIPES)}")
    recipe = RECIPES[name]
    if recipe.peft_type not in CONFIG_REGISTRY:
        raise ConfigError(f"method: {cfg.method!r} is not available in this build")
    return recipe


def adapter_config(cfg: TrainConfig, task_type: str, total_steps: int) -> AdapterConfig:
    """The adapter config of a run: the recipe's settings, then ``lora``/``adapter`` options."""
    recipe = recipe_for(cfg)
    cls = CONFIG_REGISTRY[recipe.peft_type]
    if issubclass(cls, LoraConfig):  # LoRA and DyLoRA take the lora group's settings
        options = {**to_dict(cfg.lora), **recipe.options, **cfg.adapter}
    else:
        if cfg.lora != type(cfg.lora)():
            raise ConfigError(f"lora.*: settings of the lora group do not apply to --method {cfg.method}; "
                              "use --adapter '{field: value}' (the method's config fields)")
        options = {**recipe.options, **cfg.adapter}
    if recipe.peft_type in ("PROMPT_TUNING", "PREFIX_TUNING", "P_TUNING") and cfg.data.packing:
        raise ConfigError(f"data.packing: --method {cfg.method} puts virtual tokens before each sequence; "
                          "packed rows would share them, so packing is not supported with soft prompts")
    if recipe.peft_type == "ADALORA":
        options.setdefault("total_step", total_steps)
        options.setdefault("tinit", total_steps // 10)
        options.setdefault("tfinal", total_steps // 5)
    if recipe.peft_type == "DYLORA":
        options.setdefault("rank_seed", cfg.seed)
    known = {f.name for f in dataclasses.fields(cls)} - {"extra_fields"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ConfigError(f"adapter: {cls.__name__} has no field(s) {unknown}; known: {sorted(known)}")
    options["task_type"] = task_type
    try:
        return cls(**options)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"adapter: {err}") from None


def learning_rate(cfg: TrainConfig) -> float:
    """``cfg.lr``, or the method's usual rate when it is 0."""
    return cfg.lr or recipe_for(cfg).lr


def schedule_for(cfg: TrainConfig) -> str:
    """``cfg.schedule``, or the method's usual schedule when it is empty."""
    return cfg.schedule or recipe_for(cfg).schedule


def epochs_for(cfg: TrainConfig, epoch_tokens: int = 0) -> float:
    """``cfg.epochs``, or when it is 0 the method's usual number of passes, raised (to at most
    ``MAX_EPOCHS`` whole passes) until the run reads the recipe's ``min_tokens`` when one epoch
    is ``epoch_tokens`` tokens."""
    if cfg.epochs:
        return cfg.epochs
    recipe = recipe_for(cfg)
    if recipe.min_tokens and epoch_tokens and recipe.epochs * epoch_tokens < recipe.min_tokens:
        return max(recipe.epochs, min(MAX_EPOCHS, float(math.ceil(recipe.min_tokens / epoch_tokens))))
    return recipe.epochs
