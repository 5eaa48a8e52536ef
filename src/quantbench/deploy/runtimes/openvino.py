"""OpenVINO's CPU plugin (``pip install 'quantbench[openvino]'``): the QDQ ONNX read by OpenVINO's ONNX frontend,
its low-precision transformations turn QuantizeLinear/DequantizeLinear pairs into int8 convolutions, compiled
with ``INFERENCE_PRECISION_HINT f32`` (so what is not int8 runs in float32, not bf16/fp16).

Which ops ran in integer arithmetic is read from the compiled model's runtime graph: each executed layer's
``layerType`` and ``runtimePrecision``.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from quantbench.deploy.runtimes.base import OpReport, Runtime, RuntimeOptions, register_runtime, requires

INSTALL = "pip install 'quantbench[openvino]'"
#: layer types of the CPU plugin's runtime graph that compute (the rest move, reshape or hold constants)
COMPUTE = frozenset({"Convolution", "GroupConvolution", "Deconvolution", "FullyConnected", "MatMul", "Pooling",
                     "Reduce", "Interpolate", "MVN", "Softmax", "Subgraph", "Concatenation"})
INTEGER = frozenset({"u8", "i8", "i32", "u4", "i4"})


def _openvino() -> Any:
    import openvino

    return openvino


def _info(op: Any, key: str) -> str:
    info = op.get_rt_info()
    return info[key].astype(str) if key in info else ""


def report_from_runtime_model(model: Any) -> OpReport:
    """Integer and float compute layers of a compiled model's runtime graph."""
    integer: Counter[str] = Counter()
    floats: list[dict[str, str]] = []
    every: Counter[str] = Counter()
    for op in model.get_ordered_ops():
        kind, precision = _info(op, "layerType") or op.get_type_name(), _info(op, "runtimePrecision").lower()
        every[kind] += 1
        if kind not in COMPUTE:
            continue
        if precision in INTEGER:
            integer[kind] += 1
        else:
            floats.append({"op": kind, "node": op.get_friendly_name(),
                           "reason": f"OpenVINO's CPU plugin ran it in {precision or 'float'}: its low-precision "
                                     "transformations did not match a quantized pattern here"})
    return OpReport(dict(sorted(integer.items())), floats, dict(sorted(every.items())))


@dataclass
class _Compiled:
    compiled: Any
    report: OpReport

    def run(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(self.compiled(x)[self.compiled.output(0)])


def _load(path: Path, opts: RuntimeOptions) -> _Compiled:
    ov = _openvino()
    config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": "f32"}
    if opts.threads:
        config["INFERENCE_NUM_THREADS"] = int(opts.threads)
    compiled = ov.Core().compile_model(str(path), "CPU", config)
    return _Compiled(compiled, report_from_runtime_model(compiled.get_runtime_model()))


register_runtime(Runtime("openvino", "OpenVINO CPU plugin (int8 via its low-precision transformations, f32 rest)",
                         requires("OpenVINO", INSTALL, "openvino"), lambda: str(_openvino().__version__), _load))
