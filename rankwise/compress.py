"""``compress_``: factorise a model's targeted linear layers in place and report what was done."""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping

import torch
from torch import nn

from rankwise.allocate import layer_params, loss_scores, threshold_ranks, uniform_ranks, welore_scores
from rankwise.calibrate import LayerStats, collect_stats
from rankwise.calibrate.sequential import sequential_compress
from rankwise.calibrate.stats import _batches
from rankwise.linalg import LowRank, break_even_rank, refit_left
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


def allocate_ranks(config: CompressConfig, targets: Mapping[str, nn.Module],
                   stats: Mapping[str, LayerStats] | None) -> dict[str, int]:
    """Rank per target under ``config.ratio``; a target missing from the result stays dense."""
    shapes = {name: tuple(linear_weight(m).shape) for name, m in targets.items()}
    if config.allocation == "uniform":
        return uniform_ranks(shapes, config.ratio)
    budget = int((1.0 - config.ratio) * sum(m * n for m, n in shapes.values()))
    if config.allocation == "welore":
        scores = {name: welore_scores(linear_weight(m)) for name, m in targets.items()}
    else:
        if stats is None:
            raise ValueError("allocation 'loss' needs calibration data (the input covariances)")
        scores = {name: loss_scores(linear_weight(m), stats[name].whitening().factor,
                                    stats[name].output_sensitivity(name) if stats[name].grad_out else None)
                  for name, m in targets.items()}
    ranks = threshold_ranks(scores, shapes, budget)
    return {name: r for name, r in ranks.items() if r < break_even_rank(*shapes[name]) and r < min(shapes[name])}


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
        config: a registered method config, e.g. ``SVDLLMConfig(ratio=0.2)``; its type selects the method and its
            fields the rank allocation, sequential calibration and left-factor update.
        calibration: token ids ``(samples, seq_len)`` or batches; required by data-aware methods, by
            ``allocation="loss"``, ``sequential`` and ``update_u``, and used for the report's output errors.
        stats: precomputed statistics of the dense model (from :func:`~rankwise.calibrate.collect_stats`).
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
    needs = set(config.needs) | ({"gout"} if config.allocation == "loss" else set())
    if (config.sequential or config.update_u) and calibration is None:
        raise ValueError("sequential and update_u need calibration data")
    if stats is None and calibration is not None:
        stats = collect_stats(model, calibration, targets, kinds=needs | {"xxt"}, batch_size=batch_size,
                              progress=progress)
    if needs and stats is None:
        raise ValueError(f"method {config.name!r} needs calibration data ({', '.join(sorted(needs))})")
    ranks = allocate_ranks(config, targets, stats)
    report = CompressionReport(config.name, config.ratio, sum(p.numel() for p in model.parameters()))
    report.notes.append(f"allocation {config.allocation}" + (", sequential" if config.sequential else "")
                        + (", left factor refit" if config.update_u else ""))
    dense = [name for name in targets if name not in ranks]
    if dense:
        report.notes.append(f"kept dense ({len(dense)}): {', '.join(dense)}")

    def compress_one(name: str, module: nn.Module, layer_stats: LayerStats | None) -> None:
        weight = linear_weight(module).detach()
        if layer_stats is not None and stats is not None and name in stats and stats[name].fisher:
            layer_stats.fisher = stats[name].fisher  # in sequential mode the Fisher still comes from the dense pass
        lr = method(weight, layer_stats, ranks[name], config, name)
        if config.update_u and layer_stats is not None and layer_stats.xxt is not None:
            U = refit_left(weight, lr.Vh, layer_stats.covariance, layer_stats.cross_covariance)  # (m, r)
            lr = LowRank((U / lr.S.clamp_min(torch.finfo(lr.S.dtype).tiny)).to(weight.dtype), lr.S, lr.Vh, lr.info)
        bias = module.bias.detach() if module.bias is not None else None
        new = LowRankLinear.from_lowrank(lr, bias).to(weight.device)
        err = relative_output_error(weight, new.dense_weight().detach(), layer_stats)
        before = weight.numel() + (bias.numel() if bias is not None else 0)
        report.layers.append(LayerReport(name, tuple(weight.shape), lr.rank, before, new.num_params, err,
                                         _describe(lr.info)))
        set_submodule(model, name, new)

    chosen = {name: targets[name] for name in ranks}
    if config.sequential:
        kinds = frozenset(needs & {"xxt", "abs"} | {"xxt"})
        batches = list(_batches(calibration, batch_size))

        def compress_block(mods: dict[str, nn.Module], block_stats: dict[str, LayerStats]) -> None:
            for name, module in mods.items():
                compress_one(name, module, block_stats[name])

        rest = sequential_compress(model, batches, chosen, compress_block, kinds=kinds, paired=config.update_u,
                                   progress=progress)
        for name in rest:
            compress_one(name, chosen[name], stats.get(name) if stats else None)
    else:
        for name in progress_bar(list(chosen), f"{config.name} factorising", enabled=progress):
            compress_one(name, chosen[name], stats.get(name) if stats is not None else None)
    for name in dense:
        m, n = linear_weight(targets[name]).shape
        bias = targets[name].bias.numel() if targets[name].bias is not None else 0
        report.layers.append(LayerReport(name, (m, n), min(m, n), m * n + bias, layer_params(m, n, min(m, n)) + bias,
                                         0.0, "kept dense"))
    order = {name: i for i, name in enumerate(targets)}
    report.layers.sort(key=lambda layer: order[layer.name])
    report.params_total_after = sum(p.numel() for p in model.parameters())
    report.seconds = time.perf_counter() - start
    return report


def _describe(info: Mapping[str, object]) -> str:
    wh = info.get("whitening")
    if isinstance(wh, Mapping) and wh.get("method") == "eigh":
        return f"covariance not positive definite: eigen-decomposition, {wh['clamped']} eigenvalues clamped"
    clamped = int(info.get("clamped_row_weights", 0) or 0) + int(info.get("clamped_col_weights", 0) or 0)
    return f"{clamped} zero weights clamped" if clamped else ""
