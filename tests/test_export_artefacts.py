"""Backend artefacts: the TensorRT clip-range JSON and the SNPE encodings JSON follow their schemas, agree
with the exported quantizers and name tensors of the float model written beside them."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from quantbench.deploy import export_onnx
from quantbench.deploy.artefacts import ARTEFACTS
from quantbench.deploy.errors import ExportError
from quantbench.errors import UnknownNameError
from tests.test_export import CALIB, calibrated


def _tensor_names(path) -> set[str]:
    model = onnx.load(str(path))
    names = {i.name for i in model.graph.initializer} | {i.name for i in model.graph.input}
    return names | {o for n in model.graph.node for o in n.output}


@pytest.fixture(scope="module")
def trt(tmp_path_factory):
    path = tmp_path_factory.mktemp("trt") / "r20.onnx"
    return export_onnx(calibrated("resnet20_cifar", "tensorrt"), CALIB[:1], path)


@pytest.fixture(scope="module")
def snpe(tmp_path_factory):
    path = tmp_path_factory.mktemp("snpe") / "r20.onnx"
    return export_onnx(calibrated("resnet20_cifar", "snpe"), CALIB[:1], path)


def test_tensorrt_clip_ranges_schema(trt):
    assert set(trt.artefacts) == {"tensorrt_clip_ranges", "float_model"}
    data = json.loads(trt.artefacts["tensorrt_clip_ranges"].read_text())
    assert data["format"] == "tensorrt-clip-ranges" and data["version"] == 1
    assert data["model"] == trt.artefacts["float_model"].name and data["qdq_model"] == trt.path.name
    blob = data["tensorrt"]["blob_range"]
    assert isinstance(blob, dict) and blob and all(isinstance(v, float) and v > 0 for v in blob.values())
    names = _tensor_names(trt.artefacts["float_model"])
    for a in trt.record["activations"]:
        assert blob[a["tensor"]] == pytest.approx(a["scale"][0] * 127, rel=1e-7)  # TensorRT: scale = amax / 127
        assert data["tensors"][a["tensor"]]["scale"] == a["scale"][0]
        assert a["tensor"] in names or a["tensor"] == "input"
    for w in trt.record["weights"]:
        entry = data["weights"][f"{w['layer']}.weight"]
        assert len(entry["amax"]) == len(w["scale"]) and entry["axis"] == 0
        assert f"{w['layer']}.weight" in names


def test_snpe_encodings_schema(snpe):
    data = json.loads(snpe.artefacts["snpe_encodings"].read_text())
    assert set(data) >= {"activation_encodings", "param_encodings", "version", "model"}
    keys = {"bitwidth", "dtype", "is_symmetric", "max", "min", "offset", "scale"}
    names = _tensor_names(snpe.artefacts["float_model"])
    for tensor, encs in {**data["activation_encodings"], **data["param_encodings"]}.items():
        assert tensor in names
        for e in encs:
            assert set(e) == keys and e["bitwidth"] == 8 and e["dtype"] == "int" and e["is_symmetric"] == "False"
            assert isinstance(e["offset"], int) and e["offset"] <= 0 and e["scale"] > 0
            assert e["min"] == pytest.approx(e["offset"] * e["scale"])
            assert e["max"] == pytest.approx(e["min"] + e["scale"] * 255)
    for a in snpe.record["activations"]:
        (enc,) = data["activation_encodings"][a["tensor"]]
        assert enc["offset"] == -a["zero_point"][0] and enc["scale"] == a["scale"][0]
    for w in snpe.record["weights"]:
        encs = data["param_encodings"][f"{w['layer']}.weight"]
        assert len(encs) == 1 and encs[0]["offset"] == -w["zero_point"][0]  # SNPE: u8 per-tensor weights


def test_float_model_runs_and_carries_the_dequantized_weights(trt):
    sess = ort.InferenceSession(str(trt.artefacts["float_model"]), providers=["CPUExecutionProvider"])
    out = sess.run(None, {"input": CALIB[:2].numpy()})[0]
    assert out.shape == (2, 10) and np.isfinite(out).all()
    model = onnx.load(str(trt.artefacts["float_model"]))
    assert not [n for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]


def test_tensorrt_ranges_need_symmetric_int8_activations(tmp_path):
    gm = calibrated("resnet20_cifar", "onnxruntime")  # uint8 asymmetric activations
    with pytest.raises(ExportError, match="symmetric int8"):
        export_onnx(gm, CALIB[:1], tmp_path / "m.onnx", artefacts=["tensorrt_clip_ranges"])


def test_unknown_artefact_lists_the_valid_ones(tmp_path):
    with pytest.raises(UnknownNameError, match="snpe_encodings"):
        export_onnx(calibrated("resnet20_cifar", "snpe"), CALIB[:1], tmp_path / "m.onnx", artefacts=["coreml"])
    assert sorted(ARTEFACTS.names()) == ["snpe_encodings", "tensorrt_clip_ranges"]
    assert not (tmp_path / "m.onnx").exists(), "a refused export must not leave files behind"
