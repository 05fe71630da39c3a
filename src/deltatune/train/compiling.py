"""``compile: true``: each transformer block compiled with ``torch.compile``.

Blocks, not the whole model: a model's blocks are instances of one class, so the compiler
traces one and reuses it for the others, which keeps the compile time to that of one block;
the embedding, the loss and the optimizer stay eager. Compiling costs time up front (and again
when the batch shape changes, until the compiler makes the shape dynamic), so it pays only in
runs long enough to win it back: ``benchmarks/compile_step.py`` measures both on a machine.
"""

from __future__ import annotations

from torch import nn

from .config import ConfigError


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The model's repeated blocks: the modules of the classes transformers keeps whole when it
    splits a model across devices (``_no_split_modules``)."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    return [m for m in model.modules() if type(m).__name__ in names]


def compile_blocks(model: nn.Module) -> int:
    """Compile every transformer block of ``model`` in place; returns how many."""
    blocks = transformer_blocks(model)
    if not blocks:
        raise ConfigError(f"compile: {type(model).__name__} names no transformer block class "
                          "(_no_split_modules), so there is nothing to compile block by block")
    for block in blocks:
        block.compile()
    return len(blocks)
