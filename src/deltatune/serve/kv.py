"""A batch's key/value cache as rows that can join, leave and be padded between decoding steps.

The rows of a running batch are aligned on the right: each row's tokens end at the last column,
and the columns in front of a shorter row are padding its attention mask hides. A soft-prompt
group keeps its virtual tokens in the first ``prefix`` columns of every row (the soft-prompt hook
puts them there and prepends their mask itself), so padding goes in after them.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from transformers import DynamicCache


def cache_length(cache: DynamicCache) -> int:
    """Columns in ``cache`` (virtual tokens and padding included)."""
    return cache.get_seq_length()


def _layers(cache: DynamicCache) -> list:
    return [layer for layer in cache.layers if layer.is_initialized]


def _rewrite(cache: DynamicCache, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """Replace every layer's keys and values (batch, heads, columns, head size) by ``fn`` of them."""
    for layer in _layers(cache):
        layer.keys, layer.values = fn(layer.keys), fn(layer.values)


def pad_front(cache: DynamicCache, columns: int, prefix: int = 0) -> None:
    """Insert ``columns`` zero columns after the first ``prefix`` columns of every row, in place."""
    if columns > 0:
        _rewrite(cache, lambda t: torch.cat([t[:, :, :prefix], t.new_zeros(*t.shape[:2], columns, t.shape[3]),
                                             t[:, :, prefix:]], dim=2))


def drop_front(cache: DynamicCache, columns: int, prefix: int = 0) -> None:
    """Remove ``columns`` columns after the first ``prefix`` (padding no row needs any more)."""
    if columns > 0:
        _rewrite(cache, lambda t: torch.cat([t[:, :, :prefix], t[:, :, prefix + columns:]], dim=2))


def keep_rows(cache: DynamicCache, rows: torch.Tensor) -> None:
    """Keep only ``rows`` (indices into the batch), in place."""
    _rewrite(cache, lambda t: t.index_select(0, rows))


def append_rows(cache: DynamicCache, other: DynamicCache) -> None:
    """Add ``other``'s rows after ``cache``'s; both have the same number of columns."""
    mine, theirs = _layers(cache), _layers(other)
    if len(mine) != len(theirs):
        raise ValueError("the two caches differ in their number of layers")
    for a, b in zip(mine, theirs):
        a.keys = torch.cat([a.keys, b.keys], dim=0)
        a.values = torch.cat([a.values, b.values], dim=0)


def merged(running: Optional[DynamicCache], joining: DynamicCache, prefix: int = 0) -> DynamicCache:
    """``running``'s rows then ``joining``'s, the shorter side padded at the front to the longer."""
    if running is None or not _layers(running):
        return joining
    a, b = cache_length(running), cache_length(joining)
    pad_front(running, b - a, prefix)
    pad_front(joining, a - b, prefix)
    append_rows(running, joining)
    return running
