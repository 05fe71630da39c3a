"""Bytes a training step keeps for backward, derived op by op from a decoder's shape.

The terms follow what autograd actually saves in a deltatune LoRA step on a Llama-style block
(``benchmarks/saved_activations.py`` lists the saved tensors by shape for the default model):

- the residual stream entering each norm (the norm's backward reads its input);
- each norm's output, where a LoRA layer reads it (the fused LoRA op keeps its input ``x``);
- the attention's query, key and value, keys and values repeated to every query head as
  transformers' SDPA path does, its output (shared with the output projection's input) and its
  log-sum-exp per head and row; the (rows, 1, L, L) mask when the batch is padded;
- the MLP's gate and up projections, the activation ``act(gate)`` and the product that feeds
  the down projection;
- per adapted linear: the rank-r product ``dropout(x) Aᵀ`` and the dropped positions (int64,
  about ``p`` of the input's elements), DoRA's low-rank output too.

``cheap_recompute`` (micro-batches of at least ``MIN_TOKENS`` positions) rebuilds the norm
outputs, ``act(gate)`` and the product in backward, so they are not kept; gradient
checkpointing keeps only each block's input and rebuilds one block at a time in backward.
Layer 0's input is the embedding output, which needs no gradient, and the final norm's input is
kept instead: one residual per layer either way.

On a mixture-of-experts model an MoE layer keeps the attention's terms and, in place of the dense
MLP's, those of ``plan_moe.moe_mlp_saved_bytes``; dense layers (Qwen3-MoE's ``mlp_only_layers``)
keep the dense block's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..kernels.cross_entropy import CHUNK_ELEMENTS
from .plan_moe import ExpertLora, dense_mlp_targets, moe_backward_transient, moe_mlp_saved_bytes
from ..train.recompute import MIN_TOKENS as RECOMPUTE_MIN_TOKENS

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
DROPOUT_INDEX_BYTES = 8  # the dropped positions are int64 flat indices
SPARSE_DROPOUT_LIMIT = 0.25  # kernels.sparse_dropout.SPARSE_LIMIT: above it a bool mask is kept


@dataclass(frozen=True)
class StepShape:
    """One micro-batch on one rank and how its activations are stored."""

    rows: int
    seq_len: int
    residual_bytes: int  # the residual stream and norm outputs (float32 unless the base is 16-bit)
    matmul_bytes: int  # outputs of matmuls: 2 under bf16/fp16 autocast, else the residual's
    padded: bool = True  # rows of different lengths: SDPA gets (and keeps) a mask
    labelled_share: float = 1.0  # positions whose next token is trained

    @property
    def tokens(self) -> int:
        return self.rows * self.seq_len


def _adapted(targets: frozenset, names: tuple) -> list:
    return [n for n in names if n in targets]


def block_saved_bytes(shape, step: StepShape, targets: frozenset, r: int, dropout: float,
                      dora: bool, lean: bool) -> dict[str, int]:
    """Bytes one decoder block keeps for backward, by kind (``lean``: cheap_recompute's set)."""
    T, H, I = step.tokens, shape.hidden, shape.intermediate
    qd, kvd = shape.heads * shape.head_dim, shape.heads * shape.head_dim  # keys/values repeated to every head
    res, mm = step.residual_bytes, step.matmul_bytes
    qkv_adapted = bool(_adapted(targets, ATTENTION[:3]))
    gate_up_adapted = bool(_adapted(targets, MLP[:2]))
    terms = {
        "residual inputs": 2 * T * H * res,
        "norm outputs": 0 if lean else T * H * res * (qkv_adapted + gate_up_adapted),
        "query, key, value": T * (qd + 2 * kvd) * mm,
        "attention output": T * qd * mm,
        "log-sum-exp": step.rows * shape.heads * step.seq_len * 4,
        "attention mask": step.rows * step.seq_len ** 2 * 4 if step.padded else 0,
        "gate and up": 2 * T * I * mm,
        "act(gate), product": 0 if lean else T * I * mm * (1 + ("down_proj" in targets)),
    }
    inputs = shape.linear_inputs()
    outputs = shape.linear_outputs()
    low_rank = drop = extra = 0
    for name in targets:
        if name not in inputs:
            continue
        low_rank += T * r * mm
        if 0 < dropout <= SPARSE_DROPOUT_LIMIT:
            drop += int(dropout * T * inputs[name]) * DROPOUT_INDEX_BYTES
        elif dropout > SPARSE_DROPOUT_LIMIT:
            drop += T * inputs[name]  # a bool mask
        if dora:
            extra += T * outputs[name] * mm  # the fused DoRA op keeps its low-rank output
    terms["LoRA rank-r products"] = low_rank
    terms["dropout positions"] = drop
    if dora:
        terms["DoRA low-rank outputs"] = extra
    return terms


def moe_block_saved_bytes(shape, step: StepShape, targets: frozenset, r: int, dropout: float, dora: bool,
                          lean: bool, experts: ExpertLora) -> dict[str, int]:
    """Bytes one MoE layer keeps for backward: the attention's terms of ``block_saved_bytes``, the
    MLP's replaced by the experts' (``plan_moe.moe_mlp_saved_bytes``)."""
    attention = frozenset(n for n in targets if n in ATTENTION)
    terms = block_saved_bytes(shape, step, attention, r, dropout, dora, lean)
    moe = moe_mlp_saved_bytes(shape, step.tokens, step.residual_bytes, step.matmul_bytes, experts, lean)
    terms["norm outputs"] += moe.pop("norm output (router LoRA)")
    terms["LoRA rank-r products"] += moe.pop("expert LoRA rank-r products")
    terms.update(moe)
    return terms


def block_backward_transient(shape, step: StepShape) -> int:
    """Gradients alive at once inside one block's backward: in the MLP, the down projection's
    input gradient beside the two gradients of the gated product (3 x tokens x intermediate),
    plus the residual gradient entering and leaving the block."""
    T = step.tokens
    mlp = 3 * T * shape.intermediate * step.matmul_bytes
    attention = 4 * T * shape.heads * shape.head_dim * step.matmul_bytes
    return max(mlp, attention) + 2 * T * shape.hidden * step.residual_bytes


def loss_bytes(shape, step: StepShape) -> tuple[int, int]:
    """(kept, transient) of the chunked loss: the gradient of the labelled hidden states is kept
    from forward to backward; during forward, the gathered labelled hidden states and one chunk
    of float32 logits (at most ``CHUNK_ELEMENTS``) twice over: ``torch.logsumexp`` materialises
    ``logits - max`` beside them (measured: the loss's peak is two chunks)."""
    labelled = max(1, int(step.tokens * step.labelled_share))
    kept = labelled * shape.hidden * step.residual_bytes
    chunk_rows = min(labelled, max(1, CHUNK_ELEMENTS // shape.vocab))
    logits = 2 * chunk_rows * shape.vocab * 4
    if step.matmul_bytes < 4:  # the 16-bit matmul output and the 16-bit copy of the softmax
        logits += 2 * chunk_rows * shape.vocab * step.matmul_bytes
    return kept, logits + labelled * shape.hidden * step.residual_bytes


@dataclass(frozen=True)
class Activations:
    """Activation memory of one micro-batch, the parts named."""

    saved: int  # kept for backward across the whole stack, at the end of forward
    saved_per_block: int
    lean: bool  # cheap_recompute's set
    checkpointed: bool
    recompute_block: int  # one block rebuilt in backward (checkpointing)
    backward_transient: int
    logits: int  # the loss's forward transient
    terms: dict

    @property
    def peak(self) -> int:
        """The larger of the two moments: the loss at the end of forward, or the first block's
        backward (with checkpointing, after rebuilding it)."""
        return self.saved + max(self.logits, self.recompute_block + self.backward_transient)


def activations(shape, step: StepShape, targets: frozenset, r: int, dropout: float, dora: bool,
                checkpointing: bool, cheap_recompute: bool = True,
                experts: Optional[ExpertLora] = None) -> Activations:
    """The activation terms of ``shape`` for one micro-batch ``step`` (``experts``: the LoRA ranks
    on an MoE layer's parameters, see ``plan_moe.expert_lora``)."""
    lean = cheap_recompute and not checkpointing and step.tokens >= RECOMPUTE_MIN_TOKENS
    if getattr(shape, "moe", False):
        return _moe_activations(shape, step, targets, r, dropout, dora, checkpointing, lean,
                                experts or ExpertLora())
    per_block = block_saved_bytes(shape, step, targets, r, dropout, dora, lean)
    block = sum(per_block.values())
    loss_kept, logits = loss_bytes(shape, step)
    transient = block_backward_transient(shape, step)
    if checkpointing:
        kept_inputs = shape.layers * step.tokens * shape.hidden * step.residual_bytes
        full_block = sum(block_saved_bytes(shape, step, targets, r, dropout, dora, False).values())
        return Activations(kept_inputs + loss_kept, step.tokens * shape.hidden * step.residual_bytes, False, True,
                           full_block, transient, logits, per_block)
    return Activations(shape.layers * block + loss_kept, block, lean, False, 0, transient, logits, per_block)


def _moe_activations(shape, step: StepShape, targets: frozenset, r: int, dropout: float, dora: bool,
                     checkpointing: bool, lean: bool, experts: ExpertLora) -> Activations:
    """``activations`` of a mixture-of-experts model: MoE layers and dense layers counted apart."""
    dense_targets = dense_mlp_targets(shape, targets)

    def blocks(lean_set: bool) -> tuple[dict, dict]:
        moe = moe_block_saved_bytes(shape, step, targets, r, dropout, dora, lean_set, experts)
        dense = block_saved_bytes(shape, step, dense_targets, r, dropout, dora, lean_set)
        return moe, dense

    moe_terms, dense_terms = blocks(lean)
    moe_block, dense_block = sum(moe_terms.values()), sum(dense_terms.values())
    loss_kept, logits = loss_bytes(shape, step)
    attention = 4 * step.tokens * shape.heads * shape.head_dim * step.matmul_bytes
    residual = 2 * step.tokens * shape.hidden * step.residual_bytes
    transient = max(moe_backward_transient(shape, step.tokens, step.matmul_bytes), attention) + residual
    if shape.dense_layers:
        transient = max(transient, block_backward_transient(shape, step))
    if checkpointing:
        kept_inputs = shape.layers * step.tokens * shape.hidden * step.residual_bytes
        full_moe, full_dense = blocks(False)
        rebuilt = max(sum(full_moe.values()), sum(full_dense.values()) if shape.dense_layers else 0)
        return Activations(kept_inputs + loss_kept, step.tokens * shape.hidden * step.residual_bytes, False, True,
                           rebuilt, transient, logits, moe_terms)
    saved = shape.moe_layers * moe_block + shape.dense_layers * dense_block + loss_kept
    return Activations(saved, moe_block, lean, False, 0, transient, logits, moe_terms)
