"""A rich download bar in the shape huggingface_hub's `tqdm_class` wants."""

from __future__ import annotations

from rich.markup import escape
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from .console import err


class RichBar:
    """What huggingface_hub asks of its `tqdm_class` (keyword construction, update, close, a
    context manager), drawn by rich on stderr with size, speed and ETA."""

    def __init__(self, *_, total: int | None = None, initial: int = 0, desc: str = "", **__):
        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=err,
        )
        self._task = self._progress.add_task(escape(desc), total=total, completed=initial)
        self._progress.start()

    def update(self, n: int = 1) -> None:
        self._progress.advance(self._task, n)

    @property
    def n(self) -> int:
        return int(self._progress.tasks[0].completed)

    @property
    def total(self) -> int | None:
        total = self._progress.tasks[0].total
        return None if total is None else int(total)

    @total.setter
    def total(self, value: int | None) -> None:
        self._progress.update(self._task, total=value)

    def ignore(self, *_, **__) -> None:
        """Xet downloads also report network bytes and speed text; the bar shows bytes written."""

    update_transfer = set_postfix_str = set_transfer_postfix_str = refresh = ignore

    def close(self) -> None:
        self._progress.stop()

    def __enter__(self) -> RichBar:
        return self

    def __exit__(self, *_) -> None:
        self.close()
