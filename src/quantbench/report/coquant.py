"""The report's CoQuant section (seed 002): top-1 against the evaluated bit-width for each trained network, the
trained bit-widths filled, the zero-shot ones (BN-calibrated) hollow, and the table behind the plot."""

from __future__ import annotations

import base64
from collections import defaultdict
from html import escape

from quantbench.store import RunRow

Key = tuple[str, str, str, tuple[int, ...]]  # model, backend, method label, trained set B


def coquant_groups(rows: list[RunRow]) -> dict[Key, list[RunRow]]:
    """Finished ``coquant`` rows per trained network, sorted by evaluated bit-width (highest first)."""
    groups: dict[Key, list[RunRow]] = defaultdict(list)
    for r in rows:
        if r.method == "coquant" and r.status == "done" and r.quant_top1 is not None and r.w_bits is not None:
            trained = tuple(int(b) for b in r.metrics.get("trained_bits", []))
            groups[(r.model or "?", r.backend or "?", r.method_label or "coquant", trained)].append(r)
    return {k: sorted(v, key=lambda r: -int(r.w_bits or 0)) for k, v in sorted(groups.items())}


def bits_plot(groups: dict[Key, list[RunRow]]) -> bytes:
    """Top-1 vs evaluated bit-width, one line per trained network: filled = trained, hollow = zero-shot."""
    from quantbench.report.plots import MARKERS, _grid, _png

    fig, (ax,) = _grid(1, width=7.0, height=4.5)
    for i, (key, runs) in enumerate(groups.items()):
        bits = [int(r.w_bits or 0) for r in runs]
        top1 = [float(r.quant_top1 or 0.0) for r in runs]
        marker = MARKERS[i % len(MARKERS)]
        (line,) = ax.plot(bits, top1, "-", label=f"{key[0]} {key[2]} (B = {{{', '.join(map(str, key[3]))}}})")
        zero = [r.metrics.get("zero_shot", False) for r in runs]
        ax.scatter([b for b, z in zip(bits, zero, strict=True) if not z],
                   [t for t, z in zip(top1, zero, strict=True) if not z], marker=marker, color=line.get_color(),
                   zorder=3)
        ax.scatter([b for b, z in zip(bits, zero, strict=True) if z],
                   [t for t, z in zip(top1, zero, strict=True) if z], marker=marker, facecolors="white",
                   edgecolors=line.get_color(), zorder=3)
        fp = runs[0].fp_top1
        if fp is not None:
            ax.axhline(fp, color=line.get_color(), lw=0.8, ls=":")
    ax.set(xlabel="evaluated bit-width (weights and activations)", ylabel="top-1 (%)",
           title="CoQuant: one network at every bit-width (filled: trained, hollow: zero-shot; dotted: FP32)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    return _png(fig)


def _table(groups: dict[Key, list[RunRow]]) -> str:
    body = "".join(
        f"<tr><td>{escape(key[0])}</td><td>{escape(key[2])}</td><td>{escape(str(list(key[3])))}</td>"
        f"<td class=\"num\">{r.w_bits}</td><td>{'zero-shot' if r.metrics.get('zero_shot') else 'trained'}</td>"
        f"<td class=\"num\">{r.metrics.get('bn_calib_images') or ''}</td><td class=\"num\">{r.quant_top1:.2f}</td>"
        f"<td class=\"num\">{100 * (r.agreement or 0.0):.1f}</td><td>{escape(r.run_id)}</td></tr>"
        for key, runs in groups.items() for r in runs)
    return ('<div class="table-wrap"><table class="sortable"><thead><tr><th>model</th><th>method</th><th>B</th>'
            "<th>bits</th><th>kind</th><th>BN images</th><th>top-1</th><th>agreement %</th><th>run</th></tr>"
            f"</thead><tbody>{body}</tbody></table></div>")


def coquant_section(rows: list[RunRow]) -> str:
    """HTML of the CoQuant rows in ``rows`` ('' when there are none)."""
    groups = coquant_groups(rows)
    if not groups:
        return ""
    png = base64.b64encode(bits_plot(groups)).decode("ascii")
    return ('<section id="coquant"><h2>CoQuant: one network, several bit-widths</h2><p class="muted">Seed 002: '
            "each line is one network trained jointly over its set B and evaluated at every bit-width of the sweep; "
            "a bit-width outside B is zero-shot (its BatchNorm calibrated on training images). Each row's card "
            "lists the interpretations in force.</p>"
            f'<figure><img alt="top-1 vs bit-width" src="data:image/png;base64,{png}"></figure>'
            f"{_table(groups)}</section>")
