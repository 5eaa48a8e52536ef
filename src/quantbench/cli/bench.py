"""``quantbench bench SWEEP.yaml``: expand a sweep, run what the store does not have yet, print the leaderboard."""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from quantbench.cli.errors import friendly_errors
from quantbench.cli.options import DEFAULT_OUT, OutOpt, StoreOpt, open_results
from quantbench.store import open_store, resolve_store_url

console = Console(width=None if sys.stdout.isatty() else 160)


class OnInvalid(str, Enum):
    refuse = "refuse"
    skip = "skip"


WorkersOpt = Annotated[int, typer.Option(min=1, help="parallel worker processes")]
ThreadsOpt = Annotated[int | None, typer.Option(min=1, help="torch threads per process (default: torch's; "
                                                            "cores/workers with --workers)")]
OnInvalidOpt = Annotated[OnInvalid, typer.Option(help="impossible combinations: refuse the sweep or skip them")]


class ExecutorName(str, Enum):
    local = "local"
    ray = "ray"


def leaderboard_table(boards: dict[Any, list[Any]], title: str) -> list[Table]:
    """Rich tables of :func:`quantbench.report.leaderboard.leaderboards`."""
    from quantbench.report.leaderboard import COLUMNS, cells

    tables = []
    for (model, data), entries in boards.items():
        t = Table(title=f"{title}: {model} on {data}")
        for c in COLUMNS:
            t.add_column(c, justify="left" if c in ("backend", "W/A", "method", "run") else "right")
        for i, e in enumerate(entries, 1):
            row = cells(i, e)
            color = "green" if e.delta > -0.5 else ("yellow" if e.delta > -2 else "red")
            row[COLUMNS.index("Δ")] = f"[{color}]{row[COLUMNS.index('Δ')]}[/{color}]"
            t.add_row(*row)
        tables.append(t)
    return tables


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """While running, ``kill PID`` stops the sweep like Ctrl-C (what finished is already stored); the
    previous handler is restored afterwards. A no-op outside the main thread."""
    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _existing_statuses(out: Path, store_url: str | None, run_ids: list[str]) -> dict[str, str]:
    """Statuses in the store, or none when it does not exist yet (a dry run creates nothing)."""
    from quantbench.store.url import sqlite_path

    url = resolve_store_url(store_url, out)
    path = sqlite_path(url)
    if path is not None and not path.exists():
        return {}
    with open_store(url, create=False) as store:
        return store.statuses(run_ids)


def run_sweep_file(sweep_path: Path, out: Path, store_url: str | None, workers: int, on_invalid: str,
                   progress: bool, dry_run: bool, con: Console, threads: int | None = None,
                   executor: str = "local", address: str | None = None, cpus_per_run: float | None = None,
                   combos: list[Any] | None = None) -> int:
    """The body of ``quantbench bench``; returns the exit code. ``combos``: run these combinations of the sweep
    instead of its own product (``quantbench pareto``'s second step)."""
    from quantbench.report.leaderboard import leaderboards
    from quantbench.sweep.expand import expand
    from quantbench.sweep.load import load_sweep
    from quantbench.sweep.prepare import assign_run_dirs, materialize_weights
    from quantbench.sweep.runner import ExecutorOptions, pending, run_jobs
    from quantbench.sweep.sink import StoreSink

    _check_executor(executor, workers, address, cpus_per_run)
    sweep = load_sweep(sweep_path)
    expansion = expand(sweep, on_invalid, combos)
    for inv in expansion.invalid:
        con.print(Text(f"skipped: {inv.description}: {inv.reason}", style="yellow"))
    if dry_run:
        statuses = _existing_statuses(out, store_url, [j.run_id for j in expansion.jobs])
        con.print(f"sweep {sweep.spec.name!r}: {len(expansion.jobs)} runs, "
                  f"{sum(s == 'done' for s in statuses.values())} already complete in the store")
        for j in expansion.jobs:
            con.print(Text(f"  {j.run_id}  {statuses.get(j.run_id, 'new'):8s} {j.description}"))
        return 0
    with open_results(out, store_url, create=True) as store:
        statuses = store.statuses(j.run_id for j in expansion.jobs)
        todo = pending(expansion.jobs, statuses)
        n_done = len(expansion.jobs) - len(todo)
        con.print(f"sweep {sweep.spec.name!r}: {len(expansion.jobs)} runs, {n_done} already complete in the store "
                  f"(skipped), {len(todo)} to run" + _where(executor, workers, address) +
                  f"; store: {store.location}")
        todo = assign_run_dirs(materialize_weights(todo, out / "cache", progress), out / "checkpoints")
        options = ExecutorOptions(workers=workers, threads=threads, address=address, cpus_per_run=cpus_per_run)
        with sigterm_as_interrupt():
            summary = run_jobs(todo, StoreSink(store, out / "cards"), progress=progress, console=con,
                               executor=executor, options=options)
        # a run another sweep already stored (same resolved config) belongs to this sweep's results too
        rows = store.query(run_ids=[j.run_id for j in expansion.jobs])
        for table in leaderboard_table(leaderboards(rows), f"sweep {sweep.spec.name}"):
            con.print(table)
        failed = [r for r in rows if r.status == "failed"]
        for r in failed:
            first = (r.error or "").strip().splitlines()[0] if r.error else "?"
            con.print(Text(f"failed: {r.run_id} {r.model} {r.backend} {r.method_label}: {first}", style="red"))
        if summary.interrupted:
            con.print(Text(f"interrupted: {summary.done} runs finished in this call and every finished run is stored "
                           f"in {store.location}; rerun the same command to resume", style="yellow"))
            return 130
        elsewhere = (f"{summary.elsewhere} were taken by another process on this store (not run here); "
                     if summary.elsewhere else "")
        report = f"quantbench report --out {out}"
        if sweep.spec.pareto is not None:  # a Pareto sweep's product is its analysis: write the report now
            from quantbench.cli.results import write_report

            report = str(write_report(out, store_url, output=out / "report.html"))
        con.print(f"{summary.done} runs done, {summary.failed} failed in this call; {elsewhere}"
                  f"{n_done} were already complete. "
                  f"Store: {store.location}; cards: {out / 'cards'}; report: {report}")
        return 1 if failed else 0


def _check_executor(executor: str, workers: int, address: str | None, cpus_per_run: float | None) -> None:
    """Refuse option combinations that do not apply to the chosen executor, before any work."""
    from quantbench.errors import ConfigError

    if executor == "ray":
        from quantbench.sweep.ray_executor import import_ray

        if workers > 1:
            raise ConfigError("--workers is for the local executor; on Ray as many runs go at once as the cluster's "
                              "CPUs allow (set the CPUs each run takes with --cpus-per-run)")
        import_ray()
    elif address is not None or cpus_per_run is not None:
        raise ConfigError("--address and --cpus-per-run are for --executor ray")


def _where(executor: str, workers: int, address: str | None) -> str:
    if executor == "ray":
        return " on Ray (" + (f"cluster {address}" if address else "a local Ray instance") + ")"
    return f" on {workers} workers" if workers > 1 else ""


@friendly_errors
def bench(
    sweep: Annotated[Path, typer.Argument(help="sweep YAML file (see examples/ and docs/REPORTS.md)")],
    out: OutOpt = DEFAULT_OUT,
    store: StoreOpt = None,
    workers: WorkersOpt = 1,
    threads: ThreadsOpt = None,
    on_invalid: OnInvalidOpt = OnInvalid.refuse,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="list the runs and their status, run nothing")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", help="no progress bar")] = False,
    executor: Annotated[ExecutorName, typer.Option(help="local: this machine (--workers processes); ray: one Ray "
                                                        "task per run (pip install 'quantbench[ray]')")]
    = ExecutorName.local,
    address: Annotated[str | None, typer.Option(help="Ray cluster: auto (the one this machine is in) or "
                                                     "ray://HOST:10001; default: start a local Ray instance")] = None,
    cpus_per_run: Annotated[float | None, typer.Option(min=0.01, help="Ray CPUs each run takes (default: its "
                                                                        "torch threads, 1)")] = None,
) -> None:
    """Run a sweep: skip runs already complete in the store, run the rest, print the leaderboard."""
    code = run_sweep_file(sweep, out, store, workers, on_invalid.value, not quiet, dry_run, console, threads,
                          executor.value, address, cpus_per_run)
    if code:
        raise typer.Exit(code)


def register(app: typer.Typer) -> None:
    app.command("bench")(bench)
