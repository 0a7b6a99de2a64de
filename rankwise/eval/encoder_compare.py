"""Compare compression methods across ratios on an encoder: embedding cosine to the dense model and retrieval."""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil
import torch
from torch import nn

from rankwise.calibrate.cache import StatsCache, collect_stats_cached
from rankwise.compression import compress_
from rankwise.eval.compare import label
from rankwise.eval.embedding import embedding_cosine, evaluate_encoder
from rankwise.eval.measure import count_params, peak_rss_mb
from rankwise.io.atomic import atomic_dir
from rankwise.methods import CompressConfig
from rankwise.progress import progress_bar
from rankwise.targets import find_targets

__all__ = ["EncoderComparison", "EncoderRow", "compare_encoder"]


@dataclass
class EncoderRow:
    """One model of an encoder comparison (``ratio`` 0: the dense reference)."""

    method: str
    ratio: float
    cosine: float  # mean cosine of its sentence embeddings to the dense model's
    top1: float
    mrr: float
    params_targeted_kept: int
    params_targeted_removed: int
    params_total: int
    compress_s: float
    rss_mb: float  # resident memory right after this row's compression (process-wide)
    texts_per_s: float


@dataclass
class EncoderComparison:
    """All rows plus the dense reference and the settings that produced them."""

    dense: EncoderRow
    rows: list[EncoderRow] = field(default_factory=list)
    settings: dict = field(default_factory=dict)
    calibration_s: float = 0.0
    notes: list[str] = field(default_factory=list)

    def to_markdown(self) -> str:
        s = self.settings
        head = (f"Encoder {s.get('model')}; calibration {s.get('calib')} windows of {s.get('seq_len')} tokens "
                f"({s.get('text')}); retrieval over {s.get('pairs')} held-out pydoc topics (first paragraph -> rest); "
                "ratio = fraction of targeted parameters removed; cosine = mean cosine of each text's embedding to "
                f"the dense model's; shared calibration took {self.calibration_s:.1f} s.\n\n")
        lines = ["| method | ratio | embedding cosine | top-1 | MRR | targeted kept | targeted removed | total params "
                 "| texts/s | factorise s | RSS MB |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in [self.dense, *self.rows]:
            total = r.params_targeted_kept + r.params_targeted_removed
            lines.append(
                f"| {r.method} | {r.ratio:g} | {r.cosine:.4f} | {r.top1:.3f} | {r.mrr:.3f} | "
                f"{r.params_targeted_kept:,} ({r.params_targeted_kept / total:.1%}) | "
                f"{r.params_targeted_removed:,} ({r.params_targeted_removed / total:.1%}) | {r.params_total:,} | "
                f"{r.texts_per_s:,.1f} | {r.compress_s:.1f} | {r.rss_mb:,.0f} |")
        return head + "\n".join(lines)

    def plot(self, path: Path) -> None:
        """Embedding cosine and top-1 accuracy against the ratio, one line per method."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for ax, key, name in ((axes[0], "cosine", "embedding cosine to dense"), (axes[1], "top1", "retrieval top-1")):
            for method in dict.fromkeys(r.method for r in self.rows):
                rows = sorted((r for r in self.rows if r.method == method), key=lambda r: r.ratio)
                ax.plot([r.ratio for r in rows], [getattr(r, key) for r in rows], marker="o", label=method)
            ax.axhline(getattr(self.dense, key), color="black", linestyle="--", label="dense")
            ax.set_xlabel("ratio (fraction of targeted parameters removed)")
            ax.set_ylabel(name)
            ax.grid(True, alpha=0.3)
        axes[0].legend()
        fig.suptitle(f"{self.settings.get('model')}: encoder quality vs compression")
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)

    def save(self, out: str | Path, overwrite: bool = False) -> Path:
        """Write ``comparison.md``, ``comparison.png`` and ``comparison.json`` atomically into ``out``."""
        with atomic_dir(out, overwrite) as tmp:
            (tmp / "comparison.md").write_text(self.to_markdown() + "\n")
            self.plot(tmp / "comparison.png")
            data = {"settings": self.settings, "calibration_s": self.calibration_s, "notes": self.notes,
                    "dense": asdict(self.dense), "rows": [asdict(r) for r in self.rows], "peak_rss_mb": peak_rss_mb()}
            (tmp / "comparison.json").write_text(json.dumps(data, indent=1))
        return Path(out)


def compare_encoder(model: nn.Module, tokenizer: Any, calibration: torch.Tensor, pairs: Sequence[tuple[str, str]],
                    configs: list[CompressConfig], *, batch_size: int = 8, max_length: int = 256,
                    progress: bool = True, settings: dict | None = None, cache: str | Path | None = None
                    ) -> EncoderComparison:
    """Compress a copy of the encoder ``model`` with every config and measure each on the held-out ``pairs``.

    The dense model's calibration statistics (every kind any config needs) are collected once and shared, as in
    :func:`rankwise.eval.compare.compare`; ``model`` is left untouched.
    """
    targets = find_targets(model)
    kinds = set().union(*(c.needs | c.policy.kinds for c in configs)) | {"xxt"}
    start = time.perf_counter()
    stats, entry = collect_stats_cached(StatsCache(cache) if cache is not None else None, model, calibration,
                                        targets, kinds=kinds, batch_size=batch_size, progress=progress)
    notes = [entry.note] if entry is not None and entry.note else []
    calibration_s = time.perf_counter() - start
    measure = {"max_length": max_length}
    dense_result, reference = evaluate_encoder(model, tokenizer, pairs, **measure)
    _, dense_targeted = count_params(model)

    def row(candidate: nn.Module, name: str, ratio: float, seconds: float) -> EncoderRow:
        rss = psutil.Process().memory_info().rss / 2**20
        result, _ = evaluate_encoder(candidate, tokenizer, pairs, reference=reference, **measure)
        return EncoderRow(name, ratio, result.cosine, result.top1, result.mrr, result.params_targeted,
                          dense_targeted - result.params_targeted, result.params_total, seconds, rss,
                          result.texts_per_s)

    dense = EncoderRow("dense", 0.0, embedding_cosine(reference, reference), dense_result.top1, dense_result.mrr,
                       dense_targeted, 0, dense_result.params_total, 0.0, psutil.Process().memory_info().rss / 2**20,
                       dense_result.texts_per_s)
    rows = []
    for config in progress_bar(configs, "recipes x ratios", enabled=progress):
        candidate = copy.deepcopy(model)
        needs_data = config.sequential or config.update_u
        report = compress_(candidate, config, calibration if needs_data else None, stats=stats,
                           batch_size=batch_size, progress=False)
        rows.append(row(candidate, label(config), config.ratio, report.seconds))
        del candidate
    return EncoderComparison(dense, rows, settings=dict(settings or {}), calibration_s=calibration_s, notes=notes)
