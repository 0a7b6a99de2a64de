"""Calibration statistics cached on disk, so a second compression of the same model on the same text (another ratio,
another method that reads the same statistics) skips the forward and backward passes.

An entry is a directory ``<root>/<key>`` named by a SHA-256 over everything the statistics depend on: the model's
weights (a content hash), the calibration token ids, the batch size, the statistic kinds, the observed layers, the
dtype and device, and this file's format version. Inside: one safetensors file per part (a decoder block's
statistics, the gradient pass's scores ...) and ``manifest.json`` listing every file with its size and SHA-256.

* An entry is built in a scratch directory and renamed into place whole, after its manifest is written: a killed
  run leaves no entry, only scratch that the next run removes.
* Every file is checked against the manifest before an entry is used: a truncated, edited or partial entry is
  reported, removed and recomputed, never read.
* A cache root that cannot be written (read-only, full disk) disables caching for the run, with a note; the
  compression itself goes on.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_bytes
from safetensors.torch import save as save_bytes

from rankwise.calibrate.stats import LayerStats

FORMAT = 1
MANIFEST = "manifest.json"
_CHUNK = 1 << 24
_EMPTY = "__empty__"


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def tensor_digest(tensors: Iterable[tuple[str, torch.Tensor]]) -> str:
    """SHA-256 over names, dtypes, shapes and bytes of ``(name, tensor)`` pairs (in the order given)."""
    digest = hashlib.sha256()
    for name, t in tensors:
        t = t.detach().cpu().contiguous()
        digest.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def checkpoint_digest(path: str | Path, memo_dir: Path | None = None) -> str:
    """SHA-256 over a checkpoint directory's ``config.json`` and safetensors files (their full contents).

    Hashing gigabytes takes seconds, so the result is remembered in ``memo_dir`` keyed by each file's path, size,
    modification time and inode: an unchanged checkpoint is hashed once; a rewritten one is hashed again.
    """
    path = Path(path).absolute()
    files = sorted(path.glob("*.safetensors")) + sorted(path.glob("config.json"))
    if not files:
        raise ValueError(f"{path} holds no safetensors weights to identify the model by")
    stamp = hashlib.sha256(json.dumps([(str(f), f.stat().st_size, f.stat().st_mtime_ns, f.stat().st_ino)
                                       for f in files]).encode()).hexdigest()
    memo = memo_dir / f"weights-{stamp}.sha256" if memo_dir is not None else None
    if memo is not None and memo.is_file():
        known = memo.read_text().strip()
        if len(known) == 64:
            return known
    digest = hashlib.sha256()
    for file in files:
        digest.update(f"{file.name}\0{_sha256_file(file)}\0".encode())
    value = digest.hexdigest()
    if memo is not None:
        with contextlib.suppress(OSError):
            memo_dir.mkdir(parents=True, exist_ok=True)
            tmp = memo.with_name(f"{memo.name}.{os.getpid()}")
            tmp.write_text(value + "\n")
            tmp.replace(memo)
    return value


def pack(stats: Mapping[str, LayerStats]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata holding ``stats`` (layers sharing one :class:`LayerStats` stay shared)."""
    groups: dict[int, list[str]] = {}
    for name, s in stats.items():
        groups.setdefault(id(s), []).append(name)
    tensors: dict[str, torch.Tensor] = {}
    meta = []
    for k, members in enumerate(groups.values()):
        s = stats[members[0]]
        for attr in ("xxt", "abs_sum", "cross"):
            value = getattr(s, attr)
            if value is not None:
                tensors[f"{k}.{attr}"] = value.detach().cpu().contiguous()
        for attr in ("fisher_out", "fisher_in"):
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
        for attr in ("fisher_out", "fisher_in"):
            prefix = f"{k}.{attr}."
            getattr(s, attr).update({key[len(prefix):]: t for key, t in tensors.items() if key.startswith(prefix)})
        for name in group["members"]:
            out[name] = s
    return out


class CacheEntry:
    """One cached calibration: read its parts when :attr:`hit`, otherwise write them and :meth:`commit`.

    Writing never raises for an unwritable cache: the first ``OSError`` turns caching off for this entry and is
    kept in :attr:`note` (say it to the user).
    """

    def __init__(self, root: Path, key: Mapping[str, Any]) -> None:
        self.root = root
        self.key = {"format": FORMAT, **key}
        self.name = hashlib.sha256(json.dumps(self.key, sort_keys=True, default=str).encode()).hexdigest()[:32]
        self.path = root / self.name
        self.note: str | None = None
        self.files: dict[str, dict[str, Any]] | None = None
        self._scratch: Path | None = None
        self._written: dict[str, dict[str, Any]] = {}
        self._abandoned = False
        self.hit = self._check()

    # reading
    def _check(self) -> bool:
        if not self.path.is_dir():
            return False
        problem = self._verify()
        if problem is None:
            return True
        self.note = f"calibration cache entry {self.path} is damaged ({problem}); removed, recomputing"
        shutil.rmtree(self.path, ignore_errors=True)
        return False

    def _verify(self) -> str | None:
        try:
            manifest = json.loads((self.path / MANIFEST).read_text())
        except (OSError, ValueError) as err:
            return f"no readable {MANIFEST}: {err}"
        if not isinstance(manifest, dict) or manifest.get("key") != json.loads(json.dumps(self.key, default=str)):
            return f"{MANIFEST} describes another calibration"
        files = manifest.get("files")
        if not isinstance(files, dict):
            return f"{MANIFEST} lists no files"
        for file, info in files.items():
            path = self.path / file
            if Path(file).name != file or not path.is_file():
                return f"{file} is missing"
            if path.stat().st_size != info.get("bytes"):
                return f"{file} has {path.stat().st_size} bytes, the manifest says {info.get('bytes')}"
            if _sha256_file(path) != info.get("sha256"):
                return f"{file} does not match its checksum"
        self.files = files
        return None

    def has(self, part: str) -> bool:
        return self.hit and self.files is not None and f"{part}.safetensors" in self.files

    def read(self, part: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """A part's tensors and metadata, checked against the manifest again as they are read."""
        file = f"{part}.safetensors"
        if not self.has(part):
            raise KeyError(f"calibration cache entry {self.path} has no part {part!r}")
        data = (self.path / file).read_bytes()
        if hashlib.sha256(data).hexdigest() != self.files[file]["sha256"]:
            raise ValueError(f"calibration cache file {self.path / file} changed while this run read it; "
                             "run again (or pass --no-cache)")
        tensors = load_bytes(data)
        tensors.pop(_EMPTY, None)
        meta = json.loads(data[8:8 + int.from_bytes(data[:8], "little")]).get("__metadata__", {})
        return tensors, meta

    def read_stats(self, part: str) -> dict[str, LayerStats]:
        return unpack(*self.read(part))

    # writing
    def write(self, part: str, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> None:
        if self.hit or self._abandoned:
            return
        try:
            if self._scratch is None:
                from rankwise.io.atomic import make_scratch_dir, remove_dead_scratch

                self.root.mkdir(parents=True, exist_ok=True)
                remove_dead_scratch(self.root, f".{self.name}")
                self._scratch = make_scratch_dir(self.root, f".{self.name}", ".tmp-")
            # safetensors cannot read back a file without tensors: an empty part holds one empty placeholder
            payload = {k: v.contiguous() for k, v in tensors.items()} or {_EMPTY: torch.zeros(0)}
            data = save_bytes(payload, metadata=dict(metadata or {}))
            file = f"{part}.safetensors"
            (self._scratch / file).write_bytes(data)
            self._written[file] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        except OSError as err:
            self._give_up(err)

    def write_stats(self, part: str, stats: Mapping[str, LayerStats]) -> None:
        self.write(part, *pack(stats))

    def commit(self) -> None:
        """Put the finished entry in place (a no-op after a hit or a write failure)."""
        if self._scratch is None:
            return
        try:
            manifest = {"key": self.key, "files": self._written}
            (self._scratch / MANIFEST).write_text(json.dumps(manifest, indent=1, default=str))
            if self.path.exists():  # another run finished the same entry first: keep theirs
                shutil.rmtree(self._scratch, ignore_errors=True)
            else:
                self._scratch.rename(self.path)
        except OSError as err:
            self._give_up(err)
        self._scratch = None

    def discard(self) -> None:
        """Drop what was written (the run failed)."""
        if self._scratch is not None:
            shutil.rmtree(self._scratch, ignore_errors=True)
            self._scratch = None

    def _give_up(self, err: OSError) -> None:
        self.discard()
        self._abandoned = True
        self.note = (f"calibration statistics not cached: cannot write under {self.root} "
                     f"({err.strerror or err}); compression goes on without the cache")


class StatsCache:
    """A directory of :class:`CacheEntry`, one per distinct calibration (``root`` need not exist yet)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def entry(self, **key: Any) -> CacheEntry:
        return CacheEntry(self.root, key)

    def model_key(self, source: Any) -> str:
        """The identity of a block source's weights: a content hash of its checkpoint files, or of the tensors of a
        model in memory."""
        path = getattr(source, "path", None)
        if path is not None:
            return checkpoint_digest(path, self.root / "weights")
        state = source.model.state_dict()
        return tensor_digest(sorted(state.items()))


def collect_stats_cached(cache: StatsCache | None, model: torch.nn.Module, data: torch.Tensor,
                         modules: Mapping[str, torch.nn.Module], *, kinds: Iterable[str], batch_size: int = 4,
                         progress: bool = False) -> tuple[dict[str, LayerStats], list[str]]:
    """:func:`~rankwise.calibrate.collect_stats` over a whole in-memory model, through ``cache`` when given.

    Returns the statistics and notes for the user (read from the cache, a damaged entry, an unwritable cache).
    """
    from rankwise.calibrate.stats import check_kinds, collect_stats, iter_batches

    kinds = sorted(check_kinds(kinds))
    if cache is None:
        return collect_stats(model, data, modules, kinds=kinds, batch_size=batch_size, progress=progress), []
    parameter = next(model.parameters())
    entry = cache.entry(model=tensor_digest(sorted(model.state_dict().items())),
                        tokens=tensor_digest((str(b), t) for b, t in enumerate(iter_batches(data, batch_size))),
                        dtype=str(parameter.dtype), device=parameter.device.type, targets=sorted(modules),
                        whole_model_kinds=kinds)
    notes = [entry.note] if entry.note else []
    if entry.hit:
        return entry.read_stats("stats"), [*notes, f"calibration statistics read from the cache ({entry.path})"]
    stats = collect_stats(model, data, modules, kinds=kinds, batch_size=batch_size, progress=progress)
    entry.write_stats("stats", stats)
    entry.commit()
    return stats, [*notes, *([entry.note] if entry.note and entry.note not in notes else [])]
