"""Tokens per second from a roofline: a step's matmul FLOPs at the device's matmul rate plus its
element-wise traffic at the device's memory bandwidth.

On a CPU both rates are measured when the plan is made (a float32 matmul of the model's widths
with as many rows as a micro-batch has positions, a copy of a large tensor), so the figure describes this machine as it is loaded now. On a GPU
they are the data-sheet peaks times an efficiency (``GPU_MATMUL_EFFICIENCY``,
``GPU_BANDWIDTH_EFFICIENCY``): an assumption until a GPU run measures it. The two terms are
added, not overlapped: each op of a training step is bound by one or the other, and a CPU runs
them one after the other.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

GIB = 2 ** 30
# Usual shares of peak for LoRA training of 7B-70B models in bf16 (published MFU of 35-55%
# for fine-tuning); assumptions until measured on a GPU with deltatune.
GPU_MATMUL_EFFICIENCY = 0.45
GPU_BANDWIDTH_EFFICIENCY = 0.7
CUDA_CONTEXT_BYTES = 600 * 2 ** 20  # CUDA context, cuBLAS workspace and kernels: outside torch's allocator


@dataclass(frozen=True)
class Device:
    """A device's memory and rates: dense bf16 matmul FLOP/s, float32 matmul FLOP/s, bytes/s."""

    name: str
    memory: int
    bf16_flops: float
    fp32_flops: float
    bandwidth: float


# Data-sheet figures (dense, no sparsity); fp32 is TF32 tensor-core rate where the GPU has one.
DEVICES: dict[str, Device] = {
    "h200": Device("H200", 141 * 10 ** 9, 989e12, 494e12, 4.8e12),
    "h100": Device("H100 SXM", 80 * 10 ** 9, 989e12, 494e12, 3.35e12),
    "a100-80gb": Device("A100 80GB", 80 * 10 ** 9, 312e12, 156e12, 2.0e12),
    "a100-40gb": Device("A100 40GB", 40 * 10 ** 9, 312e12, 156e12, 1.55e12),
    "l40s": Device("L40S", 48 * 10 ** 9, 362e12, 183e12, 0.864e12),
    "a6000": Device("RTX A6000", 48 * 10 ** 9, 155e12, 77e12, 0.768e12),
    "a10": Device("A10", 24 * 10 ** 9, 125e12, 62e12, 0.6e12),
    "rtx4090": Device("RTX 4090", 24 * 10 ** 9, 165e12, 83e12, 1.0e12),
}


def measure_cpu(hidden: int, intermediate: int, rows: int = 1024, repeats: int = 3) -> tuple[float, float]:
    """(float32 matmul FLOP/s, copy bytes/s) of this CPU now, with the threads training would use:
    the best of ``repeats`` timings of ``(rows x hidden) @ (hidden x intermediate)`` (``rows``: the
    positions of a micro-batch, as the run's matmuls have) and of a 256 MiB copy."""
    import torch

    a, b = torch.randn(rows, hidden), torch.randn(hidden, intermediate)
    out = a @ b  # first call: allocation and kernel choice outside the timing
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        torch.matmul(a, b, out=out)
        best = min(best, time.perf_counter() - started)
    flops = 2 * rows * hidden * intermediate / best
    src = torch.ones(64 * 2 ** 20)  # 256 MiB
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - started)
    return flops, 2 * src.numel() * 4 / best  # read and write


@dataclass(frozen=True)
class StepCost:
    """FLOPs and element-wise bytes of one optimizer step on one rank, the parts named."""

    flops: dict
    traffic: dict
    tokens: int


def step_cost(shape, rows: int, seq_len: int, targets: frozenset, r: int, full: bool, dora: bool,
              checkpointing: bool, lean: bool, quantized: bool, act_bytes: int, labelled_share: float) -> StepCost:
    """Count one step: forward, backward (input gradients through the frozen base; weight
    gradients for the adapter only, unless ``full``), rebuilt forwards under checkpointing."""
    T = rows * seq_len
    ins, outs = shape.linear_inputs(), shape.linear_outputs()
    base = shape.layers * shape.block_linear_parameters()
    adapter = shape.layers * sum(r * (ins[n] + outs[n]) for n in targets if n in ins)
    qd = shape.heads * shape.head_dim
    # QK^T and AV over the causal half of the positions, forward; backward is twice that
    attention = shape.layers * 2 * 2 * seq_len * qd / 2
    head = 2 * shape.hidden * shape.vocab * labelled_share  # logits and their input gradient, loss rows only
    flops = {"base forward": 2 * base * T, "base backward (input gradients)": 2 * base * T,
             "adapter forward + backward": 6 * adapter * T, "attention": 3 * attention * T,
             "output head and loss": 2 * head * T}
    if full:
        flops["base weight gradients"] = 2 * base * T
    if checkpointing:
        flops["rebuilt forward (checkpointing)"] = (2 * base + 2 * adapter + attention) * T
    if dora:  # the weight norm from the factors, once per step per adapted linear
        flops["DoRA norms"] = shape.layers * sum(2 * r * ins[n] * outs[n] for n in targets if n in ins)
    kvd = shape.kv_heads * shape.head_dim
    # element-wise passes of a block's forward, in elements per token: two norms (about five
    # passes each), two residual adds, rotary embeddings on q and k, the key/value repeat,
    # the attention output's transpose, SiLU and the gated product, each adapter's dropout copy
    per_token = (16 * shape.hidden + 6 * (qd + kvd) + 2 * 2 * qd + 2 * qd + 5 * shape.intermediate
                 + 2 * sum(ins[n] for n in targets if n in ins))
    passes = 3 + (1 if checkpointing else 0) + (0.5 if lean else 0)  # backward reads and writes about twice
    traffic = {"element-wise ops": passes * per_token * shape.layers * T * act_bytes}
    if quantized:  # each 4-bit weight is decoded to a full matrix in forward, backward (and rebuild)
        traffic["4-bit dequantization"] = (2 + checkpointing) * base * (0.5 + act_bytes)
    return StepCost(flops, traffic, T)


def tokens_per_second(cost: StepCost, matmul_flops: float, bandwidth: float) -> tuple[float, float, float]:
    """(tokens/s, seconds in matmuls, seconds in element-wise traffic) of one step."""
    compute = sum(cost.flops.values()) / matmul_flops
    memory = sum(cost.traffic.values()) / bandwidth
    return cost.tokens / (compute + memory), compute, memory
