"""Which allocator the ``deltatune`` command runs itself under (``src/deltatune/allocator.py``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from deltatune.allocator import ACTIVE, SETTING, find_allocator
from deltatune.allocator import tuning_for as allocator_tuning


def _finder(present: dict):
    return lambda name: present.get(name)


def test_system_keeps_glibc_and_auto_takes_the_first_library_found(monkeypatch):
    monkeypatch.setattr(sys, "platform", "linux")
    present = {"tcmalloc_minimal": "libtcmalloc_minimal.so.4", "jemalloc": "libjemalloc.so.2"}
    assert find_allocator({SETTING: "system"}, _finder(present)) is None
    if os.path.exists("/dev/nvidiactl"):
        pytest.skip("a GPU machine keeps the system allocator")
    none, wheel = (lambda: None), (lambda: "/site-packages/cmeel.prefix/lib/libmimalloc.so.3")
    assert find_allocator({}, _finder(present), none) == ("tcmalloc", "libtcmalloc_minimal.so.4")
    assert find_allocator({}, _finder(present), wheel) == ("tcmalloc", "libtcmalloc_minimal.so.4")
    assert find_allocator({SETTING: "auto"}, _finder({"jemalloc": "libjemalloc.so.2"}), none) == (
        "jemalloc", "libjemalloc.so.2")
    assert find_allocator({}, _finder({"jemalloc": "libjemalloc.so.2"}), wheel) == ("mimalloc", wheel())
    assert find_allocator({}, _finder({}), wheel) == ("mimalloc", wheel())  # pip alone brings mimalloc
    assert find_allocator({}, _finder({}), none) is None  # nothing installed: glibc's, no error


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the wheel is a Linux dependency")
def test_mimalloc_comes_with_deltatune_on_linux():
    from deltatune.allocator import mimalloc_from_wheel

    library = mimalloc_from_wheel()
    assert library is not None and os.path.isfile(library) and "libmimalloc.so" in library


def test_a_named_library_must_exist(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"{SETTING}=.*no such library"):
        find_allocator({SETTING: str(tmp_path / "libmissing.so")})
    library = tmp_path / "libmine.so.1"
    library.write_bytes(b"")
    assert find_allocator({SETTING: str(library)}) == ("mine", str(library))


def test_the_command_runs_itself_again_under_the_allocator_found():
    """``deltatune`` relaunches once with the library preloaded (not at all where the machine has
    none, or under DELTATUNE_ALLOCATOR=system), and the relaunched process reports it."""
    expected = find_allocator(os.environ)
    for setting, want in (("auto", expected[0] if expected else "system"), ("system", "system")):
        env = {k: v for k, v in os.environ.items() if k not in (ACTIVE, "LD_PRELOAD")}
        env[SETTING] = setting
        out = subprocess.run([sys.executable, "-m", "deltatune", "info"], env=env, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr[-2000:]
        assert json.loads(out.stdout)["allocator"] == want, setting


@pytest.mark.parametrize("given", [None, "250"])
def test_mimalloc_runs_without_purging_unless_told_otherwise(monkeypatch, tmp_path, given):
    """Under mimalloc the relaunched command keeps freed pages (purging made every step fault them
    back in); a purge delay set in the environment wins."""
    from deltatune import allocator

    library = tmp_path / "libmimalloc.so.3"
    library.write_bytes(b"")
    monkeypatch.delenv(ACTIVE, raising=False)
    monkeypatch.setenv(SETTING, str(library))
    if given is None:
        monkeypatch.delenv("MIMALLOC_PURGE_DELAY", raising=False)
    else:
        monkeypatch.setenv("MIMALLOC_PURGE_DELAY", given)
    launched = {}
    monkeypatch.setattr(allocator.os, "execve", lambda path, argv, env: launched.update(env=env, argv=argv))
    allocator.relaunch_with_allocator(["info"])
    env = launched["env"]
    assert env[ACTIVE] == "mimalloc" and env["LD_PRELOAD"].startswith(str(library))
    assert env["MIMALLOC_PURGE_DELAY"] == ("-1" if given is None else given)
    assert launched["argv"][-1] == "info"


def test_other_allocators_get_no_mimalloc_settings():
    assert allocator_tuning("tcmalloc") == {} and allocator_tuning("jemalloc") == {}
    assert allocator_tuning("mimalloc") == {"MIMALLOC_PURGE_DELAY": "-1"}


def test_a_bench_worker_for_glibc_drops_only_the_preloaded_allocator():
    from deltatune.bench.run import worker_env

    relaunched = {ACTIVE: "mimalloc", "LD_PRELOAD": "/w/libmimalloc.so.3:/opt/libmine.so", "MIMALLOC_PURGE_DELAY": "-1",
                  "PATH": "/bin"}
    assert worker_env("same", relaunched) == relaunched
    assert worker_env("system", relaunched) == {"LD_PRELOAD": "/opt/libmine.so", "PATH": "/bin", SETTING: "system"}
    # a process that was not relaunched has no allocator of deltatune's in LD_PRELOAD to drop
    assert worker_env("system", {"LD_PRELOAD": "/opt/libmine.so"}) == {"LD_PRELOAD": "/opt/libmine.so",
                                                                       SETTING: "system"}
