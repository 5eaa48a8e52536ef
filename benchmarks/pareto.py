"""Seed 003's Pareto question at CPU scale: the ResNet-20 smoke-scale width x precision front (trained from scratch)
and the pretrained ResNet-20 / ResNet-32 precision front (PTQ and 1-epoch QAT at 1.0x), as tables and JSON.

    python benchmarks/pareto.py --smoke        # pareto_resnet20_smoke.yaml: 6 runs, about 15 minutes on 2 cores
    python benchmarks/pareto.py --pretrained   # pareto_pretrained.yaml: 18 runs, about 10 minutes
    python benchmarks/pareto.py                # both

Runs go through the sweep machinery into ``benchmarks/results/pareto/quantbench.db`` (runs already there are not
run again); ``quantbench report --out benchmarks/results/pareto`` draws the fronts. Torch uses one thread.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from _common import RESULTS, print_table, write_json
from quantbench.cli.bench import run_sweep_file
from quantbench.cli.options import open_results
from quantbench.pareto.analysis import analyse, c_size_of, summary
from quantbench.store import RunRow

HERE = Path(__file__).resolve().parent
SWEEPS = {"smoke": HERE / "pareto_resnet20_smoke.yaml", "pretrained": HERE / "pareto_pretrained.yaml"}
NAMES = {"smoke": "pareto-resnet20-smoke", "pretrained": "pareto-pretrained"}


def _rows(out: Path, sweep: str) -> list[RunRow]:
    with open_results(out, None, create=False) as st:
        return [r for r in st.query(sweep=sweep) if r.status == "done"]


def _on_front(rows: list[RunRow]) -> set[str]:
    """Runs no other run beats with a C_size at most theirs and a higher top-1 (the Pareto-optimal set)."""
    pts = [(c_size_of(r) or 0.0, float(r.quant_top1 or 0.0), r.run_id) for r in rows]
    return {rid for s, a, rid in pts if not any(s2 <= s and a2 > a for s2, a2, _ in pts)}


def smoke(out: Path) -> dict[str, Any]:
    rows = _rows(out, NAMES["smoke"])
    analyses = analyse(rows)
    for a in analyses:
        table = [[f.name, p.width, p.c_size_bits / 1e6, p.top1] for f in a.fronts for p in f.points]
        print_table(f"smoke-scale front: {a.key.title()}", ["precision", "width", "C_size 1e6 bits", "top-1"], table)
        for v in a.verdicts:
            print(" ", v.sentence())
    seconds = {r.run_id: r.metrics.get("train_seconds") for r in rows}
    return {"analyses": [summary(a) for a in analyses], "train_seconds": seconds}


def pretrained(out: Path) -> dict[str, Any]:
    rows = sorted(_rows(out, NAMES["pretrained"]), key=lambda r: (c_size_of(r) or 0.0))
    front = _on_front(rows)
    table = [[r.model, r.method_label, f"W{r.w_bits}A{r.a_bits}", (c_size_of(r) or 0.0) / 1e6,
              float(r.quant_top1 or 0.0), "yes" if r.run_id in front else ""] for r in rows]
    print_table("pretrained precision front (1.0x; front: no smaller model is more accurate)",
                ["model", "method", "bits", "C_size 1e6 bits", "top-1", "on the front"], table)
    return {"rows": [{"run_id": r.run_id, "model": r.model, "method": r.method_label, "w_bits": r.w_bits,
                      "a_bits": r.a_bits, "c_size_bits": c_size_of(r), "top1": r.quant_top1,
                      "fp_top1": r.fp_top1, "on_front": r.run_id in front} for r in rows]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="the ResNet-20 width x precision front from scratch")
    p.add_argument("--pretrained", action="store_true", help="the pretrained ResNet-20/32 precision front")
    p.add_argument("--out", type=Path, default=RESULTS / "pareto", help="store folder")
    p.add_argument("--no-run", action="store_true", help="only tabulate what the store holds")
    args = p.parse_args()
    torch.set_num_threads(1)
    chosen = [k for k in SWEEPS if getattr(args, k)] or list(SWEEPS)
    con = Console(width=160)
    if not args.no_run:
        for k in chosen:
            run_sweep_file(SWEEPS[k], args.out, None, 1, "skip", False, False, con, threads=1)
    payload = {k: {"smoke": smoke, "pretrained": pretrained}[k](args.out) for k in chosen}
    print("wrote", write_json("pareto", payload))


if __name__ == "__main__":
    main()
