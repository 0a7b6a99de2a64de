"""Returning freed memory to the operating system, or keeping it for training steps (glibc only; a no-op elsewhere).

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

_M_TRIM_THRESHOLD = -1  # mallopt parameter numbers in glibc's malloc.h
_M_MMAP_THRESHOLD = -3
_M_MMAP_MAX = -4
_C_INT_MAX = 2**31 - 1  # mallopt takes a C int


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


def reuse_freed_memory(nbytes: int = 1 << 30) -> bool:
    """Serve allocations below ``nbytes`` from the heap and keep what is freed there for the next step, for the rest
    of the process; ``True`` if applied.

    For training, where every step allocates the same tensors again. glibc's default maps anything above its dynamic
    threshold (at most 32 MB) afresh each time and zero-fills it page by page when first written. With heal's
    earlier, unfused loss a step on the default model allocated a dozen vocabulary-sized tensors (4 x 256 tokens x
    49,152 logits, 200 MB each); kept in the heap, ``rankwise heal`` at ratio 0.4 took 11.3 s a step against 14.3 s
    on the machine of the time, at a peak RSS of 6.1 GB against 5.3 GB: the heap holds the step's largest working
    set once reached. With the fused loss (one gradient buffer) the setting still takes a step from 6.69 s to 6.30 s
    on a faster machine, at 4.30 GB against 4.26 GB (``benchmarks/heal_allocator.py``, RESULTS.md). A freed chunk is
    not always reused at the same size (an aligned allocation needs a little more than the chunk it replaces), but
    the step's freed tensors coalesce. With the unfused loss the mmap threshold did most of it (12.6 s a step alone,
    12.0 s with both, one run each); the trim threshold is never set alone, which would also fix the mmap threshold
    at glibc's 128 KB (18.4 s a step).

    Raises:
        ValueError: ``nbytes`` does not fit mallopt's C int.
    """
    if not 0 < nbytes <= _C_INT_MAX:
        raise ValueError(f"nbytes must be in (0, {_C_INT_MAX}] (mallopt takes a C int), got {nbytes}")
    libc = _libc()
    if libc is None:
        return False
    # glibc before 2.35 refuses an mmap threshold above 32 MB: there, turn mmap off for the heap's allocations
    kept = bool(libc.mallopt(_M_MMAP_THRESHOLD, nbytes) or libc.mallopt(_M_MMAP_MAX, 0))
    return kept and bool(libc.mallopt(_M_TRIM_THRESHOLD, nbytes))


def trim() -> None:
    """Give the heap's free memory back to the operating system."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)
