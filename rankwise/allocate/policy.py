"""Allocation policies by name or callable: what statistics each needs, and how scores become each matrix's share
of the budget.

A policy scores every targeted matrix (from its weight and, where needed, its calibration statistics) and turns
the scores into *shares*: the fraction of its dense cost each matrix may keep, under a total that keeps ``kept`` of
the targets' cost (``1 - ratio`` of their parameters, or ``bits / 16`` of their bf16 bytes). The method then picks,
per matrix, the largest size knob (a rank, a number of atoms ...) whose cost fits the share
(:func:`rankwise.methods.base.choose_knobs`). Scores rank components the way a low-rank truncation does; for other
representations they only decide how the budget is spread. The compression pipeline asks a
policy what it needs (:attr:`AllocationPolicy.kinds`), streams the model once to score each block's matrices if
anything is needed, and calls :meth:`AllocationPolicy.ranks` once with every score.

A user policy is any callable ``(shapes, ratio) -> ranks`` (data-free), or an :class:`AllocationPolicy`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from rankwise.allocate.budget import layer_params, loss_scores, threshold_ranks, welore_scores
from rankwise.allocate.drank import drank_ranks
from rankwise.allocate.fisher import fisher_loss_scores
from rankwise.allocate.uniform import uniform_ranks
from rankwise.allocate.zero_sum import zero_sum_ranks, zero_sum_scores
from rankwise.calibrate import LayerStats
from rankwise.linalg import break_even_rank, squared_singular_values

Shapes = Mapping[str, tuple[int, int]]
RankFn = Callable[[Shapes, float], Mapping[str, int]]


@dataclass(frozen=True)
class AllocationPolicy:
    """How many ranks each matrix keeps.

    Attributes:
        name: shown in reports.
        score: ``(name, weight, stats) -> 1-D non-increasing scores``, or ``None`` for a policy that needs no
            scores (then ``rank_fn`` gives the ranks from the shapes alone).
        kinds: calibration statistics ``score`` needs (subset of ``xxt``, ``gout``, ``grad``, ``gwin``); empty for
            data-free scores.
        rank_fn: ranks from the shapes and ratio, for policies without scores.
        even: every matrix keeps the same share (uniform allocation).
        select: ``(scores, shapes, budget, limits=...) -> ranks`` turning the scores into ranks under a budget of
            kept parameters; ``None``: the global threshold of :func:`~rankwise.allocate.threshold_ranks` (scores
            non-increasing per matrix).
    """

    name: str
    score: Callable[[str, torch.Tensor, LayerStats | None], torch.Tensor] | None = None
    kinds: frozenset[str] = frozenset()
    rank_fn: RankFn | None = None
    even: bool = False
    select: Callable[..., dict[str, int]] | None = None

    @property
    def needs_scores(self) -> bool:
        return self.score is not None

    def shares(self, shapes: Shapes, kept: float, scores: Mapping[str, torch.Tensor] | None = None,
               limits: Mapping[str, int] | None = None) -> dict[str, float]:
        """The fraction of its dense cost each matrix may keep (``1.0``: dense), ``kept`` on average; ``limits``
        (name -> rank) keeps a matrix dense from that rank on (see :mod:`rankwise.allocate.latency`)."""
        if self.even:
            return {name: kept for name in shapes}
        ranks = self.ranks(shapes, 1.0 - kept, scores, limits)
        return {name: layer_params(m, n, ranks[name]) / (m * n) if name in ranks else 1.0
                for name, (m, n) in shapes.items()}

    def ranks(self, shapes: Shapes, ratio: float, scores: Mapping[str, torch.Tensor] | None = None,
              limits: Mapping[str, int] | None = None) -> dict[str, int]:
        """Rank per matrix; a matrix missing from the result stays dense."""
        limits = limits or {}
        if self.score is None:
            assert self.rank_fn is not None
            ranks = dict(self.rank_fn(shapes, ratio))
            bad = [n for n, r in ranks.items() if n not in shapes or not isinstance(r, int) or r < 1]
            if bad:
                raise ValueError(f"allocation {self.name!r} returned an invalid rank for {bad[0]!r}: ranks must be "
                                 "ints >= 1 keyed by targeted layer names")
            return {n: r for n, r in ranks.items() if r < min(min(shapes[n]), limits.get(n, r + 1))}
        if scores is None or set(scores) != set(shapes):
            raise ValueError(f"allocation {self.name!r} needs a score for every targeted matrix")
        budget = int((1.0 - ratio) * sum(m * n for m, n in shapes.values()))
        ranks = (self.select or threshold_ranks)(scores, shapes, budget, limits=limits)
        return {n: r for n, r in ranks.items()
                if r < min(break_even_rank(*shapes[n]), limits.get(n, r + 1)) and r < min(shapes[n])}


def _welore(_name: str, weight: torch.Tensor, _stats: LayerStats | None) -> torch.Tensor:
    return welore_scores(weight)


def _loss(name: str, weight: torch.Tensor, stats: LayerStats | None) -> torch.Tensor:
    if stats is None:
        raise ValueError("allocation 'loss' needs calibration data (the input covariances)")
    sensitivity = stats.output_sensitivity(name) if stats.grad_out else None
    return loss_scores(stats.whitening().right_multiply(weight.detach().float()), sensitivity)


def _loss_channels(name: str, weight: torch.Tensor, stats: LayerStats | None) -> torch.Tensor:
    rows = stats.output_channel_weights(name) if stats is not None and stats.xxt is not None else None
    if rows is None:
        raise ValueError("allocation 'loss_channels' needs calibration data: the input covariances and the loss "
                         "gradient at every layer's outputs (statistics kinds 'xxt' and 'gout')")
    m, n = weight.shape
    weighted = weight.detach().double() * rows.to(weight.device, torch.float64)[:, None]  # D W
    s2 = squared_singular_values(stats.whitening().right_multiply(weighted))
    return 0.5 * s2 / (m + n)


MFAC_DAMP = 1e-3
"""Default damping of ``loss_mfac``: ``lambda`` relative to the mean diagonal of each layer's window Fisher."""


def mfac_allocation(damp: float = MFAC_DAMP) -> AllocationPolicy:
    """``loss_mfac`` with another damping: loss-aware allocation scored by the M-FAC empirical Fisher of each
    layer's per-window weight gradients (:mod:`rankwise.allocate.fisher`, https://arxiv.org/abs/2107.03356).

    Raises:
        ValueError: ``damp`` is not a finite float > 0.
    """
    if not (isinstance(damp, int | float) and 0 < damp < float("inf")):
        raise ValueError(f"damp must be a finite float > 0, got {damp!r}")

    def score(name: str, weight: torch.Tensor, stats: LayerStats | None) -> torch.Tensor:
        if stats is None or name not in stats.grad_windows:
            raise ValueError("allocation 'loss_mfac' needs calibration data: the input covariances and each "
                             "window's weight gradient (statistics kinds 'xxt' and 'gwin')")
        return fisher_loss_scores(weight, stats.whitening(), stats.grad_windows[name], damp)

    return AllocationPolicy("loss_mfac", score=score, kinds=frozenset({"xxt", "gwin"}))


def _zero_sum(name: str, weight: torch.Tensor, stats: LayerStats | None) -> torch.Tensor:
    if stats is None or name not in stats.grad_sum:
        raise ValueError("allocation 'zs' needs calibration data: the input covariances and the loss gradient of "
                         "every weight (statistics kinds 'xxt' and 'grad')")
    return zero_sum_scores(weight, stats.whitening(), stats.grad_sum[name])


def _drank(_name: str, weight: torch.Tensor, stats: LayerStats | None) -> torch.Tensor:
    if stats is None:
        raise ValueError("allocation 'drank' needs calibration data (the input covariances)")
    return squared_singular_values(stats.whitening().right_multiply(weight.detach().float()))


ALLOCATIONS: dict[str, AllocationPolicy] = {
    "uniform": AllocationPolicy("uniform", rank_fn=uniform_ranks, even=True),
    "welore": AllocationPolicy("welore", score=_welore),
    "loss": AllocationPolicy("loss", score=_loss, kinds=frozenset({"xxt", "gout"})),
    "loss_channels": AllocationPolicy("loss_channels", score=_loss_channels, kinds=frozenset({"xxt", "gout"})),
    "loss_mfac": mfac_allocation(),
    "zs": AllocationPolicy("zs", score=_zero_sum, kinds=frozenset({"xxt", "grad"}), select=zero_sum_ranks),
    "drank": AllocationPolicy("drank", score=_drank, kinds=frozenset({"xxt"}), select=drank_ranks),
}


def allocation_policy(spec: str | RankFn | AllocationPolicy) -> AllocationPolicy:
    """The policy for a registered name, a ``(shapes, ratio) -> ranks`` callable, or a policy; the error lists
    the valid names."""
    if isinstance(spec, AllocationPolicy):
        return spec
    if isinstance(spec, str):
        if spec not in ALLOCATIONS:
            raise ValueError(f"allocation must be one of {', '.join(ALLOCATIONS)} or a callable, got {spec!r}")
        return ALLOCATIONS[spec]
    if callable(spec):
        return AllocationPolicy(getattr(spec, "__name__", "custom"), rank_fn=spec)
    raise ValueError(f"allocation must be one of {', '.join(ALLOCATIONS)} or a callable, got {spec!r}")
