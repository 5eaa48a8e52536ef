"""One self-contained static HTML page: leaderboards, plots (embedded PNGs) and every run's card."""

from __future__ import annotations

import base64
from datetime import datetime, timezone
from html import escape
from typing import Any

from quantbench.cards.render import details, summary_rows
from quantbench.report.assets import CSS, JS
from quantbench.report.coquant import coquant_section
from quantbench.report.leaderboard import COLUMNS, Entry, cells, leaderboards
from quantbench.report.mixed import mixed_section
from quantbench.report.pareto import pareto_section
from quantbench.report.plots import FIGURES
from quantbench.report.synthetic import synthetic_section
from quantbench.store import RunRow

NUMERIC = {"#", "FP top-1", "quant top-1", "Δ", "rel. degr. %", "agreement", "size KiB", "calib s"}


def _e(v: Any) -> str:
    return escape(str(v), quote=True)


def _delta_class(d: float) -> str:
    return "good" if d > -0.5 else ("warn" if d > -2 else "bad")


def _leaderboard_table(idx: int, entries: list[Entry]) -> str:
    head = "".join(f'<th class="{"num" if c in NUMERIC else ""}" scope="col">{_e(c)}</th>' for c in COLUMNS)
    body = []
    for rank, e in enumerate(entries, 1):
        tds = []
        for col, text in zip(COLUMNS, cells(rank, e), strict=True):
            cls = "num" if col in NUMERIC else ""
            if col == "Δ":
                cls += f" {_delta_class(e.delta)}"
            link = f'<a class="card-link" href="#card-{_e(e.run_id)}">{_e(text)}</a>'
            text_html = link if col == "run" else _e(text)
            value = {"agreement": f"{e.agreement:.6f}", "W/A": f"{e.w_bits:02d}{e.a_bits:02d}"}.get(col)
            attr = f' data-value="{_e(value)}"' if value else ""
            tds.append(f'<td class="{cls.strip()}"{attr}>{text_html}</td>')
        body.append("<tr>" + "".join(tds) + "</tr>")
    return (f'<input class="filter" type="search" data-table="lb-{idx}" data-count="lb-{idx}-count" '
            f'placeholder="filter rows, e.g. tensorrt W4A8 mse" aria-label="filter leaderboard">'
            f'<span class="count" id="lb-{idx}-count"></span>'
            f'<div class="table-wrap"><table class="sortable leaderboard" id="lb-{idx}"><thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(body)}</tbody></table></div>')


def _kv_table(rows: list[tuple[str, str]], cls: str = "") -> str:
    body = "".join(f"<tr><td>{_e(k)}</td><td>{_e(v)}</td></tr>" for k, v in rows)
    return f'<table class="{cls}"><tbody>{body}</tbody></table>'


def _card_html(row: RunRow) -> str:
    card = row.card or {}
    r = card.get("run", {})
    title = (f"{r.get('model', row.model)} · {r.get('backend', row.backend)} · {r.get('method_label', '')} · "
             f"W{r.get('w_bits', row.w_bits)}A{r.get('a_bits', row.a_bits)} · run {row.run_id}")
    parts = [f'<details class="card" id="card-{_e(row.run_id)}"><summary>{_e(title)}</summary>',
             "<h4>Quantization card</h4>", _kv_table(summary_rows(card), "card-summary"), '<div class="card-details">']
    for section, rows in details(card):
        parts.append(f"<div><h4>{_e(section.replace('_', ' ').capitalize())}</h4>{_kv_table(rows)}</div>")
    env = row.environment
    parts.append(f"<div><h4>Environment</h4>{_kv_table([(k, str(v)) for k, v in env.items()])}</div>")
    parts.append("</div></details>")
    return "".join(parts)


def _timing_table(done: list[RunRow]) -> str:
    """Runs that measured latency or trained, with those figures; a note when none did."""
    timed = [r for r in done if r.metrics.get("latency_ms") or r.metrics.get("train_seconds")]
    if not timed:
        return ('<p class="muted">No latency measurements or training runs among these runs: they are post-training '
                "quantization runs without deployment export (n/a in their cards). They are listed here when runs "
                "record them.</p>")

    def fmt(v: Any, digits: int) -> str:
        return f"{float(v):.{digits}f}" if isinstance(v, (int, float)) else "n/a"

    body = "".join(
        f"<tr><td>{_e(r.run_id)}</td><td>{_e(r.model)}</td><td>{_e(r.backend)}</td><td>W{r.w_bits}A{r.a_bits}</td>"
        f"<td>{_e(fmt(r.metrics.get('latency_ms'), 3))}</td><td>{_e(fmt(r.metrics.get('train_seconds'), 1))}</td></tr>"
        for r in timed)
    return ('<div class="table-wrap"><table class="sortable"><thead><tr><th>run</th><th>model</th><th>backend</th>'
            "<th>bits</th><th>latency (ms)</th><th>training (s)</th></tr></thead>"
            f"<tbody>{body}</tbody></table></div>")


def _failed_table(rows: list[RunRow]) -> str:
    if not rows:
        return '<p class="muted">No failed runs.</p>'
    body = "".join(
        f"<tr><td>{_e(r.run_id)}</td><td>{_e(r.model)}</td><td>{_e(r.backend)}</td><td>{_e(r.method_label)}</td>"
        f"<td>W{_e(r.w_bits)}A{_e(r.a_bits)}</td><td>{_e(r.status)}</td>"
        f"<td><pre class=\"error\">{_e((r.error or '').strip()[:2000])}</pre></td></tr>" for r in rows)
    return ('<div class="table-wrap"><table class="sortable" id="failed-runs"><thead><tr><th>run</th><th>model</th>'
            '<th>backend</th><th>method</th><th>W/A</th><th>status</th><th>error</th></tr></thead>'
            f"<tbody>{body}</tbody></table></div>")


def _figures(boards: dict[tuple[str, str], list[Entry]]) -> str:
    if not boards:
        return '<p class="muted">No finished runs to plot.</p>'
    out = []
    for anchor, title, caption, fn in FIGURES:
        data = base64.b64encode(fn(boards)).decode("ascii")
        out.append(f'<figure id="fig-{anchor}"><h3>{_e(title)}</h3><img alt="{_e(title)}" '
                   f'src="data:image/png;base64,{data}"><figcaption>{_e(caption)}</figcaption></figure>')
    return "".join(out)


def render_report(rows: list[RunRow], title: str = "quantbench report", source: str = "") -> str:
    """The whole page as one string (inline CSS, JS and images)."""
    boards = leaderboards(rows)
    done = [r for r in rows if r.status == "done"]
    failed = [r for r in rows if r.status != "done"]
    sweeps = sorted({r.sweep or "" for r in rows})
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    boards_html = "".join(
        f"<h3>{_e(model)} on {_e(data)} <span class=\"muted\">({len(entries)} runs)</span></h3>"
        f"{_leaderboard_table(i, entries)}" for i, ((model, data), entries) in enumerate(boards.items())
    ) or '<p class="muted">No finished runs yet: run <code>quantbench bench SWEEP.yaml</code>.</p>'
    curves = _timing_table(done)
    cards = "".join(_card_html(r) for r in done if r.card) or '<p class="muted">No cards.</p>'
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{_e(title)}</title><link rel="icon" href="data:,"><style>{CSS}</style></head>
<body>
<header><h1>{_e(title)}</h1><p>{len(done)} finished runs, {len(failed)} failed or unfinished · sweeps:
{_e(", ".join(sweeps) or "none")} · generated {when}{(" from " + _e(source)) if source else ""}</p></header>
<nav><a href="#leaderboard">Leaderboard</a><a href="#plots">Plots</a><a href="#curves">Latency &amp; training</a>
<a href="#failed">Failed runs</a><a href="#cards">Cards</a></nav>
<main>
<section id="leaderboard"><h2>Leaderboard</h2><p class="muted">Click a column header to sort; type in the box to
filter (every word must match). Top-1 in percent on the test split; agreement is the fraction of test images whose
predicted class is unchanged by quantization; Δ = quantized − FP32 top-1.</p>{boards_html}</section>
<section id="plots"><h2>Plots</h2>{_figures(boards)}</section>
<section id="curves"><h2>Latency and training curves</h2>{curves}</section>
{synthetic_section(done)}
{mixed_section(done)}
{pareto_section(done)}
{coquant_section(done)}
<section id="failed"><h2>Failed or unfinished runs</h2>{_failed_table(failed)}</section>
<section id="cards"><h2>Quantization cards</h2><p class="muted">One card per run (seed 004 Table 1), generated
from what the run did. Click to open.</p>{cards}</section>
</main>
<footer>quantbench · self-contained report: no network access needed.</footer>
<script>{JS}</script>
</body></html>
"""
