"""Fisher-weighted SVD (FWSVD): Hsu et al., "Language model compression with weighted low-rank factorization",
ICLR 2022, https://arxiv.org/abs/2207.00112.

Each weight row gets the importance ``I_i = sum_j F_ij`` (the diagonal empirical Fisher of the LM loss summed along
the row), and ``||diag(sqrt(I)) (W - W')||_F`` is minimised in closed form.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from rankwise.calibrate import LayerStats
from rankwise.linalg import LowRank, weighted_svd
from rankwise.methods.base import LowRankConfig, register_method


@dataclass(frozen=True)
class FWSVDConfig(LowRankConfig):
    """FWSVD.

    Attributes:
        axis: which side of the ``(out, in)`` weight the Fisher importance weights: ``"out"`` (sum over inputs,
            weighting output channels) or ``"in"`` (sum over outputs, weighting input channels).
    """

    name: ClassVar[str] = "fwsvd"
    needs: ClassVar[frozenset[str]] = frozenset({"fisher"})
    axis: Literal["out", "in"] = "out"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.axis not in ("out", "in"):
            raise ValueError(f"axis must be 'out' or 'in', got {self.axis!r}")


@register_method(FWSVDConfig)
def fwsvd(weight: torch.Tensor, stats: LayerStats | None, rank: int, config: FWSVDConfig, name: str) -> LowRank:
    if stats is None or name not in stats.fisher_out:
        raise ValueError(f"fwsvd needs Fisher statistics for {name}; calibrate with kinds=('fisher',)")
    if config.axis == "out":
        return weighted_svd(weight, rank, row_weights=stats.fisher_out[name].sqrt())  # (out,)
    return weighted_svd(weight, rank, col_weights=stats.fisher_in[name].sqrt())  # (in,)
