# -*- test-case-name: tests.test_malloc -*-
"""
Hand memory that big mailbox operations used back to the system.

A cold index scan of a large mbox, or a commit, allocates and frees
megabytes in a thread of the pool.  glibc keeps freed memory for reuse: in the
thread's own arena, and, after a large block is freed, it raises the size
above which blocks get their own mapping (so the next ones stay on the
heap too).  A server process would then keep the peak of its largest scan
for good.  L{tune} pins that threshold; L{trim} returns free pages after
a big operation.  Both do nothing without glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util

__all__ = ["MMAP_THRESHOLD", "trim", "tune"]

#: Blocks this large or larger get a mapping of their own, which is
#: returned to the system when freed.  Smaller ones come from the heap and
#: are reused: a 1 MiB scan chunk in a fresh mapping each time costs a
#: page fault per 4 KiB, a quarter of a cold 1 GB scan's time.
MMAP_THRESHOLD = 4 << 20

#: At most this many malloc arenas.  glibc gives each new thread its own
#: (up to eight per CPU), each keeping what it once held; with the GIL the
#: threads seldom allocate at the same moment, so sharing costs little.
ARENA_MAX = 2

#: mallopt(3) parameter numbers.
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8


def _libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt  # noqa: B018 (probe: glibc has it, musl does not)
        libc.malloc_trim  # noqa: B018
    except (OSError, AttributeError):
        return None
    return libc


_LIBC = _libc()


def tune() -> bool:
    """
    Keep large blocks in their own mappings, and the number of arenas
    small, for the life of the process (and of its forks).

    @return: whether glibc took the setting.
    """
    if _LIBC is None:
        return False
    arenas = _LIBC.mallopt(_M_ARENA_MAX, ARENA_MAX)
    return bool(_LIBC.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(arenas)


def trim() -> bool:
    """
    Return free heap pages, in every arena, to the system.

    @return: whether any memory was released.
    """
    if _LIBC is None:
        return False
    return bool(_LIBC.malloc_trim(0))
