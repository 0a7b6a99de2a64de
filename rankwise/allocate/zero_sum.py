"""Zero-sum allocation (ZS-SVD): prune singular values globally so the predicted loss changes cancel out.

Ma et al., "Zero-Sum SVD: balancing loss sensitivity for low-rank LLM compression", 2026,
https://arxiv.org/abs/2602.02848 (reference code: mint-vu/Zero-Sum-SVD).

In whitened coordinates ``A = W S = U diag(s) V^T`` (``S S^T = X X^T``), removing component ``i`` changes the loss by
about ``d_i = -s_i u_i^T (G S^-T) v_i`` to first order, where ``G = dL/dW`` is the gradient of the calibration
loss (``G S^-T = dL/dA``). Every matrix offers only its smallest remaining singular value; a running sum of the
removed ``d_i`` decides which side to take next: when it is at or below zero, the candidate with the smallest
non-negative ``d_i``; above zero, the one with the smallest ``|d_i|`` among the negative ones (the other side when
one is empty). Removal stops once the kept parameters fit the budget, so predicted increases and decreases
balance instead of piling up. As in the reference code, every matrix starts at full rank and removals above its
break-even rank (which save nothing until the matrix is factorised) count in the running sum too.
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping

import torch

from rankwise.allocate.budget import check_floor, layer_params


def zero_sum_scores(weight: torch.Tensor, whitening, grad: torch.Tensor) -> torch.Tensor:
    """``d_i = -s_i u_i^T (G S^-T) v_i`` per whitened component, in order of decreasing ``s_i`` (float64).

    Args:
        weight: ``(m, n)``.
        whitening: the input's :class:`~rankwise.linalg.Whitening` (``S``).
        grad: ``(m, n)`` gradient of the calibration loss with respect to ``weight``.
    """
    A = whitening.right_multiply(weight.detach().double())  # (m, n) W S
    U, s, Vh = torch.linalg.svd(A, full_matrices=False)
    GA = whitening.right_solve_transpose(grad.detach().double())  # (m, n) dL/dA
    g = ((U.mT @ GA) * Vh).sum(dim=1)  # u_i^T GA v_i
    return -s * g


def zero_sum_ranks(scores: Mapping[str, torch.Tensor], shapes: Mapping[str, tuple[int, int]], budget: int, *,
                   min_rank: int = 1, limits: Mapping[str, int] | None = None) -> dict[str, int]:
    """Ranks from ZS-SVD's zero-sum removal order, keeping at most ``budget`` parameters.

    Args:
        scores: name -> predicted loss change of removing each component, in order of decreasing singular value.
        shapes: name -> ``(m, n)``.
        budget: total parameters allowed over these matrices.
        min_rank: no matrix goes below this rank.
        limits: name -> rank from which the matrix is kept dense (as in :func:`~rankwise.allocate.threshold_ranks`).

    Raises:
        ValueError: even ``min_rank`` everywhere keeps more than ``budget`` (the message says by how much).
    """
    limits = limits or {}
    ranks = {k: int(s.numel()) for k, s in scores.items()}

    def cost(k: str, r: int) -> int:
        return layer_params(*shapes[k], r, limits.get(k))

    check_floor(scores, shapes, budget, min_rank, limits)
    total = sum(cost(k, r) for k, r in ranks.items())
    values = {k: s.double().tolist() for k, s in scores.items()}
    pos: list[tuple[float, str]] = []
    neg: list[tuple[float, str]] = []

    def offer(k: str) -> None:
        if ranks[k] > min_rank:
            d = values[k][ranks[k] - 1]
            heapq.heappush(pos if d >= 0 else neg, (abs(d), k))

    for k in sorted(scores):
        offer(k)
    running = 0.0
    while total > budget:
        side = pos if (running <= 0 and pos) or not neg else neg
        _, k = heapq.heappop(side)
        running += values[k][ranks[k] - 1]
        before = cost(k, ranks[k])
        ranks[k] -= 1
        total += cost(k, ranks[k]) - before
        offer(k)
    return ranks
