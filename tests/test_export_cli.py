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
