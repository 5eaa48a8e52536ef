"""``quantbench pareto SWEEP.yaml``: seed 003's analysis end to end.

1. Run the sweep (its product, the ``pareto.widths`` fronts and the DualPrecision grid), as ``quantbench bench``.
2. Pick the best (depthwise bits, other bits) pair of each grid and run it at ``pareto.dual_precision.widths``.
3. Print every Def. 4.1 verdict and the best pairs, write ``OUT/pareto.json`` and the HTML report.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.text import Text

from quantbench.cli.bench import OnInvalid, OnInvalidOpt, ThreadsOpt, WorkersOpt, console, run_sweep_file
from quantbench.cli.errors import friendly_errors
from quantbench.cli.options import DEFAULT_OUT, OutOpt, StoreOpt, open_results


@friendly_errors
def pareto(
    sweep: Annotated[Path, typer.Argument(help="sweep YAML with a pareto: section (examples/pareto_digits.yaml)")],
    out: OutOpt = DEFAULT_OUT,
    store: StoreOpt = None,
    workers: WorkersOpt = 1,
    threads: ThreadsOpt = None,
    on_invalid: OnInvalidOpt = OnInvalid.refuse,
    quiet: Annotated[bool, typer.Option("--quiet", help="no progress bar")] = False,
) -> None:
    """Fronts per precision, the DualPrecision grid, then the best pair across widths; verdicts and report."""
    from quantbench.cli.results import write_report
    from quantbench.errors import ConfigError
    from quantbench.pareto.analysis import analyse, best_pairs, summary
    from quantbench.sweep.expand import combinations, resolve_spec
    from quantbench.sweep.load import load_sweep
    from quantbench.sweep.pareto import dual_combinations
    from quantbench.utils.io import atomic_write_text

    spec = load_sweep(sweep)
    if spec.spec.pareto is None:
        raise ConfigError(f"{sweep} has no pareto: section (widths and/or dual_precision); see "
                          "examples/pareto_digits.yaml, or run it with quantbench bench")
    args = dict(out=out, store_url=store, workers=workers, on_invalid=on_invalid.value, progress=not quiet,
                dry_run=False, con=console, threads=threads)
    code = run_sweep_file(sweep, **args)  # type: ignore[arg-type]
    base = [c for c in combinations(spec) if not (c.extra.get("pareto") or {}).get("role", "").startswith("dual")]

    def stored() -> list:  # type: ignore[type-arg]
        with open_results(out, store, create=False) as st:
            return st.query(sweep=spec.spec.name)

    pairs = best_pairs(analyse(stored()))
    dp = spec.spec.pareto.dual_precision
    if pairs and dp is not None and dp.widths:
        for (model, method), (d, o) in pairs.items():
            console.print(f"DualPrecision {model} ({method}): best pair depthwise {d} bits / others {o} bits; running "
                          f"it at widths {', '.join(f'{w:g}' for w in dp.widths)}")
        code = max(code, run_sweep_file(sweep, **args, combos=dual_combinations(spec, base, resolve_spec, pairs)))
    analyses = analyse(stored())
    for a in analyses:
        console.print(Text(a.key.title(), style="bold"))
        for v in a.verdicts:
            console.print(f"  {v.sentence()}")
    path = out / "pareto.json"
    atomic_write_text(path, json.dumps([summary(a) for a in analyses], indent=2, default=str) + "\n")
    report = write_report(out, store, output=out / "report.html")
    console.print(f"pareto: {path}; report: {report}")
    if code:
        raise typer.Exit(code)


def register(app: typer.Typer) -> None:
    app.command("pareto")(pareto)
