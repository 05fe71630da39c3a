"""``deltatune plan``: per-rank peak memory and tokens/s of a training run, before running it.

The memory of a rank is the sum of named terms: the runtime (interpreter, torch, transformers),
the base weights (sharded under FSDP2, packed under 4-bit), the adapter, its gradients, the
optimizer's states, the activations kept for backward, and the larger of two moments' working
sets (one chunk of logits in the loss, or one block's backward). Each term is computed from the
model's shape and the run's settings; ``plan_activations`` derives the activation terms and
``plan_speed`` the roofline (on a CPU, ``plan_block`` times a block instead). ``choose`` walks the ways to run (one device, DDP, FSDP2, 4-bit,
activation offload) and returns the first that fits, with the command that runs it. Mixture-of-experts
models add the experts' terms of ``plan_moe`` (all experts stored, top-k computed).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Callable, Optional

from .plan_activations import StepShape, activations
from .plan_moe import ExpertLora, dense_mlp_targets, effective_dropout, expert_lora, expert_lora_parameters, \
    largest_decoded_weight
from .plan_shapes import ATTENTION_LINEARS, LINEARS, ModelShape
from .plan_speed import CUDA_CONTEXT_BYTES, GPU_BANDWIDTH_EFFICIENCY, GPU_MATMUL_EFFICIENCY, CpuRates, Device, \
    step_cost, tokens_per_second

MiB, GiB = 2 ** 20, 2 ** 30
METHODS = ("lora", "dora", "qlora", "qdora", "full")
FIT_SHARE = 0.95  # leave 5% of a device for the caching allocator's rounding and fragmentation
NF4_DOUBLE_QUANT_BITS = 4 + 8 / 64 + 32 / (64 * 256)  # quant.blockwise: 8-bit scales per 64, fp32 per 256 scales
OPTIMIZER_STATE_BYTES = {"adamw": 8, "paged_adamw": 8, "adamw_8bit": 2, "paged_adamw_8bit": 2}


@dataclass(frozen=True)
class Run:
    """One way to train: what ``deltatune train`` would be told."""

    method: str = "lora"  # lora, dora, qlora, qdora or full
    r: int = 16
    dropout: float = 0.05
    targets: frozenset = frozenset(LINEARS)
    rows: int = 8
    seq_len: int = 512
    precision: str = "fp32"  # fp32 or bf16 (autocast; the base stays in base_dtype)
    base_dtype: str = "fp32"  # what deltatune train loads: float32; bf16 describes a 16-bit base
    gradient_checkpointing: bool = False
    cheap_recompute: bool = True
    activation_offload: bool = False
    optimizer: str = "adamw"
    world: int = 1
    strategy: str = "single"  # single, ddp or fsdp
    padded: bool = True
    labelled_share: float = 1.0
    all_linear: bool = True  # targets given as "all-linear" (on some MoE models it reaches experts and router)
    target_experts: bool = False  # deltatune train's --lora.target-experts (MoE models)

    @property
    def quantized(self) -> bool:
        return self.method in ("qlora", "qdora")

    @property
    def dora(self) -> bool:
        return self.method in ("dora", "qdora")


def parse_memory(text: str, name: str = "--gpu-memory") -> int:
    """Bytes in ``80GB``, ``80GiB``, ``24 G``, ``512MiB`` or a plain number of GB."""
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*(gib|gb|g|mib|mb|m|tib|tb|t)?\s*", str(text).lower())
    if not match:
        raise ValueError(f"{name}: {text!r} is not an amount of memory such as 80GB, 24GiB or 512MiB")
    number, unit = float(match.group(1)), match.group(2) or "gb"
    scale = {"gb": 10 ** 9, "g": 10 ** 9, "gib": GiB, "mb": 10 ** 6, "m": 10 ** 6, "mib": MiB,
             "tb": 10 ** 12, "t": 10 ** 12, "tib": 2 ** 40}[unit]
    if number <= 0:
        raise ValueError(f"{name}: {text!r} must be more than zero")
    return int(number * scale)


def experts_of(shape: ModelShape, run: Run) -> ExpertLora:
    """The LoRA ranks on an MoE layer's experts and router under ``run`` (zeros on a dense model)."""
    return expert_lora(shape, run.r, run.targets, run.all_linear, run.target_experts)


def trainable_parameters(shape: ModelShape, run: Run) -> int:
    """Adapter parameters (LoRA A and B, DoRA's magnitudes), or every parameter for ``full``; on an
    MoE model the attention's in every layer, the dense MLP's in dense layers, the experts' and
    router's in MoE layers."""
    if run.method == "full":
        return shape.parameters()
    ins, outs = shape.linear_inputs(), shape.linear_outputs()

    def per_block(names) -> int:
        return sum(run.r * (ins[n] + outs[n]) + (outs[n] if run.dora else 0) for n in names if n in ins)

    if not shape.moe:
        return shape.layers * per_block(run.targets)
    attention = frozenset(n for n in run.targets if n in ATTENTION_LINEARS)
    dense_mlp = dense_mlp_targets(shape, run.targets) - attention
    return shape.layers * per_block(attention) + shape.dense_layers * per_block(dense_mlp) \
        + shape.moe_layers * expert_lora_parameters(shape, experts_of(shape, run))


def base_weight_bytes(shape: ModelShape, run: Run) -> int:
    """Bytes of the base as stored: 4-bit linears with double-quantized scales, the rest (and
    every weight without 4-bit) in ``base_dtype``."""
    full = 2 if run.base_dtype == "bf16" else 4
    if not run.quantized:
        return shape.parameters() * full
    linear = shape.quantized_parameters()  # every linear and, on an MoE model, every expert
    return int(linear * NF4_DOUBLE_QUANT_BITS / 8) + shape.other_parameters() * full


def _activation_bytes(run: Run) -> tuple[int, int]:
    """(residual stream bytes, matmul output bytes) per element: float32 residuals with a float32
    base (autocast casts only matmul inputs), 16-bit matmul outputs under bf16 autocast."""
    residual = 2 if run.base_dtype == "bf16" else 4
    return residual, 2 if run.precision in ("bf16", "fp16") else residual


@dataclass
class Plan:
    """Per-rank memory terms (bytes), tokens/s and the roofline's parts."""

    shape: ModelShape
    run: Run
    memory: dict
    trainable: int
    tokens_per_s: float = 0.0
    speed: dict = field(default_factory=dict)

    @property
    def peak(self) -> int:
        return sum(self.memory.values())

    def to_json(self) -> dict:
        run = dataclasses.asdict(self.run)
        run["targets"] = sorted(self.run.targets)
        return {"model": dataclasses.asdict(self.shape), "run": run, "trainable_parameters": self.trainable,
                "memory_mib": {k: v / MiB for k, v in self.memory.items()}, "peak_mib": self.peak / MiB,
                "tokens_per_s": self.tokens_per_s, "speed": self.speed}


def memory_terms(shape: ModelShape, run: Run, runtime: int) -> tuple[dict, int]:
    """(the per-rank memory terms in bytes, trainable parameters) of ``run``."""
    world = run.world if run.strategy == "fsdp" else 1  # FSDP2 shards weights, adapter and states
    trainable = trainable_parameters(shape, run)
    step = StepShape(run.rows, run.seq_len, *_activation_bytes(run), padded=run.padded,
                     labelled_share=run.labelled_share)
    experts = experts_of(shape, run)
    acts = activations(shape, step, run.targets, run.r, effective_dropout(run.dropout, experts), run.dora,
                       run.gradient_checkpointing, run.cheap_recompute, experts=experts)
    base = base_weight_bytes(shape, run)
    memory = {"runtime": runtime, "base weights": -(-base // world)}
    if run.strategy == "fsdp":  # a block's weights gathered in the compute dtype, the next prefetched
        gathered = 2 if run.precision == "bf16" else (2 if run.base_dtype == "bf16" else 4)
        if run.quantized:  # gathered as packed bytes and scales, decoded one weight at a time
            gathered = NF4_DOUBLE_QUANT_BITS / 8
        memory["gathered blocks (FSDP2)"] = int(2 * shape.largest_block_parameters() * gathered)
    if run.quantized:  # one weight (on an MoE layer, one whole expert stack) decoded at a time for its matmul
        memory["4-bit decoded weight"] = largest_decoded_weight(shape) * _activation_bytes(run)[1]
    if run.quantized and shape.moe_layers and not (experts.gate_up or experts.down):
        # 4-bit experts without LoRA run the model's own experts forward, whose matmuls keep the
        # decoded weights for the input's gradient: every MoE layer's, or with checkpointing the
        # rebuilt layer's (LoRA on the experts decodes again in backward instead)
        layers = 1 if run.gradient_checkpointing else shape.moe_layers
        memory["decoded 4-bit experts kept for backward (no LoRA on them)"] = \
            layers * shape.expert_parameters() * _activation_bytes(run)[1]
    memory["adapter weights" if run.method != "full" else "trainable copy (full)"] = \
        0 if run.method == "full" else -(-trainable * 4 // world)
    memory["gradients"] = -(-trainable * 4 // world)
    if run.strategy == "ddp":  # DDP reduces gradients through buckets of its own
        memory["gradient buckets (DDP)"] = trainable * 4
    memory["optimizer states"] = -(-trainable * OPTIMIZER_STATE_BYTES.get(run.optimizer, 8) // world)
    saved = acts.saved
    if run.activation_offload:  # kept in pinned CPU memory; the device holds the working set
        saved = 0
    label = "activations kept for backward" + (" (block inputs, checkpointing)" if acts.checkpointed else
                                               " (cheap_recompute)" if acts.lean else "")
    memory[label] = saved
    block = acts.recompute_block + acts.backward_transient
    if acts.logits >= block:
        memory["working set: one chunk of logits in the loss"] = acts.logits
    else:
        memory["working set: one block's backward" + (" after rebuilding it" if acts.checkpointed else "")] = block
    return memory, trainable


def make_plan(shape: ModelShape, run: Run, device: Optional[Device], runtime: int,
              cpu_rates: Optional[CpuRates] = None, block_timer: Optional[Callable] = None) -> Plan:
    """The plan of ``run`` on ``device`` (None: this CPU, whose ``cpu_rates`` were measured, and
    whose ``block_timer`` (``plan_block.BlockTimer``) times a block of the run)."""
    memory, trainable = memory_terms(shape, run, runtime)
    lean = run.cheap_recompute and not run.gradient_checkpointing and run.rows * run.seq_len >= 1024
    cost = step_cost(shape, run.rows, run.seq_len, run.targets, run.r, run.method == "full", run.dora,
                     run.gradient_checkpointing, lean, run.quantized, _activation_bytes(run)[1], run.labelled_share,
                     experts_of(shape, run))
    low_rank = attention = None
    if device is None:
        rates = cpu_rates or CpuRates(1e11, 1e10, 1e10)
        flops_rate, low_rank, bandwidth, attention = rates.matmul, rates.low_rank, rates.bandwidth, rates.attention
        source = "measured on this CPU"
    else:
        peak = device.bf16_flops if run.precision in ("bf16", "fp16") else device.fp32_flops
        flops_rate, bandwidth = peak * GPU_MATMUL_EFFICIENCY, device.bandwidth * GPU_BANDWIDTH_EFFICIENCY
        source = (f"{device.name} data sheet x {GPU_MATMUL_EFFICIENCY} (matmul) and x {GPU_BANDWIDTH_EFFICIENCY} "
                  "(bandwidth): assumed, not measured")
    if run.strategy == "fsdp":  # each rank runs its own micro-batch; gathers overlap with compute
        cost.traffic["FSDP2 all-gathers"] = 0
    per_rank, compute, traffic = tokens_per_second(cost, flops_rate, bandwidth, low_rank, attention)
    speed = {"flops_per_step": cost.flops, "traffic_bytes_per_step": cost.traffic, "matmul_flops_per_s": flops_rate,
             "low_rank_flops_per_s": low_rank or flops_rate, "attention_flops_per_s": attention or flops_rate,
             "bandwidth_bytes_per_s": bandwidth, "rates": source, "seconds_in_matmuls": compute,
             "seconds_in_traffic": traffic, "tokens_per_s_per_rank": per_rank}
    if device is None and block_timer is not None:  # the blocks timed, the head and loss from the roofline
        head = cost.flops.get("output head and loss", 0) / flops_rate
        block = block_timer(run, (compute + traffic - head) / shape.layers)
        if block is not None:
            per_rank = cost.tokens / (shape.layers * block + head)
            speed.update({"roofline_tokens_per_s_per_rank": speed["tokens_per_s_per_rank"],
                          "block_seconds_measured": block, "seconds_in_blocks": shape.layers * block,
                          "seconds_in_head_and_loss": head, "tokens_per_s_per_rank": per_rank,
                          "rates": "measured on this CPU; one block timed at the run's micro-batch"})
    return Plan(shape, run, memory, trainable, per_rank * run.world, speed)


def gpu_runtime() -> int:
    """Device memory outside torch's tensors on a GPU (CUDA context, library workspaces)."""
    return CUDA_CONTEXT_BYTES


def cpu_runtime(tokenizer_folder: Optional[str] = None) -> int:
    """Resident bytes of this process once it carries what a training process carries besides
    its model and batch: torch, transformers, datasets and matplotlib (the loss plot) imported,
    the model's tokenizer loaded (when ``tokenizer_folder`` has one), and one step of a toy LoRA
    model run, which pages in the kernels' code and starts the thread pools."""
    import os

    import matplotlib
    import torch

    import deltatune.train.loop  # noqa: F401  (the training code, torch and transformers)

    matplotlib.use("Agg")
    import datasets  # noqa: F401
    import matplotlib.pyplot  # noqa: F401

    if tokenizer_folder:
        from transformers import AutoTokenizer

        try:
            AutoTokenizer.from_pretrained(tokenizer_folder)
        except (OSError, ValueError):  # a config without a tokenizer beside it
            pass
    _toy_step(torch)
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _toy_step(torch) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    from ..adapter_ops import add_adapter
    from ..config import LoraConfig
    from ..loss import TrainingLoss

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2)
    model = add_adapter(LlamaForCausalLM(config), LoraConfig(r=4, target_modules="all-linear"))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    ids = torch.randint(0, 64, (2, 16))
    TrainingLoss(model)({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}).backward()
    optimizer.step()


@dataclass
class Choice:
    """The first way that fits (or None), every way tried, and the command that runs it."""

    plan: Optional[Plan]
    tried: list
    memory: int
    command: str = ""

    @property
    def strategy(self) -> str:
        return describe(self.plan.run) if self.plan else "does not fit"


def describe(run: Run) -> str:
    """A few words for a way to run, e.g. ``FSDP2 on 8 devices, checkpointing``."""
    where = {"single": "one device", "ddp": f"DDP on {run.world} devices",
             "fsdp": f"FSDP2 on {run.world} devices"}[run.strategy]
    extras = [run.method] + (["experts targeted"] if run.target_experts else []) \
        + (["checkpointing"] if run.gradient_checkpointing else []) \
        + (["activation offload"] if run.activation_offload else [])
    return f"{where}, {', '.join(extras)}"


def ladder(run: Run, gpus: int, cuda: bool) -> list[Run]:
    """The ways to try, cheapest first: the run as asked (one device, or DDP on several), with
    checkpointing, FSDP2, then a 4-bit base (whole on each GPU, then sharded by FSDP2), then
    activations offloaded to CPU memory."""
    many = "ddp" if gpus > 1 else "single"
    four_bit = {"lora": "qlora", "dora": "qdora"}.get(run.method, run.method)
    steps = [dataclasses.replace(run, strategy=many, world=max(1, gpus))]
    if gpus > 1 and run.method in ("lora", "dora"):
        steps.append(dataclasses.replace(run, strategy="fsdp", world=gpus))
    steps.append(dataclasses.replace(run, method=four_bit, strategy=many, world=max(1, gpus)))
    if gpus > 1 and four_bit in ("qlora", "qdora"):  # FSDP2 shards the packed bytes too
        steps.append(dataclasses.replace(run, method=four_bit, strategy="fsdp", world=gpus))
    ways = []
    for way in steps:
        ways.append(way)
        if not way.gradient_checkpointing:
            ways.append(dataclasses.replace(way, gradient_checkpointing=True))
    if cuda:
        ways.append(dataclasses.replace(ways[-1], activation_offload=True))
    seen, unique = set(), []
    for way in ways:
        if way not in seen:
            seen.add(way)
            unique.append(way)
    return unique


def choose(shape: ModelShape, run: Run, gpus: int, memory: int, device: Optional[Device], runtime: int,
           cpu_rates: Optional[CpuRates] = None, block_timer: Optional[Callable] = None) -> Choice:
    """The first way in ``ladder`` whose per-rank peak fits ``FIT_SHARE`` of ``memory``."""
    tried = [make_plan(shape, way, device, runtime, cpu_rates, block_timer)
             for way in ladder(run, gpus, device is not None)]
    fits = [p for p in tried if p.peak <= FIT_SHARE * memory]
    return Choice(fits[0] if fits else None, tried, memory)


def command(plan: Plan, model: str, defaults: Run) -> str:
    """The ``deltatune train`` (or ``torchrun ... deltatune train``) command of ``plan``."""
    run = plan.run
    if run.method == "full":
        return "(none: deltatune train tunes adapters; full fine-tuning is planned for comparison only)"
    args = ["deltatune", "train"]
    if run.world > 1:
        args = ["torchrun", "--nproc-per-node", str(run.world), "-m", "deltatune", "train",
                "--distributed", run.strategy]
    if model:
        args += ["--model", model if "/" in model or "." in model else f"PATH/TO/{model}"]
    args += ["--data", "FILE"]
    if run.dora:
        args += ["--method", "dora"]
    if run.quantized:
        args += ["--quantize", "nf4"]
    args += ["--batch-size", str(run.rows), "--data.max-seq-len", str(run.seq_len)]
    if run.r != defaults.r:
        args += ["--lora.r", str(run.r)]
    if run.target_experts:
        args.append("--lora.target-experts")
    if run.precision != defaults.precision:
        args += ["--precision", run.precision]
    if run.optimizer != defaults.optimizer:
        args += ["--optimizer", run.optimizer]
    if run.gradient_checkpointing:
        args.append("--gradient-checkpointing")
    if run.activation_offload:
        args.append("--activation-offload")
    if not run.cheap_recompute:
        args.append("--no-cheap-recompute")
    return " ".join(args)
