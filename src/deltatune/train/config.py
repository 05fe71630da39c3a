"""``deltatune train`` settings: dataclasses whose field docstrings become ``--help``.

A run is configured by a YAML file, flags, or both (flags win). Nested fields are set with
dotted flags, e.g. ``--lora.r 32 --data.max_seq_len 256``; values are read as YAML scalars.
"""

from __future__ import annotations

import dataclasses
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from ..config.base import short_repr
from ..data import DataConfig
from ..files import utf8_text


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
    init_lora_weights: Any = "true"
    """initialisation: true (B = 0), gaussian, pissa, pissa_niter_<n>, olora, orthogonal, mica (B frozen), loftq (quantizes the base; with --adapter '{loftq_config: {loftq_bits: 4}}', without --quantize), eva, corda, lora_ga (from the first 8 training batches; settings in --adapter '{eva_config: {...}}')"""
    target_experts: bool = False
    """mixture-of-experts models: LoRA on every fused expert weight too (PEFT's target_parameters, e.g. mlp.experts.gate_up_proj and mlp.experts.down_proj); lora_dropout becomes 0, as dropout cannot act on a weight"""
    train_router: bool = False
    """mixture-of-experts models: train the routers in full, saved with the adapter (PEFT's modules_to_save); without it they stay frozen"""


@dataclass
class TrainConfig:
    """Settings of one training run."""

    model: str = ""
    """Hugging Face model folder or .gguf file; empty: the embedded default model."""
    quantize: str = ""
    """Load the base quantized: nf4, fp4 or int8 (QLoRA); empty: full precision."""
    method: str = "lora"
    """Adapter method: lora, dylora (QDyLoRA with --quantize), dora, loha, lokr, adalora, ia3, vera, hira, pvera, lily, nola, road, delora, randlora, vblora, gralora, unilora, tinylora, deft, peanut, bottleneck, pfeiffer, prompt_tuning, prefix_tuning, cartridge, p_tuning, adaption_prompt, beft, bitfit, top_layers, ln_tuning, trainable_tokens (with --adapter '{token_indices: [...]}'), fourierft, waveft, shira, supertuning, glora, miss, c3a, oft, boft, hra, psoft, adamss (ASA with --adapter '{use_asa: true, ...}'), osf, frod, xlora (with --adapter '{adapters: {name: LoRA adapter folder, ...}}'), poly, multitask_prompt_tuning (each row's task from the data's task_id column, else task 0), cpt (its context: the first training examples, unless --adapter '{cpt_token_ids: [...]}'), shadow (ShadowPEFT: its shadow loss is added to the training loss)."""
    lora: LoraOptions = field(default_factory=LoraOptions)
    """LoRA/DoRA settings."""
    adapter: dict = field(default_factory=dict)
    """Config fields of the method (PEFT names), e.g. --adapter '{r: 8, alpha: 16}'; they override the method's recipe."""
    objective: str = "sft"
    """What training minimises: sft (next-token loss on completions), dpo (Direct Preference Optimization: the chosen completion made more likely than the rejected one, measured against the reference, the model the run starts from) or orpo (the SFT loss on the chosen completion plus an odds-ratio term; no reference). dpo and orpo read preference pairs: prompt, chosen, rejected (docs/training.md)."""
    beta: float = 0.1
    """DPO's beta (above 0): the scale of the implicit reward beta * log(policy / reference); smaller lets the tuned model move further from the reference. dpo only."""
    label_smoothing: float = 0.0
    """Conservative DPO's epsilon in [0, 0.5): the share of pairs taken to be mislabelled, the loss -(1-eps)*logsigmoid(beta*d) - eps*logsigmoid(-beta*d), d the chosen completion's log-ratio to the reference minus the rejected one's; 0: DPO's own loss. dpo only."""
    orpo_lambda: float = 0.1
    """ORPO's lambda (at least 0): the weight of the odds-ratio term added to the SFT loss (TRL's ORPOConfig calls it beta). orpo only."""
    init_adapter: str = ""
    """Start a dpo or orpo run from this supervised adapter folder (PEFT format, LoRA or DoRA): it is trained, and a frozen copy beside it on the same base is the reference; empty: a new adapter, the base (adapters disabled) the reference. The adapter's own config is used, so method, lora and adapter stay at their defaults."""
    data: DataConfig = field(default_factory=DataConfig)
    """Data settings."""
    output_dir: str = ""
    """Run folder; empty: a new folder under runs/. A non-empty folder needs --resume or --overwrite."""
    epochs: float = 0.0
    """Passes over the training data (ignored when max_steps is set); 0: the method's usual number (LoRA 1, or up to 3 until 24,000 tokens are read; the others 3; see train/methods.py)."""
    max_steps: int = 0
    """Optimizer steps to run; 0: from epochs."""
    batch_size: int = 8
    """Examples (or packed rows) per micro-batch."""
    batch_tokens: int = 0
    """Cut micro-batches by a token budget instead of a row count: as many rows as fit N tokens once padded (rows x the batch's longest row), so short examples travel many to a batch; 0: batch_size rows. At least data.max_seq_len."""
    auto_batch: bool = False
    """Use the largest micro-batch (a divisor of batch_size) that fits the device's memory, with gradient accumulation keeping batch_size x grad_accum examples per step: tried on a GPU, estimated from the measured memory per token on a CPU."""
    group_by_length: bool = True
    """Batch rows of similar length together (sorted within groups of 64 batches, the batches still shuffled): less padding when example lengths vary; packed rows are nearly full already. The share of padding is in summary.json."""
    eval_batch_size: int = 0
    """Rows per batch in validation passes and the final evaluation's generation; 0: 4 x batch_size (no gradients or saved activations there, so a larger batch fits in the memory a training batch takes, and on a CPU generating more rows at once reads the weights fewer times)."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    lr: float = 0.0
    """Peak learning rate; 0: the method's usual rate (LoRA 1e-3; see train/methods.py)."""
    lora_plus_ratio: float = 0.0
    """LoRA+: the B matrices (lora_B, lora_embedding_B) learn at this many times the learning rate of the other parameters (the LoRA+ paper suggests about 16); 0: one rate for all. LoRA and DoRA only."""
    weight_decay: float = 0.0
    """AdamW weight decay (never applied to biases and norms)."""
    schedule: str = ""
    """Learning-rate schedule after warm-up: cosine, linear, constant or wsd (the peak rate, then a linear decay over the last 20% of the steps); empty: the method's usual one (cosine for every method today)."""
    warmup_steps: int = 0
    """Steps of linear warm-up from 0 (0: warmup_ratio of the run's steps)."""
    warmup_ratio: float = 0.1
    """Share of the run's steps spent warming up when warmup_steps is 0."""
    optimizer: str = "adamw"
    """adamw, adamw_8bit, paged_adamw_8bit or paged_adamw."""
    max_grad_norm: float = 1.0
    """Clip the gradient norm to this (0: no clipping)."""
    precision: str = "auto"
    """fp32, bf16 or fp16 autocast (fp16 uses loss scaling); auto: bf16 where the device multiplies it faster (CUDA with bf16, CPUs with AMX, CPUs with AVX512-BF16 where a timed matmul says so), else fp32. Adapter weights and optimizer states stay float32 either way."""
    compile: bool = False
    """Compile each transformer block with torch.compile: faster steps after a compile time up front (the log reports it), so it pays in long runs only; benchmarks/compile_step.py measures when on a machine."""
    distributed: str = "auto"
    """Under torchrun: ddp (every process holds the whole model), fsdp (FSDP2: weights, adapter and optimizer states sharded across processes, each block's weights gathered to run it) or auto (fsdp when one copy of the model per process would take more than 40% of a device's memory, else ddp). Ignored in one process."""
    fsdp_offload: bool = False
    """With FSDP2 (which it implies): keep each rank's shards of the weights, gradients and optimizer states in CPU memory, copying a block's weights to the device only to run it, and step the optimizer on the CPU. For a base that does not fit on the devices even sharded; slower, by the copies and the CPU optimizer step."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory."""
    cheap_recompute: bool = True
    """Rebuild norm outputs and the MLP's gated products in the backward pass instead of keeping them (element-wise work only, no matmul; the same bits): about a third less activation memory, used for micro-batches of at least 1,024 positions, where it costs no measurable step time. Off under gradient_checkpointing, activation_offload and compile, which manage saved activations themselves."""
    activation_offload: bool = False
    """Keep the activations saved for the backward pass in pinned CPU memory instead of GPU memory (CUDA only): GPU memory like checkpointing's without recomputing, at the cost of transfers; deltatune bench measures which is faster."""
    eval_steps: int = 0
    """Evaluate the validation loss every N steps (0: as often as costs about 8% of the training time, at most ten times; always at step 0 and at the end)."""
    eval_max_rows: int = 512
    """Validation passes read at most this many validation rows, a fixed sample of a larger split (0: all); the final evaluation reads them all."""
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
    """Start a new run in a non-empty output_dir: the earlier run is first moved aside to <output_dir>.replaced-<time>."""


class ConfigError(ValueError):
    """A bad setting: the message names the field (and the file)."""


class SettingsLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that reads numbers as YAML 1.2 does and refuses a key given twice.

    PyYAML follows YAML 1.1, where a float needs a dot and a signed exponent, so ``2e-4``,
    ``1e3`` and ``-.5`` would be text. Everything else (ints, booleans, null) is unchanged.
    A repeated key (two ``lr:`` lines) would silently keep the last one; it is an error here.
    """

    def construct_mapping(self, node, deep=False):
        seen: set[str] = set()
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.value != "<<":
                if key_node.value in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"{key_node.value!r} is given twice", key_node.start_mark)
                seen.add(key_node.value)
        return super().construct_mapping(node, deep=deep)


# Floats YAML 1.1 reads as text: an exponent without a dot or without a sign, a signed
# leading dot. Tried after PyYAML's own resolvers, so it only adds spellings.
_YAML12_FLOAT = re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9][0-9_]*)[eE][-+]?[0-9]+
                                |[-+]?\.[0-9][0-9_]*)$""", re.X)
SettingsLoader.add_implicit_resolver("tag:yaml.org,2002:float", _YAML12_FLOAT, list("-+0123456789."))

_EXACT_INT = 2 ** 53  # floats up to this size that are whole stand for exactly one integer


def read_yaml(text: str | bytes) -> Any:
    """The value of one YAML document, numbers read in every usual spelling (see ``SettingsLoader``)."""
    return yaml.load(text, Loader=SettingsLoader)  # noqa: S506 (a SafeLoader subclass)


def _read_settings_file(path: str) -> dict:
    """The mapping of settings in the YAML file ``path``; every failure is a ConfigError naming it."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"config file {path} not found") from None
    except OSError as err:  # a folder, no permission, ...
        raise ConfigError(f"config file {path} could not be read ({err.strerror or err})") from None
    text = utf8_text(data, path, ConfigError)
    try:
        tree = read_yaml(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}:{line} not valid YAML ({getattr(err, 'problem', None) or err})") from None
    except RecursionError:  # PyYAML builds nested values recursively
        raise ConfigError(f"{path}: values nested too deeply") from None
    except ValueError as err:  # PyYAML's int() of a number with more than 4300 digits
        raise ConfigError(f"{path}: a value could not be read ({err})") from None
    if tree is None:
        return {}
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: expected a mapping of settings at the top level")
    return tree


def _build(cls, values: dict, where: str):
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kinds = typing.get_type_hints(cls)
    # Keys may be any YAML scalar (1, null, true): compare and sort them as text.
    unknown = sorted(str(k) for k in values if not isinstance(k, str) or k not in fields)
    if unknown:
        raise ConfigError(f"{where}unknown field(s) {unknown}; known: {sorted(fields)}")
    kwargs = {}
    for name, value in values.items():
        kind = kinds[name]
        if dataclasses.is_dataclass(kind):
            if not isinstance(value, dict):
                raise ConfigError(f"{where}{name}: expected a mapping of {kind.__name__} fields, "
                                  f"got {short_repr(value)}")
            kwargs[name] = _build(kind, value, f"{where}{name}.")
        elif kind is Any:
            kwargs[name] = value  # e.g. target_modules: a name, a regex or a list
        else:
            kwargs[name] = _coerce(value, kind, f"{where}{name}")
    return cls(**kwargs)


def _coerce(value, kind: type, where: str):
    """``value`` as the field's declared type ``kind``, or a ConfigError naming the field."""
    if kind is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {short_repr(value)}")
        return value
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        # 1e3 and 2.0 are whole numbers in a float's spelling; 1e-3, 2.5 and 1e300 are not exact.
        if isinstance(value, float) and value.is_integer() and abs(value) <= _EXACT_INT:
            return int(value)
        if not is_number or isinstance(value, float):
            raise ConfigError(f"{where}: expected an integer, got {short_repr(value)}")
        if not -2 ** 63 <= value < 2 ** 63:
            raise ConfigError(f"{where}: expected an integer of 64 bits at most, got {short_repr(value)}")
        return value
    if kind is float:
        if not is_number:
            raise ConfigError(f"{where}: expected a number, got {short_repr(value)}")
        try:
            number = float(value)
        except OverflowError:  # an integer with hundreds of digits
            number = math.inf
        if not math.isfinite(number):
            raise ConfigError(f"{where}: expected a finite number, got {short_repr(value)}")
        return number
    if kind is str and not isinstance(value, str):
        raise ConfigError(f"{where}: expected text, got {short_repr(value)}")
    if kind is dict and not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a mapping, got {short_repr(value)}")
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
        tree = _read_settings_file(path)
    for dotted, value in (overrides or {}).items():
        _set_dotted(tree, dotted.replace("-", "_"), value)
    return _build(TrainConfig, tree, where)


def to_dict(config) -> dict:
    return dataclasses.asdict(config)
