"""Tokens per second from a roofline: a step's matmul FLOPs at the device's matmul rate plus its
element-wise traffic at the device's memory bandwidth.

On a CPU the rates are measured when the plan is made: every matmul shape of the model's linears
with as many rows as a micro-batch has positions, in the layouts of forward and backward, the
adapter's rank-r products on their own (they run far below a large matmul's rate), and a copy of a
large tensor; so the figure describes this machine as it is loaded now. On a GPU
they are the data-sheet peaks times an efficiency (``GPU_MATMUL_EFFICIENCY``,
``GPU_BANDWIDTH_EFFICIENCY``): an assumption until a GPU run measures it. The two terms are
added, not overlapped: each op of a training step is bound by one or the other, and a CPU runs
them one after the other.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional

from .plan_moe import dense_mlp_targets, expert_lora_flops_per_token, moe_elementwise_per_token
from .plan_shapes import ATTENTION_LINEARS

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


@dataclass(frozen=True)
class CpuRates:
    """Rates of this CPU measured at a run's shapes: FLOP/s of the base model's matmuls (forward
    and input-gradient orientations), of the adapter's rank-r matmuls, and copy bytes/s."""

    matmul: float
    low_rank: float
    bandwidth: float
    attention: Optional[float] = None  # FLOP/s of attention's forward and backward, where measured


MEASURED_ROWS = 2048  # rows beyond this run at the same rate; fewer keeps planning a big model quick


def _median_seconds(run, repeats: int) -> float:
    run()  # first call: allocation and kernel choice outside the timing
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return sorted(times)[len(times) // 2]


def measure_cpu(shapes: dict, rows: int, r: int, repeats: int = 3,
                attention_shape: Optional[tuple[int, int, int, int, int]] = None) -> CpuRates:
    """``CpuRates`` of this CPU now, with the threads training would use. ``shapes`` maps each
    (in, out) of a block's linears to how many linears have it; ``rows`` is the positions of a
    micro-batch. Each matmul a step runs for those linears is timed as the step lays it out
    (``x @ W.T`` forward, ``g @ W`` for the input gradient; the adapter's six rank-``r`` products),
    the median of ``repeats``; a rate is the FLOPs of all of them over their seconds, so each shape
    counts as often as the model has it. A 256 MiB copy gives the bandwidth; ``attention_shape``
    (see ``measure_attention``) the attention rate."""
    import torch

    rows = max(1, min(rows, MEASURED_ROWS))
    base = [0.0, 0.0]  # FLOPs, seconds
    low = [0.0, 0.0]
    for (fan_in, fan_out), count in shapes.items():
        x, g = torch.randn(rows, fan_in), torch.randn(rows, fan_out)
        w, a, b = torch.randn(fan_out, fan_in), torch.randn(r, fan_in), torch.randn(fan_out, r)
        xa, gb = x @ a.T, g @ b
        flops = 2 * rows * fan_in * fan_out
        base[0] += count * 2 * flops
        base[1] += count * (_median_seconds(lambda: x @ w.T, repeats) + _median_seconds(lambda: g @ w, repeats))
        products = (lambda: x @ a.T, lambda: xa @ b.T, lambda: g @ b, lambda: gb @ a, lambda: g.T @ xa,
                    lambda: gb.T @ x)
        low[0] += count * (3 * 2 * rows * r * fan_in + 3 * 2 * rows * r * fan_out)
        low[1] += count * sum(_median_seconds(p, repeats) for p in products)
    src = torch.ones(64 * 2 ** 20)  # 256 MiB
    dst = torch.empty_like(src)
    copy = _median_seconds(lambda: dst.copy_(src), repeats)
    attention = measure_attention(attention_shape, repeats) if attention_shape else None
    return CpuRates(base[0] / base[1], low[0] / low[1], 2 * src.numel() * 4 / copy, attention)  # read and write


def measure_attention(shape: tuple[int, int, int, int, int], repeats: int = 3) -> float:
    """FLOP/s of causal scaled-dot-product attention, forward and backward, at ``shape`` = (rows,
    heads, key/value heads, positions, head width): one block's attention as a step runs it (an
    attention kernel runs far below a large matmul's rate on a CPU). FLOPs as ``step_cost`` counts them."""
    import torch
    import torch.nn.functional as F

    rows, heads, _, seq, width = shape
    rows = max(1, min(rows, max(1, MEASURED_ROWS // seq)))
    # keys and values repeated to every head, as the model's attention hands them to the kernel
    q, k, v = (torch.randn(rows, heads, seq, width, requires_grad=True) for _ in range(3))
    grad = torch.randn(rows, heads, seq, width)

    def forward_backward():
        F.scaled_dot_product_attention(q, k, v, is_causal=True).backward(grad)

    flops = 3 * 2 * 2 * seq * heads * width / 2 * rows * seq  # forward over the causal half; backward twice
    return flops / _median_seconds(forward_backward, repeats)


@dataclass(frozen=True)
class StepCost:
    """FLOPs and element-wise bytes of one optimizer step on one rank, the parts named."""

    flops: dict
    traffic: dict
    tokens: int


def step_cost(shape, rows: int, seq_len: int, targets: frozenset, r: int, full: bool, dora: bool,
              checkpointing: bool, lean: bool, quantized: bool, act_bytes: int, labelled_share: float,
              experts=None) -> StepCost:
    """Count one step: forward, backward (input gradients through the frozen base; weight
    gradients for the adapter only, unless ``full``), rebuilt forwards under checkpointing. On an
    MoE model (``experts``: ``plan_moe.ExpertLora``) each token runs its top-k experts and the
    router; 4-bit dequantization decodes every expert."""
    T = rows * seq_len
    ins, outs = shape.linear_inputs(), shape.linear_outputs()
    moe = getattr(shape, "moe", False)
    base = shape.active_parameters() if moe else shape.layers * shape.block_linear_parameters()
    adapter = shape.layers * sum(r * (ins[n] + outs[n]) for n in targets if n in ins)
    if moe:
        adapter = _moe_adapter(shape, targets, r, experts)
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
        if moe:  # DoRA adapts modules only: the attention, and the dense MLP of dense layers
            norms = {n: 2 * r * ins[n] * outs[n] for n in dense_mlp_targets(shape, targets) if n in ins}
            flops["DoRA norms"] = sum(v * (shape.layers if n in ATTENTION_LINEARS else shape.dense_layers)
                                      for n, v in norms.items())
    kvd = shape.kv_heads * shape.head_dim
    # element-wise passes of a block's forward, in elements per token: two norms (about five
    # passes each), two residual adds, rotary embeddings on q and k, the key/value repeat,
    # the attention output's transpose, SiLU and the gated product, each adapter's dropout copy
    per_token = (16 * shape.hidden + 6 * (qd + kvd) + 2 * 2 * qd + 2 * qd + 5 * shape.intermediate
                 + 2 * sum(ins[n] for n in targets if n in ins))
    passes = 3 + (1 if checkpointing else 0) + (0.5 if lean else 0)  # backward reads and writes about twice
    traffic = {"element-wise ops": passes * per_token * shape.layers * T * act_bytes}
    if moe:  # MoE layers: the experts' element-wise work in place of the dense MLP's
        dense_mlp = 5 * shape.intermediate + 2 * sum(ins[n] for n in targets if n in ins and n not in ATTENTION_LINEARS)
        moe_token = per_token - dense_mlp + moe_elementwise_per_token(shape)
        traffic["element-wise ops"] = passes * (per_token * shape.dense_layers + moe_token * shape.moe_layers) \
            * T * act_bytes
    if quantized:  # each 4-bit weight is decoded to a full matrix in forward, backward (and rebuild)
        stored = shape.quantized_parameters() if moe else base  # every expert is decoded, not only the top-k
        traffic["4-bit dequantization"] = (2 + checkpointing) * stored * (0.5 + act_bytes)
    return StepCost(flops, traffic, T)



def _moe_adapter(shape, targets: frozenset, r: int, experts) -> int:
    """LoRA parameters one token's forward multiplies on an MoE model: the attention's in every
    layer, the dense MLP's in dense layers, its k experts' and the router's in MoE layers."""
    ins, outs = shape.linear_inputs(), shape.linear_outputs()
    attention = sum(r * (ins[n] + outs[n]) for n in targets if n in ATTENTION_LINEARS)
    dense_mlp = sum(r * (ins[n] + outs[n]) for n in dense_mlp_targets(shape, targets)
                    if n in ins and n not in ATTENTION_LINEARS)
    per_moe = expert_lora_flops_per_token(shape, experts) if experts is not None else 0
    return shape.layers * attention + shape.dense_layers * dense_mlp + shape.moe_layers * per_moe


LOW_RANK_PARTS = ("adapter forward + backward", "DoRA norms")  # products with a side of r


def tokens_per_second(cost: StepCost, matmul_flops: float, bandwidth: float, low_rank_flops: Optional[float] = None,
                      attention_flops: Optional[float] = None) -> tuple[float, float, float]:
    """(tokens/s, seconds in matmuls, seconds in element-wise traffic) of one step; the adapter's
    rank-r products at ``low_rank_flops`` and attention at ``attention_flops`` where they are known
    (both run far below a large matmul's rate on a CPU)."""
    rate = {part: low_rank_flops or matmul_flops for part in LOW_RANK_PARTS}
    rate["attention"] = attention_flops or matmul_flops
    compute = sum(f / rate.get(part, matmul_flops) for part, f in cost.flops.items())
    memory = sum(cost.traffic.values()) / bandwidth
    return cost.tokens / (compute + memory), compute, memory
