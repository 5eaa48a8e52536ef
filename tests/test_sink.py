"""Value-preserving ops moved onto uint8 codes (deploy/sink.py): ONNX Runtime gives the same outputs before
and after, and the rewrite leaves alone what it cannot do exactly."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from quantbench.deploy.sink import sink_dequantize

SCALE = 0.05


def _graph(zp_dtype: type = np.uint8, zp: int = 7, pad_value: float = 0.0, scale2: float = SCALE,
           with_flatten: bool = False) -> onnx.ModelProto:
    """x -> Q -> DQ -> Slice -> Pad -> Q' -> DQ' -> y, Q' with (scale2, zp): the shape the export writes."""
    inits = [
        numpy_helper.from_array(np.array(SCALE, np.float32), "s1"),
        numpy_helper.from_array(np.array(zp, zp_dtype), "z1"),
        numpy_helper.from_array(np.array(scale2, np.float32), "s2"),
        numpy_helper.from_array(np.array(zp, zp_dtype), "z2"),
        numpy_helper.from_array(np.array(SCALE, np.float32), "s3"),
        numpy_helper.from_array(np.array(zp, zp_dtype), "z3"),
        numpy_helper.from_array(np.array([0, 0, 0, 0], np.int64), "starts"),
        numpy_helper.from_array(np.array([2**31, 2**31, 2**31, 2**31], np.int64), "ends"),
        numpy_helper.from_array(np.array([0, 1, 2, 3], np.int64), "axes"),
        numpy_helper.from_array(np.array([1, 1, 2, 2], np.int64), "steps"),
        numpy_helper.from_array(np.array([0, 2, 0, 0, 0, 2, 0, 0], np.int64), "pads"),
        numpy_helper.from_array(np.array(pad_value, np.float32), "fill"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s1", "z1"], ["xq"], name="src/QuantizeLinear"),
        helper.make_node("DequantizeLinear", ["xq", "s1", "z1"], ["xd"], name="src/DequantizeLinear"),
        helper.make_node("Slice", ["xd", "starts", "ends", "axes", "steps"], ["sl"], name="/Slice"),
        helper.make_node("Pad", ["sl", "pads", "fill"], ["pd"], name="/Pad", mode="constant"),
    ]
    last = "pd"
    if with_flatten:
        nodes.append(helper.make_node("Flatten", ["pd"], ["fl"], name="/Flatten"))
        last = "fl"
    nodes += [
        helper.make_node("QuantizeLinear", [last, "s2", "z2"], ["rq"], name="copy__regrid_add/QuantizeLinear"),
        helper.make_node("DequantizeLinear", ["rq", "s2", "z2"], ["rd"], name="copy__regrid_add/DequantizeLinear"),
        # a second reader of the source keeps its DequantizeLinear alive
        helper.make_node("DequantizeLinear", ["xq", "s3", "z3"], ["other"], name="src/DequantizeLinear_1"),
    ]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4, 6, 6])],
                          [helper.make_tensor_value_info("rd", TensorProto.FLOAT, [2, None] if with_flatten else
                                                         [2, 8, 3, 3]),
                           helper.make_tensor_value_info("other", TensorProto.FLOAT, [2, 4, 6, 6])], inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    onnx.checker.check_model(model)
    return model


def _run(model: onnx.ModelProto, x: np.ndarray) -> list[np.ndarray]:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})


X = np.random.default_rng(0).normal(0, 3, (2, 4, 6, 6)).astype(np.float32)


@pytest.mark.parametrize("with_flatten", [False, True])
def test_sunk_chain_gives_the_same_outputs_in_onnx_runtime(with_flatten):
    model = _graph(with_flatten=with_flatten)
    before = _run(model, X)
    sunk = sink_dequantize(model)
    ops = ["Slice", "Pad"] + (["Flatten"] if with_flatten else [])
    assert sunk == {"copy__regrid_add/QuantizeLinear": ops}
    onnx.checker.check_model(model)
    kinds = [n.op_type for n in model.graph.node]
    assert kinds.count("QuantizeLinear") == 1 and kinds.count("DequantizeLinear") == 2
    pad = next(n for n in model.graph.node if n.op_type == "Pad")
    fill = next(numpy_helper.to_array(i) for i in model.graph.initializer if i.name == pad.input[2])
    assert fill.dtype == np.uint8 and int(fill) == 7  # the zero-point code pads, as 0.0 did
    after = _run(model, X)
    for a, b in zip(before, after, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("kwargs", [
    {"zp_dtype": np.int8, "zp": 0},  # int8: ORT's s8->u8 conversion needs Q -> DQ
    {"pad_value": 1.0},  # a non-zero fill is not the zero-point code
    {"scale2": 2 * SCALE},  # a different grid re-rounds
])
def test_chains_that_would_not_be_exact_or_fusable_are_left_alone(kwargs):
    model = _graph(**kwargs)
    nodes = [n.op_type for n in model.graph.node]
    assert sink_dequantize(model) == {}
    assert [n.op_type for n in model.graph.node] == nodes
