"""``deltatune train`` settings: dataclasses whose field docstrings become ``--help``.

A run is configured by a YAML file, flags, or both (flags win). Nested fields are set with
dotted flags, e.g. ``--lora.r 32 --data.max_seq_len 256``; values are read as YAML scalars.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from ..data import DataConfig


@dataclass
class LoraOptions:
    """The adapter (PEFT's LoraConfig field names)."""

    r: int = 16
    """rank"""
    lora_alpha: float = 32
    """scale numerator: the update is scaled by lora_alpha / r"""
    lora_dropout: float = 0.05
    """dropout on the adapter's input"""
    target_modules: Any = "all-linear"
    """module names, a regex, or all-linear"""
    use_dora: bool = False
    """DoRA: learn a magnitude per output as well"""
    use_rslora: bool = False
    """scale by lora_alpha / sqrt(r)"""


@dataclass
class TrainConfig:
    """Settings of one training run."""

    model: str = ""
    """Hugging Face model folder or .gguf file; empty: the embedded default model."""
    quantize: str = ""
    """Load the base quantized: nf4, fp4 or int8 (QLoRA); empty: full precision."""
    method: str = "lora"
    """Adapter method: lora, dora, loha, lokr, adalora, ia3, vera, nola, bottleneck, pfeiffer, prompt_tuning, prefix_tuning, p_tuning, bitfit, top_layers."""
    lora: LoraOptions = field(default_factory=LoraOptions)
    """LoRA/DoRA settings."""
    adapter: dict = field(default_factory=dict)
    """Config fields of the method (PEFT names), e.g. --adapter '{r: 8, alpha: 16}'; they override the method's recipe."""
    data: DataConfig = field(default_factory=DataConfig)
    """Data settings."""
    output_dir: str = ""
    """Run folder; empty: a new folder under runs/. A non-empty folder needs --resume or --overwrite."""
    epochs: float = 3.0
    """Passes over the training data (ignored when max_steps is set)."""
    max_steps: int = 0
    """Optimizer steps to run; 0: from epochs."""
    batch_size: int = 8
    """Examples (or packed rows) per micro-batch."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    lr: float = 0.0
    """Peak learning rate; 0: the method's usual rate (LoRA 2e-4; see train/methods.py)."""
    weight_decay: float = 0.0
    """AdamW weight decay (never applied to biases and norms)."""
    schedule: str = "cosine"
    """Learning-rate schedule: cosine, linear or constant."""
    warmup_steps: int = 0
    """Steps of linear warm-up from 0."""
    optimizer: str = "adamw"
    """adamw, adamw_8bit, paged_adamw_8bit or paged_adamw."""
    max_grad_norm: float = 1.0
    """Clip the gradient norm to this (0: no clipping)."""
    precision: str = "fp32"
    """fp32, bf16 or fp16 autocast (fp16 uses loss scaling)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory."""
    eval_steps: int = 0
    """Evaluate the validation loss every N steps (0: about ten times over the run; always at step 0 and at the end)."""
    save_steps: int = 0
    """Write a resumable checkpoint every N steps (0: none until the end)."""
    logging_steps: int = 1
    """Write metrics every N steps."""
    early_stopping_patience: int = 0
    """Stop after this many evaluations without a better validation loss (0: never)."""
    seed: int = 0
    """Seed for the adapter's initialisation, data order and dropout."""
    final_eval: str = "auto"
    """Generate on the validation split at the end, base against tuned (on, off; auto: on for the default job)."""
    eval_max_new_tokens: int = 48
    """Tokens generated per validation example in the final evaluation."""
    resume: bool = False
    """Continue from the latest valid checkpoint in output_dir."""
    overwrite: bool = False
    """Allow a non-empty output_dir without resuming (its files may be replaced)."""


class ConfigError(ValueError):
    """A bad setting: the message names the field (and the file)."""


def _build(cls, values: dict, where: str):
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(f"{where}unknown field(s) {unknown}; known: {sorted(fields)}")
    kwargs = {}
    for name, value in values.items():
        default = fields[name].default_factory() if fields[name].default_factory is not dataclasses.MISSING \
            else fields[name].default
        if dataclasses.is_dataclass(default):
            if not isinstance(value, dict):
                raise ConfigError(f"{where}{name}: expected a mapping of {type(default).__name__} fields")
            kwargs[name] = _build(type(default), value, f"{where}{name}.")
        elif str(fields[name].type) in ("Any", "typing.Any"):
            kwargs[name] = value  # e.g. target_modules: a name, a regex or a list
        else:
            kwargs[name] = _coerce(value, default, f"{where}{name}")
    return cls(**kwargs)


def _coerce(value, default, where: str):
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if isinstance(default, int) and not isinstance(default, bool):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if isinstance(default, str) and not isinstance(value, str):
        raise ConfigError(f"{where}: expected text, got {value!r}")
    if isinstance(default, dict) and not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a mapping, got {value!r}")
    return value


def _set_dotted(tree: dict, dotted: str, value) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--{dotted}: {part} is not a group of settings")
    node[parts[-1]] = value


def load_config(path: Optional[str] = None, overrides: Optional[dict[str, Any]] = None) -> TrainConfig:
    """A ``TrainConfig`` from a YAML file (optional) and dotted overrides (flags)."""
    tree: dict = {}
    where = ""
    if path:
        where = f"{path}: "
        try:
            tree = yaml.safe_load(Path(path).read_text()) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file {path} not found") from None
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            line = f" line {mark.line + 1}" if mark is not None else ""
            raise ConfigError(f"{path}:{line} not valid YAML ({getattr(err, 'problem', err)})") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: expected a mapping of settings at the top level")
    for dotted, value in (overrides or {}).items():
        _set_dotted(tree, dotted.replace("-", "_"), value)
    return _build(TrainConfig, tree, where)


def to_dict(config) -> dict:
    return dataclasses.asdict(config)
