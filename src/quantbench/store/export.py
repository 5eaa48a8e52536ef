"""Export stored runs as CSV (flat columns and metrics) or JSON (everything, card included)."""

from __future__ import annotations

import csv
import io
import json
from dataclasses import asdict
from typing import Any

from quantbench.store.db import RunRow

CSV_FIRST = ("run_id", "sweep", "status", "model", "data", "backend", "w_bits", "a_bits", "method", "method_label",
             "seed", "fp_top1", "quant_top1", "agreement", "model_size_bytes", "wall_seconds")


def to_csv(rows: list[RunRow]) -> str:
    """One line per run: the store's scalar columns first, then every scalar metric."""
    flat = [r.flat() for r in rows]
    extra = sorted({k for f in flat for k in f} - set(CSV_FIRST) - {"error"})
    fields = [*CSV_FIRST, *extra, "error"]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for f in flat:
        writer.writerow({k: ("" if v is None else v) for k, v in f.items()})
    return buf.getvalue()


def to_json(rows: list[RunRow]) -> str:
    """Every run with its config, metrics, environment and card."""
    payload: list[dict[str, Any]] = [asdict(r) for r in rows]
    return json.dumps(payload, indent=2, sort_keys=True) + "\n"


FORMATS = {"csv": to_csv, "json": to_json}
