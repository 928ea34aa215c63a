"""Progress on stderr for the library's `on_progress(label, done, total)` reports.

One bar per label (with ETA) while its step runs; when the step reaches its total the bar
goes and a dim `label: done in 12.3s` line stays. The live display runs only while some step
is running, so a bar never outlives its step: not after a command, not under a chat prompt.
Where stderr is not a terminal (a log file, CI), a plain line marks each tenth passed instead
(one line for a step that passes several).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

from .console import err


class StepProgress:
    """The `on_progress` callback; `close()` drops steps that never finished (Ctrl-C)."""

    def __init__(self) -> None:
        self.bar = Progress(
            "[progress.description]{task.description}",
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            console=err,
            transient=True,
        )
        self.steps: dict[str, list[Any]] = {}  # label -> [rich task id, start time, last done]

    def __call__(self, label: str, done: int, total: int) -> None:
        if label not in self.steps:
            if not self.steps and err.is_terminal:
                self.bar.start()
            task = self.bar.add_task(escape(label), total=total)
            self.steps[label] = [task, time.monotonic(), 0]
        task, started, before = self.steps[label]
        self.steps[label][2] = done
        self.bar.update(task, completed=done, total=total)
        if not err.is_terminal and _tenths(before, total) < _tenths(done, total) < 10:
            err.print(f"{escape(label)}: {done}/{total}")  # a log: a line per tenth passed
        if done >= total:
            self.bar.remove_task(task)
            del self.steps[label]
            if not self.steps:
                self._stop()
            err.print(f"[dim]{escape(label)}: done in {time.monotonic() - started:.1f}s[/]")

    def close(self) -> None:
        for task, *_ in self.steps.values():
            self.bar.remove_task(task)
        self.steps.clear()
        self._stop()

    def _stop(self) -> None:
        if self.bar.live.is_started:  # stopping a display that never started prints a line
            self.bar.stop()


def _tenths(done: int, total: int) -> int:
    return 10 * max(done, 0) // max(total, 1)


@contextlib.contextmanager
def progress_bar() -> Iterator[StepProgress]:
    """A StepProgress that is closed however the block ends."""
    progress = StepProgress()
    try:
        yield progress
    finally:
        progress.close()
