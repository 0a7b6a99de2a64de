"""Factorise one layer: the method, the optional left-factor refit, the replacement module and its report row."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

import torch
from torch import nn

from rankwise.calibrate import LayerStats
from rankwise.calibrate.stats import InputGroup, relative_output_error
from rankwise.linalg import LowRank, refit_left
from rankwise.methods import CompressConfig, MethodFn
from rankwise.nn import CompressedLinear, linear_weight
from rankwise.report import LayerReport


def check_finite(name: str, module: nn.Module) -> None:
    """Raise ``ValueError`` naming the layer if its weight has NaN or Inf."""
    if not bool(torch.isfinite(module.weight.detach()).all()):
        raise ValueError(f"layer {name} has non-finite weights (NaN or Inf); cannot compress it")


def factorise(name: str, module: nn.Module, stats: LayerStats | None, knob: int, config: CompressConfig,
              method: MethodFn) -> tuple[CompressedLinear, LayerReport]:
    """The compressed layer replacing ``module`` at ``knob`` (a rank for low-rank methods) and its report row."""
    weight = linear_weight(module).detach()
    result = method(weight, stats, knob, config, name)
    bias = module.bias.detach() if module.bias is not None else None
    fallback, notes, refused = False, "", ()
    if isinstance(result, LowRank):
        lr = result
        refit_note, refitted = "", lr
        if config.update_u and stats is not None and stats.xxt is not None:
            refitted = refit(weight, lr, stats, config.refit_anchor)
            if refitted is None:
                refit_note = "left-factor refit skipped (singular system or non-finite result): factors kept as fitted"
            else:
                refit_note = "then its left factor refitted" if lr.anchored_fallback else ""
                lr = refitted
        new: CompressedLinear = config.lowrank_layer(lr, bias).to(weight.device)
        fallback = lr.whitening_fallback
        refused = (("anchored",) if lr.anchored_fallback else ()) + (("refit",) if refitted is None else ())
        notes = "; ".join(n for n in (describe(lr), refit_note) if n)
    elif isinstance(result, CompressedLinear):
        if config.update_u:
            raise ValueError(f"update_u refits a low-rank left factor; method {config.name!r} builds "
                             f"{result.kind!r} layers")
        new = result.to(weight.device)
        new.set_bias(bias)
    else:
        raise TypeError(f"method {config.name!r} returned {type(result).__name__}; expected LowRank or a "
                        "CompressedLinear layer kind")
    err = relative_output_error(weight, new.dense_weight().detach(), stats)
    before = weight.numel() + (bias.numel() if bias is not None else 0)
    row = LayerReport(name, tuple(weight.shape), knob, before, new.num_params, err, notes, fallback, kind=new.kind,
                      knob=config.knob, floats_after=new.float_numel, fixed_bytes_after=new.fixed_nbytes,
                      refused_fits=refused)
    return new, row


def refit(weight: torch.Tensor, lr: LowRank, stats: LayerStats, anchor: float) -> LowRank | None:
    """``lr`` with its left factor refitted by least squares towards ``W (a X + (1 - a) Xh)`` (``a`` = ``anchor``;
    the cross moment is then ``a X Xh^T + (1 - a) Xh Xh^T``), or ``None`` when the system is singular or the factors
    would not be finite in ``weight``'s dtype. A per-output-channel weighting of the error (``output_weighted``)
    does not change this minimiser: each row is its own least-squares problem."""
    cross = stats.cross_covariance
    if cross is not None and anchor < 1.0:
        cross = anchor * cross + (1.0 - anchor) * stats.covariance
    U = refit_left(weight, lr.Vh, stats.covariance, cross)  # (m, r)
    if U is None:
        return None
    U = (U / lr.S.clamp_min(torch.finfo(lr.S.dtype).tiny)).to(weight.dtype)  # U diag(S) is the refit
    if not bool(torch.isfinite(U).all()):
        return None
    return replace(lr, U=U)


def dense_row(name: str, shape: tuple[int, int], bias: int, why: str = "kept dense") -> LayerReport:
    m, n = shape
    return LayerReport(name, (m, n), min(m, n), m * n + bias, m * n + bias, 0.0, why)


def describe(lr: LowRank) -> str:
    """The layer's report note on what its fit did out of the ordinary ("" for nothing)."""
    info = lr.info
    if lr.anchored_fallback:
        return f"anchored fit skipped (its regression was {info.get('anchored_skipped')}): plain whitened truncation"
    wh = info.get("whitening")
    if isinstance(wh, Mapping) and wh.get("method") == "eigh":
        kept = lr.Vh.shape[1] - info.get("anchored_dropped", 0)
        spanned = f"; anchored on the {kept} directions the compressed inputs span" if info.get("anchored") else ""
        return f"covariance not positive definite: eigen-decomposition, {wh['clamped']} eigenvalues clamped{spanned}"
    if isinstance(wh, Mapping) and wh.get("method") == "ridge":
        return f"covariance not positive definite: Cholesky after a ridge of {wh['damping']:.3g}"
    clamped = int(info.get("clamped_row_weights", 0) or 0) + int(info.get("clamped_col_weights", 0) or 0)
    return f"{clamped} zero weights clamped" if clamped else ""


def factorise_shared(names: list[str], modules: list[nn.Module], stats: list[LayerStats | None],
                     knobs: Mapping[str, int], config: CompressConfig, value_bytes: int
                     ) -> list[tuple[str, CompressedLinear, LayerReport]]:
    """Compress layers that share a factor (one projection across a group of blocks) with the method's group
    function, at the largest common knob whose shared cost fits what the allocation gave them one by one."""
    from rankwise.methods.base import group_method_for

    weights = [linear_weight(m).detach() for m in modules]
    shapes = [tuple(w.shape) for w in weights]
    unit = config.unit
    budget = sum(config.cost(*shape, knobs[name], value_bytes)[unit] for name, shape in zip(names, shapes,
                                                                                            strict=True))
    lo, hi = config.knob_range(sum(m for m, _ in shapes), shapes[0][1])  # the stacked matrix's range
    while lo < hi:  # the last knob whose shared cost fits
        mid = (lo + hi + 1) // 2
        if config.group_cost(shapes, mid, value_bytes)[unit] <= budget:
            lo = mid
        else:
            hi = mid - 1
    layers = group_method_for(config)(names, weights, stats, lo, config)
    out = []
    for name, module, weight, layer_stats, new in zip(names, modules, weights, stats, layers, strict=True):
        bias = module.bias.detach() if module.bias is not None else None
        new = new.to(weight.device)
        new.set_bias(bias)
        err = relative_output_error(weight, new.dense_weight().detach(), layer_stats)
        before = weight.numel() + (bias.numel() if bias is not None else 0)
        row = LayerReport(name, tuple(weight.shape), lo, before, new.num_params, err, "", False, kind=new.kind,
                          knob=config.knob, floats_after=new.float_numel, fixed_bytes_after=new.fixed_nbytes)
        out.append((name, new, row))
    return out


def add_fisher(group: InputGroup, gradient_stats: Mapping[str, LayerStats]) -> LayerStats | None:
    """The group's statistics, given the dense model's gradient statistics of its layers (from the gradient pass:
    Fisher sums, output-gradient energies per channel), which the Fisher- and output-weighted fits read from them."""
    if group.stats is not None:
        for name in group.names:
            if name in gradient_stats:
                part = gradient_stats[name]
                group.stats.fisher_out.update(part.fisher_out)
                group.stats.fisher_in.update(part.fisher_in)
                group.stats.grad_channels.update(part.grad_channels)
                group.stats.grad_out.update(part.grad_out)
                group.stats.grad_tokens.update(part.grad_tokens)
    return group.stats


def factorise_group(group: list[tuple[str, nn.Module, LayerStats | None, int]], *, config: CompressConfig,
                    method) -> list[tuple[str, nn.Module, object]]:
    """Factorise the layers that read one input (they share its statistics and whitening): ``(name, new, row)``."""
    return [(name, *factorise(name, module, layer_stats, rank, config, method))
            for name, module, layer_stats, rank in group]
