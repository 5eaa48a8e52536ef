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
                    w_observer="minmax", a_observer="minmax", calib_size=128)
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
    assert r.int8_kernels["QLinearConv"] == 19  # real int8 execution, not a float fallback
    assert r.max_abs_logit_diff < 1e-4  # bit for bit: the simulation computes what ORT's kernels compute


@needs_shared
@pytest.mark.skipif(not cpu_features()["int16_overflow_possible"], reason="needs an x86 CPU with AVX2 and no VNNI")
def test_int16_overflow_of_avx2_kernels_is_found_and_named(tmp):
    """ORT's documented deviation: full-range int8 weights in the default session on AVX2 without VNNI."""
    r = _verify("onnxruntime", False, False, tmp, 300)
    assert r.agreement < 0.995  # ORT itself deviates (int16 saturation), the simulation does not hide it
    assert r.int16_overflow_risk["at_risk"]
    assert any("--x64-quant-precision" in n and "--reduce-range" in n for n in r.notes)


@needs_shared
@pytest.mark.skipif(not cpu_features()["vnni"], reason="needs an x86 CPU with VNNI (exact int32 dot products)")
def test_vnni_cpus_run_full_range_int8_weights_exactly(tmp):
    """The complement: where the u8 x s8 dot products accumulate in int32 (VNNI), ORT's default session runs
    the full 8-bit weights bit for bit like the simulation, and verify raises no overflow warning."""
    r = _verify("onnxruntime", False, False, tmp, 300)
    assert r.int16_overflow_risk["at_risk"]  # the weights would overflow int16 pair sums without VNNI
    assert r.agreement == 1.0 and r.max_abs_logit_diff < 1e-4
    assert not any("--reduce-range" in n for n in r.notes)


@needs_shared
def test_float_fallbacks_are_reported_with_the_reason(tmp):
    r = _verify("tensorrt", True, False, tmp)
    assert not r.int8_complete and r.status.startswith("partial-int8")
    # every conv, add, pool and the classifier run as integer kernels; what stays in float are the Relus
    # kept before int8 QuantizeLinear nodes with zero-point 0 (exact on grid values)
    assert r.int8_kernels == {"QGemm": 1, "QLinearAdd": 9, "QLinearConv": 19, "QLinearGlobalAveragePool": 1}
    assert {f["op"] for f in r.float_ops} == {"Relu"} and len(r.float_ops) == 19
    assert all("container minimum" in f["reason"] for f in r.float_ops)


# ------------------------------------------------------------------------------------ CLI round trip
def test_cli_export_then_verify_writes_json(tmp_path):
    """Export (TensorRT artefacts, reduce_range) -> verify --out -> export --from the saved simulation; digits
    data so it runs everywhere."""
    onnx_path = tmp_path / "d.onnx"
    res = runner.invoke(app, ["export", "--model", "digits_cnn", "--data", "digits", "--backend", "tensorrt",
                              "--reduce-range", "--a-observer", "minmax", "--calib-size", "64", "--out", str(onnx_path),
                              "--quiet"])
    assert res.exit_code == 0, res.output
    for suffix in (".onnx", ".qb.safetensors", ".tensorrt.json", ".float.onnx"):
        assert (tmp_path / f"d{suffix}").is_file(), suffix
    assert "QLinearConv" in res.output and "reduce_range" in res.output
    assert "inside [qmin, qmax]" in res.output  # notes print as plain text (rich took brackets for markup)
    out = tmp_path / "verify.json"
    res = runner.invoke(app, ["verify", "--onnx", str(onnx_path), "--data", "digits", "--max-test", "200",
                              "--out", str(out), "--quiet"])
    assert res.exit_code == 0, res.output
    data = json.loads(out.read_text())
    assert data.keys() >= REQUIRED and data["n"] == 200 and 0 <= data["agreement"] <= 1
    assert data["agreement"] >= 0.995 and abs(data["real_top1"] - data["sim_top1"]) <= 0.1
    assert "ran in float" in res.output  # the logits layer
    # the same simulation exports again from its checkpoint (the path a QAT run takes)
    res = runner.invoke(app, ["export", "--from", str(tmp_path / "d.qb.safetensors"), "--out",
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


def test_snpe_round_trip_writes_encodings(tmp_path):
    """Export + verify for SNPE (uint8 weights: the exact u8u8 kernels run in ORT's default session)."""
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


def test_export_from_a_qat_run_folder(tmp_path):
    """`quantbench export --from RUN` with the final.pt a `quantbench qat` run writes."""
    from quantbench.data import calibration_subset, load_data
    from quantbench.graph.quantize import prepare
    from quantbench.models import build_model, get_entry
    from quantbench.ptq import calibrate
    from quantbench.qat.checkpoint import save_checkpoint
    from quantbench.qat.config import QATConfig
    from quantbench.qat.prepare import prepare_qat

    cfg = QATConfig(model="digits_cnn", data="digits", backend="fbgemm", algorithm="lsq", bn_fold=3)
    entry = get_entry(cfg.model)
    bundle = load_data(cfg.data, entry.mean, entry.std, entry.input_size)
    w_obs, a_obs = cfg.observers()
    gm = prepare(build_model(cfg.model), cfg.resolved_backend(), bundle.test[0][0][None], w_obs, a_obs)
    calibrate(gm, make_loader(calibration_subset(bundle, 64, 0), 64), progress=False)
    prepare_qat(gm, cfg.algorithm, cfg.bn_fold)
    save_checkpoint(tmp_path / "run" / "final.pt", {"config": cfg.model_dump(mode="json"), "model": gm.state_dict()})
    out = tmp_path / "qat.onnx"
    res = runner.invoke(app, ["export", "--from", str(tmp_path / "run"), "--out", str(out), "--quiet"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["verify", "--onnx", str(out), "--data", "digits", "--x64-quant-precision", "--out",
                              str(tmp_path / "v.json"), "--quiet"])
    assert res.exit_code == 0, res.output
    data = json.loads((tmp_path / "v.json").read_text())
    assert data["agreement"] >= 0.995 and abs(data["real_top1"] - data["sim_top1"]) <= 0.1
