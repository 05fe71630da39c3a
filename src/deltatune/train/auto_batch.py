"""``--auto-batch``: the largest micro-batch that fits the device, the effective batch kept.

The micro-batch is a divisor of ``batch_size`` and gradient accumulation makes up the rest, so
a step still averages over ``batch_size x grad_accum`` examples. Each candidate is judged on the
run's longest rows, the worst case of the epoch. On a GPU running out of memory is an
exception, so each candidate is simply tried (largest first). On a CPU it kills the process
instead, so one row is measured (the rise of peak resident memory over one forward and
backward) and a candidate fits when that many rows take at most ``CPU_SHARE`` of the memory
available now.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from ..data import collate
from ..hardware import status_kib

CPU_SHARE = 0.7  # of the memory available before training, what the activations may take


def divisors_descending(n: int) -> list[int]:
    return [d for d in range(n, 0, -1) if n % d == 0]


def largest_fitting(batch_size: int, fits: Callable[[int], bool]) -> Optional[int]:
    """The largest divisor of ``batch_size`` for which ``fits`` holds, or None."""
    return next((b for b in divisors_descending(batch_size) if fits(b)), None)


def available_cpu_bytes() -> Optional[int]:
    """Memory this process may still take: MemAvailable, bounded by a cgroup limit if one is set."""
    available = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
    except OSError:
        return None
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text())
        if limit != "max" and available is not None:
            available = min(available, int(limit) - used)
    except (OSError, ValueError):
        pass
    return available


@contextlib.contextmanager
def _rng_kept():
    """The probe's dropout must not shift the run's random numbers."""
    cpu = torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


def _forward_backward(step: Callable[[dict], torch.Tensor], rows: Sequence, pad_id: int, packed: bool,
                      seq2seq: bool, device: torch.device, model) -> None:
    batch = {k: v.to(device) for k, v in collate(list(rows), pad_id, packed, seq2seq).items()}
    try:
        step(batch).backward()
    finally:
        model.zero_grad(set_to_none=True)


def choose_micro_batch(step: Callable[[dict], torch.Tensor], model, rows: Sequence, lengths: Sequence[int],
                       batch_size: int, pad_id: int, packed: bool, seq2seq: bool, device: torch.device,
                       available: Optional[int] = None) -> tuple[int, str]:
    """(micro-batch size, how it was found) for ``batch_size``; ``step(batch)`` returns the loss."""
    longest = [rows[i] for i in sorted(range(len(rows)), key=lambda i: -lengths[i])[:batch_size]]
    probe = lambda b: _forward_backward(step, longest[:b], pad_id, packed, seq2seq, device, model)  # noqa: E731
    with _rng_kept():
        if device.type == "cuda":
            def fits(b: int) -> bool:
                try:
                    probe(b)
                    return True
                except torch.cuda.OutOfMemoryError:
                    torch.cuda.empty_cache()
                    return False
            micro = largest_fitting(batch_size, fits)
            if micro is None:
                raise RuntimeError(f"one row of {max(lengths)} tokens does not fit "
                                   "this GPU; shorten data.max_seq_len or turn on gradient_checkpointing")
            return micro, "tried on the GPU"
        available = available_cpu_bytes() if available is None else available
        before = status_kib("VmRSS")
        with contextlib.suppress(OSError):  # resets the peak (VmHWM) to the current size
            Path("/proc/self/clear_refs").write_text("5")
        probe(1)
        peak = status_kib("VmHWM")
        if available is None or before is None or peak is None:
            return batch_size, "memory unknown on this system: batch_size kept"
        per_row = max(1, (peak - before) * 1024)
        micro = largest_fitting(batch_size, lambda b: b * per_row <= CPU_SHARE * available) or 1
        return micro, f"{per_row / 2**20:.0f} MiB a row of {max(lengths)} tokens, {available / 2**30:.1f} GiB free"
