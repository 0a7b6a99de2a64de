"""Effective-rank allocation (D-Rank): more rank where a matrix's whitened spectrum is spread out.

Mi et al., "D-Rank: layer-wise dynamic rank allocation for LLM compression", 2025,
https://arxiv.org/abs/2509.25622 (reference code: Rainbow0427/D_rank).

Each matrix's *effective rank* is ``exp(H(p))`` with ``p_i = s_i^2 / sum s^2`` the normalised squared singular values of
its whitened ``W S``, as the reference code computes it (``get_sensitivity_and_singular_values``; Roy and Vetterli's
effective rank normalises the singular values themselves, not their squares). Within each projection type (all
``q_proj``, all ``down_proj`` ...) the type's share of the budget ``P`` is spread by the Lagrange solution of ``min sum
e_i / k_i`` subject to ``sum k_i w_i = P`` (``w_i = m + n`` per rank): ``k_i = sqrt(e_i / w_i) P / sum_j sqrt(e_j
w_j)``. As in the reference code, q/k/v always take this allocation, gate projections keep the uniform one, and the
other types take it only where it lowers their summed whitened truncation error. Then 20 % of every query and key rank
moves to the value projections (in parameters, so the budget holds under grouped-query attention), and single ranks are
moved until the budget is met exactly.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from rankwise.allocate.budget import check_floor, layer_params
from rankwise.linalg import break_even_rank

QK_TAX = 0.2
"""Fraction of each query and key rank moved to the value projections (the reference code's ``tax_rate``)."""

_ALWAYS = ("q_proj", "k_proj", "v_proj", "query", "key", "value")
_NEVER = ("gate_proj",)
_QK = ("q_proj", "k_proj", "query", "key")
_V = ("v_proj", "value")


def effective_rank(s2: torch.Tensor) -> float:
    """``exp`` of the entropy of the normalised squared singular values ``s2``."""
    p = s2.double().clamp_min(0.0)
    p = p / p.sum().clamp_min(torch.finfo(p.dtype).tiny)
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def _kind(name: str) -> str:
    """The projection type: the name without block indices (``model.layers.self_attn.q_proj``; BERT's attention
    and feed-forward ``output.dense`` stay apart)."""
    return ".".join(part for part in name.split(".") if not part.isdigit())


def _last(kind: str) -> str:
    return kind.rsplit(".", 1)[-1]


def drank_ranks(scores: Mapping[str, torch.Tensor], shapes: Mapping[str, tuple[int, int]], budget: int, *,
                min_rank: int = 1, limits: Mapping[str, int] | None = None) -> dict[str, int]:
    """D-Rank's ranks from each matrix's squared whitened singular values (``scores``), keeping at most ``budget``
    parameters (``limits`` as in :func:`~rankwise.allocate.threshold_ranks`).

    Raises:
        ValueError: even ``min_rank`` everywhere keeps more than ``budget`` (the message says by how much).
    """
    limits = limits or {}

    def cost(k: str, r: int) -> int:
        return layer_params(*shapes[k], r, limits.get(k))

    def cap(k: str) -> int:  # the largest rank that still saves parameters
        m, n = shapes[k]
        return max(min_rank, min(min(m, n), break_even_rank(m, n) - 1, limits.get(k, math.inf) - 1))

    check_floor(scores, shapes, budget, min_rank, limits)
    kept = budget / sum(m * n for m, n in (shapes[k] for k in scores))
    erank = {k: effective_rank(s) for k, s in scores.items()}
    ranks: dict[str, int] = {}
    by_kind: dict[str, list[str]] = {}
    for k in scores:
        by_kind.setdefault(_kind(k), []).append(k)
    for kind, names in by_kind.items():
        uniform = {k: min(cap(k), max(min_rank, int(kept * shapes[k][0] * shapes[k][1] / sum(shapes[k]))))
                   for k in names}
        total = kept * sum(shapes[k][0] * shapes[k][1] for k in names)
        norm = sum(math.sqrt(erank[k] * sum(shapes[k])) for k in names)
        dynamic = {k: min(cap(k), max(min_rank, round(math.sqrt(erank[k] / sum(shapes[k])) * total / norm)))
                   for k in names}
        if _last(kind) in _NEVER:
            choice = uniform
        elif _last(kind) in _ALWAYS:
            choice = dynamic
        else:
            choice = dynamic if _tail(scores, dynamic) < _tail(scores, uniform) else uniform
        ranks.update(choice)
    _tax_queries_keys(ranks, shapes, cap)
    _fit(ranks, budget, erank, shapes, cost, cap, min_rank)
    return ranks


def _tail(scores: Mapping[str, torch.Tensor], ranks: Mapping[str, int]) -> float:
    """The summed whitened truncation error ``sum_i sum_{j > k_i} s_ij^2`` of ``ranks`` over one type's matrices."""
    return sum(float(scores[k][r:].sum()) for k, r in ranks.items())


def _tax_queries_keys(ranks: dict[str, int], shapes, cap) -> None:
    values = [k for k in ranks if _last(_kind(k)) in _V]
    if not values:
        return
    pool = 0
    for k in [k for k in ranks if _last(_kind(k)) in _QK]:
        cut = round(QK_TAX * ranks[k])
        ranks[k] -= cut
        pool += cut * sum(shapes[k])
    share = pool / len(values)
    for k in values:
        ranks[k] = min(cap(k), ranks[k] + int(share // sum(shapes[k])))


def _fit(ranks: dict[str, int], budget: int, erank, shapes, cost, cap, min_rank: int) -> None:
    """Single-rank moves until the budget is met: one rank from each matrix in turn, lowest effective rank per
    parameter first; then any room left is handed out the same way, highest first."""
    order = sorted(ranks, key=lambda k: erank[k] / sum(shapes[k]))  # ascending value per parameter
    total = sum(cost(k, r) for k, r in ranks.items())
    i = 0
    while total > budget:
        k = order[i % len(order)]
        if ranks[k] > min_rank:
            total += cost(k, ranks[k] - 1) - cost(k, ranks[k])
            ranks[k] -= 1
        i += 1
    grew = True
    while grew:  # what is left: one rank to each matrix in turn, the highest value per parameter first
        grew = False
        for k in reversed(order):
            if ranks[k] < cap(k) and total + cost(k, ranks[k] + 1) - cost(k, ranks[k]) <= budget:
                total += cost(k, ranks[k] + 1) - cost(k, ranks[k])
                ranks[k] += 1
                grew = True
