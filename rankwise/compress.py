"""``compress_``: factorise a model's targeted linear layers in place and report what was done."""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping

import torch
from torch import nn

from rankwise.allocate import uniform_ranks
from rankwise.calibrate import LayerStats, collect_stats
from rankwise.linalg._checks import all_finite
from rankwise.methods import CompressConfig, method_for
from rankwise.nn import LowRankLinear, linear_weight
from rankwise.progress import progress_bar
from rankwise.report import CompressionReport, LayerReport
from rankwise.targets import FilterFn, find_targets, set_submodule


def relative_output_error(weight: torch.Tensor, approx: torch.Tensor, stats: LayerStats | None) -> float | None:
    """``||(W - W') X||_F / ||W X||_F`` from the input covariance, or ``None`` without one."""
    if stats is None or stats.xxt is None:
        return None
    C = stats.covariance.float()  # float32 is plenty for a reported error
    W = weight.float()
    D = W - approx.float()
    num = float(((D @ C) * D).sum())
    den = float(((W @ C) * W).sum())
    return (max(num, 0.0) / den) ** 0.5 if den > 0 else None


def check_finite_weights(modules: Mapping[str, nn.Module]) -> None:
    """Raise ``ValueError`` naming the first layer with NaN or Inf weights."""
    for name, module in modules.items():
        if not all_finite(module.weight.detach()):
            raise ValueError(f"layer {name} has non-finite weights (NaN or Inf); cannot compress it")


def compress_(
    model: nn.Module,
    config: CompressConfig,
    calibration: torch.Tensor | Iterable[torch.Tensor] | None = None,
    *,
    stats: Mapping[str, LayerStats] | None = None,
    filter_fn: FilterFn | None = None,
    batch_size: int = 4,
    progress: bool = True,
) -> CompressionReport:
    """Replace the targeted linear layers of ``model`` by :class:`~rankwise.nn.LowRankLinear` in place.

    Args:
        model: a Hugging Face causal LM (or any module whose projections are ``nn.Linear``/``Conv1D``).
        config: a registered method config, e.g. ``SVDLLMConfig(ratio=0.2)``; its type selects the method.
        calibration: token ids ``(samples, seq_len)`` or batches; required by data-aware methods and used for the
            report's relative output errors.
        stats: precomputed statistics (from :func:`~rankwise.calibrate.collect_stats`) to reuse across runs.
        filter_fn: ``(name, module) -> bool`` to narrow the targets further.
        batch_size: windows per calibration forward pass.
        progress: show progress bars.

    Returns:
        A :class:`~rankwise.report.CompressionReport` with each layer's rank, parameters and output error.
    """
    start = time.perf_counter()
    method = method_for(config)
    targets = find_targets(model, config.targets, filter_fn)
    if not targets:
        raise ValueError("no layer matched the targets; check targets/filter_fn")
    check_finite_weights(targets)
    needs = set(config.needs)
    if stats is None and calibration is not None:
        stats = collect_stats(model, calibration, targets, kinds=needs | {"xxt"}, batch_size=batch_size,
                              progress=progress)
    if needs and stats is None:
        raise ValueError(f"method {config.name!r} needs calibration data ({', '.join(sorted(needs))})")
    shapes = {name: tuple(linear_weight(m).shape) for name, m in targets.items()}
    ranks = uniform_ranks(shapes, config.ratio)
    report = CompressionReport(config.name, config.ratio, sum(p.numel() for p in model.parameters()))
    skipped = sorted(set(targets) - set(ranks))
    if skipped:
        report.notes.append(f"kept dense (too small to factorise at this ratio): {', '.join(skipped)}")
    for name in progress_bar(list(ranks), f"{config.name} factorising", enabled=progress):
        module = targets[name]
        weight = linear_weight(module).detach()
        layer_stats = stats.get(name) if stats is not None else None
        lr = method(weight, layer_stats, ranks[name], config, name)
        notes = _describe(lr.info)
        bias = module.bias.detach() if module.bias is not None else None
        new = LowRankLinear.from_lowrank(lr, bias).to(weight.device)
        err = relative_output_error(weight, new.dense_weight().detach(), layer_stats)
        before = weight.numel() + (bias.numel() if bias is not None else 0)
        report.layers.append(LayerReport(name, shapes[name], lr.rank, before, new.num_params, err, notes))
        set_submodule(model, name, new)
    report.params_total_after = sum(p.numel() for p in model.parameters())
    report.seconds = time.perf_counter() - start
    return report


def _describe(info: Mapping[str, object]) -> str:
    wh = info.get("whitening")
    if isinstance(wh, Mapping) and wh.get("method") == "eigh":
        return f"covariance not positive definite: eigen-decomposition, {wh['clamped']} eigenvalues clamped"
    clamped = int(info.get("clamped_row_weights", 0) or 0) + int(info.get("clamped_col_weights", 0) or 0)
    return f"{clamped} zero weights clamped" if clamped else ""
