"""A CPU run returns freed activation memory to the system instead of keeping it in malloc's heap:
with the threshold fixed, an activation-sized block is mapped on its own (and unmapped when
freed), where glibc's rising threshold would have served it from the heap."""

import subprocess
import sys

import pytest

from deltatune.train.host_memory import _libc

SCRIPT = """
import ctypes, sys, torch
from deltatune.train.host_memory import release_freed_activations

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
if sys.argv[1] == "release":
    assert release_freed_activations()
torch.empty(16 << 18).fill_(1)  # a freed 16 MiB mapping raises glibc's dynamic threshold to 16 MiB
mapped = libc.mallinfo2().hblkhd
block = torch.ones(5 << 18)  # 5 MiB: an activation of a small model
print((libc.mallinfo2().hblkhd - mapped) >> 20)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or _libc() is None
                    or not hasattr(_libc(), "mallinfo2"), reason="glibc 2.33+ on Linux")
def test_an_activation_sized_block_is_mapped_on_its_own_with_the_threshold_fixed():
    mapped = {mode: int(subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True,
                                       check=True).stdout) for mode in ("default", "release")}
    assert mapped == {"default": 0, "release": 5}
