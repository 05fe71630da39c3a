"""How much a merge changed the model: logits and perplexity on a fixed text, before vs after.

Merging into full-precision weights only reorders float arithmetic, so the difference is
rounding noise. Merging into a quantized base and re-quantizing is lossy; the report says by
how much, every time, instead of leaving the user to find out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

# A fixed probe text (the project's own words): ordinary prose, so perplexity is meaningful.
PROBE_TEXT = (
    "The river rose after three days of rain, and the people of the valley moved their boats "
    "to higher ground. By the end of the week the water had reached the old stone bridge, "
    "which had stood for two hundred years. Engineers measured the current every morning and "
    "wrote the numbers on a board outside the town hall, where anyone could read them."
)
PROBE_LENGTH = 64


@dataclass
class MergeReport:
    """Error of the merged model against the unmerged one on the probe text."""

    max_logit_diff: float
    mean_logit_diff: float
    perplexity_before: float
    perplexity_after: float
    tokens: int
    requantized: bool
    max_abs_logit: float = 0.0  # scale of the logits, for relative bounds

    # Merging without re-quantizing only reorders float arithmetic: the difference stays below
    # this fraction of the largest logit (float32; tested on every merge path).
    FLOAT_BOUND = 1e-4

    @property
    def within_float_rounding(self) -> bool:
        return self.max_logit_diff <= self.FLOAT_BOUND * max(1.0, self.max_abs_logit)

    @property
    def perplexity_change(self) -> float:
        return self.perplexity_after - self.perplexity_before

    def __str__(self) -> str:
        how = "merged and re-quantized" if self.requantized else "merged"
        return (f"{how}: max |Δlogit| {self.max_logit_diff:.3g}, mean |Δlogit| {self.mean_logit_diff:.3g}, "
                f"perplexity {self.perplexity_before:.4g} -> {self.perplexity_after:.4g} "
                f"({self.perplexity_change:+.3g}) on {self.tokens} probe tokens")


def probe_ids(model: nn.Module, tokenizer=None) -> torch.Tensor:
    """Token ids of the probe text, or (without a tokenizer) a fixed pseudo-random sequence."""
    if tokenizer is not None:
        ids = tokenizer(PROBE_TEXT, return_tensors="pt")["input_ids"][:, :PROBE_LENGTH]
        if ids.shape[1] >= 2:
            return ids
    vocab = int(getattr(getattr(model, "config", None), "vocab_size", 0) or 2)
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab, (1, PROBE_LENGTH), generator=g)


def _device_of(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


@torch.no_grad()
def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    kwargs = {"decoder_input_ids": ids} if getattr(getattr(model, "config", None), "is_encoder_decoder", False) else {}
    return model(input_ids=ids, **kwargs).logits.float()


def _perplexity(logits: torch.Tensor, ids: torch.Tensor) -> float:
    loss = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:])
    return math.exp(min(loss.item(), 700.0))


def measure_merge(model: nn.Module, do_merge: Callable[[], None], tokenizer=None,
                  requantized: bool = False, verbose: bool = True) -> MergeReport:
    """Run ``do_merge`` between two evaluations of ``model`` on the probe text."""
    ids = probe_ids(model, tokenizer).to(_device_of(model))
    training = {m: m.training for m in model.modules()}
    model.eval()
    try:
        before = _logits(model, ids)
        do_merge()
        after = _logits(model, ids)
    finally:
        for m, flag in training.items():
            m.training = flag
    diff = (after - before).abs()
    report = MergeReport(diff.max().item(), diff.mean().item(), _perplexity(before, ids),
                         _perplexity(after, ids), ids.shape[1], requantized, before.abs().max().item())
    if verbose:
        print(report)
    return report
