"""Held-out preference accuracy: how often a model finds the chosen completion more likely than the rejected.

For each pair, the completions' log-probabilities given the prompt are summed over their tokens
(prompt tokens never count, EOS does), as DPO sums them; a pair counts as preferred when the
chosen sum is the larger. ``preference_report`` puts the model a run starts from (the base, or
the supervised adapter given with ``--init-adapter``) beside the tuned one, with the tuned model's
reward accuracy: DPO's implicit reward ``β·(log π - log π_ref)`` of the chosen completion above the
rejected one's, or for ORPO (no reference) its reward ``λ·mean log p`` (per-token means).
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch

from ..adapter_ops import active_adapters, disable_adapters, set_adapter
from ..data.packing import collate
from ..data.preference import PreferencePair
from ..data.tokenize import Example
from .shared_prefix import MIN_SHARED_TOKENS, shared_prefix_length
from ..logprobs import completion_logps
from ..loss import TrainingLoss


@contextlib.contextmanager
def as_reference(model, reference: Optional[str]) -> Iterator[None]:
    """Within the block the model computes the reference: the base with adapters disabled
    (``reference`` None) or adapter ``reference`` alone; the active adapters come back after."""
    if reference is None:
        with disable_adapters(model):
            yield
        return
    active = active_adapters(model)
    set_adapter(model, reference)
    try:
        yield
    finally:
        set_adapter(model, active)


def can_share_prefix(loss_of: TrainingLoss) -> bool:
    """Whether ``loss_of``'s model can continue rows from a key/value cache of their shared beginning."""
    return loss_of.reason is None and loss_of.cache_name is not None


@torch.no_grad()
def pair_logps(model, pairs: list[PreferencePair], batch_size: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sums, counts)``, each ``(pairs, 2)`` (chosen, rejected), float64 and int64, in the order of
    ``pairs``. ``batch_size`` pairs a forward pass (their chosen and rejected rows together), in
    order of length so a batch pads little; the same pairs give the same batches, so the numbers
    repeat exactly. ``model``: a model or its ``TrainingLoss``; run in eval mode (no dropout)."""
    loss_of = model if isinstance(model, TrainingLoss) else TrainingLoss(model)
    device = next(loss_of.parameters()).device
    sums = torch.zeros(len(pairs), 2, dtype=torch.float64)
    counts = torch.zeros(len(pairs), 2, dtype=torch.int64)
    order = sorted(range(len(pairs)), key=lambda i: pairs[i].width)
    was_training = loss_of.model.training  # a TrainingLoss made here starts in training mode whatever the model's
    loss_of.eval()
    try:
        for start in range(0, len(order), batch_size):
            picked = order[start:start + batch_size]
            batch = pair_batch([pairs[i] for i in picked], pad_id, share_prefix=can_share_prefix(loss_of))
            row_sums, row_counts = batch_logps(loss_of, {k: v.to(device) for k, v in batch.items()})
            sums[picked] = row_sums.double().view(2, -1).T.cpu()
            counts[picked] = row_counts.view(2, -1).T.cpu()
    finally:
        loss_of.train(was_training)
    return sums, counts


def pair_batch(pairs: list[PreferencePair], pad_id: int, share_prefix: bool = False) -> dict[str, torch.Tensor]:
    """One batch of the pairs' chosen rows followed by their rejected rows (TRL's concatenated
    forward: both completions of a pair in one pass), right-padded, prompts labelled -100.

    With ``share_prefix``, the tokens every row begins with (a chat template's system prompt, often
    half of a short row), when at least ``MIN_SHARED_TOKENS``, become ``prefix_ids`` (one row) and
    the rows hold what follows; ``batch_logps`` runs the prefix once and continues every row from
    its key/value cache. No scored token is in the prefix (``shared_prefix_length`` stops before)."""
    rows = pair_rows(pairs)
    shared = shared_prefix_length(rows) if share_prefix and len(rows) > 1 else 0
    if shared < MIN_SHARED_TOKENS:
        return collate(rows, pad_id, packed=False)
    batch = collate([Example(r.input_ids[shared:], r.labels[shared:]) for r in rows], pad_id, packed=False)
    batch["attention_mask"] = torch.cat([batch["attention_mask"].new_ones(len(rows), shared),
                                         batch["attention_mask"]], dim=1)
    batch["prefix_ids"] = torch.tensor([rows[0].input_ids[:shared]])
    return batch


def batch_logps(loss_of: TrainingLoss, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """``completion_logps`` of a ``pair_batch`` (its ``prefix_ids`` run once, with gradients where
    they are enabled: the rows' keys and values over the prefix come from that one pass)."""
    inputs = {k: v for k, v in batch.items() if k not in ("prefix_ids", "reference_logps")}
    if "prefix_ids" not in batch:
        return completion_logps(loss_of, inputs)
    from transformers import DynamicCache

    cache = DynamicCache(config=loss_of.model.config)
    loss_of.hidden_states({"input_ids": batch["prefix_ids"]}, cache)
    cache.batch_repeat_interleave(inputs["input_ids"].shape[0])
    return completion_logps(loss_of, inputs, cache)


def pair_rows(pairs: list[PreferencePair]) -> list[Example]:
    """The pairs' chosen rows, then their rejected rows."""
    examples = [p.examples() for p in pairs]
    return [c for c, _ in examples] + [r for _, r in examples]


def preference_accuracy(sums: torch.Tensor) -> float:
    """Share of pairs whose chosen completion has the larger log-probability (ties count as not)."""
    return (sums[:, 0] > sums[:, 1]).double().mean().item() if len(sums) else float("nan")


def preference_report(before: tuple[torch.Tensor, torch.Tensor], after: tuple[torch.Tensor, torch.Tensor],
                      objective: str, beta: float, orpo_lambda: float) -> dict:
    """Held-out figures of a preference run: ``before``/``after`` are ``pair_logps`` of the
    reference (the model the run started from) and of the tuned model on the same pairs."""
    (ref, counts), (pol, _) = before, after
    if objective == "orpo":  # ORPO's reward: λ·mean log-probability per token, no reference
        rewards = orpo_lambda * pol / counts
    else:
        rewards = beta * (pol - ref)
    margin = rewards[:, 0] - rewards[:, 1]
    return {"pairs": len(pol),
            "preference_accuracy_before": preference_accuracy(ref),
            "preference_accuracy_after": preference_accuracy(pol),
            # the same with per-token means, which a difference in length cannot decide
            "mean_logp_preference_accuracy_before": preference_accuracy(ref / counts),
            "mean_logp_preference_accuracy_after": preference_accuracy(pol / counts),
            "reward_accuracy": (margin > 0).double().mean().item(),
            "reward_margin": margin.mean().item(),
            "chosen_logps_before": ref[:, 0].mean().item(), "rejected_logps_before": ref[:, 1].mean().item(),
            "chosen_logps_after": pol[:, 0].mean().item(), "rejected_logps_after": pol[:, 1].mean().item()}
