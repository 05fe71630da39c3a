"""Which rows form each micro-batch of an epoch: a seeded shuffle, optionally grouped by length.

A batch is padded to its longest row, so a batch that mixes a 40-token row with a 500-token
one spends most of its compute on padding. ``group_by_length`` sorts rows by length within
groups of ``GROUP_BATCHES`` batches of a shuffled order, cuts each group into batches and
shuffles the batches again: rows of similar length train together, while which rows meet and
the order of batches stay random from epoch to epoch (the same idea as Hugging Face's
length-grouped sampler). Everything is a function of (seed, epoch), so a resumed run takes
the same batches.

With a token budget (``batch_tokens``) a batch holds as many rows as fit the budget once padded
(rows x longest row): short rows travel many to a batch, long ones few, so every step does
about the same work and little of it on padding. Rows are sorted by length in windows of
``GROUP_ROWS`` of a shuffled order, cut greedily and the batches shuffled. The count of batches
can differ a little between epochs; a run's epoch is as many batches as its first one.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

GROUP_BATCHES = 64  # global batches per sorted group: big enough to find similar lengths, small enough to mix
GROUP_ROWS = 1024  # rows per sorted window when batches are cut by a token budget


def _shuffled(n: int, seed: int, epoch: int, stream: int = 0) -> list[int]:
    generator = torch.Generator().manual_seed(seed * 1000003 + epoch + stream * 7919)
    return torch.randperm(n, generator=generator).tolist()


def epoch_batches(n_rows: int, batch_size: int, seed: int, epoch: int, rank: int = 0, world: int = 1,
                  lengths: Optional[Sequence[int]] = None) -> list[list[int]]:
    """Row indices of each micro-batch rank ``rank`` of ``world`` takes in ``epoch``.

    Rows are shuffled with a seed drawn from (``seed``, ``epoch``); the last partial global batch
    is dropped (all of it is kept when there are fewer rows than one global batch). With
    ``lengths`` (one per row) rows are grouped by length as described above.
    """
    order = _shuffled(n_rows, seed, epoch)
    global_batch = batch_size * world
    usable = n_rows - n_rows % global_batch if n_rows >= global_batch else n_rows
    if lengths is not None and usable > global_batch:
        if len(lengths) != n_rows:
            raise ValueError(f"{len(lengths)} lengths for {n_rows} rows")
        order = order[:usable]
        group = GROUP_BATCHES * global_batch
        grouped = []
        for start in range(0, usable, group):
            grouped += sorted(order[start:start + group], key=lambda i: -lengths[i])
        chunks = [grouped[i:i + global_batch] for i in range(0, usable, global_batch)]
        order = [row for c in _shuffled(len(chunks), seed, epoch, stream=1) for row in chunks[c]]
    batches = []
    for start in range(0, usable, global_batch):
        mine = order[start:start + global_batch][rank * batch_size:(rank + 1) * batch_size]
        if mine:
            batches.append(mine)
    return batches


def padding_share(batches: list[list[int]], lengths: Sequence[int]) -> float:
    """Share of the positions in ``batches`` (each padded to its longest row) that are padding."""
    padded = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    real = sum(lengths[i] for b in batches for i in b)
    return 1 - real / padded if padded else 0.0


def token_batches(lengths: Sequence[int], batch_tokens: int, seed: int, epoch: int, rank: int = 0,
                  world: int = 1) -> list[list[int]]:
    """Row indices of each micro-batch of rank ``rank`` in ``epoch``, each batch's rows times its
    longest row at most ``batch_tokens`` (a row longer than that alone); the last
    ``len % world`` batches are dropped so every rank takes as many."""
    order = _shuffled(len(lengths), seed, epoch)
    batches: list[list[int]] = []
    for start in range(0, len(order), GROUP_ROWS):
        batch: list[int] = []
        for i in sorted(order[start:start + GROUP_ROWS], key=lambda i: -lengths[i]):
            if batch and (len(batch) + 1) * lengths[batch[0]] > batch_tokens:  # batch[0] is its longest
                batches.append(batch)
                batch = []
            batch.append(i)
        if batch:
            batches.append(batch)
    batches = [batches[b] for b in _shuffled(len(batches), seed, epoch, stream=1)]
    usable = len(batches) - len(batches) % world if len(batches) >= world else len(batches)
    return batches[rank:usable:world] or batches[:1]


def make_batches(lengths: Sequence[int], batch_size: int, batch_tokens: int, group_by_length: bool, seed: int,
                 epoch: int, rank: int = 0, world: int = 1) -> list[list[int]]:
    """An epoch's micro-batches for this rank as the run's settings ask: by token budget when
    ``batch_tokens`` is set, else ``batch_size`` rows (grouped by length when asked)."""
    if batch_tokens:
        return token_batches(lengths, batch_tokens, seed, epoch, rank, world)
    return epoch_batches(len(lengths), batch_size, seed, epoch, rank, world, lengths if group_by_length else None)
