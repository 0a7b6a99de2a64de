"""SVD-LLM: truncation-aware data whitening. Wang et al., "SVD-LLM: Truncation-aware singular value decomposition
for large language model compression", 2024, https://arxiv.org/abs/2403.07378.

With ``X X^T = S S^T`` (Cholesky), truncating the SVD of ``W S`` and mapping back by ``S^-1`` minimises the layer's
output error ``||(W - W') X||_F`` exactly; singular or indefinite covariances fall back to a clamped
eigen-decomposition (reported per layer).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from rankwise.calibrate import LayerStats
from rankwise.linalg import LowRank, whitened_svd
from rankwise.methods.base import LowRankConfig, register_method


@dataclass(frozen=True)
class SVDLLMConfig(LowRankConfig):
    """SVD-LLM whitening.

    Attributes:
        damp: relative ridge added to the covariance diagonal before factorising (0 = none, as in the paper).
    """

    name: ClassVar[str] = "svd_llm"
    needs: ClassVar[frozenset[str]] = frozenset({"xxt"})
    damp: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.damp >= 0.0:
            raise ValueError(f"damp must be >= 0, got {self.damp}")


@register_method(SVDLLMConfig)
def svd_llm(weight: torch.Tensor, stats: LayerStats | None, rank: int, config: SVDLLMConfig, name: str) -> LowRank:
    if stats is None:
        raise ValueError(f"svd_llm needs the input covariance for {name}")
    return whitened_svd(weight, stats.whitening(config.damp), rank)
