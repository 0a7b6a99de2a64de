"""Block-boundary activations: in memory while small, spilled to files on disk above a memory budget (and what is
put with ``spill=True``, read back once much later, always on disk)."""

from __future__ import annotations

import errno
import shutil
import tempfile
from collections.abc import Hashable
from pathlib import Path

import numpy as np
import torch

from rankwise.io.atomic import make_scratch_dir, remove_dead_scratch

SPILL_STEM = "rankwise"  # spill directories are rankwise-activations-<pid>-<host>-<random>


class ActivationStore:
    """A keyed store of tensors that keeps at most ``budget_bytes`` in memory and writes the rest to disk (and, put
    with ``spill=True``, what is read back once much later, such as the scoring pass's per-block statistics).

    Spilled tensors are raw files in a private temporary directory inside ``offload_dir`` (created lazily, removed
    by :meth:`close`); they are read back through a memory map. Spill directories left there by killed runs (their
    pid gone) are removed when a new one is made. A full disk or an unwritable directory raises a
    one-line ``ValueError``.
    """

    def __init__(self, budget_bytes: int, offload_dir: str | Path | None = None) -> None:
        self.budget_bytes = budget_bytes
        self.offload_dir = Path(offload_dir) if offload_dir is not None else None
        self._memory: dict[Hashable, torch.Tensor] = {}
        self._disk: dict[Hashable, tuple[Path, torch.dtype, torch.Size]] = {}
        self._dir: Path | None = None
        self._count = 0
        self.bytes_in_memory = 0
        self.bytes_spilled = 0

    def __enter__(self) -> ActivationStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __contains__(self, key: Hashable) -> bool:
        return key in self._memory or key in self._disk

    def put(self, key: Hashable, tensor: torch.Tensor, *, spill: bool = False) -> None:
        """Store ``tensor`` under ``key``: in memory while the budget allows, else on disk; with ``spill``, on disk
        whatever the budget (for what is read back once, much later, so that it never holds memory meanwhile)."""
        self.drop(key)
        tensor = tensor.detach()
        size = tensor.numel() * tensor.element_size()
        if not spill and self.bytes_in_memory + size <= self.budget_bytes:
            self._memory[key] = tensor.to("cpu") if tensor.device.type != "cpu" else tensor
            self.bytes_in_memory += size
            return
        path = self._spill_dir() / f"{self._count}.bin"
        self._count += 1
        try:
            write_raw(path, tensor)
        except OSError as err:
            path.unlink(missing_ok=True)
            reason = "the disk is full" if err.errno == errno.ENOSPC else err.strerror
            raise ValueError(f"cannot spill activations to {self._dir}: {reason} (set --offload-dir to a "
                             "directory with free space" + ("" if spill else ", or raise the activation memory budget")
                             + ")") from None
        self._disk[key] = (path, tensor.dtype, tensor.shape)
        self.bytes_spilled += size

    def get(self, key: Hashable) -> torch.Tensor:
        if key in self._memory:
            return self._memory[key]
        path, dtype, shape = self._disk[key]
        mapped = np.memmap(path, dtype=np.uint8, mode="r")
        return torch.from_numpy(np.array(mapped)).view(dtype).reshape(shape)

    def drop(self, key: Hashable) -> None:
        if key in self._memory:
            t = self._memory.pop(key)
            self.bytes_in_memory -= t.numel() * t.element_size()
        elif key in self._disk:
            self._disk.pop(key)[0].unlink(missing_ok=True)

    def close(self) -> None:
        self._memory.clear()
        self._disk.clear()
        self.bytes_in_memory = 0
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def free_disk_bytes(self) -> int:
        """Free bytes on the file system the spills go to (``offload_dir``, else the temporary directory)."""
        path = self.offload_dir if self.offload_dir is not None else Path(tempfile.gettempdir())
        while not path.exists() and path != path.parent:
            path = path.parent
        return shutil.disk_usage(path).free

    def _spill_dir(self) -> Path:
        if self._dir is None:
            parent = self.offload_dir if self.offload_dir is not None else Path(tempfile.gettempdir())
            try:
                parent.mkdir(parents=True, exist_ok=True)
                remove_dead_scratch(parent, SPILL_STEM)
                self._dir = make_scratch_dir(parent, SPILL_STEM, "-activations-", private=True)
            except OSError as err:
                raise ValueError(f"offload directory {str(parent)!r} is not writable: {err.strerror}") from None
        return self._dir


def write_raw(path: Path, tensor: torch.Tensor) -> None:
    """The tensor's bytes, as they are in memory, into ``path``."""
    tensor.to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tofile(path)


def check_offload_dir(path: str | Path) -> Path:
    """Raise a one-line ``ValueError`` unless ``path`` is (or can be made) a writable directory."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        tempfile.NamedTemporaryFile(dir=path).close()  # creating a file is the real test of writability
    except OSError as err:
        raise ValueError(f"offload directory {str(path)!r} is not writable: {err.strerror}") from None
    return path
