"""What a compression did, per layer and in total, printable as Markdown or JSON."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class LayerReport:
    """One factorised (or skipped) matrix."""

    name: str
    shape: tuple[int, int]
    rank: int
    params_before: int
    params_after: int
    rel_error: float | None  # ||(W - W')X||_F / ||W X||_F on calibration data; None without data
    notes: str = ""
    covariance_fallback: bool = False  # the input covariance was not positive definite (eigen fallback used)


@dataclass
class CompressionReport:
    """Per-layer ranks, parameters before/after and calibration error, plus totals.

    ``ratio`` is the requested fraction of targeted parameters removed; ``removed_fraction`` is what was achieved.
    """

    method: str
    ratio: float
    params_total_before: int
    params_total_after: int = 0
    layers: list[LayerReport] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    block_seconds: list[float] = field(default_factory=list)  # compression time of each decoder block
    storage_dtype: str | None = None  # the dtype the saved weights are stored in
    bytes_on_disk: int | None = None  # the saved weight files (safetensors), once written
    bytes_dense: int | None = None  # the dense model's weights stored in the same dtype (each tied tensor once)

    @property
    def bits_per_targeted_weight(self) -> float | None:
        """Stored bits of the targeted layers per weight of the dense matrices they replace."""
        if self.storage_dtype is None or not self.params_targeted_before:
            return None
        import torch

        bits = getattr(torch, self.storage_dtype).itemsize * 8
        return bits * self.params_targeted_after / self.params_targeted_before

    def record_storage(self, out: Any, dtype: Any) -> None:
        """Note the dtype and the bytes of the weights written to directory ``out``."""
        from rankwise.io.shards import weights_bytes

        self.storage_dtype = str(dtype).removeprefix("torch.")
        self.bytes_on_disk = weights_bytes(out)
        self.bytes_dense = self.params_total_before * dtype.itemsize

    def storage_line(self) -> str:
        """Bytes on disk against the dense model in the same dtype, and bits per targeted weight."""
        if self.bytes_on_disk is None or self.bytes_dense is None:
            return ""
        return (f"weights on disk {self.bytes_on_disk / 1e6:,.1f} MB ({self.storage_dtype}), dense in "
                f"{self.storage_dtype} {self.bytes_dense / 1e6:,.1f} MB: {self.bytes_on_disk / self.bytes_dense:.3f}x; "
                f"{self.bits_per_targeted_weight:.2f} bits per targeted weight")

    @property
    def params_targeted_before(self) -> int:
        return sum(layer.params_before for layer in self.layers)

    @property
    def params_targeted_after(self) -> int:
        return sum(layer.params_after for layer in self.layers)

    @property
    def removed_fraction(self) -> float:
        before = self.params_targeted_before
        return 1.0 - self.params_targeted_after / before if before else 0.0

    def summary(self) -> str:
        kept = self.params_targeted_after
        before = self.params_targeted_before
        errors = [layer.rel_error for layer in self.layers if layer.rel_error is not None]
        mean_err = f", mean relative output error {sum(errors) / len(errors):.4f}" if errors else ""
        return (
            f"{self.method} at ratio {self.ratio:g}: targeted params kept {kept:,} / {before:,} "
            f"({kept / max(before, 1):.1%} kept, {self.removed_fraction:.1%} removed); total params "
            f"{self.params_total_after:,} (was {self.params_total_before:,}); {len(self.layers)} layers"
            f"{mean_err}; {self.seconds:.1f} s"
        )

    def to_markdown(self) -> str:
        lines = [f"**{self.summary()}**", "", "| layer | shape | rank | params before | params after | kept | "
                 "removed | rel. output error | notes |", "|---|---|---|---|---|---|---|---|---|"]
        for layer in self.layers:
            kept = layer.params_after / layer.params_before
            err = "" if layer.rel_error is None else f"{layer.rel_error:.4f}"
            lines.append(f"| {layer.name} | {layer.shape[0]}x{layer.shape[1]} | {layer.rank} | "
                         f"{layer.params_before:,} | {layer.params_after:,} | {kept:.1%} | {1 - kept:.1%} | {err} "
                         f"| {layer.notes} |")
        lines += [f"- {note}" for note in self.notes]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.update(params_targeted_before=self.params_targeted_before,
                   params_targeted_after=self.params_targeted_after, removed_fraction=self.removed_fraction,
                   bits_per_targeted_weight=self.bits_per_targeted_weight)
        for layer in out["layers"]:
            if layer["rel_error"] is not None and not math.isfinite(layer["rel_error"]):
                layer["rel_error"] = None
        return out
