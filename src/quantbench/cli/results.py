"""Reading the results store: ``runs``, ``export-results``, ``card RUN_ID`` and ``report``."""

from __future__ import annotations

import json
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from quantbench.cli.errors import friendly_errors
from quantbench.cli.options import DEFAULT_OUT, OutOpt, StoreOpt, open_results
from quantbench.errors import QuantbenchError

console = Console(width=None if sys.stdout.isatty() else 160)

SweepOpt = Annotated[str | None, typer.Option(help="only runs of this sweep")]
StatusOpt = Annotated[str | None, typer.Option(help="only runs with this status: done, failed or running")]
BackendOpt = Annotated[str | None, typer.Option(help="only runs on this backend")]
ModelOpt = Annotated[str | None, typer.Option(help="only runs of this model")]
MethodOpt = Annotated[str | None, typer.Option(help="only runs of this method label, e.g. minmax or minmax/kld")]


class Format(str, Enum):
    csv = "csv"
    json = "json"


def _filters(sweep: str | None, status: str | None, backend: str | None, model: str | None,
             method: str | None) -> dict[str, str | None]:
    if status is not None and status not in ("done", "failed", "running"):
        raise QuantbenchError(f"--status must be done, failed or running, got {status!r}")
    return {"sweep": sweep, "status": status, "backend": backend, "model": model, "method_label": method}


@friendly_errors
def runs(out: OutOpt = DEFAULT_OUT, store: StoreOpt = None, sweep: SweepOpt = None, status: StatusOpt = None,
         backend: BackendOpt = None, model: ModelOpt = None, method: MethodOpt = None,
         limit: Annotated[int | None, typer.Option(min=1, help="show the last N runs")] = None) -> None:
    """List stored runs (filter by sweep, status, backend, model, method)."""
    with open_results(out, store, create=False) as st:
        rows = st.query(**_filters(sweep, status, backend, model, method))
        location = st.location
    if limit is not None:
        rows = rows[-limit:]
    t = Table(title=f"{len(rows)} runs in {location}")
    for col in ("run", "sweep", "status", "model", "backend", "W/A", "method", "FP top-1", "quant top-1", "agree",
                "finished", "error"):
        t.add_column(col, justify="right" if col in ("FP top-1", "quant top-1", "agree") else "left")
    for r in rows:
        err = (r.error or "").strip().splitlines()[0][:60] if r.error else ""
        t.add_row(r.run_id, r.sweep or "", r.status, r.model or "", r.backend or "", f"W{r.w_bits}A{r.a_bits}",
                  r.method_label or "", f"{r.fp_top1:.2f}" if r.fp_top1 is not None else "-",
                  f"{r.quant_top1:.2f}" if r.quant_top1 is not None else "-",
                  f"{100 * r.agreement:.1f}%" if r.agreement is not None else "-", r.finished_at or "-",
                  Text(err, style="red"))
    console.print(t)


@friendly_errors
def export_results(
    fmt: Annotated[Format, typer.Option("--format", help="csv or json")] = Format.csv,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="write here instead of stdout")] = None,
    out: OutOpt = DEFAULT_OUT, store: StoreOpt = None, sweep: SweepOpt = None, status: StatusOpt = None,
    backend: BackendOpt = None, model: ModelOpt = None, method: MethodOpt = None,
) -> None:
    """Export stored runs as CSV (one line per run) or JSON (with config, environment and card)."""
    from quantbench.store.export import FORMATS
    from quantbench.utils.io import atomic_write_text

    with open_results(out, store, create=False) as st:
        rows = st.query(**_filters(sweep, status, backend, model, method))
    text = FORMATS[fmt.value](rows)
    if output is None:
        sys.stdout.write(text)
    else:
        atomic_write_text(output, text)
        console.print(f"wrote {len(rows)} runs to {output}")


@friendly_errors
def card(
    run_id: Annotated[str, typer.Argument(help="run id or a unique prefix (see `quantbench runs`)")],
    as_json: Annotated[bool, typer.Option("--json", help="print the card as JSON")] = False,
    out: OutOpt = DEFAULT_OUT, store: StoreOpt = None,
) -> None:
    """Print a run's quantization card (Markdown, or JSON with --json)."""
    from quantbench.cards import to_markdown

    with open_results(out, store, create=False) as st:
        row = st.get(run_id)
    if row.card is None:
        raise QuantbenchError(f"run {row.run_id} has no card (status {row.status}"
                              + (f": {row.error.strip().splitlines()[0]}" if row.error else "") + ")")
    sys.stdout.write(json.dumps(row.card, indent=2, sort_keys=True) + "\n" if as_json else to_markdown(row.card))


@friendly_errors
def report(
    out: OutOpt = DEFAULT_OUT, store: StoreOpt = None, sweep: SweepOpt = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="HTML file (default OUT/report.html)")] = None,
    title: Annotated[str, typer.Option(help="page title")] = "quantbench report",
) -> None:
    """Write one self-contained HTML page (works offline): leaderboards, plots and every run's card."""
    path = write_report(out, store, sweep, output, title)
    console.print(f"report: {path.resolve()}")


def write_report(out: Path, store: str | None = None, sweep: str | None = None, output: Path | None = None,
                 title: str = "quantbench report") -> Path:
    """Render the report of the store's runs (optionally one sweep) to ``output``."""
    from quantbench.report.html import render_report
    from quantbench.utils.io import atomic_write_text

    with open_results(out, store, create=False) as st:
        rows = st.query(sweep=sweep)
        location = st.location
    if sweep is not None and not rows:
        raise QuantbenchError(f"no runs of sweep {sweep!r} in {location}; `quantbench runs` lists the sweeps")
    path = output or out / "report.html"
    try:
        atomic_write_text(path, render_report(rows, title, location))
        path.chmod(0o644)
    except OSError as exc:
        raise QuantbenchError(f"cannot write the report to {path}: {exc.strerror or exc}") from exc
    return path


def register(app: typer.Typer) -> None:
    app.command("runs")(runs)
    app.command("export-results")(export_results)
    app.command("card")(card)
    app.command("report")(report)
