"""What the machine computes fast: the training precision ``auto`` resolves to, and CPU threads.

bf16 halves the bytes every matmul reads, but pays only where the hardware multiplies bf16
faster than float32: CUDA devices that support it, CPUs with AMX tiles, and some CPUs with
AVX512-BF16 alone. Which of the last it is, the flags do not tell: on a 2-core Intel Xeon with
AVX512-BF16 and no AMX, a bf16 matmul ran at about 0.6x float32's speed and bf16 autocast made
the default job's steps 1.5-1.7x slower; on a 2-core AMD EPYC (Zen 4) with the same flags, bf16
matmuls ran 2.2-4x faster than float32 and the default job's steps 1.5x faster
(`python benchmarks/cpu_precision.py`, benchmarks/cpu-precision-cpu.json). So on such a CPU
``auto`` times one matmul in each dtype (about 0.2 s, once per process) and takes bf16 where it
is at least ``BF16_SPEEDUP_NEEDED`` times faster, enough to pay for the casts around it. On an
AVX2 CPU PyTorch converts bf16 to float32 around each matmul, and ``auto`` keeps float32
without timing anything.
"""

from __future__ import annotations

import functools
import os
import time
from pathlib import Path
from typing import Callable, Optional

import torch

BF16_CPU_FLAGS = ("amx_bf16",)  # /proc/cpuinfo names of bf16 arithmetic faster than float32
BF16_MAYBE_FAST_FLAGS = ("avx512_bf16",)  # bf16 dot products that may or may not beat float32: timed
BF16_SPEEDUP_NEEDED = 1.5  # how much faster a bf16 matmul must be than float32 for autocast to pay


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    """The feature flags of the first CPU in ``cpuinfo`` (empty where the file does not exist)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


@functools.lru_cache(maxsize=None)
def bf16_matmul_speedup(size: int = 1024, repeats: int = 3) -> float:
    """How many times faster this CPU multiplies two ``size`` x ``size`` matrices in bf16 than
    in float32 (the best of ``repeats`` timings of each, after one untimed run)."""

    def best_seconds(dtype: torch.dtype) -> float:
        a = torch.randn(size, size).to(dtype)
        b = torch.randn(size, size).to(dtype)
        a @ b  # the first call picks and prepares the kernel
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - start)
        return min(times)

    return best_seconds(torch.float32) / best_seconds(torch.bfloat16)


def cpu_has_fast_bf16(flags: Optional[set[str]] = None,
                      speedup: Callable[[], float] = bf16_matmul_speedup) -> bool:
    """Whether this CPU multiplies bf16 fast enough for autocast to pay: AMX always; AVX512-BF16
    where ``speedup()`` (a timed matmul) is at least ``BF16_SPEEDUP_NEEDED``; nothing else."""
    flags = cpu_flags() if flags is None else flags
    if set(BF16_CPU_FLAGS) & flags:
        return True
    if set(BF16_MAYBE_FAST_FLAGS) & flags:
        return speedup() >= BF16_SPEEDUP_NEEDED
    return False


def auto_precision(device: torch.device, flags: Optional[set[str]] = None,
                   speedup: Callable[[], float] = bf16_matmul_speedup) -> str:
    """``bf16`` where ``device`` computes it fast (``cpu_has_fast_bf16`` on a CPU), else ``fp32``.

    Under bf16 autocast the adapter's weights, gradients and optimizer states stay float32
    (the master copy); only the matmuls read bf16.
    """
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    if device.type == "cpu":
        return "bf16" if cpu_has_fast_bf16(flags, speedup) else "fp32"
    return "fp32"


def physical_cores() -> int:
    """Physical cores this process may run on (hyper-threads of one core count once)."""
    allowed = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    cores = set()
    for cpu in allowed:
        topology = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            cores.add((topology.joinpath("physical_package_id").read_text().strip(),
                       topology.joinpath("core_id").read_text().strip()))
        except OSError:
            cores.add(("cpu", str(cpu)))
    return max(1, len(cores))


def set_cpu_threads(processes_on_this_machine: int = 1) -> Optional[int]:
    """One matmul thread per physical core, shared among this machine's processes.

    Two threads on the hyper-threads of one core compete for its vector units, so PyTorch's
    default of one thread per logical CPU is slower for dense matmuls. An explicit
    ``OMP_NUM_THREADS`` (torchrun sets one) always wins; returns the count set, or None.
    """
    if os.environ.get("OMP_NUM_THREADS"):
        return None
    threads = max(1, physical_cores() // max(1, processes_on_this_machine))
    torch.set_num_threads(threads)
    return threads


def status_kib(field: str) -> Optional[int]:
    """A ``/proc/self/status`` figure in KiB (``VmRSS``, ``VmHWM``), or ``None`` off Linux."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def peak_resident_mib() -> float:
    """This process's peak resident memory. Linux's ``VmHWM`` is the process's own; ``ru_maxrss``
    (the fallback elsewhere) carries over across ``exec`` the size of the parent it was forked
    from, so a small run started by a large process would report the parent's size."""
    peak = status_kib("VmHWM")
    if peak is None:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return peak / 1024

