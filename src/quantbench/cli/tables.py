"""Rich tables for results and backends."""

from __future__ import annotations

from collections.abc import Iterable

from rich.table import Table

from quantbench.backends import BackendSpec
from quantbench.ptq.pipeline import PTQResult


def backends_table(specs: Iterable[BackendSpec]) -> Table:
    t = Table(title="Backends (src/quantbench/backends/specs/*.yaml)")
    for col in ("backend", "weights", "activations", "quantized ops", "BN fold", "first/last", "deployable"):
        t.add_column(col)
    for s in specs:
        t.add_row(s.name, s.weight.describe(), s.activation.describe(), s.quantized_ops(),
                  "yes" if s.fold_bn else "no", str(s.first_last), "yes" if s.deployable else "no")
    return t


def results_table(results: Iterable[PTQResult], title: str = "PTQ results") -> Table:
    results = list(results)
    recon = any(r.recon_seconds is not None for r in results)  # reconstruction columns only when there is one
    t = Table(title=title)
    numeric = ("FP top-1", "quant top-1", "Δ", "agree", "calib s", "recon s")
    for col in ("model", "backend", "W/A", "w obs", "a obs", *(("rounding",) if recon else ()), "FP top-1",
                "quant top-1", "Δ", "agree", "calib s", *(("recon s",) if recon else ())):
        t.add_column(col, justify="right" if col in numeric else "left")
    for r in results:
        delta = r.quant_top1 - r.fp_top1
        color = "green" if delta > -0.5 else ("yellow" if delta > -2 else "red")
        t.add_row(r.model, r.backend, f"W{r.w_bits}A{r.a_bits}", r.w_observer, r.a_observer,
                  *((r.method,) if recon else ()), f"{r.fp_top1:.2f}", f"{r.quant_top1:.2f}",
                  f"[{color}]{delta:+.2f}[/{color}]", f"{100 * r.agreement:.1f}%", f"{r.calib_seconds:.2f}",
                  *((f"{r.recon_seconds or 0.0:.1f}",) if recon else ()))
    return t
