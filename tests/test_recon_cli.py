"""Reconstruction from the CLI (`ptq --method`, `units`) and as sweep method kinds (`{kind: qdrop, ...}`)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from quantbench.cli.main import app
from quantbench.config import PTQConfig
from quantbench.errors import QuantbenchError, SweepError
from quantbench.sweep.execute import execute
from quantbench.sweep.expand import expand
from quantbench.sweep.load import parse_sweep
from quantbench.sweep.methods import ContextCache
from tests.test_sweep_plugin import one_thread, tiny_sweep  # noqa: F401  (one_thread: autouse)

runner = CliRunner()


def test_ptq_method_qdrop_writes_recon_seconds_and_a_card_with_the_rounding(tmp_path):
    out, card = tmp_path / "r.json", tmp_path / "card.json"
    res = runner.invoke(app, ["ptq", "--model", "digits_cnn", "--data", "digits", "--backend", "tensorrt",
                              "--w-bits", "4", "--a-bits", "4", "--method", "qdrop", "--iters", "5",
                              "--recon-size", "64", "--max-test", "64", "--quiet", "--out", str(out),
                              "--card", str(card)])
    assert res.exit_code == 0, res.output
    r = json.loads(out.read_text())
    assert r["method"] == "qdrop" and r["recon_seconds"] > 0
    assert r["config"]["recon"]["iters"] == 5 and r["config"]["recon"]["recon_size"] == 64
    c = json.loads(card.read_text())
    assert c["quantization_method"]["rounding"].startswith("learned (qdrop")
    rec = c["resource_complexity"]["reconstruction"]
    assert rec["images"] == 64 and rec["labels_used"] is False and rec["preset"].startswith("5 iterations")


def test_ptq_default_is_nearest_rounding(tmp_path):
    out = tmp_path / "r.json"
    res = runner.invoke(app, ["ptq", "--model", "digits_cnn", "--data", "digits", "--max-test", "32", "--quiet",
                              "--out", str(out)])
    assert res.exit_code == 0, res.output
    r = json.loads(out.read_text())
    assert r["method"] == "nearest" and r["recon_seconds"] is None


@pytest.mark.fault(input="`ptq --method adaroud` (a misspelt reconstruction method)",
                   message="unknown reconstruction method 'adaroud'; valid ...: adaround, brecq, qdrop",
                   exit_code=2, kept="nothing is computed")
def test_an_unknown_method_is_refused_with_the_valid_names():
    res = runner.invoke(app, ["ptq", "--model", "digits_cnn", "--data", "digits", "--method", "adaroud", "--quiet"])
    assert res.exit_code == 2
    assert "adaround" in res.output and "qdrop" in res.output
    with pytest.raises((ValueError, QuantbenchError), match="adaround"):
        PTQConfig(model="digits_cnn", method="adaroud")


def test_units_prints_the_partition():
    res = runner.invoke(app, ["units", "--model", "resnet20_cifar", "--backend", "tensorrt", "--json"])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.output)
    assert len(rows) == 11 and rows[1]["layers"] == ["layer1.0.conv1", "layer1.0.conv2"]


@pytest.mark.parametrize("kind", ["adaround", "brecq", "qdrop"])
def test_sweep_method_kinds_reconstruct(kind: str, tmp_path):
    method = {"kind": kind, "calibrator": "minmax", "calib_size": 32, "calib_batch_size": 32, "iters": 3,
              "recon_size": 32}
    job = expand(parse_sweep(tiny_sweep(backends=["tensorrt"], methods=[method], bits=["W4A4"]), tmp_path)).jobs[0]
    assert job.config["method"] == kind and job.config["recon"]["iters"] == 3
    record = execute(job, ContextCache())
    assert record.status == "done", record.error
    assert record.metrics["method"] == kind and record.metrics["recon_seconds"] > 0
    assert record.card["resource_complexity"]["reconstruction"]["method"] == kind
    assert record.card["resource_complexity"]["fraction_of_epoch"] != "n/a"


def test_sweep_recon_options_are_validated_when_loaded(tmp_path):
    method = {"kind": "qdrop", "calibrator": "minmax", "recon_options": {"round_wieght": 0.1}}
    with pytest.raises(SweepError, match="round_wieght"):
        parse_sweep(tiny_sweep(methods=[method]), tmp_path)
