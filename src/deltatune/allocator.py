"""The memory allocator of a deltatune process on a CPU machine.

A training step allocates and frees gigabytes of temporaries around the activations it keeps
for the backward pass. glibc's malloc keeps the freed pages between those kept tensors, so the
process's resident size grows well past the bytes it holds: on the default model at 4 rows of
400-512 tokens, a peak of 4.7 GiB where the bytes alive at once peak near 3.0 GiB. tcmalloc and
jemalloc reuse freed blocks by size and stay at 3.1 and 3.0 GiB on the same run, tcmalloc with
no slower steps (``benchmarks/allocators.py``); so does mimalloc, which deltatune installs on
Linux from its wheel (``cmeel-mimalloc``), so that a machine with nothing but pip gets it too.
So on Linux without a GPU, the ``deltatune`` command runs itself once more with one of them
preloaded: tcmalloc where the system has it (Debian and Ubuntu package it as
``libtcmalloc-minimal4``), else mimalloc, else jemalloc (``libjemalloc2``); PyTorch's own CPU
launcher preloads allocators the same way. ``DELTATUNE_ALLOCATOR=system`` keeps glibc's;
``DELTATUNE_ALLOCATOR=/path/lib.so`` names another library.

mimalloc runs with purging off (``MIMALLOC_PURGE_DELAY=-1``, unless the environment sets it).
By default it hands pages that stay free for a second back to the system, and a training step
is longer than that: every step then faults the same gigabytes of pages back in. On a 2-core
Intel Xeon that made steps on 4 rows of 400-512 tokens 1.37x slower than with purging off, which
costs 2% more peak memory (``benchmarks/allocators.py``, docs/measured.md).
"""

from __future__ import annotations

import ctypes.util
import os
import sys
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence

SETTING = "DELTATUNE_ALLOCATOR"
ACTIVE = "DELTATUNE_ALLOCATOR_ACTIVE"  # set in the relaunched process: what it runs with
# (name, ctypes.util.find_library's name, or None for mimalloc's wheel), the first one found is
# used: tcmalloc first, as it was as lean as jemalloc and the only one of the two not slower than
# glibc per step; then mimalloc from its wheel (as lean, within noise of glibc's step time);
# jemalloc last
CANDIDATES = (("tcmalloc", "tcmalloc_minimal"), ("tcmalloc", "tcmalloc"), ("mimalloc", None),
              ("jemalloc", "jemalloc"))
# settings each allocator runs with where the environment does not give them (see the docstring)
TUNING = {"mimalloc": {"MIMALLOC_PURGE_DELAY": "-1"}}


def mimalloc_from_wheel() -> Optional[str]:
    """The path of mimalloc's library from the ``cmeel-mimalloc`` wheel (installed with deltatune
    on Linux), or ``None`` where it is not installed."""
    from importlib import metadata

    try:
        path = Path(str(metadata.distribution("cmeel-mimalloc").locate_file("cmeel.prefix/lib/libmimalloc.so.3")))
    except metadata.PackageNotFoundError:
        return None
    return str(path) if path.is_file() else None


def find_allocator(env: Mapping[str, str], find=ctypes.util.find_library,
                   wheel: Callable[[], Optional[str]] = mimalloc_from_wheel) -> Optional[tuple[str, str]]:
    """``(name, library)`` to preload as ``env`` asks (``auto`` when unset), or ``None`` for glibc's.
    ``find`` looks a system library up by name, ``wheel`` gives mimalloc's from its wheel."""
    setting = env.get(SETTING, "auto").strip() or "auto"
    if setting == "system":
        return None
    if setting != "auto":
        path = setting if "/" in setting else _library_path(setting)
        if path is None or not Path(path).is_file():
            raise FileNotFoundError(f"{SETTING}={setting}: no such library (give a shared library's path or "
                                    "name, 'system' or 'auto')")
        return Path(path).name.split(".")[0].removeprefix("lib"), path
    if not sys.platform.startswith("linux") or Path("/dev/nvidiactl").exists():
        return None  # a GPU run's tensors live in CUDA's own caching allocator
    for name, library in CANDIDATES:
        found = wheel() if library is None else find(library)
        if found:
            return name, found
    return None


def _library_path(name: str) -> Optional[str]:
    """The path the dynamic linker's cache gives for the library file ``name`` (``ldconfig -p``)."""
    import subprocess

    try:
        listing = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    for line in listing.splitlines():
        soname, _, path = line.strip().partition(" => ")
        if soname.split(" ")[0] == name and path:
            return path
    return None


def tuning_for(name: str) -> dict[str, str]:
    """Environment settings the allocator ``name`` runs with, where the environment lacks them."""
    return dict(TUNING.get(name, {}))


def relaunch_with_allocator(argv: Sequence[str]) -> None:
    """Replace this process with the same ``deltatune`` command under a better allocator, where
    ``find_allocator`` picks one; return (and run as is) otherwise, or when already relaunched."""
    if os.environ.get(ACTIVE):
        return
    choice = find_allocator(os.environ)
    if choice is None:
        return
    name, library = choice
    preload = os.environ.get("LD_PRELOAD", "")
    env = {**tuning_for(name), **os.environ, "LD_PRELOAD": f"{library}:{preload}" if preload else library,
           ACTIVE: name}
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", "deltatune", *argv], env)


def without_preloaded_allocator(env: Mapping[str, str]) -> dict[str, str]:
    """``env`` as it was before ``relaunch_with_allocator`` added its allocator (the library it put
    first in ``LD_PRELOAD``, its settings, ``ACTIVE``), set to keep glibc's: for a child process
    that should run as a plain Python process would."""
    out = dict(env)
    name = out.pop(ACTIVE, None)
    if name:
        rest = out.pop("LD_PRELOAD", "").split(":")[1:]
        if rest:
            out["LD_PRELOAD"] = ":".join(rest)
        for setting in tuning_for(name):
            out.pop(setting, None)
    out[SETTING] = "system"
    return out


def allocator_in_use() -> str:
    """The allocator this process runs with: the preloaded one's name, or ``system``."""
    return os.environ.get(ACTIVE, "system")
