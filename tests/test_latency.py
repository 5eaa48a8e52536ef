"""The latency command: a table with speed-up ratios, JSON and a bar chart (no timing assertions)."""

from __future__ import annotations

import json

import torch
from typer.testing import CliRunner

from quantbench.cli.main import app

runner = CliRunner()
FAST = ("torch-fp32,torch-fp16-gpu,ort-fp32,ort-int8-onnxruntime,ort-int8-tensorrt,openvino-fp32,"
        "openvino-int8-tensorrt,torch-qdq-x86,executorch-fp32,executorch-int8-tensorrt")


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
    ov = rows[("openvino-int8-tensorrt", 1)]  # a row per deployment runtime; skipped with the reason if missing
    assert ((ov["median_ms"] or 0) > 0 and ov["baseline"] == "openvino-fp32") or "quantbench[openvino]" in ov["skipped"]
    et = rows[("executorch-int8-tensorrt", 1)]
    assert ((et["median_ms"] or 0) > 0 and et["baseline"] == "executorch-fp32") or \
        "quantbench[executorch]" in et["skipped"]
    assert rows[("torch-qdq-x86", 2)]["median_ms"] > 0  # the x86 spec's export on PyTorch's own x86 kernels


def test_unknown_runtime_lists_the_valid_ones():
    res = runner.invoke(app, ["latency", "--model", "resnet20_cifar", "--runtimes", "tflite"])
    assert res.exit_code == 2 and "valid runtimes" in res.output and "ort-fp32" in res.output


def test_measure_restores_torch_settings_and_removes_its_temp_folder(tmp_path, monkeypatch):
    """The x86 int8 runtime switches the quantized engine and --threads the thread count: both come back, and the
    scratch folder (the exported ONNX files) is gone after the command."""
    import tempfile

    from quantbench.deploy.latency import make_context, measure
    from quantbench.models import build_model

    other = next((e for e in ("fbgemm", "qnnpack", "onednn") if e in torch.backends.quantized.supported_engines
                  and e != "x86"), None)
    old_engine, old_threads = torch.backends.quantized.engine, torch.get_num_threads()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    try:
        if other:
            torch.backends.quantized.engine = other
        torch.set_num_threads(2)
        net = build_model("resnet20_cifar", width_mult=0.25)
        with make_context(net, (3, 32, 32), threads=1) as ctx:
            report = measure(ctx, ["torch-int8-x86", "ort-int8-onnxruntime"], [1], 1, 0, False, "r20")
            assert ctx.workdir.parent == tmp_path and any(ctx.workdir.iterdir())
            assert torch.get_num_threads() == 2 and torch.backends.quantized.engine == (other or old_engine)
        assert report.threads == 1 and list(tmp_path.iterdir()) == []
        res = runner.invoke(app, ["latency", "--model", "resnet20_cifar", "--width-mult", "0.25", "--batch-sizes",
                                  "1", "--repeats", "1", "--warmup", "0", "--threads", "1", "--runtimes",
                                  "ort-int8-onnxruntime", "--quiet"])
        assert res.exit_code == 0, res.output
        assert list(tmp_path.iterdir()) == [] and torch.get_num_threads() == 2
    finally:
        torch.backends.quantized.engine = old_engine
        torch.set_num_threads(old_threads)
