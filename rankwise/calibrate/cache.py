"""Calibration statistics cached on disk, so a second compression of the same model on the same text (another ratio,
another method that reads the same statistics) skips the forward and backward passes.

An entry is a directory ``<root>/<key>`` named by a SHA-256 over everything the statistics depend on: the model's
weights (a content hash of the files' full bytes, computed on every run, never remembered by file name, size or
time), the calibration token ids, the batch size, the statistic kinds, the observed layers, the
dtype and device, and this file's format version. Inside: one safetensors file per part (a decoder block's
statistics, the gradient pass's scores ...) and ``manifest.json`` listing every file with its size and SHA-256.

* An entry is built in a scratch directory and renamed into place whole, after its manifest is written: a killed
  run leaves no entry, only scratch that the next run removes.
* Every file is checked against the manifest before an entry is used: a truncated, edited or partial entry is
  reported, removed and recomputed, never read.
* A cache root that cannot be written (read-only, full disk) disables caching for the run, with a note; the
  compression itself goes on.

The cache is capped (:data:`DEFAULT_MAX_GB`, or ``$RANKWISE_CACHE_MAX_GB`` in gigabytes, read when a
:class:`StatsCache` is made). After an entry is committed, the least recently used entries are evicted until the
total fits. "Used" is committed or read: each entry holds an empty file ``last-used`` whose modification time is
set at both. A run holds a shared ``flock`` on that file while it reads the entry, and eviction takes it exclusively
without waiting, so an entry another run is reading stays; eviction renames an entry away whole (to scratch) before
removing it, never touches scratch, and never the entries this run used. An entry larger than the whole cap is
kept, with a note saying which variable to raise. :func:`list_entries` and :func:`clear` back ``rankwise cache``.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shutil
import weakref
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from rankwise._errors import first_line
from rankwise.calibrate.cache_store import (
    MANIFEST,
    MAX_GB_ENV,
    USED,
    cache_cap,
    evict,
    format_bytes,
    list_entries,
    remove_dead_scratches,
    remove_entry,
)
from rankwise.calibrate.stats import LayerStats, check_kinds, collect_stats, input_groups, iter_batches
from rankwise.io.atomic import make_scratch_dir
from rankwise.io.integrity import sha256_file

FORMAT = 2
_EMPTY = "__empty__"


def tensor_digest(tensors: Iterable[tuple[str, torch.Tensor]]) -> str:
    """SHA-256 over names, dtypes, shapes and bytes of ``(name, tensor)`` pairs (in the order given)."""
    digest = hashlib.sha256()
    for name, t in tensors:
        t = t.detach().cpu().contiguous()
        digest.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        if t.numel():
            digest.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    return digest.hexdigest()


def pack(stats: Mapping[str, LayerStats]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata holding ``stats`` (layers sharing one :class:`LayerStats` stay shared)."""
    tensors: dict[str, torch.Tensor] = {}
    meta = []
    for k, group in enumerate(input_groups(stats, stats)):
        s, members = group.stats, list(group.names)
        for attr in ("xxt", "abs_sum", "cross"):
            value = getattr(s, attr)
            if value is not None:
                tensors[f"{k}.{attr}"] = value.detach().cpu().contiguous()
        for attr in ("fisher_out", "fisher_in", "grad_sum", "grad_channels"):
            for name, value in getattr(s, attr).items():
                tensors[f"{k}.{attr}.{name}"] = value.detach().cpu().contiguous()
        meta.append({"members": members, "n": s.n, "count": s.count, "grad_out": s.grad_out,
                     "grad_tokens": s.grad_tokens})
    return tensors, {"groups": json.dumps(meta)}


def unpack(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> dict[str, LayerStats]:
    """The inverse of :func:`pack`."""
    out: dict[str, LayerStats] = {}
    for k, group in enumerate(json.loads(metadata["groups"])):
        s = LayerStats(n=int(group["n"]), count=int(group["count"]), grad_out=dict(group["grad_out"]),
                       grad_tokens={n: int(v) for n, v in group["grad_tokens"].items()})
        for attr in ("xxt", "abs_sum", "cross"):
            setattr(s, attr, tensors.get(f"{k}.{attr}"))
        for attr in ("fisher_out", "fisher_in", "grad_sum", "grad_channels"):
            prefix = f"{k}.{attr}."
            getattr(s, attr).update({key[len(prefix):]: t for key, t in tensors.items() if key.startswith(prefix)})
        for name in group["members"]:
            out[name] = s
    return out


class CacheEntry:
    """One cached calibration (made by :meth:`StatsCache.open`): read its parts when :attr:`hit`, otherwise write
    them and :meth:`commit`.

    Writing never raises for an unwritable cache: the first failure turns caching off for this entry and is kept in
    :attr:`note` (say it to the user).
    """

    def __init__(self, root: Path, key: Mapping[str, Any], *,
                 after_commit: Callable[[CacheEntry], str | None] | None = None) -> None:
        self.root = root
        self.key = json.loads(json.dumps({"format": FORMAT, **key}, sort_keys=True, default=str))
        self.name = hashlib.sha256(json.dumps(self.key, sort_keys=True).encode()).hexdigest()[:32]
        self.path = root / self.name
        self.note: str | None = None
        self.hit = False
        self._scratch: Path | None = None
        self._written: dict[str, dict[str, Any]] = {}
        self._abandoned = False
        self._after_commit = after_commit  # called once the entry is in place; may return a note (the cache's cap)
        self._release: Callable[[], None] | None = None

    # reading
    def check(self, parts: Iterable[str]) -> None:
        """Set :attr:`hit` if a complete, intact entry holding ``parts`` is on disk; a damaged one is removed.

        A hit marks the entry used now and holds it (no other run evicts it) until :meth:`release`."""
        try:
            if not self.path.is_dir() or not self._hold():
                return
            problem = self._verify([f"{part}.safetensors" for part in parts])
        except FileNotFoundError:  # evicted by another run meanwhile
            self.release()
            return
        except OSError as err:  # unreadable now (too many open files, an I/O error): a miss, not damage
            self.release()
            self.note = f"calibration cache entry {self.path} cannot be read ({err.strerror or err}); recomputing"
            return
        if problem is None:
            self.hit = True
            _touch(self.path)
            return
        self.release()
        remove_entry(self.path)  # locked and renamed first: never under another run that is reading it
        what = "removed" if not self.path.exists() else "could not be removed"
        self.note = f"calibration cache entry {self.path} is damaged ({problem}); {what}, recomputing"

    def _hold(self) -> bool:
        """Take a shared lock on the entry's :data:`USED` file (``False``: another run is evicting it). An entry
        whose lock file cannot be made (a read-only cache) is read unlocked: nothing can evict it either."""
        try:
            fd = os.open(self.path / USED, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o666)
        except OSError as err:
            if isinstance(err, FileNotFoundError):  # evicted meanwhile
                raise
            return True
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            held = os.stat(self.path / USED).st_ino == os.fstat(fd).st_ino  # not renamed away before the lock
        except (BlockingIOError, FileNotFoundError):
            held = False
        if not held:
            os.close(fd)
            return False
        self._release = weakref.finalize(self, os.close, fd)
        return True

    def release(self) -> None:
        """Let other runs evict this entry again (done by :meth:`commit` and :meth:`discard`, which end a run)."""
        if self._release is not None:
            self._release()
            self._release = None

    def _verify(self, expected: list[str]) -> str | None:
        try:
            manifest = json.loads((self.path / MANIFEST).read_text())
        except ValueError as err:
            return f"no readable {MANIFEST}: {err}"
        except FileNotFoundError:
            return f"no {MANIFEST}"
        if not isinstance(manifest, dict) or manifest.get("key") != self.key:
            return f"{MANIFEST} describes another calibration"
        files = manifest.get("files")
        if not isinstance(files, dict) or not all(isinstance(v, dict) for v in files.values()):
            return f"{MANIFEST} lists no files"
        missing = [f for f in expected if f not in files]
        if missing:
            return f"{missing[0]} is not in {MANIFEST}"
        for file, info in files.items():
            path = self.path / file
            if Path(file).name != file or not path.is_file():
                return f"{file} is missing"
            if path.stat().st_size != info.get("bytes"):
                return f"{file} has {path.stat().st_size} bytes, the manifest says {info.get('bytes')}"
            if sha256_file(path) != info.get("sha256"):
                return f"{file} does not match its checksum"
        return None

    def read(self, part: str, device: torch.device | str = "cpu") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """A part's tensors (on ``device``) and metadata; the files were checked when the entry was opened."""
        path = self.path / f"{part}.safetensors"
        tensors = {}
        with safe_open(path, framework="pt", device=str(device)) as fh:
            meta = fh.metadata() or {}
            for key in fh.keys():  # noqa: SIM118 (safe_open is not a mapping)
                if key != _EMPTY:
                    tensors[key] = fh.get_tensor(key)
        return tensors, meta

    def read_stats(self, part: str, device: torch.device | str = "cpu") -> dict[str, LayerStats]:
        return unpack(*self.read(part, device))

    # writing
    def write(self, part: str, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> None:
        if self.hit or self._abandoned:
            return
        try:
            if self._scratch is None:
                self.root.mkdir(parents=True, exist_ok=True)
                self._scratch = make_scratch_dir(self.root, f".{self.name}", ".tmp-")
            # safetensors cannot read back a file without tensors: an empty part holds one empty placeholder
            payload = {k: v.detach().cpu().contiguous() for k, v in tensors.items()} or {_EMPTY: torch.zeros(0)}
            file = self._scratch / f"{part}.safetensors"
            save_file(payload, file, metadata=dict(metadata or {}))
            self._written[file.name] = {"bytes": file.stat().st_size, "sha256": sha256_file(file)}
        except Exception as err:  # an unwritable or full cache must never stop the compression
            self._give_up(err)

    def write_stats(self, part: str, stats: Mapping[str, LayerStats]) -> None:
        self.write(part, *pack(stats))

    def commit(self) -> None:
        """Put the finished entry in place, then let the cache make room (a no-op after a hit or a write failure,
        apart from releasing a hit)."""
        self.release()
        if self._scratch is None:
            return
        try:
            manifest = {"key": self.key, "files": self._written}
            (self._scratch / USED).touch()
            (self._scratch / MANIFEST).write_text(json.dumps(manifest, indent=1))
            self._scratch.rename(self.path)
        except OSError as err:
            if err.errno in (errno.ENOTEMPTY, errno.EEXIST):  # another run finished the same entry first
                self.discard()
            else:
                self._give_up(err)
            return
        self._scratch = None
        note = self._after_commit(self) if self._after_commit is not None else None
        self.note = note or self.note

    def discard(self) -> None:
        """Drop what was written (the run failed)."""
        self.release()
        if self._scratch is not None:
            shutil.rmtree(self._scratch, ignore_errors=True)
            self._scratch = None

    def _give_up(self, err: Exception) -> None:
        self.discard()
        self._abandoned = True
        reason = err.strerror if isinstance(err, OSError) and err.strerror else first_line(err)
        self.note = (f"calibration statistics not cached: cannot write under {self.root} ({reason}); "
                     "compression goes on without the cache")


class StatsCache:
    """A directory of :class:`CacheEntry`, one per distinct calibration (``root`` need not exist yet), holding at
    most ``max_bytes`` (``None``: ``$RANKWISE_CACHE_MAX_GB`` gigabytes, default :data:`DEFAULT_MAX_GB`).

    Raises:
        ValueError: a cap that is not a positive number.
    """

    def __init__(self, root: str | Path, max_bytes: float | None = None) -> None:
        self.root = Path(root)
        self.max_bytes, self.cap_source = cache_cap(max_bytes)
        self._used: set[str] = set()  # entries this cache read or wrote: never evicted by it

    def open(self, parts: Iterable[str], **key: Any) -> CacheEntry:
        """The entry for ``key``: a hit if it is on disk whole with every one of ``parts``. Scratch left by dead
        runs (any key) is removed first."""
        remove_dead_scratches(self.root)
        entry = CacheEntry(self.root, {**key, "versions": _versions()}, after_commit=self._make_room)
        entry.check(parts)
        if entry.hit:
            self._used.add(entry.name)
        return entry

    def _make_room(self, entry: CacheEntry) -> str | None:
        """Evict least recently used entries until the cache fits its cap; a note when it still does not."""
        self._used.add(entry.name)
        evict(self.root, self.max_bytes, keep=self._used)
        entries = list_entries(self.root)
        total = sum(e.bytes for e in entries)
        if total <= self.max_bytes:
            return None
        size = next((e.bytes for e in entries if e.name == entry.name), 0)
        if size > self.max_bytes:
            return (f"calibration cache: its cap of {format_bytes(self.max_bytes)} ({self.cap_source}) is smaller "
                    f"than this one entry of {format_bytes(size)}, which is kept (older entries are evicted); raise "
                    f"{MAX_GB_ENV} to more than {size / 1e9:.3g} to keep more than one")
        return (f"calibration cache holds {format_bytes(total)}, over its cap of {format_bytes(self.max_bytes)} "
                f"({self.cap_source}): the other entries left are in use by this run or another one")

    def model_key(self, source: Any) -> dict[str, str]:
        """The identity of a block source's model: a content hash of its checkpoint files (``config.json`` and the
        weights, read in full every time: an edit that keeps a file's size and times still changes the key), or of
        the tensors and config of a model in memory."""
        identity = getattr(source, "content_identity", None)
        if identity is not None:
            return {"weights": identity()}
        return model_identity(source.model)


def model_identity(model: torch.nn.Module) -> dict[str, str]:
    """A content hash of an in-memory model's tensors, and its config (which changes activations too: rope, norms,
    the attention implementation)."""
    config = getattr(model, "config", None)
    described = ""
    if config is not None:
        described = config.to_json_string(use_diff=False) + str(getattr(config, "_attn_implementation", ""))
    return {"weights": tensor_digest(sorted(model.state_dict().items())),
            "config": hashlib.sha256(described.encode()).hexdigest()}


def _touch(path: Path) -> None:
    """Mark the entry at ``path`` used now (best effort: a read-only cache keeps its old times)."""
    with contextlib.suppress(OSError):
        os.utime(path / USED)


def _versions() -> str:
    import transformers

    return f"torch {torch.__version__}, transformers {transformers.__version__}"


def collect_stats_cached(cache: StatsCache | None, model: torch.nn.Module, data: torch.Tensor,
                         modules: Mapping[str, torch.nn.Module], *, kinds: Iterable[str], batch_size: int = 4,
                         progress: bool = False) -> tuple[dict[str, LayerStats], CacheEntry | None]:
    """:func:`~rankwise.calibrate.collect_stats` over a whole in-memory model, through ``cache`` when given.

    Returns the statistics and the cache entry (``None`` without a cache; its :attr:`~CacheEntry.hit` and
    :attr:`~CacheEntry.note` say what happened).
    """
    kinds = sorted(check_kinds(kinds))
    if cache is None or "gwin" in kinds:  # per-window gradients: as large as the model per window, never stored
        return collect_stats(model, data, modules, kinds=kinds, batch_size=batch_size, progress=progress), None
    parameter = next(model.parameters())
    entry = cache.open(["stats"], **model_identity(model), dtype=str(parameter.dtype), device=parameter.device.type,
                       tokens=tensor_digest((str(b), t) for b, t in enumerate(iter_batches(data, batch_size))),
                       targets=sorted(modules), whole_model_kinds=kinds)
    if entry.hit:
        stats = entry.read_stats("stats", parameter.device)
        entry.release()
        return stats, entry
    stats = collect_stats(model, data, modules, kinds=kinds, batch_size=batch_size, progress=progress)
    entry.write_stats("stats", stats)
    entry.commit()
    return stats, entry
