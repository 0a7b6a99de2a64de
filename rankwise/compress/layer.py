"""Factorise one layer: the method, the optional left-factor refit, the replacement module and its report row."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from rankwise.allocate import layer_params
from rankwise.calibrate import LayerStats
from rankwise.linalg import LowRank, refit_left
from rankwise.methods import CompressConfig, MethodFn
from rankwise.nn import LowRankLinear, linear_weight
from rankwise.report import LayerReport


def relative_output_error(weight: torch.Tensor, approx: torch.Tensor, stats: LayerStats | None) -> float | None:
    """``||(W - W') X||_F / ||W X||_F`` from the input covariance, or ``None`` without one.

    A report figure, computed in float32 (float64 products cost as much as the factorisation itself here); the
    covariance is scaled to unit trace first so float32 cannot overflow."""
    if stats is None or stats.xxt is None:
        return None
    trace = float(stats.xxt.diagonal().sum())
    if not trace > 0:
        return None
    C = (stats.xxt / trace).float()  # (n, n); the scale cancels in the ratio
    num = den = 0.0
    for start in range(0, weight.shape[0], 512):  # row chunks: temporaries of 512 x n, not m x n
        W = weight[start:start + 512].to(C.device, C.dtype)
        D = W - approx[start:start + 512].to(C.device, C.dtype)
        num += float(((D @ C) * D).sum(dtype=torch.float64))
        den += float(((W @ C) * W).sum(dtype=torch.float64))
    return (max(num, 0.0) / den) ** 0.5 if den > 0 else None


def check_finite(name: str, module: nn.Module) -> None:
    """Raise ``ValueError`` naming the layer if its weight has NaN or Inf."""
    if not bool(torch.isfinite(module.weight.detach()).all()):
        raise ValueError(f"layer {name} has non-finite weights (NaN or Inf); cannot compress it")


def factorise(name: str, module: nn.Module, stats: LayerStats | None, rank: int, config: CompressConfig,
              method: MethodFn) -> tuple[LowRankLinear, LayerReport]:
    """The ``LowRankLinear`` replacing ``module`` at ``rank`` and its report row."""
    weight = linear_weight(module).detach()
    lr = method(weight, stats, rank, config, name)
    if config.update_u and stats is not None and stats.xxt is not None:
        U = refit_left(weight, lr.Vh, stats.covariance, stats.cross_covariance)  # (m, r)
        lr = LowRank((U / lr.S.clamp_min(torch.finfo(lr.S.dtype).tiny)).to(weight.dtype), lr.S, lr.Vh, lr.info)
    bias = module.bias.detach() if module.bias is not None else None
    new = LowRankLinear.from_lowrank(lr, bias).to(weight.device)
    err = relative_output_error(weight, new.dense_weight().detach(), stats)
    before = weight.numel() + (bias.numel() if bias is not None else 0)
    wh = lr.info.get("whitening")
    fallback = isinstance(wh, Mapping) and wh.get("method") in ("eigh", "ridge")
    row = LayerReport(name, tuple(weight.shape), lr.rank, before, new.num_params, err, describe(lr.info), fallback)
    return new, row


def dense_row(name: str, shape: tuple[int, int], bias: int, why: str = "kept dense") -> LayerReport:
    m, n = shape
    return LayerReport(name, (m, n), min(m, n), m * n + bias, layer_params(m, n, min(m, n)) + bias, 0.0, why)


def describe(info: Mapping[str, object]) -> str:
    wh = info.get("whitening")
    if isinstance(wh, Mapping) and wh.get("method") == "eigh":
        return f"covariance not positive definite: eigen-decomposition, {wh['clamped']} eigenvalues clamped"
    if isinstance(wh, Mapping) and wh.get("method") == "ridge":
        return f"covariance not positive definite: Cholesky after a ridge of {wh['damping']:.3g}"
    clamped = int(info.get("clamped_row_weights", 0) or 0) + int(info.get("clamped_col_weights", 0) or 0)
    return f"{clamped} zero weights clamped" if clamped else ""
