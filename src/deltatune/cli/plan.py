"""``deltatune plan``: per-rank peak memory (term by term), tokens/s, the way to run that fits and
its command, without loading any weights. ``--table`` prints what fits where for 7B-70B models."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Optional

from ..data import DataConfig
from ..train.config import LoraOptions, TrainConfig
from .options import add_config_command


@dataclass
class PlanConfig:
    """What to plan; the defaults describe the run ``deltatune train`` does with no flags."""

    model: str = ""
    """Hugging Face model folder, config.json, .gguf file or a preset (llama-2-7b, llama-2-13b, llama-2-70b, llama-3-8b, llama-3-70b, llama-3.2-1b, and the mixture-of-experts qwen3-30b-a3b, mixtral-8x7b); empty: the embedded default model."""
    method: str = "lora"
    """lora, dora, qlora (4-bit NF4 base), qdora, or full (fine-tuning every weight, for comparison)."""
    r: int = LoraOptions.r
    """LoRA rank."""
    dropout: float = LoraOptions.lora_dropout
    """LoRA dropout (its dropped positions are kept for backward)."""
    target_modules: list = field(default_factory=lambda: ["all-linear"])
    """Adapted linears: all-linear or names among q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj."""
    target_experts: bool = False
    """Mixture-of-experts models: LoRA on every expert's fused gate_up_proj and down_proj too, as deltatune train's --lora.target-experts (on Qwen3-MoE, Mixtral and OLMoE all-linear reaches them already, as in PEFT)."""
    batch: int = TrainConfig.batch_size
    """Rows per micro-batch on each rank."""
    seq_len: int = DataConfig.max_seq_len
    """Tokens per row (rows padded to this length)."""
    gpus: int = 0
    """Number of GPUs; 0: plan for this machine's CPU."""
    gpu: str = ""
    """GPU for the speed figures: h200, h100, a100-80gb, a100-40gb, l40s, a6000, a10, rtx4090; empty: h100."""
    gpu_memory: str = ""
    """Memory of each GPU, e.g. 80GB, 24GiB; empty: the GPU's own."""
    precision: str = "auto"
    """fp32 or bf16 autocast; auto: bf16 on a GPU, on a CPU what deltatune train's auto picks here."""
    base_dtype: str = "fp32"
    """fp32 (what deltatune train loads) or bf16 (a 16-bit base, for comparison)."""
    gradient_checkpointing: bool = TrainConfig.gradient_checkpointing
    """Plan with gradient checkpointing from the start (the planner also tries it when needed)."""
    cheap_recompute: bool = TrainConfig.cheap_recompute
    """As deltatune train's --cheap-recompute."""
    optimizer: str = TrainConfig.optimizer
    """adamw, adamw_8bit, paged_adamw or paged_adamw_8bit."""
    padded: bool = True
    """Rows of different lengths in a batch (SDPA then keeps a mask per layer)."""
    labelled_share: float = 1.0
    """Share of positions whose next token is trained (the loss projects only those)."""
    json: str = ""
    """Also write the plan as JSON to this file."""
    table: bool = False
    """Print the table of what fits where (7B, 13B, 70B on 24/48/80 GB, 1-8 GPUs) instead."""


def add_parser(subcommands) -> None:
    add_config_command(subcommands, "plan", "predict memory and speed of a training run, and how to run it",
                       PlanConfig, run)


def _targets(cfg: PlanConfig) -> frozenset:
    from ..distributed.plan_shapes import LINEARS

    names = cfg.target_modules if isinstance(cfg.target_modules, list) else [cfg.target_modules]
    if names == ["all-linear"]:
        return frozenset(LINEARS)
    unknown = [n for n in names if n not in LINEARS]
    if unknown or not names:
        raise ValueError(f"--target-modules: {unknown or names} — use all-linear or names among {', '.join(LINEARS)}")
    return frozenset(names)


def _checked(cfg: PlanConfig):
    from ..distributed.plan import METHODS, OPTIMIZER_STATE_BYTES, Run, parse_memory
    from ..distributed.plan_speed import DEVICES

    if cfg.method not in METHODS:
        raise ValueError(f"--method: {cfg.method!r} is not one of {', '.join(METHODS)}")
    for name in ("r", "batch", "seq_len"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')}: {getattr(cfg, name)} must be at least 1")
    if cfg.gpus < 0:
        raise ValueError(f"--gpus: {cfg.gpus} must be 0 (this CPU) or more")
    gpu = cfg.gpu or "h100"
    if gpu not in DEVICES:
        raise ValueError(f"--gpu: {cfg.gpu!r} is not one of {', '.join(DEVICES)}")
    device = DEVICES[gpu] if cfg.gpus else None
    memory = parse_memory(cfg.gpu_memory) if cfg.gpu_memory else (device.memory if device else 0)
    if cfg.gpu_memory and not cfg.gpus:
        raise ValueError("--gpu-memory: give --gpus too (with --gpus 0 the plan is for this machine's memory)")
    if cfg.precision not in ("auto", "fp32", "bf16"):
        raise ValueError(f"--precision: {cfg.precision!r} is not auto, fp32 or bf16")
    if cfg.base_dtype not in ("fp32", "bf16"):
        raise ValueError(f"--base-dtype: {cfg.base_dtype!r} is not fp32 or bf16")
    if cfg.optimizer not in OPTIMIZER_STATE_BYTES:
        raise ValueError(f"--optimizer: {cfg.optimizer!r} is not one of {', '.join(OPTIMIZER_STATE_BYTES)}")
    if not 0 < cfg.labelled_share <= 1:
        raise ValueError(f"--labelled-share: {cfg.labelled_share} must be in (0, 1]")
    precision = cfg.precision
    if precision == "auto":
        import torch

        from ..hardware import auto_precision

        precision = "bf16" if device else auto_precision(torch.device("cpu"))
    base = Run(method=cfg.method, r=cfg.r, dropout=cfg.dropout, targets=_targets(cfg), rows=cfg.batch,
               seq_len=cfg.seq_len, precision=precision, base_dtype=cfg.base_dtype,
               gradient_checkpointing=cfg.gradient_checkpointing, cheap_recompute=cfg.cheap_recompute,
               optimizer=cfg.optimizer, padded=cfg.padded, labelled_share=cfg.labelled_share,
               all_linear=_all_linear(cfg), target_experts=cfg.target_experts)
    return base, device, memory


def _all_linear(cfg: PlanConfig) -> bool:
    names = cfg.target_modules if isinstance(cfg.target_modules, list) else [cfg.target_modules]
    return names == ["all-linear"]


def _check_moe(shape, run) -> None:
    """Refuse, naming the flag, what deltatune train would refuse on this model's experts."""
    from ..distributed.plan import experts_of

    experts = experts_of(shape, run)  # raises for half of a fused gate/up pair
    if run.target_experts and not shape.moe:
        raise ValueError(f"--target-experts: {shape.name} is not a mixture-of-experts model")
    if run.dora and experts.adapted:
        raise ValueError(f"--method {run.method}: DoRA does not adapt expert or router parameters "
                         f"({experts.describe()} on {shape.name}); use --method lora/qlora, or --target-modules "
                         "with attention names only")


def plan_for(cfg: PlanConfig):
    """(choice, the run as asked) for ``cfg``: on this CPU, rates and runtime measured now."""
    from ..distributed.plan import Run, choose, command, cpu_runtime, gpu_runtime
    from ..distributed.plan_shapes import load_shape
    from ..distributed.plan_block import BlockTimer
    from ..distributed.plan_speed import measure_cpu
    from ..distributed.processes import device_memory_bytes

    base, device, memory = _checked(cfg)
    shape = load_shape(cfg.model)
    _check_moe(shape, base)
    if device is None:
        import torch

        from ..hardware import set_cpu_threads

        set_cpu_threads()  # the threads deltatune train would use
        from ..distributed.plan_shapes import tokenizer_folder

        # rates at this run's shapes: small matmuls run well below a large one's rate
        rates = measure_cpu(shape.linear_shapes(), rows=cfg.batch * cfg.seq_len, r=cfg.r,
                            attention_shape=(cfg.batch, shape.heads, shape.kv_heads, cfg.seq_len, shape.head_dim))
        runtime = cpu_runtime(tokenizer_folder(cfg.model))  # before any block is timed in this process
        memory = device_memory_bytes(torch.device("cpu"))
        timer = None if shape.moe else BlockTimer(shape)  # the timed block is a dense Llama one: roofline for MoE
    else:
        runtime, rates, timer = gpu_runtime(), None, None
    choice = choose(shape, base, cfg.gpus, memory, device, runtime, rates, timer)
    if choice.plan is not None:
        choice.command = command(choice.plan, cfg.model, Run())
    return choice, base


def _lines(choice, cfg: PlanConfig) -> list[str]:
    from ..distributed.plan import MiB, describe

    shown = choice.plan or min(choice.tried, key=lambda p: p.peak)
    shape, run = shown.shape, shown.run
    where = f"{cfg.gpus} x {choice.memory / 10 ** 9:.0f} GB" if cfg.gpus else f"this CPU ({choice.memory / 2**30:.0f} GiB)"
    packed = (" (linears and experts 4-bit NF4)" if shape.moe else " (linears 4-bit NF4)") if run.quantized else ""
    lines = [f"model: {shape.name} ({shape.parameters() / 1e9:.3g}B parameters: {shape.layers} layers, hidden "
             f"{shape.hidden}, intermediate {shape.intermediate}, {shape.heads}/{shape.kv_heads} heads, vocab {shape.vocab})",
             f"run: {describe(run)}; {run.rows} x {run.seq_len} tokens per rank, precision {run.precision}, base "
             f"{run.base_dtype}{packed}, r={run.r}, "
             f"{shown.trainable:,d} trainable parameters; on {where}",
             "per-rank memory:"]
    if shape.moe:
        lines[1:1] = _moe_lines(shape, run)
    width = max(len(k) for k in shown.memory)
    lines += [f"  {k:<{width}}  {v / MiB:>11,.0f} MiB" for k, v in shown.memory.items()]
    lines.append(f"  {'peak':<{width}}  {shown.peak / MiB:>11,.0f} MiB")
    s = shown.speed
    rates = f"{s['matmul_flops_per_s'] / 1e12:.3g} TFLOP/s"
    if s["low_rank_flops_per_s"] != s["matmul_flops_per_s"] or s["attention_flops_per_s"] != s["matmul_flops_per_s"]:
        rates += (f"; rank-r products {s['low_rank_flops_per_s'] / 1e12:.3g}, attention "
                  f"{s['attention_flops_per_s'] / 1e12:.3g}")
    roofline = (f"{s['seconds_in_matmuls']:.3g} s of matmuls at {rates} + {s['seconds_in_traffic']:.3g} s of "
                f"element-wise traffic at {s['bandwidth_bytes_per_s'] / 1e9:.3g} GB/s per step")
    if "block_seconds_measured" in s:
        lines.append(f"speed: {shown.tokens_per_s:,.0f} tokens/s ({shown.run.rows}x{shown.run.seq_len} a micro-batch: "
                     f"{s['seconds_in_blocks']:.3g} s in blocks, one timed here at {s['block_seconds_measured']:.3g} s, "
                     f"+ {s['seconds_in_head_and_loss']:.3g} s in the head and loss; the roofline alone says "
                     f"{s['roofline_tokens_per_s_per_rank'] * shown.run.world:,.0f} tokens/s: {roofline})")
    else:
        lines.append(f"speed: {shown.tokens_per_s:,.0f} tokens/s ({roofline}; rates {s['rates']})")
    lines.append("tried: " + "; ".join(f"{describe(p.run)}: {p.peak / 2**30:.1f} GiB" for p in choice.tried))
    if choice.plan is None:
        lines.append(f"fits: nothing tried fits 95% of {where}")
    else:
        lines.append(f"fits: {choice.strategy}\ncommand: {choice.command}")
    return lines


def _moe_lines(shape, run) -> list[str]:
    """What the plan says of a mixture-of-experts model: its experts and which of them take LoRA."""
    from ..distributed.plan import experts_of

    experts = experts_of(shape, run)
    dense = f", {shape.dense_layers} dense layers of intermediate {shape.intermediate}" if shape.dense_layers else ""
    if shape.former_names and run.all_linear:
        how = "all-linear reaches them on this model, as in PEFT" + ("; --target-experts adds nothing more"
                                                                     if run.target_experts else "")
    elif run.target_experts:
        how = "--target-experts"
    else:
        how = "add --target-experts to adapt them" if not (experts.gate_up or experts.down) else "--target-modules"
    return [f"mixture of experts: {shape.moe_layers} MoE layers of {shape.experts} experts (intermediate "
            f"{shape.expert_intermediate}), top-{shape.top_k} per token{dense}; "
            f"{shape.active_parameters() / 1e9:.3g}B linear and expert weights active per token",
            f"experts: LoRA on {experts.describe()} ({how})"
            + ("; lora_dropout 0 (parameters adapted)" if experts.adapted and run.dropout else "")]


def run(cfg: PlanConfig) -> int:
    if cfg.table:
        from ..distributed.plan_table import table_markdown

        print(table_markdown())
        return 0
    choice, _ = plan_for(cfg)
    print("\n".join(_lines(choice, cfg)))
    if cfg.json:
        from ..files import write_text_atomically

        shown = choice.plan or min(choice.tried, key=lambda p: p.peak)
        result = {**shown.to_json(), "fits": choice.plan is not None, "strategy": choice.strategy,
                  "command": choice.command, "device_memory_bytes": choice.memory,
                  "tried": [{"strategy": p.run.strategy, "method": p.run.method,
                             "checkpointing": p.run.gradient_checkpointing, "peak_mib": p.peak / 2**20}
                            for p in choice.tried]}
        write_text_atomically(cfg.json, json.dumps(result, indent=2) + "\n")
    return 0


def plan_json(cfg: PlanConfig) -> Optional[dict]:
    """The chosen (or smallest) plan of ``cfg`` as JSON, for scripts."""
    choice, _ = plan_for(cfg)
    shown = choice.plan or min(choice.tried, key=lambda p: p.peak)
    return {**shown.to_json(), "fits": choice.plan is not None, "strategy": choice.strategy, "command": choice.command}
