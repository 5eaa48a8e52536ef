"""The main job: the digits CNN trains, is cached, and PTQ results land in a table and JSON."""

from __future__ import annotations

import json

from rich.console import Console

from quantbench.cli.demo import ensure_digits_model, run_demo


def test_demo_trains_caches_and_quantizes(tmp_path):
    console = Console(record=True, width=200)
    results = run_demo(tmp_path, progress=False, console=console, backends=["tensorrt", "academic"],
                       bits=((8, 8), (4, 4)), calibrators=(("minmax", "minmax"),))
    assert len(results) == 4
    w8 = [r for r in results if r.w_bits == 8]
    assert all(r.fp_top1 > 90 for r in results), "the digits CNN should train to > 90 %"
    assert all(abs(r.quant_top1 - r.fp_top1) < 2 and r.agreement > 0.97 for r in w8)
    saved = json.loads((tmp_path / "demo_results.json").read_text())
    assert len(saved) == 4 and {"fp_top1", "quant_top1", "agreement"} <= saved[0].keys()
    text = console.export_text()
    assert "tensorrt" in text and "W4A4" in text
    cached = tmp_path / "cache" / "digits_cnn.safetensors"
    mtime = cached.stat().st_mtime_ns
    assert ensure_digits_model(tmp_path / "cache", progress=False) == cached
    assert cached.stat().st_mtime_ns == mtime, "a valid cached model is reused, not retrained"


def test_corrupt_cached_model_is_retrained(tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "digits_cnn.safetensors").write_bytes(b"not a safetensors file")
    path = ensure_digits_model(cache, progress=False)
    assert path.stat().st_size > 1000
