"""Reusable CPU buffers for the weights a quantized layer rebuilds in every pass.

On CPU a tensor of more than 32 MiB comes straight from the operating system (glibc's largest
mmap threshold) and goes back when freed, so every fresh dequantized weight pays a page fault
per 4 KiB page and the kernel's zeroing: measured on a 2-core EPYC, that was more than half of
the time ``dequantize_4bit`` took for a 2048 x 8192 weight. A buffer kept per thread and
reused costs nothing after its first use. GPUs need none of this (the caching allocator
already reuses blocks).
"""

from __future__ import annotations

import threading

import torch

_local = threading.local()


def scratch(name: str, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A 1-D tensor of ``numel`` elements with undefined contents, reused between calls.

    It stays valid until the next call with the same ``name`` on this thread, so a caller uses it
    and lets go before asking again (the matmul of a quantized layer does).
    """
    buffers = _local.__dict__.setdefault("buffers", {})
    key = (name, dtype, device)
    buffer = buffers.get(key)
    if buffer is None or buffer.numel() < numel:
        buffer = torch.empty(numel, dtype=dtype, device=device)
        buffers[key] = buffer
    return buffer[:numel]

