"""The main job on the embedded default: a stored sweep of the digits CNN over every backend, several
calibrators and W8A8/W4A8/W4A4, with a card per run and ``report.html``, all in ``quantbench-out/``."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from quantbench.backends import backend_names
from quantbench.cli.bench import sigterm_as_interrupt
from quantbench.cli.results import write_report
from quantbench.report.leaderboard import Entry, leaderboards
from quantbench.store import RunRow, open_store, resolve_store_url
from quantbench.sweep.expand import expand
from quantbench.sweep.load import Sweep, parse_sweep
from quantbench.sweep.prepare import materialize_weights
from quantbench.sweep.runner import pending, run_jobs
from quantbench.sweep.sink import StoreSink
from quantbench.sweep.weights import ensure_trained

DEMO_MODEL = "digits_cnn"
DEMO_SWEEP = "demo"
BITS = ((8, 8), (4, 8), (4, 4))
CALIBRATORS = (("minmax", "minmax"), ("mse", "mse"), ("minmax", "kld"))


def ensure_digits_model(cache: Path, progress: bool = True, epochs: int = 30) -> Path:
    """Train the digits CNN once and cache its weights (safetensors)."""
    return ensure_trained(DEMO_MODEL, "digits", cache, progress, epochs)


def demo_sweep(backends: list[str] | None = None, bits: tuple[tuple[int, int], ...] = BITS,
               calibrators: tuple[tuple[str, str], ...] = CALIBRATORS) -> Sweep:
    """The demo as a sweep (the same thing a sweep YAML file would say)."""
    data: dict[str, Any] = {
        "name": DEMO_SWEEP,
        "description": "quantbench demo: the digits CNN on every backend, three calibrators, W8A8/W4A8/W4A4",
        "models": [{"model": DEMO_MODEL, "weights": "train", "data": "digits"}],
        "backends": list(backends or backend_names()),
        "methods": [{"kind": "ptq", "w_observer": w, "a_observer": a} for w, a in calibrators],
        "bits": [f"W{w}A{a}" for w, a in bits],
    }
    return parse_sweep(data, Path.cwd(), "quantbench demo")


def best_tables(boards: dict[tuple[str, str], list[Entry]]) -> list[Table]:
    """Per model: best quantized top-1 for each backend (rows) and bit-width pair (columns), with its calibrator."""
    tables = []
    for (model, data), entries in boards.items():
        bits = [f"W{w}A{a}" for w, a in sorted({(e.w_bits, e.a_bits) for e in entries}, reverse=True)]
        best: dict[tuple[str, str], Entry] = {}
        for e in entries:  # entries come best first
            best.setdefault((e.backend, e.bits), e)
        t = Table(title=f"quantbench demo: {model} on {data}, FP32 top-1 {entries[0].fp_top1:.2f} % "
                        f"({len(entries)} runs; best quantized top-1 per backend, calibrator in brackets)")
        t.add_column("backend")
        for b in bits:
            t.add_column(b, justify="right")
        for backend in sorted({e.backend for e in entries}):
            cells = []
            for b in bits:
                e = best.get((backend, b))
                cells.append(f"{e.quant_top1:.2f} ({e.method})" if e else "-")
            t.add_row(backend, *cells)
        tables.append(t)
    return tables


def run_demo(out: Path, progress: bool = True, console: Console | None = None,
             backends: list[str] | None = None, bits: tuple[tuple[int, int], ...] = BITS,
             calibrators: tuple[tuple[str, str], ...] = CALIBRATORS, workers: int = 1,
             threads: int = 1) -> list[RunRow]:
    """Train (or reuse) the digits CNN, run the demo sweep into ``OUT/quantbench.db`` (resuming what is
    there), write the cards and ``OUT/report.html``; returns the demo's stored runs.

    ``threads``: torch threads; one is fastest for this tiny model and immune to busy cores."""
    console = console or Console()
    t0 = time.perf_counter()
    saved_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _run_demo(out, progress, console, backends, bits, calibrators, workers, threads, t0)
    finally:
        torch.set_num_threads(saved_threads)


def _run_demo(out: Path, progress: bool, console: Console, backends: list[str] | None,
              bits: tuple[tuple[int, int], ...], calibrators: tuple[tuple[str, str], ...], workers: int,
              threads: int, t0: float) -> list[RunRow]:
    expansion = expand(demo_sweep(backends, bits, calibrators))
    ids = {j.run_id for j in expansion.jobs}
    with open_store(resolve_store_url(None, out)) as store:
        todo = pending(expansion.jobs, store.statuses(ids))
        if len(todo) < len(expansion.jobs):
            console.print(f"{len(expansion.jobs) - len(todo)} of {len(expansion.jobs)} demo runs are already in "
                          f"{store.location}; running the other {len(todo)}")
        todo = materialize_weights(todo, out / "cache", progress)
        with sigterm_as_interrupt():
            summary = run_jobs(todo, StoreSink(store, out / "cards"), workers=workers, progress=progress,
                               console=console, threads=threads)
        rows = store.query(run_ids=ids)
        location = store.location
    for table in best_tables(leaderboards(rows)):
        console.print(table)
    if summary.interrupted:
        console.print(f"interrupted: every finished run is stored in {location}; run `quantbench demo` again to "
                      "resume")
        raise SystemExit(130)
    report = write_report(out).resolve()
    n_failed = sum(r.status != "done" for r in rows)
    console.print(f"{len(rows)} runs ({len(todo)} run now, {n_failed} failed) in {time.perf_counter() - t0:.1f} s")
    console.print(f"results store: {Path(location).resolve()}   cards: {(out / 'cards').resolve()}")
    console.print(f"report: {report}")
    console.print(f"open it in a browser: file://{report}", soft_wrap=True)
    return rows
