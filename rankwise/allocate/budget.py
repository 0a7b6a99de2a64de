"""Non-uniform rank allocation under a global parameter budget.

Every matrix ``k`` (shape ``m x n``) offers components ``i = 1..min(m, n)`` with a score ``s_ki`` (non-increasing in
``i``). A global threshold ``t`` keeps, in every matrix, the leading components with ``s_ki >= t``; ``t`` is the
smallest threshold whose total parameter count fits the budget. A matrix whose kept rank reaches its break-even rank
is kept dense (it costs ``m n``, which factorising could not beat); with a *limit* per matrix (the rank from which a
factor pair is no faster than dense, :mod:`rankwise.allocate.latency`) it is kept dense from that rank on.

Scores:

* ``welore``: singular values of ``W`` normalised by the largest, data-free (Jaiswal et al. 2024, "From GaLore to
  WeLore", https://arxiv.org/abs/2407.11239).
* ``loss``: squared singular values of the whitened ``W S`` (``S S^T = X X^T``), i.e. the output error
  ``||(W - W')X||^2`` each component removes, weighted by the layer's output sensitivity ``E||dL/dy||^2`` (a
  Gauss-Newton estimate of how much output error costs in LM loss; relative to the layer's output energy when no
  gradients were collected) and divided by the ``m + n`` parameters it costs: a greedy exchange of estimated loss
  for parameters, optimal up to one component because each matrix's scores are non-increasing.
* ``loss_mfac``: the same exchange with the loss increase from the M-FAC empirical Fisher of the layer's per-window
  weight gradients instead of the scalar sensitivity (:mod:`rankwise.allocate.fisher`).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from rankwise.linalg import break_even_rank, squared_singular_values


def layer_params(m: int, n: int, rank: int, limit: int | None = None) -> int:
    """Parameters of an ``m x n`` matrix kept at ``rank`` (dense once factorising stops saving, or from ``limit``)."""
    dense_from = break_even_rank(m, n) if limit is None else min(limit, break_even_rank(m, n))
    return m * n if rank >= dense_from or rank >= min(m, n) else rank * (m + n)


def check_floor(names, shapes: Mapping[str, tuple[int, int]], budget: int, min_rank: int,
                limits: Mapping[str, int]) -> None:
    """A ``ValueError`` saying by how much ``budget`` is missed when even ``min_rank`` everywhere exceeds it."""
    floor = sum(layer_params(*shapes[k], min_rank, limits.get(k)) for k in names)
    if floor > budget:
        raise ValueError(f"the budget of {budget:,} parameters cannot be met: even rank {min_rank} in every matrix "
                         f"keeps {floor:,} ({floor - budget:,} too many); lower the ratio")


def threshold_ranks(scores: Mapping[str, torch.Tensor], shapes: Mapping[str, tuple[int, int]], budget: int,
                    *, min_rank: int = 1, limits: Mapping[str, int] | None = None) -> dict[str, int]:
    """Ranks from the global threshold that keeps the most parameters within ``budget``.

    Args:
        scores: name -> 1-D non-increasing component scores (length ``min(m, n)``).
        shapes: name -> ``(m, n)``.
        budget: total parameters allowed over all these matrices.
        min_rank: no matrix goes below this rank.
        limits: name -> the rank from which the matrix is kept dense (below its break-even rank); none by default.

    Raises:
        ValueError: even ``min_rank`` everywhere exceeds the budget.
    """
    limits = limits or {}
    check_floor(scores, shapes, budget, min_rank, limits)

    def ranks_at(t: float) -> dict[str, int]:
        out = {}
        for k, s in scores.items():
            # s is non-increasing: count of entries >= t
            kept = int((s >= t).sum())
            out[k] = max(min_rank, kept)
        return out

    def total(ranks: Mapping[str, int]) -> int:
        return sum(layer_params(*shapes[k], r, limits.get(k)) for k, r in ranks.items())

    candidates = torch.cat([s.double().flatten() for s in scores.values()]).unique()  # ascending
    lo, hi = 0, candidates.numel() - 1  # the highest threshold keeps the fewest parameters
    if total(ranks_at(float(candidates[hi]))) > budget:
        return ranks_at(float("inf"))
    while lo < hi:  # smallest index (threshold) whose total fits
        mid = (lo + hi) // 2
        if total(ranks_at(float(candidates[mid]))) <= budget:
            hi = mid
        else:
            lo = mid + 1
    return ranks_at(float(candidates[lo]))


def welore_scores(weight: torch.Tensor) -> torch.Tensor:
    """Singular values of ``weight`` divided by the largest."""
    s = torch.linalg.svdvals(weight.detach().float())
    return s / s[0].clamp_min(torch.finfo(s.dtype).tiny)


def loss_scores(whitened: torch.Tensor, sensitivity: float | None = None) -> torch.Tensor:
    """Estimated loss each whitened component prevents, per parameter it costs.

    ``whitened`` is ``W S`` (``m x n``, with ``S S^T`` the per-token input covariance); its squared singular values
    ``s_i^2`` are the output error per token that dropping component ``i`` adds. With ``sensitivity``
    ``h = E||dL/dy||^2 / out_features`` (an isotropic Gauss-Newton estimate of the loss curvature at the layer's
    output), ``h s_i^2 / 2`` estimates the loss increase; without it, ``s_i^2`` is taken relative to the layer's
    output energy ``sum s^2``.
    """
    m, n = whitened.shape
    s2 = squared_singular_values(whitened.detach())
    if sensitivity is None:
        return s2 / s2.sum().clamp_min(torch.finfo(s2.dtype).tiny) / (m + n)
    return 0.5 * sensitivity / m * s2 / (m + n)
