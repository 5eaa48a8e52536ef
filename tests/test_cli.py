"""The command line: results on real CIFAR-10, JSON output, and clear errors for bad input."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from quantbench.backends import backend_names
from quantbench.cli.main import app
from tests.conftest import CIFAR, RESNET20, needs_shared

runner = CliRunner()
REQUIRED_KEYS = {"model", "backend", "w_bits", "a_bits", "w_observer", "a_observer", "fp_top1", "quant_top1",
                 "agreement", "calib_seconds", "n_test"}


def _ptq(*extra: str, weights: str | None = None, data: str | None = None):
    args = ["ptq", "--model", "resnet20_cifar", "--weights", weights or str(RESNET20),
            "--data", data or f"cifar10:{CIFAR}", "--quiet", *extra]
    return runner.invoke(app, args)


@needs_shared
@pytest.mark.parametrize("backend", ["tensorrt", "academic"])
def test_ptq_w8a8_on_real_cifar10_keeps_accuracy(backend, tmp_path):
    out = tmp_path / "sub" / "result.json"
    res = _ptq("--backend", backend, "--w-bits", "8", "--a-bits", "8", "--out", str(out))
    assert res.exit_code == 0, res.output
    data = json.loads(out.read_text())
    assert data.keys() >= REQUIRED_KEYS
    assert data["n_test"] == 932 and data["fp_top1"] == pytest.approx(91.63, abs=0.01)
    assert abs(data["quant_top1"] - data["fp_top1"]) <= 0.5
    assert data["agreement"] >= 0.985
    assert data["backend"] == backend and data["config"]["calib_size"] == 256
    assert "quant top-1" in res.output


def test_backends_lists_every_spec():
    res = runner.invoke(app, ["backends"])
    assert res.exit_code == 0
    for name in backend_names():
        assert name in res.output


def test_backends_json_round_trips():
    res = runner.invoke(app, ["backends", "--json"])
    specs = json.loads(res.output)
    assert {s["name"] for s in specs} == set(backend_names())


@pytest.mark.parametrize(("flag", "value", "expect"), [
    ("--model", "resnet21", "valid models"),
    ("--backend", "tpu", "valid backends: academic"),
    ("--a-observer", "magic", "valid observers"),
    ("--w-observer", "magic", "valid observers"),
])
def test_unknown_names_list_the_valid_ones(flag, value, expect, tmp_path):
    args = ["ptq", "--model", "resnet20_cifar", "--data", "digits", "--quiet", flag, value,
            "--out", str(tmp_path / "r.json")]
    res = runner.invoke(app, args)
    assert res.exit_code == 2
    assert expect in res.output
    assert not (tmp_path / "r.json").exists()


def test_unknown_dataset_kind_lists_the_valid_ones():
    res = runner.invoke(app, ["ptq", "--model", "resnet20_cifar", "--data", "mnist:/tmp", "--quiet"])
    assert res.exit_code == 2 and "cifar10" in res.output and "imagefolder" in res.output


@pytest.mark.parametrize("bits", ["0", "17"])
def test_bits_outside_1_to_16_are_refused(bits):
    res = runner.invoke(app, ["ptq", "--model", "digits_cnn", "--data", "digits", "--w-bits", bits, "--quiet"])
    assert res.exit_code == 2 and "w_bits" in res.output


def test_missing_data_path_is_named(tmp_path):
    missing = tmp_path / "nowhere"
    res = runner.invoke(app, ["ptq", "--model", "resnet20_cifar", "--data", f"cifar10:{missing}", "--quiet"])
    assert res.exit_code == 2 and "does not exist" in res.output


def test_folder_in_the_wrong_format_is_refused(tmp_path):
    (tmp_path / "junk.txt").write_text("not cifar")
    res = runner.invoke(app, ["ptq", "--model", "resnet20_cifar", "--data", f"cifar10:{tmp_path}", "--quiet"])
    assert res.exit_code == 2 and "cifar-10-batches-py" in res.output


@needs_shared
def test_checkpoint_of_another_model_lists_missing_and_unexpected_keys():
    res = runner.invoke(app, ["ptq", "--model", "resnet32_cifar", "--weights", str(RESNET20),
                              "--data", f"cifar10:{CIFAR}", "--quiet"])
    assert res.exit_code == 2
    assert "missing" in res.output and "layer1.3" in res.output


def test_bad_first_last_value_is_refused():
    res = runner.invoke(app, ["ptq", "--model", "digits_cnn", "--data", "digits", "--first-last", "big"])
    assert res.exit_code != 0 and "first-last" in res.output


def test_ptq_on_digits_with_overrides_and_quantizer_listing(tmp_path):
    res = runner.invoke(app, ["ptq", "--model", "digits_cnn", "--data", "digits", "--backend", "snpe",
                              "--w-bits", "4", "--a-bits", "8", "--residual", "fp", "--skip", "fp",
                              "--first-last", "8", "--calib-size", "64", "--list-quantizers", "--quiet",
                              "--out", str(tmp_path / "r.json")])
    assert res.exit_code == 0, res.output
    data = json.loads((tmp_path / "r.json").read_text())
    assert (data["w_bits"], data["a_bits"], data["residual"], data["skip"]) == (4, 8, "fp", "fp")
    assert "Quantizers" in res.output and "weight" in res.output
