"""int32 bias codes against references that share no code with quantbench (issue 17).

The simulation and the exporter both call ``graph.requant.quantize_bias``, so sim-vs-ORT agreement
cannot catch a wrong rounding there (truncation passed the whole suite). Here the codes are compared with
(1) a float64 ``rne(b / (s_in * s_w))`` and (2) the int32 bias initializer that ONNX Runtime's own
``quantize_static`` writes for the same conv layer, given the same scales.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from quantbench.graph.requant import quantize_bias

onnx = pytest.importorskip("onnx")
ort_quant = pytest.importorskip("onnxruntime.quantization")


def ref_bias_codes(b: np.ndarray, s_in: float, s_w: np.ndarray) -> np.ndarray:
    """float64 round-half-to-even of ``b / (s_in * s_w)``, clamped to int32."""
    q = np.rint(b.astype(np.float64) / (np.float64(s_in) * s_w.astype(np.float64)))
    return np.clip(q, -(2**31), 2**31 - 1)


def test_bias_codes_equal_float64_round_half_to_even():
    r = np.random.default_rng(0)
    c = 4096
    b = r.normal(0, 0.5, c).astype(np.float32)
    s_in = np.float32(0.0173)
    s_w = r.uniform(1e-3, 3e-2, c).astype(np.float32)
    ref = ref_bias_codes(b, float(s_in), s_w)
    sb = torch.tensor(s_in) * torch.from_numpy(s_w)  # float32(s_in * s_w), as bias_scale computes it
    got = quantize_bias(torch.from_numpy(b), sb).numpy().astype(np.float64)
    # a code may differ only where b / s lies within float32 rounding (product and quotient, a few ulp
    # of the quotient) of a .5 tie
    quot = np.abs(b.astype(np.float64) / (float(s_in) * s_w.astype(np.float64)))
    frac = quot - np.floor(quot)
    ambiguous = np.abs(frac - 0.5) < 8 * np.finfo(np.float32).eps * np.maximum(quot, 1.0)
    np.testing.assert_array_equal(got[~ambiguous], ref[~ambiguous])
    assert (~ambiguous).sum() > 0.95 * c
    assert np.sum(frac > 0.5) > c // 4  # truncation toward zero would get these wrong


def test_bias_codes_saturate_at_int32():
    b = torch.tensor([1e6, -1e6, 0.5, -0.5, 1.5, -2.5])
    sb = torch.tensor([1e-6, 1e-6, 1.0, 1.0, 1.0, 1.0])
    got = quantize_bias(b, sb)
    torch.testing.assert_close(got, torch.tensor([2**31 - 1, -(2**31), 0.0, -0.0, 2.0, -2.0]), rtol=0, atol=0)


def _conv_model(w: np.ndarray, b: np.ndarray):
    from onnx import TensorProto, helper, numpy_helper

    x = helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, w.shape[1], 6, 6])
    y = helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)
    conv = helper.make_node("Conv", ["X", "W", "B"], ["Y"], pads=[1, 1, 1, 1])
    graph = helper.make_graph([conv], "conv", [x], [y],
                              [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "B")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


class _Reader(ort_quant.CalibrationDataReader):
    def __init__(self, batches: list[np.ndarray]) -> None:
        self._it = iter([{"X": x} for x in batches])

    def get_next(self):
        return next(self._it, None)


def test_bias_codes_equal_onnxruntime_quantize_static(tmp_path):
    from onnx import numpy_helper

    r = np.random.default_rng(1)
    w = r.normal(0, 0.2, (16, 3, 3, 3)).astype(np.float32)
    b = r.normal(0, 0.3, 16).astype(np.float32)
    src, dst = tmp_path / "conv.onnx", tmp_path / "conv.q.onnx"
    onnx.save(_conv_model(w, b), src)
    batches = [r.normal(0, 1, (1, 3, 6, 6)).astype(np.float32) for _ in range(4)]
    ort_quant.quantize_static(
        str(src), str(dst), _Reader(batches), quant_format=ort_quant.QuantFormat.QDQ, per_channel=True,
        activation_type=ort_quant.QuantType.QUInt8, weight_type=ort_quant.QuantType.QInt8,
    )
    inits = {t.name: numpy_helper.to_array(t) for t in onnx.load(dst).graph.initializer}
    bias_name = next(n for n, a in inits.items() if a.dtype == np.int32)
    ort_codes = inits[bias_name].astype(np.float64)
    s_in = inits["X_scale"].astype(np.float32).reshape(())
    s_w = inits["W_scale"].astype(np.float32).reshape(-1)
    sb = torch.from_numpy(np.asarray(s_in)) * torch.from_numpy(s_w)
    got = quantize_bias(torch.from_numpy(b), sb).numpy().astype(np.float64)
    np.testing.assert_array_equal(got, ort_codes)
    np.testing.assert_array_equal(got, ref_bias_codes(b, float(s_in), s_w))
    assert np.any(np.abs(b / sb.numpy()) % 1 > 0.5)  # a case where truncation and rounding differ
