"""What a compression did, per layer and in total, printable as Markdown or JSON."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
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
    refused_fits: tuple[str, ...] = ()  # fits refused, the plainer factors kept: "anchored" (plain whitened), "refit"
    kind: str = "dense"  # the layer kind written ("lowrank", "dictionary", ...), "dense" if kept dense
    knob: str = "rank"  # what ``rank`` counts for this kind (rank, atoms ...)
    floats_after: int | None = None  # floating-point values stored (None: params_after, all floating)
    fixed_bytes_after: int = 0  # integer codes and indices stored, in bytes

    def bytes_after(self, value_bytes: int) -> int:
        """Bytes this layer stores when floating-point values take ``value_bytes`` each."""
        floats = self.params_after if self.floats_after is None else self.floats_after
        return floats * value_bytes + self.fixed_bytes_after


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
    bits: float | None = None  # the budget in average bits per targeted weight, when one was given instead of ratio
    value_bytes: int | None = None  # bytes per floating-point value the budget counted (the planned storage dtype)

    @property
    def bits_per_targeted_weight(self) -> float | None:
        """Stored bits of the targeted layers per weight of the dense matrices they replace."""
        if self.storage_dtype is None:
            return self.bits_at(self.value_bytes) if self.value_bytes else None
        import torch

        return self.bits_at(getattr(torch, self.storage_dtype).itemsize)

    def bits_at(self, value_bytes: int) -> float | None:
        """Stored bits per targeted weight with floating-point values of ``value_bytes`` each."""
        if not self.params_targeted_before:
            return None
        return 8 * sum(layer.bytes_after(value_bytes) for layer in self.layers) / self.params_targeted_before

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
        budget = f"{self.bits:g} bits per weight" if self.bits is not None else f"ratio {self.ratio:g}"
        bits = self.bits_per_targeted_weight
        stored = f"{bits:.2f} bits per targeted weight stored; " if bits is not None else ""
        return (
            f"{self.method} at {budget}: {stored}targeted params kept {kept:,} / {before:,} "
            f"({kept / max(before, 1):.1%} kept, {self.removed_fraction:.1%} removed); total params "
            f"{self.params_total_after:,} (was {self.params_total_before:,}); {len(self.layers)} layers"
            f"{mean_err}; {self.seconds:.1f} s"
        )

    def to_markdown(self) -> str:
        value_bytes = self.value_bytes or 2
        lines = [f"**{self.summary()}**", "", "| layer | shape | kind | size | params before | params after | kept | "
                 f"removed | bits/weight ({8 * value_bytes}-bit floats) | rel. output error | notes |",
                 "|---|---|---|---|---|---|---|---|---|---|---|"]
        for layer in self.layers:
            kept = layer.params_after / layer.params_before
            err = "" if layer.rel_error is None else f"{layer.rel_error:.4f}"
            m, n = layer.shape
            bits = 8 * layer.bytes_after(value_bytes) / layer.params_before
            size = "" if layer.kind == "dense" else f"{layer.knob} {layer.rank}"
            lines.append(f"| {layer.name} | {m}x{n} | {layer.kind} | {size} | {layer.params_before:,} | "
                         f"{layer.params_after:,} | {kept:.1%} | {1 - kept:.1%} | {bits:.2f} | {err} | {layer.notes} |")
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

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CompressionReport:
        """The inverse of :meth:`to_dict` (as stored in a directory's ``rankwise.json``); derived totals are
        recomputed, unknown keys ignored."""
        names = {f.name for f in fields(cls)}
        layer_names = {f.name for f in fields(LayerReport)}
        try:
            layers = [LayerReport(**{**{k: v for k, v in layer.items() if k in layer_names},
                                     "shape": tuple(layer["shape"])}) for layer in data.get("layers", [])]
            return cls(**{k: v for k, v in data.items() if k in names and k != "layers"}, layers=layers)
        except (TypeError, KeyError, AttributeError) as err:
            raise ValueError(f"not a rankwise compression report ({type(err).__name__}: {err})") from None

    def refresh(self, model: Any) -> None:
        """Set each compressed layer's size columns (knob, values, bytes) to what ``model``'s layer holds now, after
        a merge grew it; a refreshed layer's calibration error no longer applies and is cleared. The bytes on disk
        are the next save's."""
        from rankwise.nn import compressed_modules, model_num_params

        layers = compressed_modules(model)
        for row in self.layers:
            layer = layers.get(row.name)
            if layer is None or (layer.num_params, layer.fixed_nbytes) == (row.params_after, row.fixed_bytes_after):
                continue
            row.rank = int(getattr(layer, "rank", row.rank))
            row.params_after, row.floats_after = layer.num_params, layer.float_numel
            row.fixed_bytes_after, row.rel_error = layer.fixed_nbytes, None
        self.params_total_after = model_num_params(model)
        self.bytes_on_disk = None
