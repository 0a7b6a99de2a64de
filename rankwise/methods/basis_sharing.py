"""Basis Sharing: one whitened basis for the same projection in a group of consecutive blocks.

Wang et al., "Basis Sharing: Cross-layer parameter sharing for large language model compression", ICLR 2025,
https://arxiv.org/abs/2410.03765.

Blocks are taken ``group_size`` at a time. In each group, every projection named in ``shared`` (q, k, v, gate and up
by default: the paper found output and down projections share badly) is compressed together with the same projection
of the other blocks: the basis comes from the whitened SVD of the stacked weights under the group's summed input
covariance (:func:`~rankwise.linalg.shared_basis`), and each block keeps its own coefficients. The others are
compressed one by one with SVD-LLM. A group's rank ``k`` is the largest whose shared cost ``k (n + sum m_i)`` fits
what the allocation gave its layers one by one, so sharing buys rank at the same budget.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import ClassVar

import torch

from rankwise.calibrate import LayerStats
from rankwise.calibrate.stats import pooled_second_moment
from rankwise.linalg import LowRank, shared_basis, whitened_svd
from rankwise.methods.base import (
    CompressConfig,
    Cost,
    SharedAcrossBlocks,
    register_group_method,
    register_method,
)
from rankwise.nn.shared import SharedBasisLinear
from rankwise.targets import SHARED_PROJECTIONS

SHARED = SHARED_PROJECTIONS


@dataclass(frozen=True)
class BasisSharingConfig(SharedAcrossBlocks, CompressConfig):
    """Basis Sharing across consecutive blocks.

    Attributes:
        group_size: consecutive blocks sharing one basis per projection (2 or more; the last group may be smaller).
        shared: leaf names of the projections that share (others are compressed per layer).
        damp: relative ridge added to the covariance diagonal before whitening (0 = none).
    """

    name: ClassVar[str] = "basis_sharing"
    needs: ClassVar[frozenset[str]] = frozenset({"xxt"})
    group_size: int = 2
    shared: tuple[str, ...] = SHARED
    damp: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_sharing(2)
        if isinstance(self.damp, bool) or not isinstance(self.damp, numbers.Real) or not self.damp >= 0.0:
            raise ValueError(f"damp must be a number >= 0, got {self.damp!r}")

    def group_cost(self, shapes: list[tuple[int, int]], knob: int, value_bytes: int) -> Cost:
        """One ``k x n`` basis plus each layer's ``m_i x k`` coefficients."""
        params = knob * (shapes[0][1] + sum(m for m, _ in shapes))
        return Cost(params, params * value_bytes)


@register_method(BasisSharingConfig)
def basis_sharing(weight: torch.Tensor, stats: LayerStats | None, rank: int, config: BasisSharingConfig,
                  name: str) -> LowRank:
    """A layer that does not share: SVD-LLM."""
    if stats is None:
        raise ValueError(f"basis_sharing needs the input covariance for {name}")
    return whitened_svd(weight, stats.whitening(config.damp), rank)


@register_group_method(BasisSharingConfig)
def basis_sharing_group(names: list[str], weights: list[torch.Tensor], stats: list[LayerStats | None], rank: int,
                        config: BasisSharingConfig) -> list[SharedBasisLinear]:
    """The same projection of every block in a group: one basis (stored by the first layer), coefficients each."""
    if any(s is None or s.xxt is None for s in stats):
        raise ValueError(f"basis_sharing needs the input covariance of {', '.join(names)}")
    C = pooled_second_moment(stats)  # (n, n): every member's inputs together
    basis, coefficients, _ = shared_basis(weights, C, rank, damp=config.damp)
    m0, n = weights[0].shape
    owner = SharedBasisLinear(n, m0, rank, bias=False, device=basis.device, dtype=weights[0].dtype)
    layers = [owner]
    with torch.no_grad():
        owner.down.copy_(basis)
        owner.up.copy_(coefficients[0])
        for weight, up in zip(weights[1:], coefficients[1:], strict=True):
            layer = SharedBasisLinear(n, weight.shape[0], rank, bias=False, basis=names[0], device=basis.device,
                                      dtype=weight.dtype)
            layer.up.copy_(up)
            layer.share(owner)
            layers.append(layer)
    return layers
