"""The report's inline CSS and JavaScript (no CDN, nothing fetched: the page works offline)."""

CSS = """
:root { --fg: #1d2330; --muted: #5b6475; --line: #d8dde6; --accent: #2457c5; --bg: #ffffff; --alt: #f5f7fb; }
* { box-sizing: border-box; }
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: var(--fg); margin: 0;
       background: var(--bg); }
header { background: #17233f; color: #fff; padding: 18px 28px; }
header h1 { margin: 0 0 4px; font-size: 22px; }
header p { margin: 0; color: #c9d3ea; }
nav { position: sticky; top: 0; background: #fff; border-bottom: 1px solid var(--line); padding: 8px 28px;
      z-index: 2; }
nav a { margin-right: 18px; color: var(--accent); text-decoration: none; font-weight: 600; }
main { padding: 8px 28px 40px; max-width: 1500px; }
h2 { border-bottom: 2px solid var(--line); padding-bottom: 4px; margin-top: 32px; }
h3 { margin: 22px 0 6px; }
.muted { color: var(--muted); }
.filter { width: 360px; max-width: 100%; padding: 6px 10px; border: 1px solid var(--line); border-radius: 6px;
          margin: 4px 10px 8px 0; font: inherit; }
.count { color: var(--muted); font-size: 13px; }
.table-wrap { overflow-x: auto; }
table { border-collapse: collapse; font-size: 13px; margin: 4px 0 12px; }
th, td { padding: 4px 9px; border-bottom: 1px solid var(--line); text-align: left; white-space: nowrap; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
thead th { background: var(--alt); position: sticky; top: 0; }
table.sortable thead th { cursor: pointer; user-select: none; }
table.sortable thead th::after { content: " \\2195"; color: #a0a8b8; font-size: 11px; }
table.sortable thead th[aria-sort="ascending"]::after { content: " \\25B2"; color: var(--accent); }
table.sortable thead th[aria-sort="descending"]::after { content: " \\25BC"; color: var(--accent); }
tbody tr:nth-child(even) { background: #fafbfd; }
tbody tr:hover { background: #eef3ff; }
.good { color: #1a7f37; } .warn { color: #9a6700; } .bad { color: #cf222e; }
figure { margin: 14px 0 26px; }
figure img { max-width: 100%; border: 1px solid var(--line); border-radius: 6px; }
figcaption { color: var(--muted); margin-top: 4px; }
details.card { border: 1px solid var(--line); border-radius: 6px; margin: 6px 0; padding: 0 12px; }
details.card[open] { padding-bottom: 10px; }
details.card summary { cursor: pointer; padding: 7px 0; font-weight: 600; }
table.card-summary td:first-child { font-weight: 600; width: 190px; vertical-align: top; }
table.card-summary td { white-space: normal; }
.card-details { display: flex; flex-wrap: wrap; gap: 18px; }
.card-details table td { white-space: normal; max-width: 520px; }
pre.error { white-space: pre-wrap; background: #fff5f5; border: 1px solid #f3c2c2; padding: 8px; font-size: 12px; }
footer { color: var(--muted); padding: 12px 28px 30px; font-size: 12px; }
"""

JS = """
(function () {
  "use strict";
  function cellValue(row, index) {
    var cell = row.cells[index];
    if (!cell) { return ""; }
    var v = cell.getAttribute("data-value");
    return v !== null ? v : cell.textContent.trim();
  }
  function compare(a, b) {
    var x = parseFloat(a), y = parseFloat(b);
    var numeric = !isNaN(x) && !isNaN(y) && isFinite(a) && isFinite(b);
    if (numeric) { return x - y; }
    return a.localeCompare(b, undefined, {numeric: true, sensitivity: "base"});
  }
  function sortBy(table, th) {
    var index = Array.prototype.indexOf.call(th.parentNode.children, th);
    var asc = th.getAttribute("aria-sort") !== "ascending";
    Array.prototype.forEach.call(table.tHead.rows[0].cells, function (c) { c.removeAttribute("aria-sort"); });
    th.setAttribute("aria-sort", asc ? "ascending" : "descending");
    var body = table.tBodies[0];
    var rows = Array.prototype.slice.call(body.rows);
    rows.sort(function (r1, r2) {
      var c = compare(cellValue(r1, index), cellValue(r2, index));
      return asc ? c : -c;
    });
    rows.forEach(function (r) { body.appendChild(r); });
  }
  function applyFilter(input) {
    var table = document.getElementById(input.getAttribute("data-table"));
    var terms = input.value.toLowerCase().split(/\\s+/).filter(Boolean);
    var shown = 0, rows = table.tBodies[0].rows;
    Array.prototype.forEach.call(rows, function (row) {
      var text = row.textContent.toLowerCase();
      var ok = terms.every(function (t) { return text.indexOf(t) >= 0; });
      row.hidden = !ok;
      if (ok) { shown += 1; }
    });
    var count = document.getElementById(input.getAttribute("data-count"));
    if (count) { count.textContent = shown + " of " + rows.length + " runs"; }
  }
  function openCard(id) {
    var el = document.getElementById(id);
    if (el && el.tagName === "DETAILS") { el.open = true; el.scrollIntoView(); }
  }
  document.querySelectorAll("table.sortable").forEach(function (table) {
    Array.prototype.forEach.call(table.tHead.rows[0].cells, function (th) {
      th.addEventListener("click", function () { sortBy(table, th); });
    });
  });
  document.querySelectorAll("input.filter").forEach(function (input) {
    input.addEventListener("input", function () { applyFilter(input); });
    applyFilter(input);
  });
  document.querySelectorAll("a.card-link").forEach(function (a) {
    a.addEventListener("click", function () { openCard(a.getAttribute("href").slice(1)); });
  });
  if (location.hash) { openCard(location.hash.slice(1)); }
  document.body.setAttribute("data-ready", "1");
})();
"""
