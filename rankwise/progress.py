"""Progress for anything slower than a second: rich bars on a terminal, plain lines in a log.

On a terminal (stderr is a TTY): a transient rich bar per stage with the items done, the time elapsed and, where the
total is known, the time remaining (ETA); :func:`step_bar` adds the latest metrics of a training loop.

Off a terminal (output redirected to a file, CI, ``nohup``; also a ``TERM=dumb`` terminal or ``TTY_INTERACTIVE=0``,
rich's switch; ``FORCE_COLOR``, set for many CI logs, does not make a log a terminal): plain lines on stderr, flushed
as written, e.g.::

    svd_llm blocks: 12/30 (40%) 00:31 elapsed, ETA 00:46
    svd_llm blocks: 30/30 (100%) 01:17 elapsed, done

- at most one line every ``RANKWISE_PROGRESS_SECONDS`` seconds (default 30; 0: one line per item), the first after
  that many seconds, and always one line when the stage ends (with 0, the last item's line is the end line);
- no line when a stage starts, and none when it fails (or is left early): a command that stops with an error then
  prints that error alone (the CLI's contract of one ``error: ...`` line), and a stage shorter than the interval
  prints only its end line;
- no thread: lines are written from the loop itself, so an item slower than the interval delays its line until it is
  done.

``enabled=False`` is silent everywhere. An invalid ``RANKWISE_PROGRESS_SECONDS`` is a ``ValueError`` when a stage
starts (on a terminal too, so a typo never depends on where the output goes).
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from collections.abc import Iterable, Iterator, Sized
from typing import IO, TypeVar

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

T = TypeVar("T")

SECONDS_VARIABLE = "RANKWISE_PROGRESS_SECONDS"
DEFAULT_SECONDS = 30.0  # between two lines in a log: a few per minute of a long stage, none for a short one
_END = object()


def report_seconds() -> float:
    """Seconds between two progress lines off a terminal: ``RANKWISE_PROGRESS_SECONDS``, default 30.

    Raises:
        ValueError: the variable is set to something other than a number >= 0.
    """
    raw = os.environ.get(SECONDS_VARIABLE, "").strip()
    if not raw:
        return DEFAULT_SECONDS
    try:
        seconds = float(raw)
    except ValueError:
        seconds = math.nan
    if not seconds >= 0:  # also refuses nan
        raise ValueError(f"{SECONDS_VARIABLE}={raw!r} is not valid; give seconds between progress lines, a number "
                         f">= 0 (0: a line per item; unset: {DEFAULT_SECONDS:g})")
    return seconds


def progress_bar(items: Iterable[T], description: str, *, enabled: bool = True,
                 console: Console | None = None) -> Iterator[T]:
    """Yield ``items`` while showing progress on stderr: a bar on a terminal, lines elsewhere (see the module).

    Args:
        items: what the stage iterates over; its total is known when it has a length.
        description: the stage's name, e.g. ``"svd_llm blocks"``.
        enabled: ``False`` shows nothing.
        console: where to show it, a bar if it is interactive (default: stderr as it is when the stage starts).
    """
    if not enabled:
        yield from items
        return
    every = report_seconds()
    console = console if console is not None else _stderr()
    total = len(items) if isinstance(items, Sized) else None
    if console.is_interactive:
        with Progress(*_columns(total is not None), transient=True, console=console) as bar:
            task = bar.add_task(description, total=total)
            for item in items:
                yield item
                bar.advance(task)
        return
    lines = _Lines(description, total, console.file, every)
    iterator = iter(items)
    item, done = next(iterator, _END), 0
    while item is not _END:
        yield item
        done += 1
        item = next(iterator, _END)  # looked at first: the last item's line is the end line
        if item is not _END:
            lines.tick(done)
    lines.end(done)


class _StepBar:
    """What a training loop reports to after each step: ``update(step, loss=..., tokens_per_s=...)``."""

    def __init__(self, bar: Progress | None = None, task: int | None = None, lines: _Lines | None = None,
                 start: int = 0) -> None:
        self.bar, self.task, self.lines = bar, task, lines
        self.step, self.shown = start, ""

    def update(self, step: int, **metrics: float) -> None:
        self.step, self.shown = step, "  ".join(f"{k.replace('_', ' ')} {v:.4g}" for k, v in metrics.items())
        if self.bar is not None and self.task is not None:
            self.bar.update(self.task, completed=step, metrics=self.shown)
        elif self.lines is not None and step < (self.lines.total or 0):  # the last step's line is the end line
            self.lines.tick(step, self.shown)


@contextlib.contextmanager
def step_bar(description: str, total: int, *, start: int = 0, enabled: bool = True,
             console: Console | None = None) -> Iterator[_StepBar]:
    """Progress of a loop of ``total`` steps (from ``start`` when resumed) with the latest metrics (loss,
    tokens/s ...): a bar on a terminal, lines elsewhere (see the module); the end line comes when the ``with`` block
    ends without an error."""
    if not enabled:
        yield _StepBar(start=start)
        return
    every = report_seconds()
    console = console if console is not None else _stderr()
    if console.is_interactive:
        columns = (*_columns(True), TextColumn("{task.fields[metrics]}"))
        with Progress(*columns, transient=True, console=console) as bar:
            yield _StepBar(bar, bar.add_task(description, total=total, completed=start, metrics=""), start=start)
        return
    lines = _Lines(description, total, console.file, every, start=start)
    steps = _StepBar(lines=lines, start=start)
    yield steps
    lines.end(steps.step, steps.shown)


def _stderr() -> Console:
    """stderr as it is now (a later redirection of ``sys.stderr`` does not move a stage's output), a terminal only
    if it is a TTY."""
    try:
        tty = sys.stderr.isatty()
    except ValueError:  # closed
        tty = False
    return Console(file=sys.stderr, force_terminal=tty)


def _columns(total_known: bool) -> tuple[ProgressColumn, ...]:
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    return (*columns, TextColumn("ETA"), TimeRemainingColumn()) if total_known else columns


class _Lines:
    """Progress lines for a log: ``tick`` after an item writes one if ``every`` seconds have passed since the last
    (or the start), ``end`` always writes one."""

    def __init__(self, description: str, total: int | None, file: IO[str], every: float, start: int = 0) -> None:
        self.description, self.total, self.file, self.every, self.start = description, total, file, every, start
        self.began = self.last = time.monotonic()

    def tick(self, done: int, extra: str = "") -> None:
        now = time.monotonic()
        if now - self.last >= self.every:
            self.last = now
            self._write(done, now, extra, final=False)

    def end(self, done: int, extra: str = "") -> None:
        self._write(done, time.monotonic(), extra, final=True)

    def _write(self, done: int, now: float, extra: str, *, final: bool) -> None:
        elapsed = now - self.began
        count = f"{done}" if self.total is None else f"{done}/{self.total}"
        if self.total:
            count += f" ({100 * done // self.total}%)"
        line = f"{self.description}: {count} {_clock(elapsed)} elapsed"
        if final:
            line += ", done"
        elif self.total is not None:
            rate = (done - self.start) / elapsed if elapsed > 0 else math.inf  # items per second in this run
            line += f", ETA {_clock((self.total - done) / rate) if rate > 0 else '--:--'}"
        self.file.write(f"{line}  {extra}\n" if extra else f"{line}\n")
        self.file.flush()


def _clock(seconds: float) -> str:
    """``mm:ss``, or ``h:mm:ss`` from an hour on."""
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes:02d}:{secs:02d}"
