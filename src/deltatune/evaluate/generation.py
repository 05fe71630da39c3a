"""Batched generation, reference perplexity and multiple-choice accuracy for one model state."""

from __future__ import annotations

import contextlib
import math
from typing import Optional

import torch

from ..adapters.task_ids import TASKS_ATTR, use_task_ids
from ..data import collate, trained_token_count
from ..loss import TrainingLoss
from .examples import EvalExample
from .shared_prefix import loss_batches, prefix_loss_sum


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _tasks(model, examples: list[EvalExample]):
    """A block in which ``model`` (when it routes by task) uses the examples' task ids."""
    ids = [e.scored.task_id for e in examples]
    if getattr(model, TASKS_ATTR, None) is None or any(i is None for i in ids):
        return contextlib.nullcontext()
    return use_task_ids(model, ids)


def cache_usable(model) -> bool:
    """Whether ``model`` can generate from a key/value cache: not while an adapter computes from the
    whole sequence at every call (X-LoRA's scaling pass, which PEFT too runs without a cache)."""
    return not any(m.needs_full_passes() for m in model.modules() if hasattr(m, "needs_full_passes"))


def _shortest_first(lengths: list[int]) -> list[int]:
    """Indices ordered by length, so each batch pads its rows to similar lengths (less
    padding computed); results are put back in the original order."""
    return sorted(range(len(lengths)), key=lengths.__getitem__)


@torch.no_grad()
def generate(model, tokenizer, examples: list[EvalExample], batch_size: int, max_new_tokens: int,
             seq2seq: bool, do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0) -> list[str]:
    """Greedy (or sampled) continuations, batched with the KV cache (full passes where the model's
    adapter needs them), stopping at EOS; in the order of ``examples`` (batched by prompt length)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = _device(model)
    order = _shortest_first([len(e.input_ids) for e in examples])
    outputs: list[str] = [""] * len(examples)
    use_cache = cache_usable(model)
    for start in range(0, len(order), batch_size):
        picked = order[start:start + batch_size]
        chunk = [examples[i].input_ids for i in picked]
        width = max(len(ids) for ids in chunk)
        if seq2seq:  # the encoder reads right-padded inputs
            ids = [x + [pad] * (width - len(x)) for x in chunk]
            mask = [[1] * len(x) + [0] * (width - len(x)) for x in chunk]
        else:  # a decoder continues from the last position, so pad on the left
            ids = [[pad] * (width - len(x)) + x for x in chunk]
            mask = [[0] * (width - len(x)) + [1] * len(x) for x in chunk]
        input_ids = torch.tensor(ids, device=device)
        sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if do_sample else {
            "do_sample": False}
        with _tasks(model, [examples[i] for i in picked]):
            out = model.generate(input_ids=input_ids, attention_mask=torch.tensor(mask, device=device),
                                 max_new_tokens=max_new_tokens, pad_token_id=pad,
                                 eos_token_id=tokenizer.eos_token_id, use_cache=use_cache, **sampling)
        new = out if seq2seq else out[:, width:]
        for i, row in zip(picked, new):
            outputs[i] = tokenizer.decode(row, skip_special_tokens=True).strip()
    return outputs


@torch.no_grad()
def loss_sums(model, rows: list, batch_size: int, pad_id: int, packed: bool = False,
              seq2seq: bool = False, share_prefix: bool = True) -> torch.Tensor:
    """float64 ``[sum of per-token losses, number of trained tokens]`` over ``rows``.

    Training's validation loss and evaluation's perplexity both come from these sums. Rows are
    batched by length, and the beginning all rows of a batch share runs once (``shared_prefix``)
    where the model's loss allows it and ``share_prefix``. ``model``: a model, or a
    ``TrainingLoss`` to call (a sharded one runs only through its own forward: no prefix sharing).
    """
    device = _device(model)
    # the labelled positions only, where the model allows it
    loss_of = model if isinstance(model, TrainingLoss) else TrainingLoss(model)
    total = torch.zeros(2, dtype=torch.float64)
    if not packed and not seq2seq and loss_of.reason is None and share_prefix:
        batches = loss_batches(rows, batch_size)
    else:
        ordered = [rows[i] for i in _shortest_first([len(r["input_ids"] if isinstance(r, dict) else r.input_ids)
                                                      for r in rows])]
        batches = [(ordered[i:i + batch_size], False) for i in range(0, len(ordered), batch_size)]
    for chunk, sharing in batches:
        shared = prefix_loss_sum(loss_of, chunk, pad_id, device) if sharing else None
        if shared is not None:
            loss, tokens = shared
        else:
            batch = {k: v.to(device) for k, v in collate(chunk, pad_id, packed, seq2seq).items()}
            loss, tokens = loss_of(batch), trained_token_count(batch, seq2seq)
        total += torch.stack([loss.double().cpu() * tokens.cpu(), tokens.double().cpu()])
    return total


def perplexity(model, examples: list[EvalExample], batch_size: int, pad_id: int, seq2seq: bool) -> float:
    """exp(mean loss over reference tokens given their prompts)."""
    total, tokens = loss_sums(model, [e.scored for e in examples], batch_size, pad_id, seq2seq=seq2seq).tolist()
    return math.exp(min(total / max(tokens, 1), 700.0))


@torch.no_grad()
def choice_accuracy(model, tokenizer, examples: list[EvalExample], seq2seq: bool) -> Optional[float]:
    """Share of examples whose answer has the highest log-likelihood among the choices."""
    scored = [e for e in examples if e.choices]
    if not scored or seq2seq:
        return None
    device = _device(model)
    right = 0
    for e in scored:
        totals = []
        for choice in e.choices:
            cont = list(tokenizer(" " + choice if not choice.startswith(" ") else choice,
                                  add_special_tokens=False)["input_ids"])
            ids = torch.tensor([e.input_ids + cont], device=device)
            with _tasks(model, [e]):
                logits = model(input_ids=ids, use_cache=False).logits[0, len(e.input_ids) - 1:-1].float()
            logp = torch.log_softmax(logits, dim=-1).gather(1, torch.tensor(cont, device=device)[:, None])
            totals.append(logp.sum().item())
        right += int(max(range(len(totals)), key=totals.__getitem__) == e.answer)
    return right / len(scored)
