"""Weights written as Hugging Face writes them: safetensors shards of at most ``max_shard_size`` bytes, an index when
there is more than one, each tensor once, in one dtype.

The layout depends only on the set of tensors (names sorted naturally, shards filled greedily in that order), never
on the order they were handed over, so a model compressed in memory and saved, and the same model streamed block by
block from disk, give byte-identical files. A streamed writer parks each block's tensors in a part file as they come
(bounded memory) and assembles the shards at the end, one shard in memory at a time.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from rankwise.io.checkpoint import INDEX

DEFAULT_MAX_SHARD_SIZE = "1GB"
_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20,
          "GIB": 2**30, "TIB": 2**40}


def parse_size(size: int | str) -> int:
    """Bytes of ``"1GB"``, ``"500MiB"`` or an integer (the ``max_shard_size`` convention of transformers)."""
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    else:
        match = _SIZE.fullmatch(str(size))
        if match is None:
            raise ValueError(f"max_shard_size must be bytes or a size like '1GB' or '500MiB', got {size!r}")
        value = int(float(match.group(1)) * _UNITS[(match.group(2) or "").upper()])
    if value < 1:
        raise ValueError(f"max_shard_size must be positive, got {size!r}")
    return value


def weights_bytes(path: str | Path) -> int:
    """Bytes of safetensors weights in a directory (0 if it has none)."""
    return sum(f.stat().st_size for f in Path(path).glob("*.safetensors")) if Path(path).is_dir() else 0


def _natural(name: str) -> list[tuple[int, int | str]]:
    return [(0, int(p)) if p.isdigit() else (1, p) for p in re.split(r"(\d+)", name)]


def _chmod_like_umask(path: Path) -> None:
    umask = os.umask(0)
    os.umask(umask)
    path.chmod(0o666 & ~umask)  # safetensors writes 0600; outputs follow the umask like every other file


class ShardWriter:
    """Collects tensors, then writes ``model.safetensors`` or ``model-0000i-of-0000N.safetensors`` + index.

    Args:
        out: the output directory (an atomic write's temporary directory).
        dtype: floating-point tensors are stored in this dtype (others as they are); ``None`` keeps each one's.
        max_shard_size: the largest shard in bytes (or ``"1GB"``-style); a larger single tensor gets its own shard.
        stream: park added tensors in part files under ``out`` (bounded memory) instead of holding them.
    """

    def __init__(self, out: Path, *, dtype: torch.dtype | None = None,
                 max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE, stream: bool = False) -> None:
        self.out, self.dtype, self.stream = Path(out), dtype, stream
        self.max_shard_size = parse_size(max_shard_size)
        self.held: dict[str, torch.Tensor] = {}
        self.parked: dict[str, Path] = {}
        self.sizes: dict[str, int] = {}

    def _cast(self, t: torch.Tensor) -> torch.Tensor:
        t = t.detach().to("cpu")
        if self.dtype is not None and t.is_floating_point():
            t = t.to(self.dtype)
        return t.contiguous()

    def add(self, tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Take tensors (a name given twice is an error: tied tensors are passed once)."""
        batch = {}
        for name, t in tensors:
            if name in self.sizes or name in batch:
                raise ValueError(f"tensor {name!r} was written twice")
            batch[name] = self._cast(t)
        if not batch:
            return
        self.sizes.update({n: t.numel() * t.element_size() for n, t in batch.items()})
        if self.stream:
            part = self.out / f".part-{len(set(self.parked.values())):05d}.safetensors"
            save_file(batch, str(part))
            self.parked.update(dict.fromkeys(batch, part))
        else:
            self.held.update(batch)

    def _get(self, name: str, handles: dict[Path, object]) -> torch.Tensor:
        if name in self.held:
            return self.held[name]
        part = self.parked[name]
        if part not in handles:
            handles[part] = safe_open(str(part), framework="pt")
        return handles[part].get_tensor(name)

    def finish(self) -> dict[str, str]:
        """Write the shards (and the index if several); returns tensor name -> file."""
        groups: list[list[str]] = [[]]
        size = 0
        for name in sorted(self.sizes, key=_natural):
            if groups[-1] and size + self.sizes[name] > self.max_shard_size:
                groups.append([])
                size = 0
            groups[-1].append(name)
            size += self.sizes[name]
        total = len(groups)
        files = ["model.safetensors"] if total == 1 else [f"model-{i + 1:05d}-of-{total:05d}.safetensors"
                                                           for i in range(total)]
        handles: dict[Path, object] = {}
        weight_map: dict[str, str] = {}
        for file, names in zip(files, groups, strict=True):
            save_file({n: self._get(n, handles) for n in names}, str(self.out / file), metadata={"format": "pt"})
            _chmod_like_umask(self.out / file)
            weight_map.update(dict.fromkeys(names, file))
        handles.clear()
        for part in set(self.parked.values()):
            part.unlink()
        self.held.clear()
        if total > 1:
            index = {"metadata": {"total_size": sum(self.sizes.values())}, "weight_map": dict(sorted(
                weight_map.items()))}
            (self.out / INDEX).write_text(json.dumps(index, indent=2))
        return weight_map
