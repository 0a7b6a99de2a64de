"""Returning freed memory to the operating system (glibc only; a no-op elsewhere).

Block streaming frees a block's float64 covariances and factors before the next block allocates the same sizes
again. glibc serves allocations below its *dynamic* mmap threshold (raised up to 32 MB each time a large chunk is
freed) from heaps that fragment, so the resident high-water mark creeps up block after block although nothing is
retained. Pinning the threshold at 1 MB makes every large tensor its own mapping, unmapped when freed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

_M_MMAP_THRESHOLD = -3  # mallopt parameter number in glibc's malloc.h


@functools.cache
def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
        libc.mallopt  # noqa: B018  (glibc only)
        libc.malloc_trim  # noqa: B018
    except (OSError, AttributeError):
        return None
    return libc


def pin_mmap_threshold(nbytes: int = 1 << 20) -> bool:
    """Serve allocations of ``nbytes`` and more by ``mmap`` for the rest of the process; ``True`` if applied."""
    libc = _libc()
    return bool(libc is not None and libc.mallopt(_M_MMAP_THRESHOLD, nbytes))


def trim() -> None:
    """Give the heap's free memory back to the operating system."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)
