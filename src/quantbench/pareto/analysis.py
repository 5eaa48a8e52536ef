"""From stored runs to seed 003's analysis: precision fronts over C_size, Def. 4.1 verdicts, the DualPrecision grid.

A run takes part through the ``pareto`` entry of its config (:mod:`quantbench.sweep.pareto`): ``front`` runs give a
point of their weight precision's front, ``dual`` runs a cell of the DualPrecision grid and ``dual-front`` runs a
point of the chosen pair's front. Runs that differ only by seed are averaged. Without a ``pareto`` entry, runs of a
sweep that vary the weight bits still form one-point-per-width fronts when asked (``any_run=True``: the pretrained
precision front of ``benchmarks/pareto.py``).
"""

from __future__ import annotations

import itertools
import statistics
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from quantbench.pareto.dominance import Verdict, dominance
from quantbench.store import RunRow

FRONT, DUAL, DUAL_FRONT = "front", "dual", "dual-front"


@dataclass(frozen=True)
class GroupKey:
    """What a front or grid is comparable over: everything but weight bits, width and seed."""

    model: str
    data: str
    backend: str
    method: str
    a_bits: int

    def title(self) -> str:
        return f"{self.model} on {self.data}, {self.backend}, {self.method}, A{self.a_bits}"


@dataclass
class Point:
    """One width of one precision (mean over seeds)."""

    c_size_bits: float
    top1: float
    width: float
    seeds: int
    run_ids: list[str]


@dataclass
class Front:
    name: str  # "W4", or "DP dw4/w1" for a DualPrecision pair
    points: list[Point]

    def pairs(self) -> list[tuple[float, float]]:
        return [(p.c_size_bits, p.top1) for p in self.points]


@dataclass
class Cell:
    depthwise_bits: int
    other_bits: int
    point: Point
    target_c_size_bits: float | None


@dataclass
class Analysis:
    """Fronts, verdicts (every pair of fronts) and the DualPrecision grid of one group."""

    key: GroupKey
    fronts: list[Front] = field(default_factory=list)
    verdicts: list[Verdict] = field(default_factory=list)
    grid: list[Cell] = field(default_factory=list)

    def best_cell(self) -> Cell | None:
        """The most accurate DualPrecision pair (ties: the smaller C_size)."""
        return max(self.grid, key=lambda c: (c.point.top1, -c.point.c_size_bits), default=None)


def c_size_of(row: RunRow) -> float | None:
    """The run's C_size in bits (seed 003 eq. 6), as measured on its prepared graph."""
    m = row.metrics or {}
    if m.get("c_size_bits") is not None:
        return float(m["c_size_bits"])
    if row.model_size_bytes is not None:
        return 8.0 * row.model_size_bytes
    return None


def _mean_point(rows: list[RunRow]) -> Point:
    sizes = [c_size_of(r) or 0.0 for r in rows]
    return Point(statistics.fmean(sizes), statistics.fmean(float(r.quant_top1 or 0.0) for r in rows),
                 float(rows[0].config.get("width_mult", 1.0)), len(rows), [r.run_id for r in rows])


def key_of(row: RunRow) -> GroupKey:
    return GroupKey(str(row.model), str(row.data), str(row.backend), str(row.method_label), int(row.a_bits or 0))


def _role(row: RunRow, any_run: bool) -> str | None:
    role = (row.config.get("pareto") or {}).get("role")
    return role if role is not None else (FRONT if any_run else None)


def analyse(rows: Iterable[RunRow], any_run: bool = False) -> list[Analysis]:
    """Every group's fronts, verdicts and grid, from finished runs with a C_size."""
    fronts: dict[GroupKey, dict[str, dict[float, list[RunRow]]]] = defaultdict(lambda: defaultdict(
        lambda: defaultdict(list)))
    cells: dict[GroupKey, dict[tuple[int, int], list[RunRow]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        role = _role(r, any_run)
        if r.status != "done" or role is None or r.quant_top1 is None or c_size_of(r) is None:
            continue
        p = r.config.get("pareto") or {}
        width = float(r.config.get("width_mult", 1.0))
        if role == FRONT:
            fronts[key_of(r)][f"W{r.w_bits}"][width].append(r)
        elif role == DUAL_FRONT:
            fronts[key_of(r)][f"DP dw{p['depthwise_bits']}/w{p['other_bits']}"][width].append(r)
        elif role == DUAL:
            cells[key_of(r)][(int(p["depthwise_bits"]), int(p["other_bits"]))].append(r)
    out = []
    for key in sorted(set(fronts) | set(cells), key=lambda k: (k.model, k.data, k.backend, k.method, k.a_bits)):
        a = Analysis(key)
        for name, by_width in sorted(fronts.get(key, {}).items(), key=lambda kv: _front_order(kv[0])):
            pts = sorted((_mean_point(rs) for rs in by_width.values()), key=lambda p: p.c_size_bits)
            a.fronts.append(Front(name, pts))
        a.verdicts = [dominance(x.pairs(), y.pairs(), x.name, y.name) for x, y in itertools.combinations(a.fronts, 2)]
        for (d, o), rs in sorted(cells.get(key, {}).items()):
            target = (rs[0].config.get("pareto") or {}).get("target_c_size_bits")
            a.grid.append(Cell(d, o, _mean_point(rs), float(target) if target is not None else None))
        out.append(a)
    return out


def _front_order(name: str) -> tuple[int, Any]:
    return (1, name) if name.startswith("DP") else (0, int(name[1:]))


def best_pairs(analyses: Iterable[Analysis]) -> dict[tuple[str, str], tuple[int, int]]:
    """``(model, method label) -> (depthwise bits, other bits)`` of the best grid cell of each group."""
    out: dict[tuple[str, str], tuple[int, int]] = {}
    for a in analyses:
        best = a.best_cell()
        if best is not None:
            out[(a.key.model, a.key.method)] = (best.depthwise_bits, best.other_bits)
    return out


def summary(a: Analysis) -> dict[str, Any]:
    """A JSON-able record of one analysis (benchmarks, the ``pareto`` command's output)."""
    best = a.best_cell()
    return {
        "group": a.key.__dict__,
        "fronts": {f.name: [p.__dict__ for p in f.points] for f in a.fronts},
        "verdicts": [v.sentence() for v in a.verdicts],
        "grid": [{"depthwise_bits": c.depthwise_bits, "other_bits": c.other_bits, **c.point.__dict__,
                  "target_c_size_bits": c.target_c_size_bits} for c in a.grid],
        "best_pair": None if best is None else {"depthwise_bits": best.depthwise_bits,
                                                "other_bits": best.other_bits, "top1": best.point.top1},
    }
