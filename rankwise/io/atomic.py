"""Write a directory so that it cannot be half-written, clobbered or left behind.

* :func:`claim` takes an exclusive lock (``flock`` on ``.<out>.lock`` beside the output) for as long as a run writes
  ``out``; a second run on the same ``out`` fails at once, naming the first one's pid. The lock dies with its
  process, so a killed run never blocks the next one.
* :func:`atomic_dir` builds the output under ``.<out>.tmp-<pid>-<host>-<random>`` (with a marker file inside, so
  loaders refuse it), and renames it into place only when the work finished; an output that appeared meanwhile is
  refused unless ``overwrite``.
* :func:`claimed_out` is a job's guard: it refuses an existing output (unless ``overwrite``) or one that overlaps an
  input, then holds the output's lock while the job runs.
* A finished output ends with ``SHA256SUMS`` (:mod:`rankwise.io.integrity`), checked whenever it is loaded.
* Temporary and superseded directories whose owner process is gone (same host, pid no longer alive) are removed by
  the next run on the same output, with a warning naming them.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import re
import secrets
import shutil
import signal
import socket
import stat
import warnings
from collections.abc import Iterator
from pathlib import Path

from rankwise._errors import RankwiseWarning
from rankwise.io.integrity import write_sums

WRITING = ".rankwise-writing"  # marker inside an output that is still being written
_SCRATCH = re.compile(r"^(?P<stem>.+)(?P<kind>\.tmp-|\.old-|-activations-)(?P<pid>\d+)-(?P<host>[0-9a-f]{8})-\w+$")
_held: dict[str, int] = {}  # locks this process holds: path -> depth (claim is re-entrant)


def _host() -> str:
    return hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):  # exists but owned by someone else; or no pid at all: leave it alone
        return True
    return True


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def scratch_name(stem: str, kind: str) -> str:
    """``<stem><kind><pid>-<host>-<random>``: a name that says which process on which host owns it."""
    return f"{stem}{kind}{os.getpid()}-{_host()}-{secrets.token_hex(4)}"


def destination_of(path: Path) -> Path:
    """The output that a temporary directory of :func:`atomic_dir` (``.<name>.tmp-<owner>``) becomes once renamed;
    any other path is itself (what errors should name: the output, not its scratch)."""
    match = _SCRATCH.match(path.name)
    if match and match["kind"] == ".tmp-" and match["stem"].startswith(".") and len(match["stem"]) > 1:
        return path.parent / match["stem"][1:]
    return path


def make_scratch_dir(parent: Path, stem: str, kind: str, *, private: bool = False) -> Path:
    """Create a fresh owned scratch directory under ``parent`` (permissions follow the umask, or 0700)."""
    path = parent / scratch_name(stem, kind)
    path.mkdir(mode=0o700 if private else 0o777 & ~_umask())
    return path


def is_unfinished(path: str | Path) -> bool:
    """Whether ``path`` is a temporary or superseded rankwise output (being written, or left by a killed run)."""
    path = Path(path)
    match = _SCRATCH.match(path.name)
    return (path / WRITING).exists() or bool(match and match["kind"] in (".tmp-", ".old-"))


def remove_dead_scratch(parent: Path, stem: str) -> list[Path]:
    """Remove scratch directories named after ``stem`` in ``parent`` whose owner process on this host is gone.

    Returns what was removed (a warning names each one)."""
    removed = []
    try:
        entries = list(parent.iterdir())
    except OSError:
        return removed
    for entry in entries:
        match = _SCRATCH.match(entry.name)
        if not match or match["stem"] != stem or match["host"] != _host() or _alive(int(match["pid"])):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
            if not entry.exists():
                removed.append(entry)
                warnings.warn(f"removed {entry}, left by a rankwise run that died (pid {match['pid']})",
                              RankwiseWarning, stacklevel=2)
    return removed


def check_output_dir(out: str | Path, overwrite: bool) -> Path:
    """Refuse an existing output unless ``overwrite``; return the path."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise ValueError(f"output directory {str(out)!r} exists; pass --overwrite (overwrite=True) to replace it")
    if out.exists() and not out.is_dir():
        raise ValueError(f"output path {str(out)!r} exists and is not a directory")
    return out


def refuse_overlap(out: str | Path, source: str | Path, option: str = "--out") -> None:
    """Refuse an output that is, is inside, or contains the input model (writing it would destroy the input)."""
    o, s = Path(out).resolve(), Path(source).resolve()
    if o == s or s in o.parents or o in s.parents:
        where = "is" if o == s else ("is inside" if s in o.parents else "contains")
        raise ValueError(f"{option} {str(out)!r} {where} the input model {str(source)!r}; choose a path outside it")


@contextlib.contextmanager
def claim(out: str | Path) -> Iterator[Path]:
    """Hold the exclusive write lock of ``out`` for the block (re-entrant within one process).

    Raises:
        ValueError: another live process holds it (its pid is named).
    """
    out = Path(out)
    key = str(out.absolute())
    if key in _held:
        _held[key] += 1
        try:
            yield out
        finally:
            _held[key] -= 1
        return
    try:
        out.absolute().parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"cannot create the parent directory of {str(out)!r} ({err.strerror})") from None
    lock = out.absolute().parent / f".{out.name}.lock"
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
        except OSError as err:
            raise ValueError(f"cannot create the lock file {lock} ({err.strerror}; a symlink is refused)") from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise ValueError(f"the lock file {lock} is not a regular file; remove it")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            owner = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise ValueError(f"another rankwise run (pid {owner}) is writing {str(out)!r}; wait for it to "
                                 "finish or choose another --out") from None
            raise ValueError(f"cannot lock {lock} ({err.strerror})") from None
        try:
            same = os.stat(lock).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the lock file was removed by its previous holder meanwhile: lock the new one
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    _held[key] = 1
    try:
        yield out
    finally:
        del _held[key]
        with contextlib.suppress(OSError):
            os.unlink(lock)
        os.close(fd)


@contextlib.contextmanager
def atomic_dir(out: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that replaces ``out`` only if the block finishes without error.

    The finished directory gets ``SHA256SUMS``, the checksum of every file in it (:mod:`rankwise.io.integrity`),
    which loading verifies. The output is locked for the duration (:func:`claim`), leftovers of dead runs on it are
    removed first, and an output that appeared while the block ran is refused unless ``overwrite``.
    """
    out = check_output_dir(out, overwrite)
    with claim(out):
        parent = out.absolute().parent
        remove_dead_scratch(parent, f".{out.name}")
        tmp = make_scratch_dir(parent, f".{out.name}", ".tmp-")
        try:
            (tmp / WRITING).write_text(f"{os.getpid()} {socket.gethostname()}\n")
            yield tmp
            if out.exists() and not overwrite:
                raise ValueError(f"output directory {str(out)!r} appeared while this run was writing it; "
                                 "pass --overwrite to replace it")
            (tmp / WRITING).unlink()
            write_sums(tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        _swap_into_place(tmp, out, parent)


def _swap_into_place(tmp: Path, out: Path, parent: Path) -> None:
    """Rename ``tmp`` to ``out`` (moving an existing ``out`` aside first) with SIGINT/SIGTERM held back, so a
    signal cannot fall between the two renames; if the second fails, the old output is put back."""
    blocked = {signal.SIGINT, signal.SIGTERM}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, blocked)
    old = None
    try:
        if out.exists():
            old = parent / scratch_name(f".{out.name}", ".old-")
            out.rename(old)
        try:
            tmp.rename(out)
        except OSError as err:
            if old is not None:
                old.rename(out)
            shutil.rmtree(tmp, ignore_errors=True)
            raise ValueError(f"could not move the finished output into {str(out)!r} ({err.strerror}); "
                             "something else wrote there meanwhile") from None
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_text_atomic(path: Path, text: str) -> None:
    """Write a small text file via a temporary file in the same directory and a rename (never half-written)."""
    tmp = path.parent / scratch_name(f".{path.name}", ".tmp-")
    try:
        tmp.write_text(text)
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def claimed_out(out: str | Path, overwrite: bool, *inputs: str | Path) -> Iterator[None]:
    """Refuse an existing ``out`` unless ``overwrite`` and an ``out`` that is, is inside or contains a local input;
    then hold ``out``'s write lock (:func:`claim`) for the block, so no other run writes it meanwhile."""
    check_output_dir(out, overwrite)
    if not out:
        raise ValueError("--out must not be empty")
    for where in inputs:
        if Path(where).exists():
            refuse_overlap(out, where)
    with claim(out):
        yield


def check_report_path(report: str | Path | None, *inputs: str | Path | None) -> None:
    """A JSON report's path (``--json-report``): its folder must exist, it must not be a directory or an input."""
    if not report:
        return
    where = Path(report)
    if where.is_dir():
        raise ValueError(f"--json-report {report} is a directory; give a file path")
    if not where.parent.is_dir():
        raise ValueError(f"--json-report {report}: folder {where.parent} does not exist")
    for item in inputs:
        if item and Path(item).exists():
            refuse_overlap(report, item, option="--json-report")
