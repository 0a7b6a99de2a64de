"""One rank vocabulary for every routine.

* an ``int`` is an absolute rank;
* a ``float`` in ``(0, 1)`` is the fraction of the matrix's parameters **kept** by the factorisation
  (a "ratio", as used by the CLI, is the fraction **removed**: ``kept = 1 - ratio``);
* :class:`Energy` keeps the smallest rank whose squared singular values reach a fraction of the total.

A rank-``r`` factorisation of an ``m x n`` matrix stores ``r * (m + n)`` numbers, so it saves parameters only when
``r * (m + n) < m * n``, i.e. below :func:`break_even_rank`.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch

from rankwise.linalg._checks import check_rank


@dataclass(frozen=True)
class Energy:
    """Keep the smallest rank whose share of ``sum(S**2)`` is at least ``threshold`` (in ``(0, 1]``)."""

    threshold: float

    def __post_init__(self) -> None:
        if not (isinstance(self.threshold, numbers.Real) and 0.0 < float(self.threshold) <= 1.0):
            raise ValueError(f"Energy.threshold must be in (0, 1], got {self.threshold!r}")


RankSpec = int | float | Energy


def break_even_rank(m: int, n: int) -> int:
    """Largest rank at which two factors hold no more parameters than the dense ``m x n`` matrix.

    Ranks strictly below ``m * n / (m + n)`` save parameters; at or above it factorising saves nothing.
    """
    return (m * n) // (m + n)


def saves_params(m: int, n: int, rank: int) -> bool:
    """Whether a rank-``rank`` factorisation stores fewer numbers than the dense matrix."""
    return rank * (m + n) < m * n


def rank_for_params_kept(m: int, n: int, kept: float) -> int:
    """Largest rank whose factors hold at most ``kept * m * n`` parameters (``kept`` in ``(0, 1]``)."""
    if not (isinstance(kept, numbers.Real) and 0.0 < float(kept) <= 1.0):
        raise ValueError(f"kept must be a fraction in (0, 1], got {kept!r}")
    return min(min(m, n), math.floor(float(kept) * m * n / (m + n) + 1e-9))


def rank_for_energy(S: torch.Tensor, threshold: float) -> int:
    """Smallest ``r`` with ``sum(S[:r]**2) >= threshold * sum(S**2)`` (``S`` sorted descending)."""
    Energy(threshold)
    energy = S.double().pow(2)
    total = float(energy.sum())
    if total == 0.0:
        return 0
    cumulative = torch.cumsum(energy, 0) / total
    return min(int(torch.searchsorted(cumulative, torch.tensor(threshold - 1e-12, dtype=cumulative.dtype))) + 1,
               S.shape[0])


def resolve_rank(rank: RankSpec, m: int, n: int, singular_values: torch.Tensor | None = None) -> int:
    """Turn any :data:`RankSpec` into an absolute rank in ``[0, min(m, n)]``.

    Raises ``ValueError`` naming what is allowed; an integer above ``min(m, n)`` is clamped with a warning.
    """
    if isinstance(rank, Energy):
        if singular_values is None:
            raise ValueError("rank=Energy(...) needs the singular values: use solver='exact'")
        return rank_for_energy(singular_values, rank.threshold)
    if isinstance(rank, numbers.Real) and not isinstance(rank, numbers.Integral | bool):
        if not 0.0 < float(rank) < 1.0:
            raise ValueError(
                f"rank must be an int >= 0, a float in (0, 1) (fraction of parameters kept) or Energy(t); got {rank!r}"
            )
        return rank_for_params_kept(m, n, float(rank))
    return check_rank(rank, min(m, n))
