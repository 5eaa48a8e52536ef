"""Real int8 execution: ONNX Runtime reproduces the simulation on the shared ResNet-20 and CIFAR-10 subset,
the CLI round trip (export -> verify --out), float fallbacks are reported, and bad files are refused."""

from __future__ import annotations

import json
from functools import cache

import onnx
import pytest
import torch
from typer.testing import CliRunner

from quantbench.cli.main import app
from quantbench.config import PTQConfig
from quantbench.data import make_loader
from quantbench.deploy import export_onnx, verify_onnx
from quantbench.deploy.hazards import cpu_features
from quantbench.deploy.pipeline import calibrated_model
from tests.conftest import CIFAR, RESNET20, needs_shared

runner = CliRunner()
REQUIRED = {"sim_top1", "real_top1", "agreement", "max_abs_logit_diff", "n"}


@cache
def _calibrated(backend: str, reduce_range: bool):
    cfg = PTQConfig(model="resnet20_cifar", weights=str(RESNET20), data=f"cifar10:{CIFAR}", backend=backend,
                    w_observer="minmax", a_observer="minmax")
    return calibrated_model(cfg, reduce_range, progress=False)


@cache
def _verify(backend: str, reduce_range: bool, x64: bool, tmp: str, n: int | None = None):
    cal = _calibrated(backend, reduce_range)
    path = export_onnx(cal.gm, cal.example, f"{tmp}/{backend}{reduce_range:d}.onnx", artefacts=[]).path
    test = cal.bundle.test if n is None else torch.utils.data.Subset(cal.bundle.test, range(n))
    return verify_onnx(path, cal.gm, make_loader(test, 512), x64_quant_precision=x64, progress=False)


@pytest.fixture(scope="module")
def tmp(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("verify"))


# ------------------------------------------------------------------------------------ shared ResNet-20
@needs_shared
@pytest.mark.parametrize(("backend", "reduce_range", "x64"), [
    ("onnxruntime", False, True),  # full 8-bit weights, ORT's exact u8u8 mode (session.x64quantprecision)
    ("fbgemm", False, True),
    ("tensorrt", True, False),  # 7-bit weights (reduce_range), ORT's default session
])
def test_onnx_runtime_reproduces_the_simulation_on_cifar10(backend, reduce_range, x64, tmp):
    r = _verify(backend, reduce_range, x64, tmp)
    assert r.n == 932
    assert abs(r.real_top1 - r.sim_top1) <= 0.1, r
    assert r.agreement >= 0.995, r
    assert r.sim_top1 >= 91.63 - 0.5  # the W8A8 simulation keeps FP32 accuracy
    assert r.int8_kernels == r.kernels_expected
    assert r.int8_kernels.get("QLinearConv", 0) >= 9  # real int8 execution, not a float fallback


@needs_shared
@pytest.mark.skipif(not cpu_features()["int16_overflow_possible"], reason="needs an x86 CPU with AVX2 and no VNNI")
def test_int16_overflow_of_avx2_kernels_is_found_and_named(tmp):
    """ORT's documented deviation: full-range int8 weights in the default session on AVX2 without VNNI."""
    r = _verify("onnxruntime", False, False, tmp, 300)
    assert r.agreement < 0.995  # ORT itself deviates (int16 saturation), the simulation does not hide it
    assert r.int16_overflow_risk["at_risk"]
    assert any("--x64-quant-precision" in n and "--reduce-range" in n for n in r.notes)


@needs_shared
def test_float_fallbacks_are_reported_with_the_reason(tmp):
    r = _verify("tensorrt", True, False, tmp)
    assert not r.int8_complete and r.status.startswith("partial-int8")
    reasons = {f["op"]: f["reason"] for f in r.float_ops}
    assert reasons["Gemm"].startswith("its output is a float model output")
    pads = [f for f in r.float_ops if f["op"] == "Add"]
    assert len(pads) == 2 and all("from Pad" in f["reason"] for f in pads)  # the option-A shortcuts
    relus = [f for f in r.float_ops if f["op"] == "Relu"]  # kept before int8 QuantizeLinear with zero-point 0
    assert len(relus) == 19 and all("container minimum" in f["reason"] for f in relus)
    assert r.int8_kernels == {"QLinearAdd": 7, "QLinearConv": 19, "QLinearGlobalAveragePool": 1}


# ------------------------------------------------------------------------------------ CLI round trip
@needs_shared
def test_cli_export_then_verify_writes_json(tmp_path):
    onnx_path = tmp_path / "r20.onnx"
    res = runner.invoke(app, ["export", "--model", "resnet20_cifar", "--weights", str(RESNET20), "--data",
                              f"cifar10:{CIFAR}", "--backend", "tensorrt", "--reduce-range", "--w-observer", "minmax",
                              "--a-observer", "minmax", "--calib-size", "64", "--out", str(onnx_path), "--quiet"])
    assert res.exit_code == 0, res.output
    for suffix in (".onnx", ".qb.safetensors", ".tensorrt.json", ".float.onnx"):
        assert (tmp_path / f"r20{suffix}").is_file(), suffix
    assert "QLinearConv" in res.output
    out = tmp_path / "verify.json"
    res = runner.invoke(app, ["verify", "--onnx", str(onnx_path), "--data", f"cifar10:{CIFAR}", "--max-test", "200",
                              "--out", str(out), "--quiet"])
    assert res.exit_code == 0, res.output
    data = json.loads(out.read_text())
    assert data.keys() >= REQUIRED and data["n"] == 200 and 0 <= data["agreement"] <= 1
    assert data["agreement"] >= 0.995 and "ran in float" in res.output
    # the same simulation exports again from its checkpoint (the path a QAT run takes)
    res = runner.invoke(app, ["export", "--from", str(tmp_path / "r20.qb.safetensors"), "--out",
                              str(tmp_path / "again.onnx"), "--artefacts", "none", "--quiet"])
    assert res.exit_code == 0, res.output
    a, b = onnx.load(str(onnx_path)), onnx.load(str(tmp_path / "again.onnx"))
    assert [n.op_type for n in a.graph.node] == [n.op_type for n in b.graph.node]


# ------------------------------------------------------------------------------------ bad input
def _float_onnx(path):
    from quantbench.models import build_model

    torch.onnx.export(build_model("digits_cnn").eval(), (torch.zeros(1, 1, 8, 8),), str(path), dynamo=False)


def test_verify_refuses_an_onnx_quantbench_did_not_write(tmp_path):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _float_onnx(tmp_path / "other.onnx")
    res = runner.invoke(app, ["verify", "--onnx", str(tmp_path / "other.onnx"), "--data", "digits"])
    assert res.exit_code == 2 and "not exported by `quantbench export`" in res.output


def test_verify_refuses_a_corrupt_or_missing_file(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07garbage that is not protobuf" * 10)
    res = runner.invoke(app, ["verify", "--onnx", str(bad), "--data", "digits"])
    assert res.exit_code == 2 and "not a valid ONNX model" in res.output
    res = runner.invoke(app, ["verify", "--onnx", str(tmp_path / "none.onnx"), "--data", "digits"])
    assert res.exit_code == 2 and "does not exist" in res.output


def test_export_refuses_academic_before_calibrating():
    res = runner.invoke(app, ["export", "--model", "digits_cnn", "--data", "digits", "--backend", "academic",
                              "--out", "/nonexistent/m.onnx"])
    assert res.exit_code == 2 and "not deployable" in res.output and "research setting" in res.output


def test_export_needs_model_and_data_or_from(tmp_path):
    res = runner.invoke(app, ["export", "--out", str(tmp_path / "m.onnx")])
    assert res.exit_code != 0 and "--from" in res.output


def test_digits_round_trip_without_shared_data(tmp_path):
    """Export + verify on the embedded digits data (runs everywhere)."""
    path = tmp_path / "d.onnx"
    res = runner.invoke(app, ["export", "--model", "digits_cnn", "--data", "digits", "--backend", "snpe",
                              "--calib-size", "64", "--a-observer", "minmax", "--out", str(path), "--quiet"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "d.encodings.json").is_file()
    res = runner.invoke(app, ["verify", "--onnx", str(path), "--data", "digits", "--out", str(tmp_path / "v.json"),
                              "--quiet"])
    assert res.exit_code == 0, res.output
    data = json.loads((tmp_path / "v.json").read_text())
    assert data["agreement"] >= 0.995 and abs(data["real_top1"] - data["sim_top1"]) <= 0.1
