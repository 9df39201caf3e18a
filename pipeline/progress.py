"""Progress bars for long work (rich), shared by the CLI and anything else that runs stages."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

console = Console(stderr=True)


class Bar:
    """A handle on one progress bar; ``note`` is free text shown after it (e.g. tokens/s)."""

    def __init__(self, progress: Progress | None, task: int | None) -> None:
        self._progress, self._task = progress, task

    def advance(self, n: float = 1, *, note: str | None = None) -> None:
        if self._progress is not None:
            fields = {"note": note} if note is not None else {}
            self._progress.update(self._task, advance=n, **fields)


class LogLines(Bar):
    """Progress for logs (stderr is not a terminal): one plain line every ``every`` seconds and at the end."""

    def __init__(self, description: str, total: float | None, every: float = 15.0) -> None:
        super().__init__(None, None)
        self.description, self.total, self.every = description, total, every
        self.done, self.note = 0.0, ""
        self._started = self._last = time.time()

    def advance(self, n: float = 1, *, note: str | None = None) -> None:
        self.done += n
        self.note = note if note is not None else self.note
        if time.time() - self._last >= self.every:
            self.line()

    def line(self) -> None:
        self._last = time.time()
        of = f"/{self.total:,.0f}" if self.total else ""
        console.print(f"{self.description}: {self.done:,.0f}{of} after {self._last - self._started:.0f} s {self.note}")


@contextmanager
def progress_bar(description: str, total: float | None) -> Iterator[Bar]:
    """A rich bar on stderr (plain periodic lines when stderr is a log); silent when ``LPR_DISTILL_QUIET=1``."""
    if os.environ.get("LPR_DISTILL_QUIET") == "1":
        yield Bar(None, None)
        return
    if not console.is_terminal:
        bar = LogLines(description, total)
        yield bar
        bar.line()
        return
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[note]}"),
    )
    with Progress(*columns, console=console, refresh_per_second=4) as progress:
        task = progress.add_task(description, total=total, note="")
        yield Bar(progress, task)


def info(message: str) -> None:
    if os.environ.get("LPR_DISTILL_QUIET") != "1":
        console.print(message)
