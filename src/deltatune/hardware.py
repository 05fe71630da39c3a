"""What the machine computes fast: the training precision ``auto`` resolves to, and CPU threads.

bf16 halves the bytes every matmul reads, but pays only where the hardware multiplies bf16
faster than float32: CUDA devices that support it, and CPUs with AMX tiles. On a CPU with
AVX512-BF16 but no AMX, bf16 autocast made the default job's steps 1.5-1.7x slower than float32
(`python benchmarks/cpu_precision.py`, benchmarks/cpu-precision-cpu.json: the small matmuls of
a 576-wide model gain nothing from the bf16 dot products, and the casts around them cost), and
on an AVX2 CPU PyTorch converts bf16 to float32 around each matmul; ``auto`` keeps float32 on
both.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import torch

BF16_CPU_FLAGS = ("amx_bf16",)  # /proc/cpuinfo names of bf16 arithmetic faster than float32


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


def cpu_has_fast_bf16(flags: Optional[set[str]] = None) -> bool:
    """Whether this CPU multiplies bf16 faster than float32 (AMX; AVX512-BF16 alone is not, see above)."""
    return bool(set(BF16_CPU_FLAGS) & (cpu_flags() if flags is None else flags))


def auto_precision(device: torch.device, flags: Optional[set[str]] = None) -> str:
    """``bf16`` where ``device`` computes it natively, else ``fp32``.

    Under bf16 autocast the adapter's weights, gradients and optimizer states stay float32
    (the master copy); only the matmuls read bf16.
    """
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    if device.type == "cpu":
        return "bf16" if cpu_has_fast_bf16(flags) else "fp32"
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

