"""Monarch: each weight projected onto the product of two block-diagonal factors. Dao et al., "Monarch: Expressive
Structured Matrices for Efficient and Accurate Training", ICML 2022, https://arxiv.org/abs/2204.00595.

The projection is the paper's closed form, generalised to rectangular weights and to rank ``r`` per block pair (the
knob): a truncated SVD of each of the ``nblocks^2`` submatrices of the reshaped weight, optimal in Frobenius norm. The
whitened variant targets the output error ``||(W - M) X||_F`` instead: each input block is whitened by its own
covariance block (exact for the block-diagonal part of the covariance, since a full whitening would break the block
structure), then the left factor is refitted by least squares against the full covariance; see
:func:`~rankwise.linalg.whitened_monarch_project`.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import ClassVar

import torch

from rankwise.calibrate import LayerStats
from rankwise.linalg import monarch_project, monarch_shape_error, whitened_monarch_project
from rankwise.methods.base import CompressConfig, Cost, register_method
from rankwise.nn.monarch import MonarchLinear


@dataclass(frozen=True)
class MonarchConfig(CompressConfig):
    """Monarch projection; the knob is the rank per block pair.

    A weight of ``m`` outputs and ``n`` inputs stores ``nblocks * rank * (m + n)`` values, as a low-rank
    factorisation of rank ``nblocks * rank`` would; ``rank`` runs from 1 to ``min(m, n) / nblocks``.

    Attributes:
        nblocks: diagonal blocks per factor; must divide every targeted weight's both sides. More blocks means
            finer granularity of structure and a smaller smallest size (``rank = 1`` stores ``nblocks (m + n)``);
            ``1`` is plain low rank. The paper's square Monarch matrices have ``nblocks = sqrt(n)``.
        whiten: minimise the layer's output error on the calibration inputs (needs their covariance) instead of the
            weight's Frobenius error.
        damp: relative ridge added to each input block's covariance before factorising (whitened only).
    """

    name: ClassVar[str] = "monarch"
    knob: ClassVar[str] = "rank"
    nblocks: int = 4
    whiten: bool = True
    damp: float = 0.0

    @property
    def needs(self) -> frozenset[str]:
        """Calibration statistics: the input covariance when whitening, none otherwise."""
        return frozenset({"xxt"}) if self.whiten else frozenset()

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.nblocks, bool) or not isinstance(self.nblocks, numbers.Integral) or self.nblocks < 1:
            raise ValueError(f"nblocks must be an integer >= 1 dividing every targeted weight's in and out features, "
                             f"got {self.nblocks!r}")
        if not isinstance(self.whiten, bool):
            raise ValueError(f"whiten must be True or False, got {self.whiten!r}")
        if isinstance(self.damp, bool) or not isinstance(self.damp, numbers.Real) or not math.isfinite(self.damp) \
                or self.damp < 0.0:
            raise ValueError(f"damp must be a finite number >= 0, got {self.damp!r}")

    def cost(self, m: int, n: int, knob: int, value_bytes: int) -> Cost:
        """``nblocks * knob * (m + n)`` floating-point values: ``left`` and ``right`` of :class:`MonarchLinear`."""
        params = self.nblocks * knob * (m + n)
        return Cost(params, params * value_bytes)

    def knob_range(self, m: int, n: int) -> tuple[int, int]:
        """Rank per block pair from 1 to ``min(m, n) / nblocks``; a ``ValueError`` if ``nblocks`` does not divide."""
        error = monarch_shape_error(m, n, self.nblocks)
        if error is not None:
            raise ValueError(f"monarch {error}")
        return 1, min(m, n) // self.nblocks


@register_method(MonarchConfig)
def monarch(weight: torch.Tensor, stats: LayerStats | None, knob: int, config: MonarchConfig,
            name: str) -> MonarchLinear:
    if not config.whiten:
        factors = monarch_project(weight, config.nblocks, knob)
    elif stats is None or stats.xxt is None or stats.count == 0:
        raise ValueError(f"monarch with whiten=True needs the input covariance for {name}; calibrate, or set "
                         f"whiten=False")
    else:  # the sum X X^T: its scale does not change the solution, and no n x n copy is made
        factors = whitened_monarch_project(weight, stats.xxt, config.nblocks, knob, damp=config.damp)
    return MonarchLinear.from_monarch(factors)
