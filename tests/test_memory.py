"""The process-wide allocator settings of the CLI's commands (glibc's malloc; skipped elsewhere)."""

from __future__ import annotations

import importlib
import os
import platform
import subprocess
import sys

import pytest

import rankwise._memory as memory

cli_app = importlib.import_module("rankwise.cli.app")  # the module: rankwise.cli.app the attribute is the Typer app

PROBE = """
import os, sys, torch
from rankwise._memory import reuse_freed_memory
applied = reuse_freed_memory() if sys.argv[1] == "reuse" else None
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
def mapping(addr):
    for line in open("/proc/self/maps"):
        lo, hi = (int(v, 16) for v in line.split()[0].split("-"))
        if lo <= addr < hi:
            return line.split()[-1]
x = torch.ones(50_000_000)  # 200 MB, the size of a heal step's logits on the default model
where = mapping(x.data_ptr())
held = rss()
del x
print(applied, where, (held - rss()) // 2**20)
"""


def _probe(mode: str) -> tuple[str, str, int]:
    env = {k: v for k, v in os.environ.items()  # glibc's own malloc, with its defaults
           if k not in ("LD_PRELOAD", "GLIBC_TUNABLES") and not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True,
                         env=env).stdout
    applied, where, released_mb = out.split()
    return applied, where, int(released_mb)


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
                    reason="glibc's malloc on Linux (reads /proc)")
def test_training_keeps_large_tensors_in_the_heap():
    """With the heap kept, a 200 MB tensor comes from the heap and its pages stay resident once freed, for the next
    step to reuse; glibc's default maps it on its own and unmaps it when freed (the control)."""
    applied, where, released = _probe("reuse")
    assert applied == "True"
    assert where == "[heap]" and released < 20
    _, where, released = _probe("default")
    assert where != "[heap]" and released > 180


@pytest.mark.parametrize(("command", "expected"), [("heal", "reuse"), ("adapt", "reuse"), ("compress", "pin"),
                                                   ("compare", "pin"), ("compensate", "pin"), ("eval", None)])
def test_each_command_gets_its_allocator_setting(monkeypatch, command, expected):
    calls = []
    monkeypatch.setattr(memory, "reuse_freed_memory", lambda *a: calls.append("reuse") or True)
    monkeypatch.setattr(memory, "pin_mmap_threshold", lambda *a: calls.append("pin") or True)
    monkeypatch.setattr(cli_app.signal, "signal", lambda *a: None)  # leave pytest's SIGTERM handling alone
    monkeypatch.setattr(sys, "argv", ["rankwise", command, "--help"])
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)  # typer replaces it
    with pytest.raises(SystemExit) as exit_info:
        cli_app.main()
    assert exit_info.value.code == 0
    assert calls == ([expected] if expected else [])


@pytest.mark.parametrize("nbytes", [0, -1, 1 << 31])
def test_a_threshold_mallopt_cannot_take_is_refused(nbytes):
    with pytest.raises(ValueError, match="C int"):
        memory.reuse_freed_memory(nbytes)
