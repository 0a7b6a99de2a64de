"""Activation-aware SVD (ASVD): Yuan et al., "ASVD: Activation-aware singular value decomposition for compressing
large language models", 2023, https://arxiv.org/abs/2312.05821.

Input channels are scaled by ``s_j = mean|x_j| ** alpha`` before truncation, ``W' = [W diag(s)]_r diag(s)^-1``,
so channels with large activations (outliers) are kept more accurately.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from rankwise.calibrate import LayerStats
from rankwise.linalg import LowRank, weighted_svd
from rankwise.methods.base import LowRankConfig, register_method


@dataclass(frozen=True)
class ASVDConfig(LowRankConfig):
    """ASVD with the absolute-mean scaling.

    Attributes:
        alpha: exponent of the activation scale (the paper uses 0.5), in (0, 2].
    """

    name: ClassVar[str] = "asvd"
    needs: ClassVar[frozenset[str]] = frozenset({"abs"})
    alpha: float = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 < self.alpha <= 2.0:
            raise ValueError(f"alpha must be in (0, 2], got {self.alpha}")


@register_method(ASVDConfig)
def asvd(weight: torch.Tensor, stats: LayerStats | None, rank: int, config: ASVDConfig, name: str) -> LowRank:
    if stats is None:
        raise ValueError(f"asvd needs activation statistics for {name}")
    return weighted_svd(weight, rank, col_weights=stats.abs_mean.pow(config.alpha))
