"""Progress bars for long work (rich), shared by the CLI and anything else that runs stages."""

from __future__ import annotations

import os
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


@contextmanager
def progress_bar(description: str, total: float | None) -> Iterator[Bar]:
    """A rich progress bar on stderr; silent when ``LPR_DISTILL_QUIET=1``."""
    if os.environ.get("LPR_DISTILL_QUIET") == "1":
        yield Bar(None, None)
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
