"""Options shared by the sweep and results commands (``--out``, ``--store``), and the store they open."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from quantbench.store import ResultsStore, open_store, resolve_store_url

DEFAULT_OUT = Path("quantbench-out")

OutOpt = Annotated[Path, typer.Option("--out", help="output folder (store, cards, report)")]
StoreOpt = Annotated[str | None, typer.Option(
    "--store", help="results store: a SQLAlchemy URL (e.g. postgresql+psycopg://user@host/db) or an SQLite file; "
                    "default OUT/quantbench.db")]


def open_results(out: Path, store: str | None, create: bool) -> ResultsStore:
    """The store the user pointed at; read-only commands (``create`` False) never create one."""
    return open_store(resolve_store_url(store, out), create=create)
