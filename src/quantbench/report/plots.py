"""The report's figures as PNG bytes (matplotlib, Agg backend, no display needed)."""

from __future__ import annotations

import io
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter, ScalarFormatter

from quantbench.report.leaderboard import Entry

Boards = dict[tuple[str, str], list[Entry]]
MARKERS = "osD^v<>pPX*h"


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _bits_order(entries: list[Entry]) -> list[str]:
    return [f"W{w}A{a}" for w, a in sorted({(e.w_bits, e.a_bits) for e in entries})]


def _grid(n: int, width: float = 6.0, height: float = 4.0) -> tuple[Figure, list[plt.Axes]]:
    cols = min(n, 2)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    flat = list(axes.flat)
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat[:n]


def accuracy_vs_bits(boards: Boards) -> bytes:
    """Best quantized top-1 over methods at each bit-width pair, one line per backend, per model."""
    fig, axes = _grid(len(boards))
    for ax, ((model, data), entries) in zip(axes, boards.items(), strict=True):
        order = _bits_order(entries)
        best: dict[str, dict[str, float]] = defaultdict(dict)
        for e in entries:
            best[e.backend][e.bits] = max(best[e.backend].get(e.bits, 0.0), e.quant_top1)
        for i, (backend, by_bits) in enumerate(sorted(best.items())):
            xs = [order.index(b) for b in order if b in by_bits]
            ax.plot(xs, [by_bits[order[x]] for x in xs], marker=MARKERS[i % len(MARKERS)], label=backend)
        ax.axhline(entries[0].fp_top1, color="gray", linestyle="--", linewidth=1, label="FP32")
        ax.set_xticks(range(len(order)), order)
        ax.set_xlim(-0.5, len(order) - 0.5)
        ax.set(title=f"{model} on {data}", xlabel="weight / activation bits", ylabel="quantized top-1 (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    fig.suptitle("Accuracy vs bit-width per backend (best calibrator)")
    return _png(fig)


def calibrator_comparison(boards: Boards) -> bytes:
    """Quantized top-1 of every method, grouped by backend, one panel per model and bit-width pair."""
    panels = [(k, bits, [e for e in entries if e.bits == bits]) for k, entries in boards.items()
              for bits in _bits_order(entries)]
    fig, axes = _grid(len(panels), width=7.0, height=3.8)
    for ax, ((model, data), bits, entries) in zip(axes, panels, strict=True):
        backends = sorted({e.backend for e in entries})
        methods = sorted({e.method for e in entries})
        width = 0.8 / max(1, len(methods))
        acc = {(e.backend, e.method): e.quant_top1 for e in entries}
        for j, m in enumerate(methods):
            xs = [i + (j - (len(methods) - 1) / 2) * width for i in range(len(backends))]
            ax.bar(xs, [acc.get((b, m), 0.0) for b in backends], width, label=m)
        vals = [e.quant_top1 for e in entries]
        lo = max(0.0, min(vals) - max(2.0, 0.1 * (max(vals) - min(vals))))
        ax.set_ylim(lo, min(100.0, max(max(vals), entries[0].fp_top1) + 1.0))
        ax.axhline(entries[0].fp_top1, color="gray", linestyle="--", linewidth=1, label="FP32")
        ax.set_xticks(range(len(backends)), backends, rotation=30, ha="right")
        ax.set(title=f"{model} on {data}, {bits}", ylabel="quantized top-1 (%)")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7, ncol=2, loc="lower right")
    fig.suptitle("Calibrator comparison")
    fig.tight_layout()
    return _png(fig)


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Points not dominated by a smaller-or-equal, at-least-as-accurate one, by increasing size."""
    front: list[tuple[float, float]] = []
    for size, acc in sorted(points, key=lambda p: (p[0], -p[1])):
        if not front or acc > front[-1][1]:
            front.append((size, acc))
    return front


def size_scatter(boards: Boards) -> bytes:
    """Quantized top-1 vs model size (seed 003 eq. 6), colour by bit-widths, marker by backend; Pareto front."""
    fig, axes = _grid(len(boards))
    for ax, ((model, data), entries) in zip(axes, boards.items(), strict=True):
        order = _bits_order(entries)
        backends = sorted({e.backend for e in entries})
        colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        for e in entries:
            ax.scatter(e.size_bytes / 1024, e.quant_top1, color=colors[order.index(e.bits) % len(colors)],
                       marker=MARKERS[backends.index(e.backend) % len(MARKERS)], s=36, alpha=0.8,
                       edgecolors="none")
        fp_kib = max(e.fp32_size_bytes for e in entries) / 1024
        ax.scatter([fp_kib], [entries[0].fp_top1], marker="*", s=140, color="black", label="FP32 model")
        front = pareto_front([(e.size_bytes / 1024, e.quant_top1) for e in entries])
        ax.step([p[0] for p in front], [p[1] for p in front], where="post", color="black", linewidth=1,
                label="Pareto front")
        ax.axhline(entries[0].fp_top1, color="gray", linestyle="--", linewidth=1, label="FP32 top-1")
        for i, b in enumerate(order):
            ax.scatter([], [], color=colors[i % len(colors)], marker="s", label=b)
        for i, b in enumerate(backends):
            ax.scatter([], [], color="gray", marker=MARKERS[i % len(MARKERS)], label=b)
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
        ticks: list[float] = []
        for size in sorted({round(e.size_bytes / 1024, 1) for e in entries} | {round(fp_kib, 1)}):
            if not ticks or size > 1.3 * ticks[-1]:  # no overlapping labels
                ticks.append(size)
        ax.set_xticks(ticks)
        ax.set(title=f"{model} on {data}", xlabel="model size C_size (KiB, log scale)", ylabel="quantized top-1 (%)")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7, ncol=2, loc="lower right")
    fig.suptitle("Accuracy vs model size (Pareto view)")
    return _png(fig)


#: (anchor, title, caption, function) of every figure in the report.
FIGURES = (
    ("accuracy-vs-bits", "Accuracy vs bit-width", "Best quantized top-1 over calibrators at each bit-width pair, "
     "one line per backend; the dashed line is the FP32 model.", accuracy_vs_bits),
    ("calibrators", "Calibrator comparison", "Quantized top-1 of each calibrator (method), grouped by backend.",
     calibrator_comparison),
    ("pareto", "Accuracy vs model size", "Each run's quantized top-1 against its model size C_size (weights at "
     "their bit-widths, biases and unfolded BN at 32 bits; seed 003 eq. 6); the line is the Pareto front.",
     size_scatter),
)
