"""Uniform allocation: every targeted matrix keeps the same fraction of its parameters."""

from __future__ import annotations

from collections.abc import Mapping

from rankwise.linalg import rank_for_params_kept


def uniform_ranks(shapes: Mapping[str, tuple[int, int]], ratio: float) -> dict[str, int]:
    """Rank per matrix removing ``ratio`` of each matrix's parameters (rounded down, so at least ``ratio``).

    A matrix whose rank would be 0 (too small for this ratio) is left out, i.e. kept dense: factorising it
    would not save parameters at any usable rank.

    Args:
        shapes: name -> ``(out, in)``.
        ratio: fraction of parameters removed, in (0, 1).
    """
    ranks = {}
    for name, (m, n) in shapes.items():
        r = rank_for_params_kept(m, n, 1.0 - ratio)
        if r >= 1:
            ranks[name] = r
    return ranks
