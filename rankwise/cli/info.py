"""``rankwise info``: what a compressed directory holds, and where it came from."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Annotated, Any

import typer

from rankwise.cli.common import JsonOpt, one_line_errors, say

_NUMBERS = ("ratio", "bits", "bits_per_targeted_weight", "bytes_dense")
_COUNTS = ("params_total_before", "params_total_after", "params_targeted_before", "params_targeted_after")
_LISTS = ("notes", "layers")


def check_report(manifest: Any) -> dict[str, Any]:
    """The manifest's ``report`` (``{}`` when none), its fields that :func:`describe` and :func:`info` show checked:
    a one-line ``ValueError`` naming the file and the field otherwise (a hand-edited or damaged ``rankwise.json``)."""
    report = manifest.report or {}

    def bad(name: str, expected: str) -> ValueError:
        got = f"is {report[name]!r}" if name in report else "is missing"
        return ValueError(f"{manifest.file}: field 'report.{name}' {got}; expected {expected}")

    def given(name: str) -> bool:
        return report.get(name) is not None

    if given("method") and not isinstance(report["method"], str):
        raise bad("method", "a method name")
    for name in _NUMBERS:
        if given(name) and (not isinstance(report[name], int | float) or isinstance(report[name], bool)):
            raise bad(name, "a number")
    for name in _COUNTS:
        if given(name) and (not isinstance(report[name], int) or isinstance(report[name], bool) or report[name] < 0):
            raise bad(name, "a whole number >= 0")
    for name in _LISTS:
        if given(name) and not isinstance(report[name], list):
            raise bad(name, "a list")
    if given("method") and not given("bits") and not given("ratio"):
        raise bad("ratio", "a number (or 'report.bits', a budget in bits)")
    if given("params_targeted_after"):  # shown with the targeted and total counts it is compared to
        for name in _COUNTS:
            if not given(name):
                raise bad(name, "a whole number >= 0")
    return report


def describe(manifest: Any) -> dict[str, Any]:
    """Plain data about a validated manifest: method, ratio, options, parameters, rank histogram, provenance.

    Raises:
        ValueError: a report field of the wrong type (see :func:`check_report`).
    """
    from rankwise.io.shards import weights_bytes

    report = check_report(manifest)
    layers = report.get("layers") or []
    ranks = [spec.rank for spec in manifest.modules.values() if spec.rank is not None]
    before, after = report.get("params_targeted_before"), report.get("params_targeted_after")
    return {
        "model_class": manifest.model_class,
        "dtype": manifest.dtype_name,
        "method": report.get("method"),
        "ratio": report.get("ratio") if report.get("bits") is None else None,
        "bits_budget": report.get("bits"),
        "notes": report.get("notes") or [],
        "factorised_layers": len(manifest.modules),
        "layers_in_report": len(layers),
        "params_total_before": report.get("params_total_before"),
        "params_total_after": report.get("params_total_after"),
        "params_targeted_kept": after,
        "params_targeted_removed": (before - after) if before is not None and after is not None else None,
        "kinds": dict(Counter(spec.kind for spec in manifest.modules.values())),
        "bytes_on_disk": weights_bytes(manifest.file.parent),
        "bytes_dense": report.get("bytes_dense"),
        "bits_per_targeted_weight": report.get("bits_per_targeted_weight"),
        "rank_histogram": {(f"{low}-{2 * low - 1}" if low else "0"): n
                           for low, n in sorted(Counter(map(_bucket, ranks)).items())},
        "provenance": manifest.provenance,
    }


def _bucket(rank: int) -> int:
    """The power-of-two bucket's lower end: buckets 0 (a quantised layer without a low-rank part), 1-1, 2-3, 4-7,
    8-15, ..."""
    return 1 << (rank.bit_length() - 1) if rank > 0 else 0


@one_line_errors
def info(
    path: Annotated[str, typer.Argument(help="a directory written by rankwise compress")],
    as_json: JsonOpt = False,
) -> None:
    """Show what the compressed directory PATH holds: method, ratio, options, parameters kept and removed, the rank
    histogram and provenance (source model and its fingerprint, text and windows, versions, command line)."""
    from rankwise.io.checkpoint import check_model_dir
    from rankwise.io.manifest import MANIFEST, read_manifest
    from rankwise.io.save import is_compressed_dir

    where = Path(path)
    check_model_dir(where)
    if not is_compressed_dir(where):
        raise ValueError(f"{path!r} is not a rankwise directory (no {MANIFEST}, no rankwise quantization_config)")
    data = describe(read_manifest(where))
    if as_json:
        say(json.dumps(data, indent=1))
        return
    say(f"{path}: {data['model_class']} ({data['dtype']}), {data['factorised_layers']} compressed layers")
    if data["method"] is not None and data["bits_budget"] is not None:
        say(f"method {data['method']} at a budget of {data['bits_budget']:g} bits per targeted weight")
    elif data["method"] is not None:
        say(f"method {data['method']} at ratio {data['ratio']:g} (fraction of targeted parameters removed)")
    if data["params_targeted_kept"] is not None:
        say(f"targeted parameters: kept {data['params_targeted_kept']:,}, removed {data['params_targeted_removed']:,}; "
            f"total {data['params_total_after']:,} (was {data['params_total_before']:,})")
    dense = f", dense in {data['dtype']} {data['bytes_dense'] / 1e6:,.1f} MB" if data["bytes_dense"] else ""
    bits = data["bits_per_targeted_weight"]
    say(f"weights on disk {data['bytes_on_disk'] / 1e6:,.1f} MB{dense}"
        + (f"; {bits:.2f} bits per targeted weight" if bits is not None else "")
        + "; layer kinds: " + ", ".join(f"{k} x{n}" for k, n in data["kinds"].items()))
    for note in data["notes"]:
        say(f"note: {note}")
    if data["rank_histogram"]:  # kinds with a rank (low-rank, quantised + low-rank); narrow layers have none
        say("ranks: " + ", ".join(f"{bucket}: {count}" for bucket, count in data["rank_histogram"].items()))
    origin = data["provenance"]
    if not origin:
        say("provenance: not recorded (written by rankwise.save without it, or by an older rankwise)")
        return
    for key in ("source", "source_fingerprint", "method", "options", "text", "calibration_windows", "command",
                "rankwise_version", "torch_version", "transformers_version", "created_utc", "heal"):
        if origin.get(key) is not None:
            say(f"{key}: {json.dumps(origin[key]) if isinstance(origin[key], dict | list) else origin[key]}")
