"""Plain truncated SVD of each weight: the data-free baseline (Eckart-Young, 1936).

Reference: https://doi.org/10.1007/BF02288367
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from rankwise.calibrate import LayerStats
from rankwise.linalg import LowRank, truncated_svd
from rankwise.methods.base import LowRankConfig, register_method


@dataclass(frozen=True)
class SVDConfig(LowRankConfig):
    """Plain SVD truncation; ``solver`` picks the engine's solver (exact by default for compression)."""

    name: ClassVar[str] = "svd"
    solver: str = "exact"


@register_method(SVDConfig)
def svd(weight: torch.Tensor, stats: LayerStats | None, rank: int, config: SVDConfig, name: str) -> LowRank:
    return truncated_svd(weight, rank, solver=config.solver)
