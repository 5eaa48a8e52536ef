"""The report's Pareto section (seed 003): accuracy vs C_size per weight precision, each precision's front, Def. 4.1's
verdict under the plot, the table behind it, and the DualPrecision grid as a heat map."""

from __future__ import annotations

import base64
from html import escape
from typing import Any

from quantbench.pareto.analysis import Analysis, analyse
from quantbench.store import RunRow


def front_plot(a: Analysis) -> bytes:
    """Top-1 vs C_size (log) with one line per precision, each point labelled with its width."""
    from matplotlib.ticker import NullFormatter

    from quantbench.report.plots import MARKERS, _grid, _png

    fig, (ax,) = _grid(1, width=7.0, height=4.5)
    for i, f in enumerate(a.fronts):
        xs = [p.c_size_bits / 1e6 for p in f.points]
        ys = [p.top1 for p in f.points]
        dashed = "--" if f.name.startswith("DP") else "-"
        ax.plot(xs, ys, dashed, marker=MARKERS[i % len(MARKERS)], label=f.name)
        for x, y, p in zip(xs, ys, f.points, strict=True):
            ax.annotate(f"{p.width:g}x", (x, y), textcoords="offset points", xytext=(3, 3), fontsize=7)
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(NullFormatter())  # minor log ticks unlabelled: their labels overlap
    ax.set(xlabel="C_size (10^6 bits, seed 003 eq. 6; log)", ylabel="top-1 (%)", title=a.key.title())
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="lower right")
    return _png(fig)


def grid_plot(a: Analysis) -> bytes:
    """Heat map of top-1 over (depthwise bits, other bits), each cell with its width."""
    import numpy as np

    from quantbench.report.plots import _grid, _png

    dws = sorted({c.depthwise_bits for c in a.grid})
    others = sorted({c.other_bits for c in a.grid})

    acc = np.full((len(dws), len(others)), np.nan)
    for c in a.grid:
        acc[dws.index(c.depthwise_bits), others.index(c.other_bits)] = c.point.top1
    fig, (ax,) = _grid(1, width=5.5, height=4.5)
    im = ax.imshow(acc, cmap="viridis", origin="lower", aspect="auto")
    mid = (np.nanmin(acc) + np.nanmax(acc)) / 2
    for c in a.grid:  # light text on the dark (low) end of viridis, dark text on the bright end
        ax.text(others.index(c.other_bits), dws.index(c.depthwise_bits), f"{c.point.top1:.1f}\n{c.point.width:.2f}x",
                ha="center", va="center", fontsize=8, color="white" if c.point.top1 < mid else "black")
    fig.colorbar(im, ax=ax, label="top-1 (%)")
    ax.set_xticks(range(len(others)), [str(b) for b in others])
    ax.set_yticks(range(len(dws)), [str(b) for b in dws])
    ax.set(xlabel="other layers' weight bits", ylabel="depthwise weight bits",
           title=f"DualPrecision at equal C_size: {a.key.model}")
    return _png(fig)


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}">'


def _table(a: Analysis) -> str:
    body = "".join(
        f"<tr><td>{escape(f.name)}</td><td class=\"num\">{p.width:g}</td><td class=\"num\">{p.c_size_bits / 1e6:.4f}"
        f"</td><td class=\"num\">{p.top1:.2f}</td><td class=\"num\">{p.seeds}</td><td>{escape(', '.join(p.run_ids))}"
        "</td></tr>" for f in a.fronts for p in f.points)
    return ('<div class="table-wrap"><table class="sortable"><thead><tr><th>precision</th><th>width</th>'
            "<th>C_size (10^6 bits)</th><th>top-1</th><th>seeds</th><th>runs</th></tr></thead>"
            f"<tbody>{body}</tbody></table></div>")


def _grid_html(a: Analysis) -> str:
    best = a.best_cell()
    assert best is not None
    targets = {c.target_c_size_bits for c in a.grid if c.target_c_size_bits}
    target = f" (target C_size {next(iter(targets)) / 1e6:.4g}·10^6 bits)" if len(targets) == 1 else ""
    sentence = (f"Best pair: depthwise convs at {best.depthwise_bits} bits, the other layers at {best.other_bits} "
                f"bits: top-1 {best.point.top1:.2f} at width {best.point.width:.3g}x, C_size "
                f"{best.point.c_size_bits / 1e6:.4g}·10^6 bits{target}.")
    body = "".join(
        f"<tr><td class=\"num\">{c.depthwise_bits}</td><td class=\"num\">{c.other_bits}</td><td class=\"num\">"
        f"{c.point.width:.4g}</td><td class=\"num\">{c.point.c_size_bits / 1e6:.4f}</td><td class=\"num\">"
        f"{c.point.top1:.2f}</td></tr>" for c in a.grid)
    return (f"<h4>DualPrecision grid (seed 003 section 6)</h4><figure>{_img(grid_plot(a), 'DualPrecision grid')}"
            f"<figcaption>{escape(sentence)} Every cell's width is matched to the reference model's C_size; "
            "<code>quantbench pareto</code> then runs the best pair across widths.</figcaption></figure>"
            '<div class="table-wrap"><table class="sortable"><thead><tr><th>depthwise bits</th><th>other bits</th>'
            "<th>width</th><th>C_size (10^6 bits)</th><th>top-1</th></tr></thead>"
            f"<tbody>{body}</tbody></table></div>")


def _analysis_html(a: Analysis) -> str:
    parts = [f"<h3>{escape(a.key.title())}</h3>"]
    if a.fronts:
        verdicts = "".join(f"<li>{escape(v.sentence())}</li>" for v in a.verdicts) or \
            "<li>One precision only: no verdict to give.</li>"
        parts.append(f"<figure>{_img(front_plot(a), 'accuracy vs C_size')}<figcaption>Each line is one weight "
                     "precision across width multipliers (labels); its points are its front. Def. 4.1: precision A "
                     "dominates B if it is more accurate at every size in the overlap of their ranges (accuracy "
                     f"interpolated in log C_size).</figcaption></figure><ul class=\"verdicts\">{verdicts}</ul>")
        parts.append(_table(a))
    if a.grid:
        parts.append(_grid_html(a))
    return "".join(parts)


def pareto_section(rows: list[RunRow], any_run: bool = False) -> str:
    """HTML of every Pareto analysis in ``rows`` ('' when no run takes part)."""
    analyses = analyse(rows, any_run)
    if not analyses:
        return ""
    return ('<section id="pareto"><h2>Pareto: accuracy vs model size</h2><p class="muted">Seed 003: which weight '
            "precision is most accurate at a given model size C_size = Σ b·C_in·K_w·K_h when the network may be "
            "made wider or narrower to spend the bits. Runs of a sweep's <code>pareto:</code> section.</p>"
            + "".join(_analysis_html(a) for a in analyses) + "</section>")


def pareto_json(rows: list[RunRow], any_run: bool = False) -> list[dict[str, Any]]:
    from quantbench.pareto.analysis import summary

    return [summary(a) for a in analyse(rows, any_run)]
