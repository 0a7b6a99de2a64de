"""Compare compression methods across ratios on one model, calibration set and evaluation set."""

from __future__ import annotations

import copy
import dataclasses
import json
import time
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import psutil
import torch
from torch import nn

from rankwise.calibrate import LayerStats
from rankwise.calibrate.cache import StatsCache, collect_stats_cached
from rankwise.compensate import compensate, merge_
from rankwise.compression import compress_
from rankwise.distributed import map_on_ray, ray_session
from rankwise.eval.generate import complete
from rankwise.eval.measure import (
    check_metrics,
    count_params,
    nuclear_metrics,
    peak_rss_mb,
    perplexity,
    prefill_throughput,
    targeted_bytes,
)
from rankwise.eval.speed import measure_speed
from rankwise.io.atomic import atomic_dir
from rankwise.methods import CompressConfig, config_class
from rankwise.methods.recipes import FLAG_OPTIONS
from rankwise.nn import compressed_modules
from rankwise.nn.fused import fuse_inputs_, unfuse_
from rankwise.progress import progress_bar
from rankwise.targets import find_targets


@dataclass
class CompareRow:
    method: str  # the recipe's label: method name plus its options, e.g. "svd_llm +loss +seq +upd"
    ratio: float
    perplexity: float
    params_targeted_kept: int
    params_targeted_removed: int
    params_total: int
    tokens_per_s: float
    compress_s: float
    rss_mb: float  # resident memory right after this row's compression (process-wide)
    weights_mb: float = 0.0  # bytes of the weights as saved at the storage dtype, each tied tensor once, in MB
    bits_per_weight: float = 0.0  # stored bits of the targeted layers per weight of the dense matrices
    kept: dict[str, float] = field(default_factory=dict)  # layer -> fraction of its parameters kept
    bits: float | None = None  # the budget in bits per targeted weight, when the row had one instead of a ratio
    completions: list[str] = field(default_factory=list)  # greedy completions of the comparison's prompts
    speed: dict[str, Any] | None = None  # decode / prefill timings with --speed (SpeedResult.to_dict())
    nuclear: float | None = None  # Matrix Nuclear-Norm (L1,2 approximation) when the metrics ask for it
    nuclear_exact: float | None = None  # Matrix Nuclear-Norm, exact nuclear norm, when asked for


@dataclass
class Comparison:
    """All rows plus the dense reference and the settings that produced them."""

    dense: CompareRow
    rows: list[CompareRow] = field(default_factory=list)
    settings: dict = field(default_factory=dict)
    calibration_s: float = 0.0
    stats_cached: bool = False  # the shared statistics were read from the calibration cache
    notes: list[str] = field(default_factory=list)

    def to_markdown(self) -> str:
        s = self.settings
        head = (f"Model {s.get('model')}; calibration {s.get('calib')} and disjoint evaluation {s.get('eval')} "
                f"windows of {s.get('seq_len')} tokens ({s.get('text')}); ratio = fraction of targeted parameters "
                f"removed; shared calibration took {self.calibration_s:.1f} s"
                f"{' (statistics read from the cache)' if self.stats_cached else ''}"
                ".\n\n")
        extra = [m for m in s.get("metrics", ()) if m != "perplexity"]  # the nuclear columns asked for
        lines = ["| method | ratio or bits | perplexity | vs dense | " + "".join(f"{m} | " for m in extra)
                 + f"targeted kept | targeted removed | total params | weights MB ({s.get('dtype', '')}) "
                 "| bits / targeted weight | prefill tok/s | speed-up | factorise s | RSS MB |",
                 "|---|---|---|---|" + "---|" * len(extra) + "---|---|---|---|---|---|---|---|---|"]
        for r in [self.dense, *self.rows]:
            total = r.params_targeted_kept + r.params_targeted_removed
            budget = f"{r.bits:g} bits" if r.bits is not None else f"{r.ratio:g}"
            lines.append(
                f"| {r.method} | {budget} | {r.perplexity:.2f} | {r.perplexity / self.dense.perplexity:.2f}x | "
                + "".join("- | " if getattr(r, m) is None else f"{getattr(r, m):.4f} | " for m in extra) +
                f"{r.params_targeted_kept:,} ({r.params_targeted_kept / total:.1%}) | "
                f"{r.params_targeted_removed:,} ({r.params_targeted_removed / total:.1%}) | {r.params_total:,} | "
                f"{r.weights_mb:,.1f} | {r.bits_per_weight:.2f} | {r.tokens_per_s:,.0f} | "
                f"{r.tokens_per_s / self.dense.tokens_per_s:.2f}x | {r.compress_s:.1f} | "
                f"{r.rss_mb:,.0f} |")
        side = self._side_by_side()
        speed = self._speed_table()
        return head + "\n".join(lines) + (f"\n\n{speed}" if speed else "") + (f"\n{side}" if side else "")

    def _speed_table(self) -> str:
        """Decode and prefill tokens/s of every timed row and their ratio to dense (empty without ``--speed``)."""
        if not self.dense.speed:
            return ""
        ref = self.dense.speed
        batches, shapes = list(ref["decode_tokens_per_s"]), list(ref["prefill_tokens_per_s"])
        how = (f"Speed ({ref['device']}, {ref['threads']} threads"
               + (f", decoding compiled ({ref['compile']})" if ref["compile"] else "")
               + (", low-rank input groups fused" if self.settings.get("fuse") else "")
               + f"): decode {ref['new_tokens']} new tokens with the KV cache, greedy, best of {ref['repeats']}.")
        head = ["method", "ratio or bits", *[f"decode b{b} tok/s" for b in batches],
                *[f"prefill {x} tok/s" for x in shapes], *[f"decode b{b} vs dense" for b in batches],
                *[f"prefill {x} vs dense" for x in shapes], f"memory MB ({ref['memory_is']})"]
        lines = [how, "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in [self.dense, *self.rows]:
            if not r.speed:
                continue
            dec, pre = r.speed["decode_tokens_per_s"], r.speed["prefill_tokens_per_s"]
            budget = f"{r.bits:g} bits" if r.bits is not None else f"{r.ratio:g}"
            cells = [r.method, budget, *[f"{dec[b]:,.1f}" for b in batches], *[f"{pre[x]:,.0f}" for x in shapes],
                     *[f"{dec[b] / ref['decode_tokens_per_s'][b]:.2f}x" for b in batches],
                     *[f"{pre[x] / ref['prefill_tokens_per_s'][x]:.2f}x" for x in shapes],
                     f"{r.speed['memory_mb']:,.0f}"]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def _side_by_side(self) -> str:
        """Each prompt's completion by every model, one table per prompt (empty without prompts)."""
        prompts = self.settings.get("prompts") or []
        out = []
        for k, prompt in enumerate(prompts):
            out += ["", f"**{prompt}** ...", "", "| model | greedy completion |", "|---|---|"]
            for r in [self.dense, *self.rows]:
                if k < len(r.completions):
                    text = " ".join(r.completions[k].split()).replace("|", "\\|")
                    at = f" @ {r.bits:g} bits" if r.bits is not None else f" @ {r.ratio:g}" if r.ratio else ""
                    out.append(f"| {r.method}{at} | {text} |")
        return "\n".join(out)

    def plot(self, path: Path, *, x: str = "ratio") -> None:
        """Perplexity against ``x``: ``"ratio"`` (rows with a ratio) or ``"bits"`` (every row, at the bits per
        targeted weight it stores)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4.5))
        rows_of = [r for r in self.rows if x == "bits" or r.bits is None]
        at = (lambda r: r.bits_per_weight) if x == "bits" else (lambda r: r.ratio)
        for method in dict.fromkeys(r.method for r in rows_of):
            rows = sorted((r for r in rows_of if r.method == method), key=at)
            ax.plot([at(r) for r in rows], [r.perplexity for r in rows], marker="o", label=method)
        ax.axhline(self.dense.perplexity, color="black", linestyle="--", label=f"dense ({self.dense.perplexity:.2f})")
        ax.set_yscale("log")
        ax.set_xlabel("bits stored per targeted weight" if x == "bits"
                      else "ratio (fraction of targeted parameters removed)")
        ax.set_ylabel("perplexity (held-out, log scale)")
        ax.set_title(f"{self.settings.get('model')}: perplexity vs compression")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)

    def plot_speed(self, path: Path) -> None:
        """Perplexity against decode tokens/s at the first timed batch size, every timed row."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        batch = next(iter(self.dense.speed["decode_tokens_per_s"]))
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for r in [self.dense, *self.rows]:
            if r.speed:
                x = r.speed["decode_tokens_per_s"][batch]
                ax.scatter(x, r.perplexity, s=30)
                at = f" @ {r.bits:g} bits" if r.bits is not None else f" @ {r.ratio:g}" if r.ratio else ""
                ax.annotate(f"{r.method}{at}", (x, r.perplexity), fontsize=7, xytext=(3, 3),
                            textcoords="offset points")
        ax.set_xlabel(f"decode tokens/s (batch {batch}, KV cache, greedy)")
        ax.set_ylabel("perplexity (held-out)")
        ax.set_title(f"{self.settings.get('model')}: perplexity vs decode speed")
        ax.grid(True, alpha=0.3)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)

    def plot_ranks(self, path: Path) -> None:
        """Fraction of parameters kept per layer (model order), one line per row: where each allocation spends."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(9, 4.5))
        for row in self.rows:
            if row.kept:
                ax.plot(list(row.kept.values()), linewidth=1, label=f"{row.method} @ {row.ratio:g}")
        ax.set_xlabel("targeted layer (model order)")
        ax.set_ylabel("fraction of parameters kept")
        ax.set_title("rank allocation per layer")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)

    def save(self, out: str | Path, overwrite: bool = False) -> Path:
        """Write ``comparison.md``, ``comparison.png`` (perplexity vs ratio), ``comparison_bits.png`` (perplexity vs
        bits per targeted weight), ``ranks.png`` (allocation per layer), with timings ``comparison_speed.png``
        (perplexity vs decode tokens/s), and ``comparison.json`` atomically into ``out``."""
        with atomic_dir(out, overwrite) as tmp:
            (tmp / "comparison.md").write_text(self.to_markdown() + "\n")
            self.plot(tmp / "comparison.png")
            self.plot(tmp / "comparison_bits.png", x="bits")
            self.plot_ranks(tmp / "ranks.png")
            if self.dense.speed:
                self.plot_speed(tmp / "comparison_speed.png")
            data = {"settings": self.settings, "calibration_s": self.calibration_s, "stats_cached": self.stats_cached,
                    "notes": self.notes, "dense": asdict(self.dense),
                    "rows": [asdict(r) for r in self.rows], "peak_rss_mb": peak_rss_mb()}
            (tmp / "comparison.json").write_text(json.dumps(data, indent=1))
        return Path(out)


def score(model: nn.Module, evaluation: torch.Tensor, *, batch_size: int = 8, speed_repeats: int = 5,
          prompts: Sequence[str] = (), tokenizer: Any = None, max_new_tokens: int = 32
          ) -> tuple[float, float, list[str]]:
    """``(perplexity, prefill tokens/s, greedy completions of prompts)`` of one candidate model."""
    ppl = perplexity(model, evaluation, batch_size=batch_size)
    tps = prefill_throughput(model, evaluation, batch_size=batch_size, repeats=speed_repeats)
    texts = complete(model, tokenizer, prompts, max_new_tokens=max_new_tokens) if prompts else []
    return ppl, tps, texts


def _row(model: nn.Module, name: str, ratio: float, evaluation: torch.Tensor, dense_targeted: int,
         seconds: float, batch_size: int, value_bytes: int, prompts: Sequence[str] = (), tokenizer: Any = None,
         max_new_tokens: int = 32, speed_repeats: int = 5, speed: Mapping[str, Any] | None = None,
         fuse: bool = False, metrics: Sequence[str] = ("perplexity",)) -> CompareRow:
    rss = psutil.Process().memory_info().rss / 2**20
    total, targeted = count_params(model)
    if fuse:
        fuse_inputs_(model)
    try:
        ppl, tps, texts = score(model, evaluation, batch_size=batch_size, speed_repeats=speed_repeats,
                                prompts=prompts, tokenizer=tokenizer, max_new_tokens=max_new_tokens)
        timed = measure_speed(model, **{"repeats": speed_repeats, **speed}).to_dict() if speed is not None else None
        nuclear, nuclear_exact = nuclear_metrics(model, evaluation, metrics, batch_size=batch_size)
    finally:
        unfuse_(model)
    stored = targeted_bytes(model, value_bytes)
    rest = sum(p.numel() for p in model.parameters()) - targeted_params_dense(model)
    return CompareRow(name, ratio, ppl, targeted, dense_targeted - targeted, total, tps, seconds, rss,
                      weights_mb=(stored + rest * value_bytes) / 1e6, bits_per_weight=8 * stored / dense_targeted,
                      completions=texts, speed=timed, nuclear=nuclear, nuclear_exact=nuclear_exact)


def declared_dtype(model: nn.Module) -> torch.dtype:
    """The dtype ``model`` would be saved in: the floating dtype its checkpoint's ``config.json`` declares (the
    published weights' dtype, e.g. bfloat16 for the default model, which rankwise computes with in float32), else
    the one its in-memory config names, else its parameters' dtype."""
    config = getattr(model, "config", None)
    where = Path(str(getattr(config, "_name_or_path", "") or "")) / "config.json"
    declared: Any = None
    if where.is_file():
        try:
            data = json.loads(where.read_text())
        except (OSError, ValueError):
            data = {}
        declared = (data.get("dtype") or data.get("torch_dtype")) if isinstance(data, dict) else None
    if declared is None:
        declared = getattr(config, "dtype", None)
    if isinstance(declared, str):
        declared = getattr(torch, declared, None)
    if isinstance(declared, torch.dtype) and declared.is_floating_point:
        return declared
    return next(model.parameters()).dtype


def storage_dtype_of(model: nn.Module, storage_dtype: str | torch.dtype | None) -> torch.dtype:
    """``storage_dtype`` as a floating torch dtype (a name such as ``"bfloat16"``), or :func:`declared_dtype`."""
    if storage_dtype is None:
        return declared_dtype(model)
    dtype = getattr(torch, storage_dtype, None) if isinstance(storage_dtype, str) else storage_dtype
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"storage_dtype must be a floating dtype such as bfloat16, float16 or float32, got "
                         f"{storage_dtype!r}")
    return dtype


def targeted_params_dense(model: nn.Module) -> int:
    """Floating-point parameters inside the targeted layers (dense or compressed), counted in ``model.parameters``."""
    layers = [*find_targets(model).values(), *compressed_modules(model).values()]
    return sum(p.numel() for m in layers for p in m.parameters())


def label(config: CompressConfig, eora_rank: int = 0) -> str:
    """Row label: the method and the options that differ from the defaults."""
    parts = [config.name]
    if config.allocation != "uniform":
        parts.append(f"+{config.policy.name}")
    if config.sequential:
        parts.append("+seq")
    if config.update_u:
        parts.append("+upd")
    if config.score_samples is not None:
        parts.append(f"+score_samples={config.score_samples}")
    base = {f.name for f in dataclasses.fields(CompressConfig)}
    flags = {key: flag for flag, (key, value) in FLAG_OPTIONS.items() if value is True}
    for f in dataclasses.fields(config):  # method-specific fields that differ from their defaults
        value = getattr(config, f.name)
        if f.name not in base and value != f.default:
            parts.append(f"+{flags[f.name]}" if value is True and f.name in flags else f"+{f.name}={value}")
    if eora_rank:
        parts.append(f"+eora{eora_rank}")
    return " ".join(parts)


def recipes(methods: list[str], ratios: list[float], *, allocations: tuple[str, ...] = ("uniform",),
            sequential: tuple[bool, ...] = (False,), update_u: tuple[bool, ...] = (False,),
            anchored: tuple[bool, ...] = (False,)) -> list[CompressConfig]:
    """The cross product of methods, allocations, sequential, update and anchored options, and ratios, as configs
    (anchored rows only where they mean something: sequential ones)."""
    if True in anchored and True not in sequential:
        raise ValueError("--anchored on fits the original outputs from the compressed model's inputs, which needs "
                         "sequential rows: add --sequential on (or both)")
    if True in anchored:
        lacking = [m for m in methods if "anchored" not in {f.name for f in dataclasses.fields(config_class(m))}]
        if lacking:
            raise ValueError(f"--anchored applies to methods with an anchored fit (svd_llm), not {', '.join(lacking)}")
    return [config_class(m)(ratio=r, allocation=a, sequential=s, update_u=u, **({"anchored": True} if c else {}))
            for m in methods for a in allocations for s in sequential for u in update_u for c in anchored
            if s or not c for r in ratios]


class Anchor(Protocol):
    """A row made by another library (e.g. :class:`~rankwise.eval.anchors.HQQ`): a label and its rows."""

    label: str

    def rows(self, model: nn.Module, evaluation: torch.Tensor, *, value_bytes: int, batch_size: int = 8,
             speed_repeats: int = 5, prompts: Sequence[str] = (), tokenizer: Any = None, max_new_tokens: int = 32,
             **shared: Any) -> list[CompareRow]: ...


def candidate_rows(config: CompressConfig | Anchor | None, *, model: nn.Module, calibration: torch.Tensor,
                   evaluation: torch.Tensor, stats: Mapping[str, LayerStats], dense_targeted: int, eora_rank: int = 0,
                   batch_size: int = 8, prompts: Sequence[str] = (), tokenizer: Any = None,
                   max_new_tokens: int = 32, speed_repeats: int = 5,
                   storage_dtype: str | torch.dtype | None = None, speed: Mapping[str, Any] | None = None,
                   fuse: bool = False, metrics: Sequence[str] = ("perplexity",)) -> list[CompareRow]:
    """Compress a copy of ``model`` with ``config`` and evaluate it: one row, two with ``eora_rank > 0``.

    ``model`` is left untouched; ``stats`` are the dense model's statistics, shared by every config. ``config=None``
    evaluates the dense model itself (one row); an :class:`Anchor` makes its own rows (no EoRA row). Bytes and bits
    per weight count floating-point values at ``storage_dtype`` (default: :func:`declared_dtype`), which a budget in
    bits is also met at.
    """
    dtype = storage_dtype_of(model, storage_dtype)
    text = {"prompts": prompts, "tokenizer": tokenizer, "max_new_tokens": max_new_tokens,
            "speed_repeats": speed_repeats}
    if config is None:
        return [_row(model, "dense", 0.0, evaluation, dense_targeted, 0.0, batch_size, dtype.itemsize, **text,
                     speed=speed, metrics=metrics)]
    if not isinstance(config, CompressConfig):
        return config.rows(model, evaluation, value_bytes=dtype.itemsize, batch_size=batch_size, **text)
    text.update(speed=speed, fuse=fuse, metrics=metrics)
    candidate = copy.deepcopy(model)
    needs_data = config.sequential or config.update_u or config.needs_influence
    report = compress_(candidate, config, calibration if needs_data else None, stats=stats, batch_size=batch_size,
                       progress=False, save_dtype=dtype)
    row = _row(candidate, label(config), config.ratio, evaluation, dense_targeted, report.seconds, batch_size,
               dtype.itemsize, **text)
    row.bits = config.bits
    row.kept = {layer.name: layer.params_after / layer.params_before for layer in report.layers}
    if not eora_rank or any(not layer.grows_rank for layer in compressed_modules(candidate).values()):
        return [row]  # a kind that cannot take a merged update gets no EoRA row (compare notes which)
    start = time.perf_counter()
    merge_(candidate, compensate(model, candidate, calibration, eora_rank, batch_size=batch_size, progress=False))
    seconds = report.seconds + time.perf_counter() - start
    return [row, _row(candidate, label(config, eora_rank), config.ratio, evaluation, dense_targeted, seconds,
                      batch_size, dtype.itemsize, **text)]


def compare(model: nn.Module, calibration: torch.Tensor, evaluation: torch.Tensor, configs: list[CompressConfig],
            *, eora_rank: int = 0, batch_size: int = 8, progress: bool = True, settings: dict | None = None,
            ray_address: str | None = None, prompts: Sequence[str] = (), tokenizer: Any = None,
            max_new_tokens: int = 32, cache: str | Path | None = None, speed_repeats: int = 5,
            storage_dtype: str | torch.dtype | None = None, hqq_bits: Sequence[int] = (),
            hqq_group: int = 64, speed: Mapping[str, Any] | None = None, fuse: bool = False,
            metrics: Sequence[str] = ("perplexity",)) -> Comparison:
    """Compress a copy of ``model`` with every config and evaluate each on ``evaluation``.

    With ``prompts`` (and the ``tokenizer``) every row also holds each prompt's greedy completion, shown side by
    side in the Markdown. With ``eora_rank > 0`` every config also gets a row with EoRA compensation of that rank
    merged in (its extra parameters are counted). Dense-model statistics are collected once (all kinds any method
    needs) and shared.

    Args:
        ray_address: run every config as a task on Ray (the optional ``rankwise[ray]`` extra) instead of one after
            another in this process: ``"local"`` starts a local instance, ``"auto"`` or ``"host:port"`` joins a
            running cluster (see :func:`~rankwise.distributed.ray_session`). The rows are the same, in the same
            order; their timings and memory are the workers' (the dense row's too, so speed-ups compare like with
            like).
        speed_repeats: timed prefill passes per row (the fastest counts); fewer is quicker and noisier.
        cache: a directory for the dense model's calibration statistics (see :mod:`rankwise.calibrate.cache`): a
            later comparison on the same weights and calibration reads them instead of running the model.
        storage_dtype: the dtype the models would be saved in: every row's bytes and bits per weight count
            floating-point values at its size, and budgets in bits are met at it (default: the floating dtype the
            model's checkpoint declares, e.g. bfloat16 for the default model, else its parameters' dtype). The
            models are evaluated in their own dtype.
        hqq_bits: also a row of HQQ quantisation (:class:`~rankwise.eval.anchors.HQQ`, the optional
            ``rankwise[quant]`` extra) at each of these bits, after the configs' rows, at the bits its format stores.
        hqq_group: weights per HQQ scale and zero.
        speed: also time every row's decode and prefill (the keyword arguments of
            :func:`~rankwise.eval.speed.measure_speed`, e.g. ``{}`` for its defaults), shown in a second table with
            each row's ratio to dense; the HQQ anchors are not timed (HQQ's own layers).
        fuse: run each compressed row with its low-rank input groups fused (:func:`rankwise.nn.fused.fuse_inputs_`).
        metrics: names in :data:`~rankwise.eval.measure.METRICS`; perplexity is always measured (the table's
            reference), ``nuclear`` / ``nuclear_exact`` add a column each (not for the HQQ anchors: their rows show
            ``-``).

    Raises:
        ValueError: ``hqq_bits`` without the ``hqq`` package (one line naming the extra), a bad storage dtype or
            HQQ setting, an unknown metric.
    """
    metrics = tuple(dict.fromkeys(("perplexity", *check_metrics(metrics))))
    if ray_address is not None and next(model.parameters()).device.type != "cpu":
        raise ValueError("--ray runs every candidate on a CPU worker: load the model with --device cpu")
    dtype = storage_dtype_of(model, storage_dtype)
    anchors: list[Anchor] = []
    if hqq_bits:
        from rankwise.eval.anchors import HQQ, hqq_api

        hqq_api()  # a missing package fails before any work
        anchors = [HQQ(b, hqq_group) for b in hqq_bits]
    notes = []
    if eora_rank and anchors:
        notes.append("no EoRA rows for the HQQ anchors (HQQ's own layers); the hqq method, HQQ held in rankwise's "
                     "format, takes EoRA")
    session = nullcontext() if ray_address is None else ray_session(ray_address)
    with session:  # connect before the calibration pass, so a bad address fails at once
        targets = find_targets(model)
        kinds = set().union(*(c.needs | c.policy.kinds for c in configs if isinstance(c, CompressConfig))) | {"xxt"}
        if any(isinstance(c, CompressConfig) and c.score_samples is not None for c in configs):
            raise ValueError("score_samples narrows rankwise compress's scoring pass; compare scores every row on "
                             "its shared statistics of all calibration windows: drop +score_samples from the recipes")
        if "gwin" in kinds:  # whole-model statistics would hold every layer's per-window gradients at once
            raise ValueError("allocation loss_mfac keeps each window's weight gradient, which compare's shared "
                             "whole-model statistics would hold for every layer at once; measure it with rankwise "
                             "compress --allocation loss_mfac (one block at a time) and rankwise eval")
        start = time.perf_counter()
        stats, entry = collect_stats_cached(StatsCache(cache) if cache is not None else None, model, calibration,
                                            targets, kinds=kinds, batch_size=batch_size, progress=progress)
        notes += [entry.note] if entry is not None and entry.note else []
        if entry is not None and entry.hit:
            notes.append(f"calibration statistics read from the cache ({entry.path})")
        calibration_s = time.perf_counter() - start
        _, dense_targeted = count_params(model)
        shared = {"model": model, "calibration": calibration, "evaluation": evaluation, "stats": stats,
                  "dense_targeted": dense_targeted, "eora_rank": eora_rank, "batch_size": batch_size,
                  "prompts": list(prompts), "tokenizer": tokenizer, "max_new_tokens": max_new_tokens,
                  "speed_repeats": speed_repeats, "storage_dtype": dtype, "speed": speed, "fuse": fuse,
                  "metrics": metrics}
        items = [None, *configs, *anchors]  # None: the dense model
        if ray_address is None:
            groups = [candidate_rows(c, **shared) for c in progress_bar(items, "dense, recipes x ratios",
                                                                          enabled=progress)]
        else:
            groups = map_on_ray(candidate_rows, items, shared, description="dense, recipes x ratios",
                                progress=progress)
    (dense,), *candidates = groups
    rows = [row for group in candidates for row in group]
    if eora_rank:
        alone = [group[0].method for item, group in zip(items[1:], candidates, strict=True)
                 if isinstance(item, CompressConfig) and len(group) == 1]
        if alone:
            notes.append(f"no EoRA row for {', '.join(alone)}: their layer kinds cannot merge a low-rank update "
                         "(export the compensation as a PEFT adapter with rankwise compensate instead)")
    if speed is not None and anchors:
        notes.append("the HQQ anchors are not timed (HQQ's own layers)")
    if anchors and len(metrics) > 1:
        notes.append("the HQQ anchors are scored by perplexity only (their rows show - for the other metrics)")
    settings = {"dtype": str(dtype).removeprefix("torch."), "fuse": fuse, "metrics": list(metrics),
                "compute_dtype": str(next(model.parameters()).dtype).removeprefix("torch."), **(settings or {})}
    return Comparison(dense, rows, settings=settings, calibration_s=calibration_s,
                      stats_cached=entry is not None and entry.hit, notes=notes)
