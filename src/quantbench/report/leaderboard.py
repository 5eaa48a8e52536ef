"""Leaderboard rows from stored runs: grouped by model and dataset, best quantized top-1 first."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from quantbench.data import parse_spec
from quantbench.store import RunRow


@dataclass(frozen=True)
class Entry:
    """One finished run as the leaderboard shows it (top-1 in percent, agreement as a fraction)."""

    run_id: str
    sweep: str
    model: str
    data: str
    backend: str
    w_bits: int
    a_bits: int
    method: str
    fp_top1: float
    quant_top1: float
    agreement: float
    size_bytes: float
    fp32_size_bytes: float
    calib_seconds: float
    wall_seconds: float
    seed: int

    @property
    def bits(self) -> str:
        return f"W{self.w_bits}A{self.a_bits}"

    @property
    def delta(self) -> float:
        return self.quant_top1 - self.fp_top1

    @property
    def relative_degradation(self) -> float:
        """Relative accuracy degradation in percent of the baseline (seed 004 section 2.5)."""
        return 100.0 * (self.fp_top1 - self.quant_top1) / self.fp_top1 if self.fp_top1 else 0.0


def short_data(spec: str) -> str:
    kind, path = parse_spec(spec)
    return kind if path is None or Path(path).name == kind else f"{kind}:{Path(path).name}"


def entry(row: RunRow) -> Entry:
    m = row.metrics
    return Entry(run_id=row.run_id, sweep=row.sweep or "", model=row.model or "?", data=short_data(row.data or "?"),
                 backend=row.backend or "?", w_bits=int(row.w_bits or 0), a_bits=int(row.a_bits or 0),
                 method=row.method_label or row.method or "?", fp_top1=float(row.fp_top1 or 0.0),
                 quant_top1=float(row.quant_top1 or 0.0), agreement=float(row.agreement or 0.0),
                 size_bytes=float(row.model_size_bytes or 0), fp32_size_bytes=float(m.get("fp32_size_bytes") or 0),
                 calib_seconds=float(m.get("calib_seconds") or 0.0),
                 wall_seconds=float(row.wall_seconds or 0.0), seed=int(row.seed or 0))


def leaderboards(rows: list[RunRow]) -> dict[tuple[str, str], list[Entry]]:
    """(model, data) -> entries of finished runs, best quantized top-1 (then agreement) first."""
    groups: dict[tuple[str, str], list[Entry]] = defaultdict(list)
    for r in rows:
        if r.status == "done" and r.quant_top1 is not None:
            e = entry(r)
            groups[(e.model, e.data)].append(e)
    return {k: sorted(v, key=lambda e: (-e.quant_top1, -e.agreement, e.backend, e.bits, e.method))
            for k, v in sorted(groups.items())}


COLUMNS = ("#", "backend", "W/A", "method", "FP top-1", "quant top-1", "Δ", "rel. degr. %", "agreement",
           "size KiB", "calib s", "run")


def cells(rank: int, e: Entry) -> list[str]:
    """The leaderboard's text cells for one entry (the order of :data:`COLUMNS`)."""
    return [str(rank), e.backend, e.bits, e.method, f"{e.fp_top1:.2f}", f"{e.quant_top1:.2f}", f"{e.delta:+.2f}",
            f"{e.relative_degradation:.2f}", f"{100 * e.agreement:.1f}%", f"{e.size_bytes / 1024:.1f}",
            f"{e.calib_seconds:.2f}", e.run_id]


def to_markdown(boards: dict[tuple[str, str], list[Entry]]) -> str:
    """Every leaderboard as a Markdown table."""
    out = []
    for (model, data), entries in boards.items():
        out += [f"### {model} on {data}", "", "| " + " | ".join(COLUMNS) + " |",
                "|" + "|".join(" ---: " if c not in ("backend", "W/A", "method", "run") else " --- "
                               for c in COLUMNS) + "|"]
        out += ["| " + " | ".join(cells(i, e)) + " |" for i, e in enumerate(entries, 1)]
        out.append("")
    return "\n".join(out)
