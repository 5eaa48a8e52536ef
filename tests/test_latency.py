"""The latency command: a table with speed-up ratios, JSON and a bar chart (no timing assertions)."""

from __future__ import annotations

import json

import torch
from typer.testing import CliRunner

from quantbench.cli.main import app

runner = CliRunner()
FAST = "torch-fp32,torch-fp16-gpu,ort-fp32,ort-int8-onnxruntime,ort-int8-tensorrt"


def test_latency_table_json_and_png(tmp_path):
    out, png = tmp_path / "lat.json", tmp_path / "lat.png"
    res = runner.invoke(app, ["latency", "--model", "resnet20_cifar", "--width-mult", "0.25", "--batch-sizes", "1,2",
                              "--repeats", "2", "--warmup", "1", "--threads", "1", "--runtimes", FAST,
                              "--out", str(out), "--png", str(png), "--quiet"])
    assert res.exit_code == 0, res.output
    assert "ONNX Runtime INT8 QDQ (u8 act., onnxruntime)" in res.output and "s8 act." in res.output
    data = json.loads(out.read_text())
    rows = {(r["runtime"], r["batch"]): r for r in data["rows"]}
    assert {b for _, b in rows} == {1, 2}
    int8 = rows[("ort-int8-onnxruntime", 1)]
    assert int8["median_ms"] > 0 and int8["baseline"] == "ort-fp32" and int8["speedup"] > 0
    gpu = rows[("torch-fp16-gpu", 1)]
    if not torch.cuda.is_available():
        assert gpu["median_ms"] is None and "no CUDA GPU" in gpu["skipped"]
    assert data["environment"]["onnxruntime"] and png.stat().st_size > 1000


def test_unknown_runtime_lists_the_valid_ones():
    res = runner.invoke(app, ["latency", "--model", "resnet20_cifar", "--runtimes", "tflite"])
    assert res.exit_code == 2 and "valid runtimes" in res.output and "ort-fp32" in res.output
