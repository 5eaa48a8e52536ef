"""A progress bar for a sweep that advances as runs finish (in any order)."""

from __future__ import annotations

from types import TracebackType

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn


class SweepProgress:
    """``with SweepProgress(total, enabled) as p: p.advance("last run")``; silent when disabled."""

    def __init__(self, total: int, enabled: bool = True, console: Console | None = None) -> None:
        self.enabled = enabled and total > 0
        self._progress = Progress(TextColumn("[bold blue]sweep"), BarColumn(), MofNCompleteColumn(),
                                  TimeElapsedColumn(), TextColumn("{task.description}"), transient=True,
                                  console=console)
        self._task: TaskID | None = None
        self.total = total

    def __enter__(self) -> SweepProgress:
        if self.enabled:
            self._progress.start()
            self._task = self._progress.add_task("", total=self.total)
        return self

    def advance(self, description: str) -> None:
        if self._task is not None:
            self._progress.update(self._task, advance=1, description=description)

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        if self.enabled:
            self._progress.stop()
