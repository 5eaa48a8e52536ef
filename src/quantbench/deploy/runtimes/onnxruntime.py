"""ONNX Runtime's CPU execution provider: the runtime the simulation's ``arithmetic: onnxruntime`` models."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from quantbench.deploy.runtimes.base import OpReport, Runtime, RuntimeOptions, register_runtime


@dataclass
class _Session:
    session: Any
    input_name: str
    report: OpReport

    def run(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: x})[0]


def _load(path: Path, opts: RuntimeOptions) -> _Session:
    from quantbench.deploy.ort import session_with_report

    sess, report = session_with_report(path, opts.x64_quant_precision, opts.threads)
    return _Session(sess, sess.get_inputs()[0].name, report)


def _version() -> str:
    from quantbench.deploy.ort import ort_version

    return ort_version()


register_runtime(Runtime("onnxruntime", "ONNX Runtime, CPU execution provider (QLinear* / QGemm kernels)",
                         lambda: None, _version, _load))
