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
    assert hardware.auto_precision(cpu, {"avx2", "fma"}) == "fp32"
    assert hardware.auto_precision(cpu, {"avx2", "avx512_bf16"}) == "fp32"  # measured slower without AMX
    assert hardware.auto_precision(cpu, {"amx_bf16"}) == "bf16"
    info = tmp_path / "cpuinfo"
    info.write_text(SAPPHIRE_RAPIDS)
    assert hardware.cpu_has_fast_bf16(hardware.cpu_flags(info))


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
