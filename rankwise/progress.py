"""Progress bars (rich) for anything slower than a second; silent when disabled or not on a terminal."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sized
from typing import TypeVar

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

T = TypeVar("T")


def progress_bar(items: Iterable[T], description: str, *, enabled: bool = True) -> Iterator[T]:
    """Yield ``items`` while drawing a bar on stderr (only on a terminal: elsewhere nothing is drawn)."""
    console = Console(stderr=True)
    if not enabled or not console.is_terminal:  # off a terminal rich would still end the bar with a blank line
        yield from items
        return
    total = len(items) if isinstance(items, Sized) else None
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, transient=True, console=console) as bar:
        task = bar.add_task(description, total=total)
        for item in items:
            yield item
            bar.advance(task)


class _StepBar:
    def __init__(self, bar: Progress | None, task: int | None) -> None:
        self.bar, self.task = bar, task

    def update(self, step: int, **metrics: float) -> None:
        if self.bar is not None and self.task is not None:
            shown = "  ".join(f"{k.replace('_', ' ')} {v:.4g}" for k, v in metrics.items())
            self.bar.update(self.task, completed=step, metrics=shown)


@contextlib.contextmanager
def step_bar(description: str, total: int, *, start: int = 0, enabled: bool = True) -> Iterator[_StepBar]:
    """A bar for a loop of ``total`` steps that shows the latest metrics (loss, tokens/s ...) beside it."""
    console = Console(stderr=True)
    if not enabled or not console.is_terminal:
        yield _StepBar(None, None)
        return
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("{task.fields[metrics]}"))
    with Progress(*columns, transient=True, console=console) as bar:
        yield _StepBar(bar, bar.add_task(description, total=total, completed=start, metrics=""))
