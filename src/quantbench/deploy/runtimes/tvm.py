"""Apache TVM (``pip install 'quantbench[tvm]'``): the QDQ ONNX imported by TVM's Relax ONNX frontend and compiled
for the CPU (``llvm``), run in Relax's virtual machine.

Two facts of TVM 0.27 shape this adapter:

* The frontend refuses the exporter's computed ``Pad`` (ResNet shortcuts: "Dynamic pads are not supported yet"),
  so the model is first constant-folded by ONNX Runtime's basic graph optimizations (nothing quantized changes:
  the folded subgraphs compute pad sizes and shapes).
* It lowers QuantizeLinear / DequantizeLinear to ``R.quantize`` / ``R.dequantize`` around **float** operators
  (fake quantization): no int8 kernel runs on the ``llvm`` target. The report therefore lists every convolution and
  matrix multiply as a float op, with that reason.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from quantbench.deploy.runtimes.base import OpReport, Runtime, RuntimeOptions, register_runtime, requires

INSTALL = "pip install 'quantbench[tvm]'"
FLOAT_REASON = ("TVM's Relax ONNX frontend lowers QuantizeLinear/DequantizeLinear to quantize/dequantize around "
                "float operators: on the llvm target this runs in float32 (fake quantization), not int8")
COMPUTE = ("nn.conv2d", "nn.conv1d", "matmul", "nn.dense")


def _tvm() -> Any:
    import tvm

    return tvm


def report_from_relax(text: str) -> OpReport:
    """Op counts of a Relax module's text; every conv / matmul is float (see the module docstring)."""
    calls = Counter(re.findall(r"R\.([a-zA-Z_][a-zA-Z0-9_.]*)\(", text))
    floats = [{"op": op, "node": f"{op} #{i + 1}", "reason": FLOAT_REASON}
              for op in COMPUTE for i in range(calls.get(op, 0))]
    return OpReport({}, floats, dict(sorted(calls.items())))


@dataclass
class _Compiled:
    model: Any
    report: OpReport
    _modules: dict[tuple[int, ...], Any]  # Relax modules imported per input shape (the frontend wants static ones)
    _vms: dict[tuple[int, ...], Any]

    def run(self, x: np.ndarray) -> np.ndarray:
        tvm = _tvm()
        vm = self._vms.get(x.shape)
        if vm is None:
            from tvm import relax

            vm = self._vms[x.shape] = relax.VirtualMachine(tvm.compile(self._module(x.shape), target="llvm"),
                                                           tvm.cpu())
        make = getattr(tvm.runtime, "tensor", None) or tvm.nd.array
        return np.asarray(vm["main"](make(np.ascontiguousarray(x))).numpy())

    def _module(self, shape: tuple[int, ...]) -> Any:
        if shape not in self._modules:
            from tvm.relax.frontend.onnx import from_onnx

            self._modules[shape] = from_onnx(self.model, shape_dict={self.model.graph.input[0].name: list(shape)})
        return self._modules[shape]


def _load(path: Path, opts: RuntimeOptions) -> _Compiled:
    if opts.threads:
        os.environ["TVM_NUM_THREADS"] = str(opts.threads)  # read when TVM's thread pool starts
    from quantbench.deploy.ort import constant_folded

    model = constant_folded(path)
    compiled = _Compiled(model, OpReport({}), {}, {})
    shape = tuple(d.dim_value or 1 for d in model.graph.input[0].type.tensor_type.shape.dim)
    compiled.report = report_from_relax(str(compiled._module(shape)))
    return compiled


register_runtime(Runtime("tvm", "Apache TVM, Relax ONNX frontend, llvm CPU target (QDQ run as float fake quantization)",
                         requires("Apache TVM", INSTALL, "tvm", "tvm.relax.frontend.onnx"),
                         lambda: str(_tvm().__version__), _load))
