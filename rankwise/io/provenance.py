"""Where a compressed model came from, recorded in its ``rankwise.json`` by ``rankwise compress``."""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import importlib.metadata
import shlex
import sys
from pathlib import Path
from typing import Any


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def fingerprint(path: str | Path) -> str | None:
    """``sha256`` over ``config.json`` and each safetensors file's name, size and header (its tensor names, dtypes,
    shapes and offsets), not over the weight bytes themselves: a cheap identity for checkpoints of any size. ``None``
    for what is not a local checkpoint directory."""
    path = Path(path)
    if not path.is_dir():
        return None
    digest = hashlib.sha256()
    for file in sorted(path.glob("*.safetensors")) + sorted(path.glob("config.json")):
        digest.update(f"{file.name}\0{file.stat().st_size}\0".encode())
        with file.open("rb") as fh:
            if file.suffix == ".safetensors":
                size = int.from_bytes(fh.read(8), "little")
                digest.update(fh.read(min(size, 100_000_000)))
            else:
                digest.update(fh.read())
    return digest.hexdigest()


def provenance(source: str, source_path: Any, config: Any, text: str, windows: tuple[int, ...]) -> dict[str, Any]:
    """The provenance record: source model and its fingerprint, method options, text and windows, versions, the
    command line and the time."""
    options = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else {}
    return {
        "source": source,
        "source_fingerprint": fingerprint(source_path) if isinstance(source_path, Path) else None,
        "method": getattr(config, "name", type(config).__name__),
        "options": {k: (list(v) if isinstance(v, tuple) else v) for k, v in options.items()},
        "text": text,
        "calibration_windows": list(windows),
        "rankwise_version": _version("rankwise"),
        "torch_version": _version("torch"),
        "transformers_version": _version("transformers"),
        "command": shlex.join(["rankwise", *sys.argv[1:]]) if Path(sys.argv[0]).name == "rankwise" else None,
        "created_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
