"""Writers that cannot clobber or leave debris: a lock per output, refusal of outputs that appear meanwhile or
overlap the input, SIGTERM handled like Ctrl-C, leftovers of killed runs removed by the next run, and two
concurrent writers of which exactly one succeeds. The kill and race tests run the real CLI in subprocesses."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from rankwise.cli import app
from rankwise.io import load
from rankwise.io.atomic import WRITING, atomic_dir, claim, is_unfinished, scratch_name

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--seq-len", "16", "--calib-samples", "4", "--method", "svd", "--ratio", "0.3"]


def _debris(parent: Path, name: str) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}."))


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_output_that_appears_meanwhile_is_refused(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="appeared while this run was writing it"), atomic_dir(out) as tmp:
        (tmp / "x").write_text("mine")
        out.mkdir()
        (out / "theirs").write_text("kept")
    assert (out / "theirs").read_text() == "kept" and _debris(tmp_path, "out") == []


def test_lock_is_exclusive_reentrant_and_released(tmp_path):
    out = tmp_path / "out"
    code = f"from rankwise.io.atomic import claim\nwith claim({str(out)!r}): pass"
    with claim(out), claim(out):  # re-entrant in one process
        other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
        assert other.returncode != 0 and f"another rankwise run (pid {os.getpid()}) is writing" in other.stderr
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0  # released
    assert _debris(tmp_path, "out") == []  # the lock file is gone too


def test_planted_lock_symlink_is_refused(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (tmp_path / ".out.lock").symlink_to(victim)
    with pytest.raises(ValueError, match="a symlink is refused"), claim(tmp_path / "out"):
        raise AssertionError("the lock was taken through the symlink")
    assert victim.read_text() == "precious"


def test_leftovers_of_dead_runs_are_removed_and_never_loaded(tmp_path):
    out = tmp_path / "out"
    dead = tmp_path / scratch_name(".out", ".tmp-").replace(f"-{os.getpid()}-", f"-{_dead_pid()}-")
    dead.mkdir()
    (dead / WRITING).write_text("")
    (dead / "rankwise.json").write_text("{}")
    alive = tmp_path / scratch_name(".out", ".tmp-")  # owned by this (live) process: left alone
    alive.mkdir()
    assert is_unfinished(dead) and is_unfinished(alive)
    with pytest.raises(ValueError, match="unfinished output of an interrupted rankwise run"):
        load(dead)
    with pytest.warns(UserWarning, match=r"removed .*left by a rankwise run that died"), atomic_dir(out) as tmp:
        (tmp / "ok").write_text("1")
    assert not dead.exists() and alive.exists() and (out / "ok").exists() and not (out / WRITING).exists()


def test_out_overlapping_the_input_is_refused(tiny_dir, tmp_path):
    for out in (tiny_dir, tiny_dir / "inside", tiny_dir.parent):
        result = CliRunner().invoke(app, ["compress", str(tiny_dir), "--out", str(out), "--overwrite", *SMALL])
        assert result.exit_code == 2, result.output
        assert "the input model" in result.output and "Traceback" not in result.output
    assert (tiny_dir / "config.json").exists() and not (tiny_dir / "inside").exists()


def _start(tiny_dir: Path, out: Path, delay: float = 1.0) -> subprocess.Popen:
    env = {**os.environ, "RANKWISE_TEST_SHARD_DELAY": str(delay), "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, str(ROOT / "tests" / "slow_cli.py"), "compress", str(tiny_dir),
                             "--out", str(out), *SMALL], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=ROOT)


def _wait_for_shard(proc: subprocess.Popen, out: Path, timeout: float = 120) -> Path:
    """Block until the run has written its first shard into its temporary directory; return that directory."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        tmps = [p for p in out.parent.glob(f".{out.name}.tmp-*") if any(p.glob("*.safetensors"))]
        if tmps:
            return tmps[0]
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise AssertionError("the run never started saving")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_terminated_during_save_leaves_nothing(tiny_dir, tmp_path, sig):
    out = tmp_path / "out"
    proc = _start(tiny_dir, out)
    _wait_for_shard(proc, out)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig, err
    assert "interrupted; nothing half-written was left" in err and "Traceback" not in err
    assert not out.exists() and _debris(tmp_path, "out") == []


def test_killed_during_save_is_cleaned_by_the_next_run(tiny_dir, tmp_path):
    out = tmp_path / "out"
    proc = _start(tiny_dir, out)
    tmp = _wait_for_shard(proc, out)
    proc.kill()
    proc.wait()
    assert not out.exists() and tmp.exists()  # SIGKILL cannot be handled: the debris stays ...
    with pytest.raises(ValueError, match="unfinished output"):
        load(tmp)  # ... but no loader takes it for a model
    result = CliRunner().invoke(app, ["compress", str(tiny_dir), "--out", str(out), *SMALL])
    assert result.exit_code == 0, result.output
    assert f"warning: removed {tmp}" in result.output  # the next run removes it, saying so
    assert _debris(tmp_path, "out") == [] and load(out) is not None


def test_two_concurrent_writers_exactly_one_succeeds(tiny_dir, tmp_path):
    out = tmp_path / "out"
    procs = [_start(tiny_dir, out, delay=2.0) for _ in range(2)]
    results = [p.communicate(timeout=300) for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 2], results
    loser = results[[p.returncode for p in procs].index(2)][1]
    assert "another rankwise run" in loser or "exists; pass --overwrite" in loser, loser
    assert load(out) is not None and _debris(tmp_path, "out") == []
