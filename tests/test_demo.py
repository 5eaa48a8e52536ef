"""The main job: the digits CNN trains and is cached, the demo sweep lands in the store with a card per run
and report.html, a second call resumes instead of rerunning, and the final lines say where the report is."""

from __future__ import annotations

from rich.console import Console

from quantbench.cards import validate_card
from quantbench.cli.demo import ensure_digits_model, run_demo


def test_demo_stores_runs_cards_and_report_and_resumes(tmp_path):
    console = Console(record=True, width=200)
    rows = run_demo(tmp_path, progress=False, console=console, backends=["tensorrt", "academic"],
                    bits=((8, 8), (4, 4)), calibrators=(("minmax", "minmax"),))
    assert len(rows) == 4 and all(r.status == "done" for r in rows)
    assert all(r.fp_top1 > 90 for r in rows), "the digits CNN should train to > 90 %"
    w8 = [r for r in rows if r.w_bits == 8]
    assert all(abs(r.quant_top1 - r.fp_top1) < 2 and r.agreement > 0.97 for r in w8)
    for r in rows:
        validate_card(r.card)
        assert (tmp_path / "cards" / f"{r.run_id}.md").is_file()
    report = tmp_path / "report.html"
    assert (tmp_path / "quantbench.db").is_file() and report.is_file()
    html = report.read_text()
    assert all(f'id="card-{r.run_id}"' in html for r in rows)
    text = console.export_text()
    lines = text.strip().splitlines()
    assert "tensorrt" in text and "W4A4" in text
    assert lines[-2] == f"report: {report.resolve()}" and lines[-1].startswith("open it in a browser: file://")

    cached = tmp_path / "cache" / "digits_cnn.safetensors"
    mtime = cached.stat().st_mtime_ns
    again = Console(record=True, width=200)
    rows2 = run_demo(tmp_path, progress=False, console=again, backends=["tensorrt", "academic"],
                     bits=((8, 8), (4, 4)), calibrators=(("minmax", "minmax"),))
    assert "4 of 4 demo runs are already in" in again.export_text()
    assert [(r.run_id, r.finished_at) for r in rows2] == [(r.run_id, r.finished_at) for r in rows]
    assert cached.stat().st_mtime_ns == mtime, "a valid cached model is reused, not retrained"
    assert ensure_digits_model(tmp_path / "cache", progress=False) == cached


def test_corrupt_cached_model_is_retrained(tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "digits_cnn.safetensors").write_bytes(b"not a safetensors file")
    path = ensure_digits_model(cache, progress=False, epochs=1)  # only the retraining matters here
    assert path.stat().st_size > 1000
