"""``quantbench units``: the reconstruction units of a model for a backend (what AdaRound/BRECQ/QDrop learn on)."""

from __future__ import annotations

import json
import sys
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from quantbench.cli.errors import friendly_errors
from quantbench.cli.options import ABitsOpt, WBitsOpt, WidthMultOpt

console = Console(width=None if sys.stdout.isatty() else 160)


def units(
    model: Annotated[str, typer.Option(help="model name (see `quantbench models`)")],
    backend: Annotated[str, typer.Option(help="backend name or a spec .yaml")] = "academic",
    w_bits: WBitsOpt = None,
    a_bits: ABitsOpt = None,
    width_mult: WidthMultOpt = 1.0,
    granularity: Annotated[str, typer.Option(help="block (BRECQ, QDrop) or layer (AdaRound)")] = "block",
    as_json: Annotated[bool, typer.Option("--json", help="print the partition as JSON")] = False,
) -> None:
    """Print the partition of the model into reconstruction units for the backend's placement."""
    import torch

    from quantbench.config import PTQConfig
    from quantbench.graph.quantize import prepare
    from quantbench.models import build_model, get_entry
    from quantbench.recon.units import format_partition, partition

    cfg = PTQConfig(model=model, backend=backend, w_bits=w_bits, a_bits=a_bits, width_mult=width_mult)
    entry = get_entry(model)
    net = build_model(model, None, width_mult)
    gm = prepare(net, cfg.resolved_backend(), torch.zeros(1, *entry.input_size))
    if granularity not in ("block", "layer"):
        raise typer.BadParameter(f"--granularity {granularity!r}: use block or layer")
    rows = format_partition(partition(gm, granularity))  # type: ignore[arg-type]
    if as_json:
        console.print_json(json.dumps(rows))
        return
    t = Table(title=f"Reconstruction units of {model} for {backend} ({granularity})")
    for col in ("unit", "input", "output", "layers", "activation quantizers"):
        t.add_column(col)
    for r in rows:
        t.add_row(str(r["unit"]), str(r["input"]), str(r["output"]), ", ".join(r["layers"]),  # type: ignore[arg-type]
                  ", ".join(r["activation_quantizers"]) or "-")  # type: ignore[arg-type]
    console.print(t)
    n_layers = sum(len(r["layers"]) for r in rows)  # type: ignore[arg-type, misc]
    console.print(f"{len(rows)} units, {n_layers} conv/linear layers, each in exactly one unit")


def register(app: typer.Typer) -> None:
    app.command("units")(friendly_errors(units))
