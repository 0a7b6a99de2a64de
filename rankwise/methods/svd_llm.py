"""SVD-LLM: truncation-aware data whitening. Wang et al., "SVD-LLM: Truncation-aware singular value decomposition
for large language model compression", 2024, https://arxiv.org/abs/2403.07378.

With ``X X^T = S S^T`` (Cholesky), truncating the SVD of ``W S`` and mapping back by ``S^-1`` minimises the layer's
output error ``||(W - W') X||_F`` exactly; singular or indefinite covariances fall back to a clamped
eigen-decomposition (reported per layer).

With ``anchored=True`` (sequential mode) each layer instead reproduces the *original* model's outputs from the inputs
the partly compressed model gives it, ``min ||W X - W' Xh||_F`` in closed form (AA-SVD, Kumar et al. 2026,
https://arxiv.org/abs/2604.02119; :func:`rankwise.linalg.anchored_svd`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

import torch

from rankwise.calibrate import LayerStats
from rankwise.linalg import LowRank, anchored_svd, whitened_svd
from rankwise.methods.base import LowRankConfig, register_method


@dataclass(frozen=True)
class SVDLLMConfig(LowRankConfig):
    """SVD-LLM whitening.

    Attributes:
        damp: relative ridge added to the covariance diagonal before factorising (0 = none, as in the paper).
        anchored: fit each layer to the original model's outputs from the compressed model's inputs (AA-SVD's
            objective ``||W X - W' Xh||``); needs ``sequential`` (without it ``Xh = X`` and nothing changes).
        anchor: with ``anchored``, the weight ``a`` of the original outputs in the target
            ``W (a X + (1 - a) Xh)``: 1 is AA-SVD's objective, which over-fits a few thousand calibration tokens
            (it regresses the original outputs on every input direction); 0 is the plain sequential fit. The
            default 0.25 was ahead of 0.5 at ratios 0.3 and 0.4, and of 0.125 and 0 at 0.4, on the calibration-region
            windows each of three calibration draws did not pick (default model; benchmarks/RESULTS.md, "Seventh
            session").
        refine_epochs: AA-SVD's block refinement: after a block is compressed, this many passes of AdamW over the
            calibration batches train its factors (only) towards the original block's outputs; 0 = none. Needs
            ``sequential``. A block whose calibration error would rise keeps its closed-form factors.
        refine_lr: the refinement's peak learning rate (AA-SVD: 1e-4).
        output_weighted: also weight each output channel ``j`` by ``sqrt(E (dL/dy_j)^2)``, the diagonal of the
            loss's output Fisher from the gradient pass (a Kronecker-factored curvature ``E[x x^T] (x) diag E[g^2]``
            as in K-FAC; FWSVD, https://arxiv.org/abs/2207.00112, weights rows by a Fisher too): the error
            ``||D (W X - W' Xh)||`` with ``D`` that diagonal is minimised, so channels the loss is sensitive to
            are kept more exactly. Costs the gradient pass (free with ``allocation="loss"``).
    """

    name: ClassVar[str] = "svd_llm"
    damp: float = 0.0
    anchored: bool = False
    anchor: float = 0.25
    refine_epochs: int = 0
    refine_lr: float = 1e-4
    output_weighted: bool = False

    @property
    def needs(self) -> frozenset[str]:  # type: ignore[override]
        return frozenset({"xxt", "gout"}) if self.output_weighted else frozenset({"xxt"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.damp >= 0.0:
            raise ValueError(f"damp must be >= 0, got {self.damp}")
        if self.anchored and not self.sequential:
            raise ValueError("anchored=True fits the original outputs from the compressed model's inputs, which "
                             "only differ in sequential mode: also set sequential=True (--sequential)")

        if isinstance(self.anchor, bool) or not isinstance(self.anchor, float | int) or not 0 < self.anchor <= 1:
            raise ValueError(f"anchor must be the weight of the original outputs in (0, 1], got {self.anchor!r}")
        if isinstance(self.refine_epochs, bool) or not isinstance(self.refine_epochs, int) or self.refine_epochs < 0:
            raise ValueError(f"refine_epochs must be an integer >= 0, got {self.refine_epochs!r}")
        if self.refine_epochs and not self.sequential:
            raise ValueError("refine_epochs trains each block towards the original block's outputs while compressing "
                             "block by block: also set sequential=True (--sequential)")
        if not (isinstance(self.refine_lr, float | int) and 0 < self.refine_lr < 1):
            raise ValueError(f"refine_lr must be a learning rate in (0, 1), got {self.refine_lr!r}")

    @property
    def refit_anchor(self) -> float:  # the refit keeps the anchored fit's target
        return float(self.anchor) if self.anchored else 1.0

    @property
    def paired(self) -> bool:
        return self.sequential and (self.update_u or self.anchored or self.refine_epochs > 0)


@register_method(SVDLLMConfig)
def svd_llm(weight: torch.Tensor, stats: LayerStats | None, rank: int, config: SVDLLMConfig, name: str) -> LowRank:
    if stats is None:
        raise ValueError(f"svd_llm needs the input covariance for {name}")
    target = weight
    rows = None
    if config.output_weighted:
        rows = stats.output_channel_weights(name)
        if rows is None:
            raise ValueError(f"output_weighted needs the loss gradients at {name}'s outputs (the gradient pass), "
                             "which these statistics lack (precomputed statistics need the kind 'gout')")
        rows = rows.to(weight.device, torch.float64)
        rows = rows / rows.max()  # the minimiser does not depend on D's scale: in [1e-3, 1], no under/overflow
        # D W: the error is measured as ||D (...)||; formed in float32 at least, never rounded to a half type
        target = (weight.double() * rows[:, None]).to(torch.promote_types(weight.dtype, torch.float32))
    if config.anchored and stats.cross is None:
        raise ValueError(f"anchored needs the paired statistics X Xh^T of {name} (original x compressed inputs), which "
                         "these statistics lack: they are collected in sequential mode")
    if config.anchored:
        lr = anchored_svd(target, stats.whitening(config.damp), stats.cross_covariance, rank,
                          weight=float(config.anchor))
    else:
        lr = whitened_svd(target, stats.whitening(config.damp), rank)
    if rows is None:
        return lr
    U = (lr.U.double() / rows[:, None]).to(weight.dtype)  # D^-1 [D A]_r
    return replace(lr, U=U, S=lr.S.to(weight.dtype), Vh=lr.Vh.to(weight.dtype),
                   info={**lr.info, "output_weighted": True})
