"""The calibration cache's bookkeeping: its size cap, its entries listed, evicted (least recently used first) and
cleared, for :class:`~rankwise.calibrate.cache.StatsCache` and ``rankwise cache list`` / ``rankwise cache clear``.

An entry is a directory ``<root>/<32 hex>`` with ``manifest.json``; its empty ``last-used`` file's modification time is
its last use (commit or hit) and its ``flock`` the readers'. Scratch (``.tmp-``) and half-written directories are
never touched.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import re
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rankwise.io.atomic import remove_dead_scratch, scratch_name
from rankwise.io.integrity import content_identity

MANIFEST = "manifest.json"
USED = "last-used"  # empty; its modification time is the entry's last use (commit or hit), its flock the readers'
MAX_GB_ENV = "RANKWISE_CACHE_MAX_GB"
DEFAULT_MAX_GB = 4.0
_ENTRY_NAME = re.compile(r"^[0-9a-f]{32}$")


def cache_cap(max_bytes: float | None = None) -> tuple[float, str]:
    """The cap in bytes and where it came from: ``max_bytes``, else ``$RANKWISE_CACHE_MAX_GB`` (gigabytes of
    10^9 bytes), else :data:`DEFAULT_MAX_GB`. ``inf`` means no cap.

    Raises:
        ValueError: a value that is not a positive number.
    """
    if max_bytes is not None:
        if not max_bytes > 0:
            raise ValueError(f"max_bytes must be a positive number of bytes, got {max_bytes!r}")
        return float(max_bytes), f"max_bytes={max_bytes:g}"
    raw = os.environ.get(MAX_GB_ENV, "").strip()
    if not raw:
        return DEFAULT_MAX_GB * 1e9, f"the default; {MAX_GB_ENV} is unset"
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not value > 0:
        raise ValueError(f"{MAX_GB_ENV}={raw!r} is not a size: give a positive number of gigabytes, such as 4 or "
                         "0.5 (inf for no cap)")
    return value * 1e9, f"{MAX_GB_ENV}={raw}"


@dataclass(frozen=True)
class EntryInfo:
    """A complete entry on disk, as :func:`list_entries` found it."""

    name: str
    path: Path
    bytes: int  # all its files
    created: float  # POSIX time its manifest was written
    last_used: float  # POSIX time it was last committed or read
    key: dict[str, Any]  # the manifest's key ({} when unreadable)
    files: tuple[str, ...]  # the files the manifest lists

    @property
    def model(self) -> str:
        """The model's identity (its content hash), or ``""`` when the manifest does not say."""
        weights = self.key.get("weights")
        return weights if isinstance(weights, str) else ""

    @property
    def kinds(self) -> list[str]:
        """The statistic kinds it holds (input second moments, Fisher, gradients ...)."""
        found = set()
        for field in ("block_kinds", "gradient_kinds", "whole_model_kinds"):
            found.update(self.key.get(field) or [])
        return sorted(found)

    @property
    def layers(self) -> int:
        """How many layers it holds statistics of."""
        targets = self.key.get("targets")
        return len(targets) if isinstance(targets, list) else 0

    @property
    def parts(self) -> list[str]:
        return sorted(f.removesuffix(".safetensors") for f in self.files if f.endswith(".safetensors"))


def list_entries(root: str | Path) -> list[EntryInfo]:
    """The complete entries under ``root`` (named by a key hash, with a manifest that describes a calibration: its
    key and files; never scratch, never a folder rankwise did not write), least recently used first. An entry that
    vanishes meanwhile (another run evicted it) is left out."""
    try:
        candidates = [p for p in Path(root).iterdir() if _ENTRY_NAME.match(p.name)]
    except OSError:  # no cache yet, or unreadable
        return []
    entries = []
    for path in candidates:
        try:
            manifest_time = (path / MANIFEST).stat().st_mtime
            sizes = [f.stat().st_size for f in os.scandir(path) if f.is_file(follow_symlinks=False)]
            try:
                used = (path / USED).stat().st_mtime
            except FileNotFoundError:  # an entry written before use was tracked
                used = manifest_time
            try:
                manifest = json.loads((path / MANIFEST).read_text())
            except ValueError:
                manifest = {}
        except OSError:  # gone meanwhile, incomplete (no manifest) or unreadable
            continue
        key = manifest.get("key") if isinstance(manifest, dict) else None
        files = manifest.get("files") if isinstance(manifest, dict) else None
        if not (isinstance(key, dict) and "format" in key and isinstance(files, dict)):
            continue  # not a calibration entry (a folder of someone else's, or damaged): never ours to remove
        entries.append(EntryInfo(path.name, path, sum(sizes), manifest_time, used, key, tuple(files)))
    return sorted(entries, key=lambda e: (e.last_used, e.name))


def evict(root: str | Path, max_bytes: float, keep: Iterable[str] = ()) -> list[EntryInfo]:
    """Remove least recently used entries of ``root`` until they total at most ``max_bytes``; never those named in
    ``keep`` nor one another run is reading. Returns the entries removed."""
    entries = list_entries(root)
    total = sum(e.bytes for e in entries)
    keep = set(keep)
    removed = []
    for entry in entries:
        if total <= max_bytes:
            break
        if entry.name not in keep and remove_entry(entry.path):
            total -= entry.bytes
            removed.append(entry)
    return removed


def remove_entry(path: Path) -> bool:
    """Remove the entry at ``path`` unless a run holds it: take its lock exclusively without waiting, rename it to
    scratch (a run that dies here leaves scratch, which the next one removes), delete it. ``True`` when it is gone
    (also when another run removed it first)."""
    try:
        fd = os.open(path / USED, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o666)
    except FileNotFoundError:
        return True
    except OSError:  # cannot even make the lock file: nor remove the entry
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if os.stat(path / USED).st_ino != os.fstat(fd).st_ino:  # a new entry of the same key took its place
            return False
        trash = path.parent / scratch_name(f".{path.name}", ".tmp-")
        path.rename(trash)
    except BlockingIOError:  # a run is reading it
        return False
    except FileNotFoundError:
        return True
    except OSError:
        return False
    finally:
        os.close(fd)
    shutil.rmtree(trash, ignore_errors=True)
    return True


@dataclass(frozen=True)
class Cleared:
    """What :func:`clear` did."""

    removed: list[EntryInfo]
    in_use: list[EntryInfo]  # matched, but held by a running run: kept
    left: int  # entries left in the cache
    model: str | None  # the identity of the model whose entries were removed, None for all


def clear(root: str | Path, model: str | Path | None = None) -> Cleared:
    """Remove every entry under ``root``, or with ``model`` those of one model: a checkpoint directory (matched by
    its content identity, as the cache key holds it) or a hex prefix of an identity (as ``rankwise cache list``
    shows it). Entries another run is reading are kept; scratch of dead runs is removed too.

    Raises:
        ValueError: a ``model`` that is neither, a prefix of several models, or one no entry holds.
    """
    remove_dead_scratches(Path(root))
    entries = list_entries(root)
    wanted = entries
    models: list[str] = []
    if model is not None:
        identity = model_digest(model)
        wanted = [e for e in entries if e.model.startswith(identity)]
        models = sorted({e.model for e in wanted})
        if len(models) > 1:
            raise ValueError(f"--model {model} matches {len(models)} models ({', '.join(m[:12] for m in models)}); "
                             "give more of the identity")
        if not wanted:
            named = f"{model} (identity {identity[:12]})" if identity != str(model).strip().lower() else identity
            n, held = len(entries), len({e.model for e in entries})
            raise ValueError(f"no calibration cache entry holds model {named}; the cache at {root} has {n} "
                             f"entr{'y' if n == 1 else 'ies'}, of {held} model{'' if held == 1 else 's'} (see "
                             "rankwise cache list)")
    removed, in_use = [], []
    for entry in wanted:
        (removed if remove_entry(entry.path) else in_use).append(entry)
    return Cleared(removed, in_use, len(entries) - len(removed), models[0] if models else None)


def model_digest(model: str | Path) -> str:
    """The identity ``model`` names: a checkpoint directory's content identity (what
    :meth:`StatsCache.model_key` stores for a checkpoint), or a hex prefix of one, lowercased.

    Raises:
        ValueError: neither a directory nor a hex string.
    """
    path = Path(model).expanduser()
    if path.is_dir():
        return content_identity(path, verify=False)[0]
    text = str(model).strip().lower()
    if re.fullmatch(r"[0-9a-f]{1,64}", text):
        return text
    raise ValueError(f"--model {model}: neither a model directory nor a hex prefix of a model identity (as rankwise "
                     "cache list shows it)")


def remove_dead_scratches(root: Path) -> None:
    """Remove scratch directories under ``root`` left by runs that died (any key)."""
    try:
        stems = {p.name.split(".tmp-")[0] for p in root.iterdir() if ".tmp-" in p.name}
    except OSError:
        return
    for stem in stems:
        remove_dead_scratch(root, stem)


def format_bytes(n: float) -> str:
    if math.isinf(n):
        return "no cap"
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:,.1f} {unit}"
    return f"{n:.0f} B"


