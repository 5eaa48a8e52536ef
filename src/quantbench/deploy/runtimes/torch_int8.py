"""PyTorch's own int8 CPU engines as deployment runtimes: ``torch-x86`` (FBGEMM/oneDNN, the kernels the ``fbgemm``
spec describes) and ``torch-qnnpack`` (QNNPACK, PyTorch's mobile kernels). The exported QDQ ONNX is run on
``torch.ops.quantized`` kernels by :class:`~quantbench.deploy.runtimes.torch_qdq.QDQInterpreter`: the integer ops a
``torch.ao`` ``convert_fx`` model of the same network would run, with the same scales and zero points."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from quantbench.deploy.runtimes.base import OpReport, Runtime, RuntimeOptions, register_runtime
from quantbench.deploy.runtimes.onnx_ops import input_shape
from quantbench.deploy.runtimes.torch_qdq import QDQInterpreter, Record, engine


@dataclass
class _Engine:
    interpreter: QDQInterpreter
    engine: str
    threads: int | None
    report: OpReport

    def run(self, x: np.ndarray) -> np.ndarray:
        with engine(self.engine, self.threads), torch.inference_mode():
            return self.interpreter.run(torch.from_numpy(np.ascontiguousarray(x)))[0].numpy()


def _loader(name: str) -> Callable[[Path, RuntimeOptions], _Engine]:
    def load(path: Path, opts: RuntimeOptions) -> _Engine:
        from quantbench.deploy.ort import constant_folded

        model = constant_folded(path)
        interp = QDQInterpreter(model)
        record = Record()
        with engine(name, opts.threads), torch.inference_mode():  # packs the weights; records what ran in int8
            interp.run(torch.zeros(input_shape(model)), record)
        return _Engine(interp, name, opts.threads, record.report())
    return load


def _missing(name: str) -> Callable[[], str | None]:
    def missing() -> str | None:
        if name not in torch.backends.quantized.supported_engines:
            return (f"this PyTorch build has no {name!r} quantized engine (it has "
                    f"{', '.join(torch.backends.quantized.supported_engines)})")
        return None
    return missing


for _name, _what in (("x86", "PyTorch x86 int8 engine (FBGEMM / oneDNN kernels of torch.ops.quantized)"),
                     ("qnnpack", "PyTorch QNNPACK int8 engine (the mobile kernels of torch.ops.quantized)")):
    register_runtime(Runtime(f"torch-{_name}", _what, _missing(_name), lambda: torch.__version__, _loader(_name)))
