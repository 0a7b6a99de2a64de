"""The compression pipeline: plan, score (when allocation or the method needs global information), then block by
block calibrate, allocate, factorise and write; then report.

One spine for every method and option, whether the model is in memory (:func:`compress_`) or a checkpoint on disk
far larger than memory (:func:`compress_checkpoint`): a *source* materialises one decoder block at a time and a
*sink* takes it once compressed. Calibration activations flow between blocks through an
:class:`~rankwise.stream.ActivationStore` (in memory under a budget, spilled to disk above it):

* non-sequential: each block is calibrated on the dense model's activations (the dense block's outputs feed the next
  block); after a scoring pass over every calibration window, which ran the dense blocks with the same hooks, the
  fits take that pass's input statistics (kept on disk meanwhile) and the dense model runs no second time;
* ``sequential``: each block is calibrated on the activations of the blocks already compressed, one input group at a
  time (:mod:`rankwise.compression.staged`); with ``update_u``, ``anchored`` or ``refine_epochs`` an
  original (dense) stream runs alongside for the paired statistics ``X Xh^T``: each block, before its first group
  is compressed, runs it once and keeps each group's input.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from rankwise._memory import trim
from rankwise.calibrate import LayerStats
from rankwise.calibrate.cache import CacheEntry, StatsCache, tensor_digest
from rankwise.calibrate.stats import INPUT_KINDS, StatsObserver, input_groups, iter_batches
from rankwise.compression.layer import add_fisher, check_finite, dense_row, factorise, factorise_group, factorise_shared
from rankwise.compression.passes import (
    KeptInputs,
    Streams,
    capture,
    gradient_part,
    gradient_pass,
    influence_pass,
    kept_bytes_bound,
    needs_gradients,
    scored_batches,
    weight_scores,
)
from rankwise.compression.staged import compress_staged
from rankwise.methods import CompressConfig, method_for
from rankwise.methods.base import choose_knobs
from rankwise.nn import linear_weight, model_num_params
from rankwise.progress import progress_bar
from rankwise.report import CompressionReport
from rankwise.stream import ActivationStore, block_of, run_block
from rankwise.targets import FilterFn, find_targets, refuse_unmatched, set_submodule


@dataclass
class Plan:
    """What will be compressed: targets grouped by block, their shapes, and which passes are needed."""

    config: CompressConfig
    by_block: dict[int, list[str]]
    outside: list[str]  # targets outside the decoder blocks (kept dense)
    shapes: dict[str, tuple[int, int]]
    biases: dict[str, int]
    gradient_kinds: frozenset[str]  # statistics of the gradient pass (empty: no such pass)
    block_kinds: frozenset[str]  # input statistics collected per block
    value_bytes: int  # bytes of one floating-point value as stored: what budgets in bytes count
    limits: dict[str, int] | None = None  # objective "speed": the rank from which each matrix stays dense
    influence: bool = False  # a structured method's block-influence pass runs first
    refined: list[tuple[float, float]] = field(default_factory=list)  # per block: output error before/after
    call_groups: dict[tuple, list[list[str]]] = field(default_factory=dict)  # block-relative input groups by call

    @property
    def inside(self) -> dict[str, tuple[int, int]]:
        """Shapes of the targets inside the decoder blocks (the ones compressed)."""
        return {n: self.shapes[n] for n in self.names}

    @property
    def names(self) -> list[str]:
        return [n for i in sorted(self.by_block) for n in self.by_block[i]]


def make_plan(source, config: CompressConfig, filter_fn: FilterFn | None, *, has_data: bool,
              stats: Mapping[str, LayerStats] | None, value_dtype: torch.dtype | None = None) -> Plan:
    refuse_unmatched(find_targets(source.model), config.targets)  # a misspelt layer name
    targets = find_targets(source.model, config.targets, filter_fn)
    if not targets:
        raise ValueError("no layer matched the targets; check targets/filter_fn")
    if any(len(g) > 1 for g in config.block_groups(len(source.blocks))) and (config.sequential or config.update_u):
        raise ValueError(f"method {config.name!r} compresses groups of blocks together from the dense model's "
                         "statistics: sequential and update_u are not supported with it")
    config.check_model(source.model)
    if (config.sequential or config.update_u) and not has_data:
        raise ValueError("sequential and update_u need calibration data")
    policy = config.policy
    if not has_data and stats is None and (config.needs or policy.kinds):
        what = f"method {config.name!r}" if config.needs else f"allocation {policy.name!r}"
        raise ValueError(f"{what} needs calibration data ({', '.join(sorted(config.needs | policy.kinds))})")
    by_block: dict[int, list[str]] = {}
    outside = []
    for name in targets:
        i = block_of(name, source.blocks_name)
        if i is None:
            outside.append(name)
        else:
            by_block.setdefault(i, []).append(name)
    gradient_kinds = frozenset()
    if stats is None:
        gradient_kinds = (policy.kinds | (config.needs & {"fisher", "gout"}))
        if not needs_gradients(gradient_kinds) and not (policy.needs_scores and policy.kinds):
            gradient_kinds = frozenset()  # no pass: scores from the weights alone
    block_kinds = frozenset((config.needs & INPUT_KINDS) | {"xxt"}) if has_data else frozenset()
    value_bytes = (value_dtype or linear_weight(next(iter(targets.values()))).dtype).itemsize
    plan = Plan(config, by_block, outside, {n: tuple(linear_weight(m).shape) for n, m in targets.items()},
                {n: (m.bias.numel() if m.bias is not None else 0) for n, m in targets.items()},
                gradient_kinds, block_kinds, value_bytes)
    plan.limits = speed_limits(config, plan.inside, source)
    if config.needs_influence:
        if not has_data:
            raise ValueError(f"method {config.name!r} allocates per block by block influence, which needs "
                             "calibration data")
        plan.influence = True
    kept = config.kept_fraction(value_bytes)  # refuses a budget of a kind the method does not take
    if by_block and not config.structured:  # the budget is representable, checked before any weight is read
        choose_knobs(config, plan.inside, dict.fromkeys(plan.inside, kept), value_bytes, plan.limits)
    return plan


Mapper = Callable[..., list]  # (fn, items, shared) -> [fn(item, **shared) for item in items], e.g. on Ray workers


def run(source, sink, config: CompressConfig, calibration: torch.Tensor | Iterable[torch.Tensor] | None, *,
        store: ActivationStore, stats: Mapping[str, LayerStats] | None = None, filter_fn: FilterFn | None = None,
        batch_size: int = 4, progress: bool = True, mapper: Mapper | None = None,
        cache: StatsCache | None = None, value_dtype: torch.dtype | None = None) -> CompressionReport:
    """Compress ``source``'s blocks into ``sink`` (the spine shared by :func:`compress_` and
    :func:`compress_checkpoint`). ``mapper`` fans a block's factorisations out (one task per input group, such as
    q/k/v, so the shared whitening is computed once); without it they run here, one after another. With ``cache``,
    the dense model's statistics (each block's, outside sequential mode, and the gradient pass's) are read from it
    when an earlier run on the same model and calibration stored them, and stored otherwise. ``value_dtype`` is the
    dtype the result will be stored in, which a budget in bits counts (default: the targets' own)."""
    start = time.perf_counter()
    method = method_for(config)
    batches = list(iter_batches(calibration, batch_size)) if calibration is not None else []
    if calibration is not None and not batches:
        raise ValueError("calibration data is empty: need at least one window of tokens")
    plan = make_plan(source, config, filter_fn, has_data=bool(batches), stats=stats, value_dtype=value_dtype)
    policy = config.policy
    report = CompressionReport(config.name, config.ratio, sum(p.numel() for p in source.model.parameters()),
                               bits=config.bits, value_bytes=plan.value_bytes)
    report.notes.append((f"per-block budgets {'influence' if plan.influence else 'uniform'}" if config.structured
                         else f"allocation {policy.name}") + (", sequential" if config.sequential else "")
                        + (", anchored to the original outputs" if getattr(config, "anchored", False) else "")
                        + (", left factor refit" if config.update_u else ""))
    # Streams the per-block pass reads: precomputed statistics replace the dense stream outside sequential mode.
    entry = cache_entry(cache, source, plan, batches) if cache is not None and stats is None and batches else None
    hit = entry is not None and entry.hit
    if entry is not None and entry.note:
        report.notes.append(entry.note)
    if hit:
        report.notes.append(f"calibration statistics read from the cache ({entry.path})")
    cached_blocks = hit and not config.sequential
    kept = kept_inputs(plan, batches, store, source, report) if plan.gradient_kinds and not hit else None
    main = ("compressed",) if config.sequential else (
        () if stats is not None or cached_blocks or kept is not None else ("dense",))
    wanted = main + (("original",) if config.paired else ())
    wanted += ("scoring",) if (plan.gradient_kinds or plan.influence) and not hit else ()
    streams = capture(source, batches, store, wanted) if batches and wanted else None
    try:
        report = _run_blocks(source, sink, plan, method, streams, stats, entry, report, mapper, progress, kept)
    except BaseException:
        if entry is not None:
            entry.discard()
        raise
    if entry is not None:
        entry.commit()
        if entry.note and entry.note not in report.notes:
            report.notes.append(entry.note)
    report.seconds = time.perf_counter() - start
    return report


def kept_inputs(plan: Plan, batches: list[torch.Tensor], store: ActivationStore, source,
                report: CompressionReport) -> KeptInputs | None:
    """Where the scoring pass keeps each block's input statistics for the fits, or ``None`` when the fits collect
    their own with a second dense pass.

    Outside sequential mode the fits calibrate on the dense model's inputs, which the scoring pass has run every
    block on with the same hooks when it scores every calibration window. Keeping them costs disk (a float64
    ``n x n`` covariance per input, every block's at once) and saves a dense forward: worth it on a CPU, where that
    forward is long, and only with room to spare on the disk; on an accelerator the forward is cheaper than the I/O.
    """
    config = plan.config
    if (config.sequential or source.device.type != "cpu"
            or scored_batches(batches, config.score_samples) < len(batches)):
        return None
    need = kept_bytes_bound(plan.inside)
    if need > store.free_disk_bytes() // 2:
        report.notes.append(f"input statistics collected by a second dense pass: keeping the scoring pass's "
                            f"(up to {need / 2**30:.1f} GiB) needs twice that free on the offload disk")
        return None
    return KeptInputs(store)


def cache_entry(cache: StatsCache, source, plan: Plan, batches: list[torch.Tensor]) -> CacheEntry | None:
    """The cache entry of this run's dense-model statistics, or ``None`` when nothing here can be cached (sequential
    mode without a gradient pass, or an allocation given as a callable). The key holds everything the statistics
    depend on and nothing they do not (not the ratio: a second run at another ratio reads the same entry)."""
    config = plan.config
    if not isinstance(config.allocation, str) or (config.sequential and not plan.gradient_kinds):
        return None
    parts = ([] if config.sequential else [f"block-{i}" for i in range(len(source.blocks))])
    parts += ["scores", "gradient"] if plan.gradient_kinds else []
    parts += ["influence"] if plan.influence else []
    return cache.open(
        parts, **cache.model_key(source), tokens=tensor_digest((str(b), t) for b, t in enumerate(batches)),
        dtype=str(source.dtype), device=source.device.type, targets=plan.names,
        block_kinds=None if config.sequential else sorted(plan.block_kinds),
        gradient_kinds=sorted(plan.gradient_kinds), allocation=config.allocation if plan.gradient_kinds else None,
        score_samples=config.score_samples if plan.gradient_kinds else None,
        influence=plan.influence)


def speed_limits(config: CompressConfig, shapes: dict[str, tuple[int, int]], source) -> dict[str, int] | None:
    """With ``objective="speed"``: per matrix, the rank from which its factor pair is no faster than dense on the
    device and in the dtype the model computes in (:func:`rankwise.allocate.latency.rank_limits`)."""
    if not config.speed_limited or not shapes:
        return None
    from rankwise.allocate.latency import rank_limits

    return rank_limits(shapes, device=source.device, dtype=source.dtype)


def speed_note(plan: Plan, source) -> str:
    """The report's note of the speed limits, per ``out x in`` shape."""
    by_shape = {f"{m}x{n}": plan.limits[name] for name, (m, n) in plan.inside.items()}
    return ("objective speed: factorised only below the rank where a factor pair stops being faster than dense at "
            f"decode on {source.device.type} ({str(source.dtype).removeprefix('torch.')}), per out x in shape: "
            + ", ".join(f"{k} below {v}" for k, v in sorted(by_shape.items())))


def _run_blocks(source, sink, plan: Plan, method, streams: Streams | None, stats: Mapping[str, LayerStats] | None,
                entry: CacheEntry | None, report: CompressionReport, mapper: Mapper | None,
                progress: bool, kept: KeptInputs | None = None) -> CompressionReport:
    config, policy = plan.config, plan.config.policy
    hit = entry is not None and entry.hit
    record = entry is not None and not hit and not config.sequential  # store each block's own statistics
    gradient_stats: dict[str, LayerStats] = {}
    scores = None
    if plan.gradient_kinds and hit:
        scores = entry.read("scores")[0]
        gradient_stats = entry.read_stats("gradient", source.device)
    elif plan.gradient_kinds:
        assert streams is not None
        kinds = plan.gradient_kinds | (plan.block_kinds if kept is not None else frozenset())
        scores, gradient_stats = gradient_pass(source, plan.by_block, streams, kinds, policy, progress=progress,
                                               samples=config.score_samples, keep_inputs=kept)
        if kept is not None:
            report.notes.append(f"input statistics of the fits taken from the scoring pass (kept on disk, "
                                f"{kept.bytes / 2**20:.0f} MB): the dense model ran once")
        if entry is not None:
            entry.write("scores", scores)
            entry.write_stats("gradient", gradient_stats)
    elif policy.needs_scores:
        scores = weight_scores(source, plan.by_block, policy, stats, progress=progress)
    if stats is not None and not gradient_stats:  # precomputed: their gradient parts serve the per-block fits
        gradient_stats = {name: gradient_part(name, stats[name]) for name in plan.names if name in stats}
    keeps = None
    if config.structured:
        influence = None
        if plan.influence and hit:
            influence = entry.read("influence")[0]["influence"].tolist()
        elif plan.influence:
            influence = influence_pass(source, streams, progress=progress)
            if entry is not None:
                entry.write("influence", {"influence": torch.tensor(influence, dtype=torch.float64)})
        targeted = sorted(plan.by_block)  # the budget is spread over the blocks that have targets
        keeps = dict(zip(targeted, config.block_keeps(
            [influence[i] for i in targeted] if influence is not None else None, len(targeted)), strict=True))
        report.notes.append("kept per block: " + " ".join(f"{keeps[i]:.2f}" for i in targeted)
                            + (" (block influence)" if influence is not None else ""))
    source.release_rest()
    inside = plan.inside
    limits = plan.limits
    if limits is not None:
        report.notes.append(speed_note(plan, source))
    if config.structured:
        ranks = dict.fromkeys(inside, 0)
    else:
        ranks = choose_knobs(config, inside, policy.shares(inside, config.kept_fraction(plan.value_bytes), scores,
                                                           limits), plan.value_bytes, limits)
    dense = [name for name in plan.names if name not in ranks]
    if dense:
        report.notes.append(f"kept dense ({len(dense)}): {', '.join(dense)}")
    if plan.outside:
        report.notes.append(f"outside the decoder blocks, kept dense ({len(plan.outside)}): {', '.join(plan.outside)}")

    groups = config.block_groups(len(source.blocks))
    for group in progress_bar(groups, f"{config.name} blocks" + (" (groups)" if len(groups) < len(source.blocks)
                                                                 else ""), enabled=progress):
        block_start = time.perf_counter()
        blocks = {i: source.load(i) for i in group}
        chosen = {i: [n for n in plan.by_block.get(i, []) if n in ranks] for i in group}
        records = {i: (lambda s, i=i: entry.write_stats(f"block-{i}", s)) if record else None for i in group}
        if hit and not config.sequential:
            block_stats = {i: entry.read_stats(f"block-{i}", source.device) for i in group}
        elif kept is not None:  # the scoring pass's, recorded here as the block's own pass would have
            block_stats = {i: kept.take(i, source.device) for i in group}
            for i in group:
                if records[i] is not None:
                    records[i](block_stats[i])
        else:
            block_stats = dict.fromkeys(group, stats)
        if len(group) == 1:
            (i,) = group
            rows = compress_block(source, blocks[i], i, chosen[i], ranks, plan, method, streams, block_stats.pop(i),
                                  gradient_stats, mapper, record=records[i],
                                  keep=keeps.get(i) if keeps is not None else None)
        else:
            rows = compress_block_group(source, blocks, chosen, ranks, plan, method, streams, block_stats, records)
        del block_stats  # each input group's statistics are freed once its layers are done, not at the block's end
        report.layers.extend(rows)
        for i in group:  # all written before any is released: a block may read a tensor another block stores
            sink.write_block(i, blocks[i])
        for i in group:
            source.release(i)
        trim()  # this group's covariances and factors are freed: hand the memory back before the next one
        report.block_seconds.extend([(time.perf_counter() - block_start) / len(group)] * len(group))
    for name in dense + plan.outside:
        report.layers.append(dense_row(name, plan.shapes[name], plan.biases[name]))
    order = {name: k for k, name in enumerate(plan.names + plan.outside)}
    report.layers.sort(key=lambda layer: order[layer.name])
    if plan.refined:
        gains = sorted(after / before for before, after in plan.refined if before > 0)
        report.notes.append(f"block refinement ({config.refine_epochs} epochs per block): calibration output error "
                            f"x{gains[len(gains) // 2]:.3f} in the median block (best x{gains[0]:.3f}, worst "
                            f"x{gains[-1]:.3f}); the per-layer errors are the closed form's, before it"
                            if gains else "block refinement: nothing to refine")
    report.notes += refused_fit_notes(report)
    report.params_total_after = model_num_params(source.model)
    return report


REFUSED_FITS = {
    "anchored": "anchored fit refused, plain whitened truncation used (each layer's notes say why)",
    "refit": "left-factor refit refused (singular system or non-finite result), fitted factors kept",
}


def refused_fit_notes(report: CompressionReport) -> list[str]:
    """One note per kind of refused fit (:attr:`~rankwise.report.LayerReport.refused_fits`), naming the layers."""
    notes = []
    for kind, what in REFUSED_FITS.items():
        names = [layer.name for layer in report.layers if kind in layer.refused_fits]
        if names:
            shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
            notes.append(f"{what}: {len(names)} layer{'s' if len(names) > 1 else ''} ({shown})")
    return notes


def compress_block(source, block: nn.Module, i: int, chosen: list[str], ranks: Mapping[str, int], plan: Plan,
                   method, streams: Streams | None, stats: Mapping[str, LayerStats] | None,
                   gradient_stats: Mapping[str, LayerStats], mapper: Mapper | None = None, *,
                   record: Callable[[Mapping[str, LayerStats]], None] | None = None,
                   keep: float | None = None) -> list:
    """Calibrate block ``i`` on its stream, factorise its chosen targets in place, advance the streams.
    ``record`` receives the block's own statistics as soon as they are collected (for the cache); a structured
    method narrows the block's modules to ``keep`` of their width instead."""
    config, device = plan.config, source.device
    modules = {name: source.model.get_submodule(name) for name in chosen}
    for name, module in modules.items():
        check_finite(name, module)
    block_stats: Mapping[str, LayerStats] | None = stats
    main = "compressed" if config.sequential else "dense"
    own = streams is not None and (main, 0) in streams.store
    if own and not (config.sequential and not config.structured):
        # every target of the block is observed when recording (a later run at another ratio may compress a layer
        # this one keeps dense), only the chosen ones otherwise
        observed = modules if record is None else {n: source.model.get_submodule(n) for n in plan.by_block.get(i, [])}
        block_stats = _observe(block, i, observed, plan, streams, main, device)
        if record is not None:
            record(block_stats)
    elif block_stats is not None and any(name not in block_stats for name in modules):
        missing = next(name for name in modules if name not in block_stats)
        raise ValueError(f"no calibration statistics for {missing} (it never ran on the calibration windows, or "
                         "precomputed or cached statistics are incomplete; for a cache entry, delete it or pass "
                         "--no-cache)")
    if config.structured:
        done = method(source.model, modules, block_stats, keep, config)
        return _finish_block(source, block, i, modules, done, plan, streams, main, device)
    if config.sequential and own:
        done, advanced = compress_staged(source, block, i, modules, plan, streams, ranks, gradient_stats, method,
                                         mapper)
        return _finish_block(source, block, i, modules, done, plan, streams, main, device, advance=not advanced)
    groups = input_groups(modules, block_stats)
    del block_stats, stats  # the groups hold this block's statistics now: each is freed once its group is done
    work = [[(name, modules[name], add_fisher(group, gradient_stats), ranks[name]) for name in group.names]
            for group in groups]
    del groups  # the work items hold the statistics now, one list per input group
    if mapper is None:
        done = []
        while work:  # one input group at a time, dropped when done, so each covariance is freed after its layers
            done += factorise_group(work.pop(0), config=config, method=method)
    else:
        done = [item for result in mapper(factorise_group, work, {"config": config, "method": method})
                for item in result]
    return _finish_block(source, block, i, modules, done, plan, streams, main, device)


def _finish_block(source, block: nn.Module, i: int, modules: Mapping[str, nn.Module], done: list, plan: Plan,
                  streams: Streams | None, main: str, device: torch.device, *, advance: bool = True) -> list:
    """Put the new layers in place (``None``: kept dense), then advance the compressed stream (sequential; unless
    ``advance`` is false: the staged runs did)."""
    rows = []
    for name, new, row in done:
        if new is not None:
            set_submodule(source.model, name, new)
        rows.append(row)
    order = {name: k for k, name in enumerate(modules)}
    rows.sort(key=lambda row: order[row.name])
    if plan.config.sequential and streams is not None and advance:
        with torch.no_grad():
            for b in range(len(streams.batches)):
                h = streams.store.get((main, b)).to(device)
                streams.store.put((main, b), run_block(block, streams.call(b, i, device), h))
    return rows


def compress_block_group(source, blocks: Mapping[int, nn.Module], chosen: Mapping[int, list[str]],
                         knobs: Mapping[str, int], plan: Plan, method, streams: Streams | None,
                         stats: Mapping[int, Mapping[str, LayerStats] | None], records: Mapping[int, Callable | None]
                         ) -> list:
    """Compress several blocks at once for a cross-block method (non-sequential): observe each (the dense stream
    advances block by block), then compress the layers that share (same :meth:`CompressConfig.share_key`) together
    with the group function, and the others one by one."""
    config, device = plan.config, source.device
    observed: dict[str, tuple[nn.Module, LayerStats | None]] = {}
    for i, block in blocks.items():
        modules = {name: source.model.get_submodule(name) for name in chosen[i]}
        for name, module in modules.items():
            check_finite(name, module)
        block_stats = stats[i]
        if streams is not None and ("dense", 0) in streams.store:
            watch = modules if records[i] is None else {n: source.model.get_submodule(n) for n in plan.by_block[i]}
            block_stats = _observe(block, i, watch, plan, streams, "dense", device)
            if records[i] is not None:
                records[i](block_stats)
        for name, module in modules.items():
            observed[name] = (module, block_stats.get(name) if block_stats is not None else None)
    shared: dict[str, list[str]] = {}
    done = []
    for name, (module, layer_stats) in observed.items():
        key = config.share_key(name.split(f"{source.blocks_name}.", 1)[-1].split(".", 1)[-1])
        if key is None:
            done.append((name, *factorise(name, module, layer_stats, knobs[name], config, method)))
        else:
            shared.setdefault(key, []).append(name)
    for names in shared.values():
        done += factorise_shared(names, [observed[n][0] for n in names], [observed[n][1] for n in names], knobs,
                                 config, plan.value_bytes)
    order = {name: k for k, name in enumerate(observed)}
    rows = []
    for name, new, row in sorted(done, key=lambda item: order[item[0]]):
        set_submodule(source.model, name, new)
        rows.append(row)
    return rows


def _observe(block: nn.Module, i: int, modules: Mapping[str, nn.Module], plan: Plan, streams: Streams, main: str,
             device: torch.device) -> dict[str, LayerStats]:
    """Run the (still dense) block on the main stream collecting statistics; the dense stream advances here."""
    store = streams.store
    with torch.no_grad(), StatsObserver(modules, plan.block_kinds) as observer:
        for b in range(len(streams.batches)):
            out = run_block(block, streams.call(b, i, device), store.get((main, b)).to(device))
            if main == "dense":
                store.put((main, b), out)
    return observer.stats
