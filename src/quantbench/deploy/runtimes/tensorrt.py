"""NVIDIA TensorRT (``pip install tensorrt``; needs a CUDA GPU): an engine built from the QDQ ONNX with TensorRT's
ONNX parser (explicit quantization: the export's QuantizeLinear / DequantizeLinear place int8), run through
``execute_async_v3`` on torch CUDA buffers.

Which layers ran in int8 is read from the engine inspector (``ProfilingVerbosity.DETAILED``): a convolution /
matrix-multiply layer whose input or output format is INT8 ran in int8.

*Not yet executed*: no GPU has been lent to this project, so this adapter was written against TensorRT 10's
documented Python API and only its refusal path (no GPU / no wheel) and the inspector parsing are tested. The
first session with a GPU should run ``python benchmarks/runtime_agreement.py --runtimes tensorrt``.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from quantbench.deploy.errors import RuntimeUnavailableError
from quantbench.deploy.runtimes.base import OpReport, Runtime, RuntimeOptions, register_runtime

INSTALL = "pip install tensorrt (on a machine with an NVIDIA GPU and CUDA)"
COMPUTE = ("Convolution", "MatrixMultiply", "Gemm", "FullyConnected", "ElementWise", "Pooling", "Reduce")


def _missing() -> str | None:
    if not torch.cuda.is_available():
        return "TensorRT needs an NVIDIA GPU and this machine has no CUDA device"
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return f"TensorRT is not installed ({INSTALL})"
    return None


def _trt() -> Any:
    import tensorrt

    return tensorrt


def report_from_inspector(info: str) -> OpReport:
    """Integer and float compute layers from the engine inspector's JSON (``get_engine_information``)."""
    integer: Counter[str] = Counter()
    floats: list[dict[str, str]] = []
    every: Counter[str] = Counter()
    for layer in json.loads(info).get("Layers", []):
        if not isinstance(layer, dict):
            continue
        kind = str(layer.get("LayerType", "Unknown"))
        every[kind] += 1
        if not any(c.lower() in kind.lower() for c in COMPUTE):
            continue
        tensors = layer.get("Inputs", []) + layer.get("Outputs", [])
        formats = " ".join(str(t.get("Format/Datatype", "")) for t in tensors if isinstance(t, dict))
        if "int8" in formats.lower():
            integer[kind] += 1
        else:
            floats.append({"op": kind, "node": str(layer.get("Name", "")),
                           "reason": "TensorRT chose a float kernel (no int8 tensor at this layer)"})
    return OpReport(dict(sorted(integer.items())), floats, dict(sorted(every.items())))


@dataclass
class _Engine:
    engine: Any
    input_name: str
    output_name: str
    report: OpReport = field(default_factory=lambda: OpReport({}))

    def run(self, x: np.ndarray) -> np.ndarray:
        context = self.engine.create_execution_context()
        inp = torch.from_numpy(np.ascontiguousarray(x)).cuda()
        context.set_input_shape(self.input_name, tuple(inp.shape))
        out = torch.empty(tuple(context.get_tensor_shape(self.output_name)), device="cuda", dtype=torch.float32)
        context.set_tensor_address(self.input_name, inp.data_ptr())
        context.set_tensor_address(self.output_name, out.data_ptr())
        if not context.execute_async_v3(torch.cuda.current_stream().cuda_stream):
            raise RuntimeUnavailableError("TensorRT failed to execute the engine")
        torch.cuda.current_stream().synchronize()
        return out.cpu().numpy()


def _load(path: Path, opts: RuntimeOptions, max_batch: int = 1024) -> _Engine:
    trt = _trt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(Path(path).read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeUnavailableError(f"TensorRT's ONNX parser refused {path}: {errors}")
    config = builder.create_builder_config()
    config.set_flag(trt.BuilderFlag.INT8)  # explicit quantization: the QDQ nodes decide what is int8
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    inp, out = network.get_input(0), network.get_output(0)
    shape = tuple(inp.shape)
    profile = builder.create_optimization_profile()
    profile.set_shape(inp.name, (1, *shape[1:]), (32, *shape[1:]), (max_batch, *shape[1:]))
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeUnavailableError(f"TensorRT could not build an engine from {path}")
    engine = trt.Runtime(logger).deserialize_cuda_engine(serialized)
    info = engine.create_engine_inspector().get_engine_information(trt.LayerInformationFormat.JSON)
    return _Engine(engine, inp.name, out.name, report_from_inspector(info))


register_runtime(Runtime("tensorrt", "NVIDIA TensorRT (GPU; engine built from the QDQ ONNX, explicit int8)",
                         _missing, lambda: str(_trt().__version__), _load))
