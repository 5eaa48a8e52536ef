"""`quantbench export` / `verify` on the command line: the opset is the one asked for, a failed export writes
nothing, and verify refuses a simulation that is not the one exported or data the model was not exported for."""

from __future__ import annotations

import onnx
import pytest
from typer.testing import CliRunner

from quantbench.cli.main import app

runner = CliRunner()
EXPORT = ["export", "--model", "digits_cnn", "--data", "digits", "--backend", "onnxruntime", "--calib-size", "32",
          "--a-observer", "minmax", "--artefacts", "none", "--quiet"]


def _opset(path) -> int:
    return next(o.version for o in onnx.load(str(path)).opset_import if o.domain in ("", "ai.onnx"))


@pytest.mark.parametrize("opset", [13, 17])
def test_the_written_model_has_the_requested_opset(tmp_path, opset):
    out = tmp_path / "m.onnx"
    res = runner.invoke(app, [*EXPORT, "--opset", str(opset), "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert _opset(out) == opset


@pytest.mark.fault(input="export --opset 9 (or 19)", exit_code=2,
                   message="--opset 9 is not supported: use 13..18 (per-channel QDQ, QuantizeLinear's axis, needs "
                           ">= 13; ...)", kept="nothing is written; refused before calibrating")
@pytest.mark.parametrize("opset", [9, 19])
def test_an_unsupported_opset_is_refused_before_any_work(tmp_path, monkeypatch, opset):
    import quantbench.deploy.pipeline as pipeline

    monkeypatch.setattr(pipeline, "calibrated_model", lambda *a, **k: pytest.fail("calibrated before the check"))
    res = runner.invoke(app, [*EXPORT, "--opset", str(opset), "--out", str(tmp_path / "m.onnx")])
    assert res.exit_code == 2 and f"--opset {opset} is not supported: use 13..18" in res.output, res.output
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """One digits export (the ONNX and its simulation) shared by the verify tests; each test copies it."""
    d = tmp_path_factory.mktemp("exported")
    res = runner.invoke(app, [*EXPORT, "--out", str(d / "d.onnx")])
    assert res.exit_code == 0, res.output
    return d


def _copy(src, dst):
    import shutil

    for p in src.iterdir():
        shutil.copy(p, dst / p.name)
    return dst / "d.onnx", dst / "d.qb.safetensors"


@pytest.mark.fault(input="verify with an altered .qb.safetensors (not the one export recorded)", exit_code=2,
                   message="the simulation PATH has SHA-256 <actual>, but the ONNX was exported with <recorded>: ...; "
                           "re-export", kept="both files; nothing is compared or written")
def test_verify_refuses_an_altered_simulation_naming_both_hashes(exported, tmp_path):
    from quantbench.deploy.checkpoint import sha256
    from quantbench.deploy.metadata import load_onnx, read_metadata

    onnx_path, sim = _copy(exported, tmp_path)
    recorded = read_metadata(load_onnx(str(onnx_path)))["simulation"]["sha256"]
    assert sha256(sim) == recorded
    data = bytearray(sim.read_bytes())
    data[-1] ^= 0x01  # one bit of the last tensor: the file still loads
    sim.write_bytes(bytes(data))
    res = runner.invoke(app, ["verify", "--onnx", str(onnx_path), "--data", "digits", "--quiet",
                              "--out", str(tmp_path / "v.json")])
    assert res.exit_code == 2, res.output
    out = " ".join(res.output.split())
    assert recorded in out and sha256(sim) in out and "re-export" in out
    assert not (tmp_path / "v.json").exists()


@pytest.mark.fault(input="export that fails half-way (an artefact the backend cannot hold, a bad --from run)",
                   exit_code=2, message="the exporter's error (e.g. TensorRT clip ranges need symmetric int8 ...)",
                   kept="nothing new is written: no .qb.safetensors, .onnx or artefact; old files unchanged")
def test_a_failed_export_writes_nothing_and_keeps_the_old_files(tmp_path):
    out = tmp_path / "d.onnx"
    res = runner.invoke(app, [*EXPORT[:-3], "--backend", "snpe", "--artefacts", "tensorrt_clip_ranges",
                              "--out", str(out)])
    assert res.exit_code == 2 and "TensorRT clip ranges need symmetric int8" in res.output, res.output
    assert list(tmp_path.iterdir()) == []  # no stray .qb.safetensors, no staging folder
    res = runner.invoke(app, [*EXPORT[:-3], "--backend", "snpe", "--artefacts", "snpe_encodings", "--quiet",
                              "--out", str(out)])
    assert res.exit_code == 0, res.output
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert set(before) == {"d.onnx", "d.qb.safetensors", "d.float.onnx", "d.encodings.json"}
    res = runner.invoke(app, [*EXPORT[:-3], "--backend", "snpe", "--artefacts", "tensorrt_clip_ranges",
                              "--seed", "3", "--out", str(out)])
    assert res.exit_code == 2
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


@pytest.fixture
def digits5(monkeypatch):
    """A dataset kind like digits with 5 classes (labels mod 5): same images and shape, other classes."""
    from quantbench.data.registry import DATASETS, DatasetKind, _build_digits

    def build(path, **kw):
        b = _build_digits(path, **kw)
        b.test.labels = b.test.labels % 5  # type: ignore[attr-defined]
        b.num_classes = 5
        return b
    monkeypatch.setitem(DATASETS._items, "digits5", DatasetKind("digits5", build, 1, False, "digits, 5 classes"))


@pytest.mark.fault(input="verify with a dataset of another class count or image shape than the export's",
                   exit_code=2, message="--data digits5 has 5 classes but the model was exported for 10 (exported "
                                        "with --data digits): top-1 against these labels would be meaningless; ...",
                   kept="everything; nothing is compared or written")
def test_verify_refuses_data_with_another_class_count(exported, tmp_path, digits5):
    onnx_path, _ = _copy(exported, tmp_path)
    res = runner.invoke(app, ["verify", "--onnx", str(onnx_path), "--data", "digits5", "--quiet"])
    assert res.exit_code == 2, res.output
    out = " ".join(res.output.split())
    assert "has 5 classes but the model was exported for 10" in out and "--data digits" in out


def test_verify_refuses_images_of_another_shape(exported):
    from types import SimpleNamespace

    import torch

    from quantbench.deploy.metadata import load_onnx, read_metadata
    from quantbench.deploy.verify import SimulationMismatchError, check_data

    record = read_metadata(load_onnx(str(exported / "d.onnx")))
    assert record["output"]["classes"] == 10 and record["input"]["shape"] == [None, 1, 8, 8]
    bundle = SimpleNamespace(num_classes=10, test=[(torch.zeros(1, 16, 16), 0)])
    with pytest.raises(SimulationMismatchError, match=r"shape \[1, 16, 16\] but .* exported for \[1, 8, 8\]"):
        check_data(record, {"data": "digits"}, bundle, "other")


@pytest.mark.fault(input="disk full while saving a simulation checkpoint (save_simulation)", exit_code=2,
                   message="could not write PATH: No space left on device; the previous file is unchanged; ...",
                   kept="the previous .qb.safetensors, byte for byte")
def test_save_simulation_is_atomic(exported, tmp_path, monkeypatch):
    import errno
    import os

    from quantbench.deploy.checkpoint import load_simulation, save_simulation
    from quantbench.utils import io
    from quantbench.utils.io import OutputError

    gm, config = load_simulation(exported / "d.qb.safetensors")
    config.pop("_path")
    path = tmp_path / "s.qb.safetensors"
    path.write_bytes(b"old")

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    with monkeypatch.context() as m:
        m.setattr(io.os, "fsync", full)
        with pytest.raises(OutputError, match="No space left"):
            save_simulation(gm, path, config)
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["s.qb.safetensors"]
    save_simulation(gm, path, config)
    assert load_simulation(path)[1]["model"] == "digits_cnn"


def test_export_takes_per_layer_bits_and_verifies_bit_exact(tmp_path):
    """`export --layer-bits` feeds the same overrides as `ptq`: the 4-bit layer's codes are 4-bit in the ONNX,
    and ONNX Runtime agrees with the simulation."""
    import json

    import numpy as np
    from onnx import numpy_helper

    out = tmp_path / "m.onnx"
    res = runner.invoke(app, [*EXPORT, "--layer-bits", "block.*=4", "--out", str(out)])
    assert res.exit_code == 0, res.output
    inits = {i.name: numpy_helper.to_array(i) for i in onnx.load(out).graph.initializer}
    block = [v for k, v in inits.items() if "block" in k and v.dtype == np.int8 and v.ndim == 4]
    other = [v for k, v in inits.items() if "block" not in k and v.dtype == np.int8 and v.ndim == 4]
    assert block and all(v.min() >= -8 and v.max() <= 7 for v in block)
    assert other and any(v.min() < -8 or v.max() > 7 for v in other)
    res = runner.invoke(app, ["verify", "--onnx", str(out), "--data", "digits", "--x64-quant-precision", "--quiet",
                              "--out", str(tmp_path / "v.json")])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "v.json").read_text())["agreement"] == 1.0
