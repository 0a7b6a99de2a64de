"""Checksums and content identity of directories: what rankwise writes is checked when it is read back, and what
decides reuse (a cache entry, a resumed run) is the bytes, not file names or times.

* Every directory rankwise writes ends with ``SHA256SUMS``, one ``<sha256>  <relative path>`` line per file, the
  format of coreutils' ``sha256sum`` (so ``sha256sum -c SHA256SUMS`` checks it without rankwise too).
* :func:`verify_dir` checks a directory against its ``SHA256SUMS`` or, for a snapshot in the Hugging Face cache
  (files are links to ``blobs/<sha256>``), against the names its blobs are stored under. A mismatch is one
  ``ValueError`` line naming the file.
* :func:`content_identity` is a SHA-256 over a checkpoint's ``config.json``, manifest and weight files, read in full
  each time (about 1.4 GB/s per core), verifying them against the same checksums on the way: one read for both.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

SUMS = "SHA256SUMS"
HUB = "the Hugging Face cache"
_CHUNK = 1 << 24
_HEX64 = re.compile(r"[0-9a-f]{64}")
_LINE = re.compile(r"([0-9a-fA-F]{64}) [ *](.+)")
_SKIP = {SUMS, ".rankwise-writing"}  # the list itself, and atomic_dir's marker (removed before the list is made)
NO_VERIFY = "pass --no-verify (verify=False in Python) to use it anyway"


def sha256_file(path: Path) -> str:
    """The SHA-256 of a file's bytes, read in 16 MB chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)  # hashlib releases the GIL on large buffers: files hash in parallel threads
    return digest.hexdigest()


def file_hashes(directory: Path, names: Iterable[str]) -> dict[str, str]:
    """SHA-256 of each file ``directory/name``, several files at a time."""
    names = sorted(set(names))
    workers = max(1, min(len(names), os.cpu_count() or 1, 4))
    with ThreadPoolExecutor(workers) as pool:
        return dict(zip(names, pool.map(lambda n: sha256_file(directory / n), names), strict=True))


def _listed_files(directory: Path) -> list[str]:
    """Every regular file under ``directory`` (relative POSIX paths), the checksum list itself excepted."""
    out = []
    for path in sorted(directory.rglob("*")):
        name = path.relative_to(directory).as_posix()
        if path.is_file() and not path.is_symlink() and name not in _SKIP:
            out.append(name)
    return out


def write_sums(directory: Path) -> None:
    """Write ``directory/SHA256SUMS`` for every file in it (call it last, once nothing else will be written)."""
    hashes = file_hashes(directory, _listed_files(directory))
    (directory / SUMS).write_text("".join(f"{h}  {name}\n" for name, h in sorted(hashes.items())))


def read_sums(directory: Path) -> dict[str, str] | None:
    """``{relative path: sha256}`` from ``directory/SHA256SUMS``; ``None`` if there is none.

    Raises:
        ValueError: a line that is not ``<64 hex digits>  <path>``, or a path that leaves the directory.
    """
    file = directory / SUMS
    if not file.is_file():
        return None
    try:
        lines = file.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise ValueError(f"{file} is not a text file of checksums; {NO_VERIFY}") from None
    sums = {}
    for number, line in enumerate(lines, 1):
        match = _LINE.fullmatch(line)
        if not line.strip():
            continue
        name = match.group(2) if match else ""
        if match is None or name.startswith("/") or ".." in Path(name).parts:
            raise ValueError(f"{file} line {number} is not '<sha256>  <relative path>'; the checksum list is "
                             f"damaged, {NO_VERIFY}")
        sums[name] = match.group(1).lower()
    return sums


_OTHER_WEIGHTS = (".bin", ".pt", ".pth", ".h5", ".msgpack", ".ot", ".onnx", ".gguf", ".ckpt")


def hub_sums(directory: Path) -> dict[str, str]:
    """For a Hugging Face cache snapshot: ``{file: sha256}`` of its top-level files stored as links to
    ``blobs/<sha256>`` (large files are stored under their SHA-256; small ones under a git hash, not checked here).
    Weights in other formats beside safetensors ones (``pytorch_model.bin``, ``original/*.pth``) are never read, so
    they are not hashed either."""
    sums = {}
    for path in directory.iterdir():
        if path.is_symlink():
            target = path.resolve()
            if target.parent.name == "blobs" and _HEX64.fullmatch(target.name):
                sums[path.name] = target.name
    if any(name.endswith(".safetensors") for name in sums):
        shards = set(_weight_files(directory))  # e.g. not Mistral's consolidated.safetensors beside the shards
        sums = {name: h for name, h in sums.items()
                if not name.endswith(_OTHER_WEIGHTS) and (not name.endswith(".safetensors") or name in shards)}
    return sums


def _weight_files(directory: Path) -> list[str]:
    """The safetensors files a loader reads: those the index names when there is one, else every one."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text()).get("weight_map")
            if isinstance(weight_map, dict) and all(isinstance(v, str) for v in weight_map.values()):
                return sorted({Path(v).name for v in weight_map.values()})
        except (ValueError, OSError, AttributeError):
            pass  # a damaged index: the loaders name it; identify by every shard present
    return [p.name for p in sorted(directory.glob("*.safetensors"))]


@dataclass
class Verification:
    """What :func:`verify_dir` checked: ``against`` is ``"SHA256SUMS"``, ``"the Hugging Face cache"`` or ``None``
    (nothing to check against); ``unlisted`` are files present but not in ``SHA256SUMS``."""

    directory: Path
    against: str | None = None
    files: int = 0
    bytes: int = 0
    seconds: float = 0.0
    unlisted: list[str] = field(default_factory=list)

    def describe(self) -> str:
        """One line: what was checked against what, or that nothing could be."""
        if self.against is None:
            return f"{self.directory}: no checksums to verify against (no {SUMS}, not a Hugging Face cache snapshot)"
        text = (f"{self.directory}: {self.files} files ({self.bytes / 1e6:,.1f} MB) match {self.against} "
                f"({self.seconds:.2f} s)")
        if self.unlisted:
            text += f"; not listed, so not checked: {', '.join(self.unlisted)}"
        return text


def _expected(directory: Path) -> tuple[dict[str, str], str | None]:
    """What to check ``directory`` against: a Hugging Face cache snapshot's blob names first (a ``SHA256SUMS``
    shipped in the repo may list files a partial download skipped), else its ``SHA256SUMS``."""
    hub = hub_sums(directory)
    if hub:
        return hub, HUB
    sums = read_sums(directory)
    return (sums, SUMS) if sums is not None else ({}, None)


def checksums_available(directory: str | Path) -> bool:
    """Whether ``directory`` has something to verify against (``SHA256SUMS``, or Hugging Face cache blob links)."""
    return _expected(Path(directory))[1] is not None


def _check(directory: Path, expected: dict[str, str], against: str, hashes: dict[str, str]) -> None:
    for name, want in sorted(expected.items()):
        if hashes[name] == want:
            continue
        if against == SUMS:
            raise ValueError(f"{directory / name} does not match its SHA-256 in {SUMS}: it was changed or damaged "
                             f"after it was written; restore it, or {NO_VERIFY}")
        raise ValueError(f"{directory / name} does not match the SHA-256 {HUB} stores it under "
                         f"({want[:12]}...): the download is damaged or was edited; delete it from the cache and "
                         f"download it again, or {NO_VERIFY}")


def _missing(directory: Path, expected: dict[str, str], against: str) -> None:
    """Refuse a listed file that is missing and, against ``SHA256SUMS``, a model file it does not list (added
    afterwards, or a list cut short): an unchecked weight or config must not pass as checked."""
    for name in sorted(expected):
        if not (directory / name).is_file():
            raise ValueError(f"{directory / name} is listed in {against} but missing; the directory is incomplete, "
                             f"{NO_VERIFY}")
    if against == SUMS:
        for name in identity_files(directory):
            if name not in expected:
                raise ValueError(f"{directory / name} is not listed in {SUMS}: it was added after the directory "
                                 f"was written, or the list was cut short; {NO_VERIFY}")


def verify_dir(directory: str | Path) -> Verification:
    """Check every file of ``directory`` against its ``SHA256SUMS`` (or its Hugging Face cache blob names).

    Raises:
        ValueError: one line naming the first file that is missing or does not match.
    """
    directory = Path(directory)
    start = time.perf_counter()
    expected, against = _expected(directory)
    result = Verification(directory, against)
    if against is None:
        return result
    _missing(directory, expected, against)
    hashes = file_hashes(directory, expected)
    _check(directory, expected, against, hashes)
    result.files = len(expected)
    result.bytes = sum((directory / n).stat().st_size for n in expected)
    if against == SUMS:
        result.unlisted = [n for n in _listed_files(directory) if n not in expected]
    result.seconds = time.perf_counter() - start
    return result


def identity_files(directory: Path) -> list[str]:
    """The files a model's weights and architecture are read from: ``config.json``, rankwise's manifest, the
    safetensors shards and their index."""
    names = _weight_files(directory)
    names += [n for n in ("config.json", "rankwise.json", "model.safetensors.index.json") if (directory / n).is_file()]
    return names


def content_identity(directory: str | Path, *, verify: bool = True) -> tuple[str, Verification]:
    """A SHA-256 over the full contents of ``directory``'s :func:`identity_files` and, with ``verify``, the check of
    every file against the directory's checksums, in one read.

    Raises:
        ValueError: no weights to identify the model by, or (with ``verify``) a file that does not match.
    """
    directory = Path(directory)
    start = time.perf_counter()
    files = identity_files(directory)
    if not any(n.endswith(".safetensors") for n in files):
        raise ValueError(f"{directory} holds no safetensors weights to identify the model by; give a Hugging Face "
                         "checkpoint directory with model.safetensors (or shards and their index)")
    expected, against = _expected(directory) if verify else ({}, None)
    if against is not None:
        _missing(directory, expected, against)
    hashes = file_hashes(directory, [*files, *expected])
    if against is not None:
        _check(directory, expected, against, hashes)
    digest = hashlib.sha256()
    for name in files:
        digest.update(f"{name}\0{hashes[name]}\0".encode())
    result = Verification(directory, against, len(hashes), sum((directory / n).stat().st_size for n in hashes),
                          time.perf_counter() - start)
    return digest.hexdigest(), result


def hub_snapshot(repo_id: str) -> Path | None:
    """The local snapshot directory of a hub model already in the Hugging Face cache, or ``None``."""
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo_id, "config.json")
    except ValueError:  # not a valid repo id
        return None
    return Path(found).parent if isinstance(found, str) else None


def check_finite_parameters(model: torch.nn.Module, where: str) -> None:
    """Refuse a model holding NaN or Inf in any parameter, naming the first one."""
    for name, tensor in model.named_parameters():
        if tensor.device.type != "meta" and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise ValueError(f"{where}: tensor {name!r} holds {bad:,} NaN or Inf values (of {tensor.numel():,}); "
                             "the checkpoint is damaged")
