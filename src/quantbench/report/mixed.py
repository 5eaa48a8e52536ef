"""The report's mixed-precision section: for each mixed-precision run, its bits per layer (weights) and per
activation quantizer, with the constraint and the baselines it was compared with."""

from __future__ import annotations

import base64
from html import escape
from typing import Any

from quantbench.store import RunRow


def bits_per_layer(weights: dict[str, int], activations: dict[str, int], title: str) -> bytes:
    """Two bar charts in graph order: weight bits per layer, activation bits per quantizer."""
    from quantbench.report.plots import _grid, _png

    panels = [(n, d) for n, d in (("weights", weights), ("activations", activations)) if d]
    fig, axes = _grid(len(panels), width=max(5.0, 0.28 * max(len(d) for _, d in panels)), height=3.2)
    for ax, (name, d) in zip(axes, panels, strict=True):
        ax.bar(range(len(d)), list(d.values()), color="#3b6ea8" if name == "weights" else "#c0504d")
        ax.set_xticks(range(len(d)))
        ax.set_xticklabels(list(d), rotation=90, fontsize=6)
        ax.set_ylabel("bits")
        ax.set_ylim(0, max(d.values()) + 1)
        ax.set_title(f"{title}: {name}")
    return _png(fig)


def _row_html(r: RunRow, search: dict[str, Any]) -> str:
    alloc = r.metrics.get("allocation") or {}
    weights = {row["layer"]: row["weight_bits"] for row in (r.card or {})["mixed_precision"].get("per_layer", [])
               if isinstance(row.get("weight_bits"), int)}
    acts = dict(alloc.get("activations") or {})
    ach = search.get("achieved", {})
    targets = ", ".join(f"{k} {v}" for k, v in (("W avg", search.get("w_avg")), ("A avg", search.get("a_avg")),
                                                 ("max fmap bytes", search.get("a_max_fmap_bytes"))) if v is not None)
    base = "; ".join(f"{k} {v['quant_top1']:.2f}" for k, v in search.get("baselines", {}).items())
    def bits(v: float | None) -> str:
        return "-" if v is None else f"{v:.3f}"

    head = (f"{escape(str(r.method_label))} · {escape(str(r.model))} on {escape(str(r.backend))}: top-1 "
            f"{(r.quant_top1 or 0):.2f} ({escape(targets)}; achieved W {bits(ach.get('avg_weight_bits'))}, "
            f"A {bits(ach.get('avg_activation_bits'))}){' · baselines: ' + escape(base) if base else ''}")
    png = base64.b64encode(bits_per_layer(weights, acts, str(r.method_label))).decode("ascii")
    return (f"<h3>{head}</h3><figure><img alt=\"bits per layer\" src=\"data:image/png;base64,{png}\">"
            f"<figcaption>{escape(search.get('allowed_kind', ''))} bit-widths {search.get('allowed')}, first/last "
            f"layer {escape(str(search.get('first_last')))} the budget, {escape(str(search.get('labels')))} labels, "
            f"{search.get('images')} images, {search.get('steps')} steps.</figcaption></figure>")


def mixed_section(rows: list[RunRow]) -> str:
    """HTML for every mixed-precision run ('' when there is none)."""
    runs = [(r, s) for r in rows if (s := ((r.card or {}).get("mixed_precision") or {}).get("search"))]
    if not runs:
        return ""
    return ('<section id="mixed"><h2>Mixed precision</h2><p class="muted">Bits each layer\'s weights and each '
            "activation got from the allocation, with its constraint and baselines.</p>"
            + "".join(_row_html(r, s) for r, s in runs) + "</section>")
