"""Progress bars (rich) that disappear when the output is not a terminal or progress is off."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TypeVar

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

T = TypeVar("T")


def track(items: Iterable[T], description: str, total: int | None = None, enabled: bool = True) -> Iterator[T]:
    """Iterate with a transient progress bar."""
    if not enabled:
        yield from items
        return
    columns = (TextColumn("[bold blue]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn())
    with Progress(*columns, transient=True) as progress:
        yield from progress.track(items, total=total, description=description)


class LossBar:
    """A bar over units with a sub-bar over the current unit's iterations and its latest loss (rich)."""

    def __init__(self, units: int, description: str, enabled: bool = True) -> None:
        self.enabled = enabled
        self.units = units
        self.description = description
        self._progress: Progress | None = None

    def __enter__(self) -> LossBar:
        if self.enabled:
            self._progress = Progress(TextColumn("[bold blue]{task.description}"), BarColumn(),
                                      MofNCompleteColumn(), TextColumn("{task.fields[loss]}"), TimeElapsedColumn(),
                                      transient=True)
            self._progress.start()
            self._all = self._progress.add_task(self.description, total=self.units, loss="")
            self._unit = self._progress.add_task("", total=1, loss="", visible=False)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()

    def start(self, name: str, total: int) -> None:
        """A new unit (or layer) of ``total`` iterations."""
        if self._progress is not None:
            self._progress.reset(self._unit, total=total, description=f"  {name}", loss="", visible=True)

    def update(self, done: int, loss: float, extra: str = "") -> None:
        """``done`` iterations of the current unit, its latest ``loss`` and any ``extra`` text after it."""
        if self._progress is not None:
            self._progress.update(self._unit, completed=done, loss=f"loss {loss:.4g}" + (f", {extra}" if extra else ""))

    def advance(self) -> None:
        if self._progress is not None:
            self._progress.advance(self._all)
