"""The table of what fits where: 7B, 13B and 70B LoRA runs on 1-8 GPUs of 24, 48 and 80 GB, each
cell the planner's first way that fits (``plan.choose``), its per-rank peak and tokens/s."""

from __future__ import annotations

from .plan import GiB, Run, choose
from .plan_shapes import load_shape
from .plan_speed import CUDA_CONTEXT_BYTES, DEVICES

MODELS = ("llama-2-7b", "llama-2-13b", "llama-2-70b")
GPUS = (1, 2, 4, 8)
# a GPU of each memory class for the speed figures
CLASSES = {24: "rtx4090", 48: "l40s", 80: "h100"}
TABLE_RUN = Run(rows=2, seq_len=2048, precision="bf16")  # LoRA r=16 on all linears, AdamW, fp32 base


def cell(model: str, gpus: int, gb: int) -> str:
    """``way, peak GiB, tokens/s`` of ``model`` on ``gpus`` GPUs of ``gb`` GB."""
    device = DEVICES[CLASSES[gb]]
    choice = choose(load_shape(model), TABLE_RUN, gpus, gb * 10 ** 9, device, CUDA_CONTEXT_BYTES)
    if choice.plan is None:
        return "does not fit"
    run = choice.plan.run
    way = {"single": "1 GPU", "ddp": "DDP", "fsdp": "FSDP2"}[run.strategy]
    extras = ([run.method] if run.method != "lora" else []) + (["ckpt"] if run.gradient_checkpointing else []) \
        + (["offload"] if run.activation_offload else [])
    label = way + (" + " + " + ".join(extras) if extras else "")
    return f"{label}: {choice.plan.peak / GiB:.0f} GiB, {choice.plan.tokens_per_s / 1000:.1f}k tok/s"


def table_markdown() -> str:
    """The table as Markdown, with how it was made under it."""
    lines = ["| model | GPUs | 24 GB (RTX 4090 rates) | 48 GB (L40S rates) | 80 GB (H100 rates) |",
             "|---|---|---|---|---|"]
    for model in MODELS:
        for gpus in GPUS:
            lines.append(f"| {model} | {gpus} | " + " | ".join(cell(model, gpus, gb) for gb in CLASSES) + " |")
    lines.append("")
    lines.append("Planned by `deltatune plan --table`, not measured: LoRA r=16 on all linear layers, AdamW, the "
                 "float32 base deltatune train loads, bf16 autocast, micro-batch 2 x 2048 tokens per GPU; each cell "
                 "is the first way that fits 95% of a GPU (one GPU or DDP, with checkpointing, FSDP2, a 4-bit "
                 "base, activation offload), its per-GPU peak and the tokens/s of all GPUs together at an assumed "
                 "45% of the data-sheet bf16 rate.")
    return "\n".join(lines)
