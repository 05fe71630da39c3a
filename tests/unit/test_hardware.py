"""What ``precision: auto`` resolves to and how many CPU threads a run uses."""

import torch

from deltatune import hardware

AVX2_ONLY = "processor\t: 0\nflags\t\t: fpu sse2 avx2 fma\n\nprocessor\t: 1\nflags\t\t: fpu sse2 avx2 fma\n"
SAPPHIRE_RAPIDS = "processor\t: 0\nflags\t\t: avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n"


def test_cpu_flags_are_read_from_cpuinfo(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text(AVX2_ONLY)
    assert hardware.cpu_flags(info) == {"fpu", "sse2", "avx2", "fma"}
    assert hardware.cpu_flags(tmp_path / "missing") == set()


def test_auto_precision_is_bf16_only_where_the_cpu_multiplies_it_faster(tmp_path):
    cpu = torch.device("cpu")

    def never_timed() -> float:
        raise AssertionError("only AVX512-BF16 without AMX is timed")

    assert hardware.auto_precision(cpu, {"avx2", "fma"}, never_timed) == "fp32"
    assert hardware.auto_precision(cpu, {"amx_bf16"}, never_timed) == "bf16"
    # AVX512-BF16 alone: measured 0.6x float32 on an Intel Xeon, 2.2-4x on an AMD EPYC
    assert hardware.auto_precision(cpu, {"avx2", "avx512_bf16"}, lambda: 0.6) == "fp32"
    assert hardware.auto_precision(cpu, {"avx2", "avx512_bf16"}, lambda: 2.8) == "bf16"
    needed = hardware.BF16_SPEEDUP_NEEDED
    assert hardware.auto_precision(cpu, {"avx512_bf16"}, lambda: needed) == "bf16"
    assert hardware.auto_precision(cpu, {"avx512_bf16"}, lambda: needed * 0.99) == "fp32"
    info = tmp_path / "cpuinfo"
    info.write_text(SAPPHIRE_RAPIDS)
    assert hardware.cpu_has_fast_bf16(hardware.cpu_flags(info), never_timed)


def test_the_bf16_probe_times_real_matmuls_once_per_process():
    hardware.bf16_matmul_speedup.cache_clear()
    speedup = hardware.bf16_matmul_speedup(size=128, repeats=2)
    assert 0 < speedup < float("inf")
    assert hardware.bf16_matmul_speedup(size=128, repeats=2) == speedup  # cached: the same float
    assert hardware.bf16_matmul_speedup.cache_info().hits >= 1
    hardware.bf16_matmul_speedup.cache_clear()


def test_threads_follow_physical_cores_unless_omp_num_threads_is_set(monkeypatch):
    before = torch.get_num_threads()
    try:
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        assert hardware.set_cpu_threads() is None and torch.get_num_threads() == before
        monkeypatch.delenv("OMP_NUM_THREADS")
        monkeypatch.setattr(hardware, "physical_cores", lambda: 8)
        assert hardware.set_cpu_threads() == 8 and torch.get_num_threads() == 8
        assert hardware.set_cpu_threads(processes_on_this_machine=3) == 2 and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_physical_cores_counts_at_most_the_cpus_this_process_may_use():
    import os

    assert 1 <= hardware.physical_cores() <= len(os.sched_getaffinity(0))
