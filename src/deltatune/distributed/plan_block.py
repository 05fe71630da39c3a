"""One decoder block timed on this CPU, for a CPU plan's tokens/s.

A roofline counts matmul FLOPs and element-wise bytes; on a CPU a training step also spends a
fifth or more of its time in what it does not count: attention kernels, dropout masks, the
autograd and dispatch work of a few thousand small ops a step. So a CPU plan times the thing
itself: a one-block Llama of the model's widths (random weights, a 256-token vocabulary, so the
embedding and head cost nothing), with the adapter, 4-bit base, checkpointing and recomputation
the run would use, forward and backward at the run's micro-batch, the median of three after a
warm-up. The step is then the layers times that block, plus the output head and loss from the
roofline (they depend on the real vocabulary). A block the roofline expects to take more than
``MAX_BLOCK_SECONDS`` is not timed (planning a 70B model on a CPU stays quick); its plan keeps
the roofline alone.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Optional

MAX_BLOCK_SECONDS = 3.0
TIMED_VOCAB = 256


def timing_key(run):
    """The fields of a run that change a block's time (not the strategy or the number of ranks)."""
    return dataclasses.replace(run, world=1, strategy="single")


def block_seconds(shape, run, repeats: int = 3) -> float:
    """Median seconds of one block's forward and backward for ``run`` (a ``plan.Run``) on this CPU."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from ..adapter_ops import add_adapter
    from ..config import LoraConfig
    from ..loss import TrainingLoss
    from ..quant.convert import QuantizeConfig, quantize_model
    from ..train.contexts import autocast, saved_activations
    from ..train.recompute import MIN_TOKENS, cheap_recompute

    config = LlamaConfig(vocab_size=TIMED_VOCAB, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
                         num_hidden_layers=1, num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
                         head_dim=shape.head_dim, attention_bias=shape.attention_bias,
                         max_position_embeddings=max(run.seq_len, 2048), tie_word_embeddings=True)
    dtype = torch.bfloat16 if run.base_dtype == "bf16" else torch.float32
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(dtype)
    if run.quantized:
        quantize_model(model, QuantizeConfig("nf4", compute_dtype=dtype))
    if run.method == "full":
        model.requires_grad_(True)
    else:
        model.requires_grad_(False)
        add_adapter(model, LoraConfig(r=run.r, lora_alpha=2 * run.r, lora_dropout=run.dropout,
                                      target_modules=sorted(run.targets), use_dora=run.dora))
    model.train()
    if run.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lean = None
    if run.cheap_recompute and not run.gradient_checkpointing and run.rows * run.seq_len >= MIN_TOKENS:
        lean = cheap_recompute(model)
    loss = TrainingLoss(model)
    ids = torch.randint(0, TIMED_VOCAB, (run.rows, run.seq_len))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    cpu = torch.device("cpu")

    def forward_backward() -> float:
        started = time.perf_counter()
        with autocast(run.precision, cpu), saved_activations(False, cpu, lean):
            value = loss(batch)
        value.backward()
        seconds = time.perf_counter() - started
        model.zero_grad(set_to_none=True)
        return seconds

    forward_backward()  # the first pass allocates and picks kernels
    times = sorted(forward_backward() for _ in range(repeats))
    torch.random.set_rng_state(generator_state)
    return times[len(times) // 2]


class BlockTimer:
    """Times each distinct way to run once (``timing_key``) and remembers it; ``None`` for a run
    whose block the roofline expects to be slower than ``MAX_BLOCK_SECONDS``."""

    def __init__(self, shape):
        self.shape = shape
        self.seconds: dict = {}

    def __call__(self, run, roofline_block_seconds: float) -> Optional[float]:
        if roofline_block_seconds > MAX_BLOCK_SECONDS:
            return None
        key = timing_key(run)
        if key not in self.seconds:
            self.seconds[key] = block_seconds(self.shape, key)
        return self.seconds[key]
