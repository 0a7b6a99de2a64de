"""Returning freed memory to the operating system (glibc only; a no-op elsewhere).

Block streaming frees a block's float64 covariances and factors before the next block allocates the same sizes
again. glibc serves allocations below its *dynamic* mmap threshold (raised up to 32 MB each time a large chunk is
freed) from heaps that fragment, so the resident high-water mark creeps up block after block although nothing is
retained. Pinning the threshold makes every larger tensor its own mapping, unmapped when freed.

The pin trades page faults for resident memory: each mapping is zero-filled page by page when first written. At
4 MB the small per-batch activations (a batch of 1,024 tokens of a 576-wide model is 2.4 MB) are reused from the
heap, and covariances, weights and wide activations are mapped. Compressing the default model on 8 windows
(``svd_llm+loss+seq+anc``, ``--recipe best`` at the time) took 144 s with the pin at 1 MB (peak RSS 1.01 GB, 60 s of
it in the kernel), 110 s at 4 MB (1.19 GB), 113 s at 8 MB (1.43 GB) and 110 s without a pin (1.57 GB).
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


def pin_mmap_threshold(nbytes: int = 4 << 20) -> bool:
    """Serve allocations of ``nbytes`` and more by ``mmap`` for the rest of the process; ``True`` if applied."""
    libc = _libc()
    return bool(libc is not None and libc.mallopt(_M_MMAP_THRESHOLD, nbytes))


def trim() -> None:
    """Give the heap's free memory back to the operating system."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)
