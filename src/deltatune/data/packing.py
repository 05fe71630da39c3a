"""Batches: padded rows, or several examples packed into each row without leaking between them.

A packed row restarts ``position_ids`` at 0 for every example and carries no attention
mask: transformers then builds a block-diagonal causal mask from the positions, so no token
attends to another example. The first label of each packed example is ignored, because in
an unpacked row nothing predicts it; the packed loss therefore equals the unpacked loss.
"""

from __future__ import annotations

import torch

from .tokenize import IGNORE, Example


def pack(examples: list[Example], max_seq_len: int) -> list[dict[str, list[int]]]:
    """Greedy, in order: examples go into the current row until the next one does not fit."""
    rows: list[dict[str, list[int]]] = []
    current = {"input_ids": [], "labels": [], "position_ids": []}
    for ex in examples:
        if current["input_ids"] and len(current["input_ids"]) + len(ex.input_ids) > max_seq_len:
            rows.append(current)
            current = {"input_ids": [], "labels": [], "position_ids": []}
        current["input_ids"] += ex.input_ids
        current["labels"] += [IGNORE] + ex.labels[1:]
        current["position_ids"] += list(range(len(ex.input_ids)))
    if current["input_ids"]:
        rows.append(current)
    return rows


def collate(rows: list, pad_id: int, packed: bool, seq2seq: bool = False) -> dict[str, torch.Tensor]:
    """Tensors for a batch of ``Example``s (padded) or packed rows (from ``pack``).

    ``seq2seq``: inputs and labels are padded separately (the model builds decoder inputs
    from the labels).
    """
    tasks = _task_ids(rows)
    if seq2seq:
        width = max(len(r.input_ids) for r in rows)
        label_width = max(len(r.labels) for r in rows)
        return tasks | {
            "input_ids": torch.tensor([r.input_ids + [pad_id] * (width - len(r.input_ids)) for r in rows]),
            "attention_mask": torch.tensor([[1] * len(r.input_ids) + [0] * (width - len(r.input_ids))
                                            for r in rows]),
            "labels": torch.tensor([r.labels + [IGNORE] * (label_width - len(r.labels)) for r in rows]),
        }
    if not packed:
        rows = [{"input_ids": r.input_ids, "labels": r.labels} for r in rows]
    width = max(len(r["input_ids"]) for r in rows)
    batch = {
        "input_ids": torch.tensor([r["input_ids"] + [pad_id] * (width - len(r["input_ids"])) for r in rows]),
        "labels": torch.tensor([r["labels"] + [IGNORE] * (width - len(r["labels"])) for r in rows]),
    }
    if packed:
        # Padding continues as one more "sequence" whose labels are all ignored.
        batch["position_ids"] = torch.tensor(
            [r["position_ids"] + list(range(width - len(r["position_ids"]))) for r in rows])
    else:
        batch["attention_mask"] = torch.tensor(
            [[1] * len(r["input_ids"]) + [0] * (width - len(r["input_ids"])) for r in rows])
    return batch | tasks


def _task_ids(rows: list) -> dict[str, torch.Tensor]:
    """``{"task_ids": one id per row}`` for examples that carry their task (data/tasks.py), else {}."""
    ids = [getattr(r, "task_id", None) for r in rows]
    if all(i is None for i in ids):
        return {}
    if any(i is None for i in ids):
        raise ValueError("a batch mixes examples with and without a task id")
    return {"task_ids": torch.tensor(ids)}


def trained_token_count(batch: dict[str, torch.Tensor], seq2seq: bool = False) -> torch.Tensor:
    """Tokens the loss averages over (a causal model's first position predicts nothing)."""
    labels = batch["labels"] if seq2seq else batch["labels"][:, 1:]
    return (labels != IGNORE).sum()
