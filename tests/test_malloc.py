"""
Tests for L{pop3srv.processes.malloc}.
"""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

_SCRIPT = """
from pop3srv.processes import malloc

def private_dirty_kib():
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            if line.startswith("Private_Dirty:"):
                return int(line.split()[1])
    raise AssertionError("no Private_Dirty")

assert malloc.tune()
big = bytearray(malloc.MMAP_THRESHOLD * 4)
del big
before = private_dirty_kib()
blocks = [bytearray(malloc.MMAP_THRESHOLD + 4096) for _ in range(10)]
during = private_dirty_kib()
del blocks
after = private_dirty_kib()
assert during - before > 10 * malloc.MMAP_THRESHOLD // 1024 * 0.9, (before, during)
assert after - before < malloc.MMAP_THRESHOLD // 1024, (before, after)
assert isinstance(malloc.trim(), bool)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_tuned_large_blocks_go_back_to_the_system() -> None:
    """
    After tune(), a block just over the threshold is its own mapping: many
    of them, freed, leave no heap behind, even after a larger block was
    freed (which would otherwise raise glibc's threshold above them).

    In a new interpreter: free heap left by earlier tests (glibc reuses it
    before it maps anything) would hide the effect.
    """
    subprocess.run([sys.executable, "-c", _SCRIPT], check=True, timeout=60)
