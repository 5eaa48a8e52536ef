"""Deployment: QDQ ONNX export, backend artefacts, ONNX Runtime verification, latency and size."""

from quantbench.deploy.checkpoint import load_simulation, save_simulation
from quantbench.deploy.export import ExportResult, export_onnx
from quantbench.deploy.size import SizeReport, model_size
from quantbench.deploy.verify import VerifyResult, verify_onnx

__all__ = ["ExportResult", "SizeReport", "VerifyResult", "export_onnx", "load_simulation", "model_size",
           "save_simulation", "verify_onnx"]
