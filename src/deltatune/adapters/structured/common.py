"""What the structured methods share: a layer method that also trains and saves base biases
(``bias="all"`` or ``"<method>_only"``, as PEFT's configs offer), and PEFT's per-module size lookup."""

from __future__ import annotations

import re


def size_for(patterns: dict[str, int], key: str, default: int) -> int:
    """A per-module size (``n_frequency_pattern``, ``block_size_pattern``): the first pattern
    that matches the end of ``key`` after a dot, else an entry named exactly ``key``, else
    ``default``: the rule PEFT applies to these two fields, so both pick the same sizes."""
    for pattern in patterns:
        if re.match(rf".*\.{pattern}$", key):
            return patterns[pattern]
    return patterns.get(key, default)
