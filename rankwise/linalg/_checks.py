"""Input validation shared by the linalg routines: one-line errors that name the argument."""

from __future__ import annotations

import numbers
import warnings

import torch

from rankwise._errors import RankwiseWarning

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_matrix(x: object, name: str) -> torch.Tensor:
    """Return ``x`` if it is a finite, non-empty 2-D floating tensor, else raise ``ValueError``."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim != 2:
        raise ValueError(f"{name} must be a 2-D matrix, got a {x.ndim}-D tensor of shape {tuple(x.shape)}")
    if x.numel() == 0:
        raise ValueError(f"{name} must be non-empty, got shape {tuple(x.shape)}")
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must have dtype float16, bfloat16, float32 or float64, got {x.dtype}")
    if not all_finite(x):
        raise ValueError(f"{name} contains NaN or Inf; all entries must be finite")
    return x


def all_finite(x: torch.Tensor) -> bool:
    """Whether every entry is finite. Fast path: one sum (NaN/Inf propagate); an overflowing sum falls through."""
    if x.is_floating_point() and bool(torch.isfinite(x.sum())):
        return True
    return bool(torch.isfinite(x).all())


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Decompose half precision in float32, keep float32/float64 as they are."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_rank(rank: object, max_rank: int, name: str = "rank") -> int:
    """Validate an absolute rank; clamp one above ``max_rank`` with a warning."""
    if isinstance(rank, bool) or not isinstance(rank, numbers.Integral):
        raise ValueError(f"{name} must be a non-negative integer, got {rank!r}")
    rank = int(rank)
    if rank < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {rank}")
    if rank > max_rank:
        warnings.warn(f"{name}={rank} exceeds min(m, n)={max_rank}; clamped to {max_rank}", RankwiseWarning,
                      stacklevel=3)
        return max_rank
    return rank


def check_positive_int(value: object, name: str, minimum: int = 0) -> int:
    """Validate an integer option such as ``oversample`` or ``power_iters``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or int(value) < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def make_generator(generator: torch.Generator | int | None) -> torch.Generator:
    """A CPU generator from a seed, an existing generator, or ``None`` (seed 0: deterministic by default)."""
    if isinstance(generator, torch.Generator):
        return generator
    if generator is None:
        generator = 0
    if isinstance(generator, bool) or not isinstance(generator, numbers.Integral):
        raise ValueError(f"generator must be a torch.Generator, an integer seed or None, got {generator!r}")
    return torch.Generator().manual_seed(int(generator))


def randn(shape: tuple[int, ...], generator: torch.Generator, dtype: torch.dtype,
          device: torch.device) -> torch.Tensor:
    """Gaussian draws made on the generator's device, then moved: same seed, same bytes on every device."""
    out = torch.randn(shape, generator=generator, dtype=dtype, device=generator.device)
    return out.to(device)
