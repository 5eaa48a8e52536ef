"""Run an exported model in a real runtime (ONNX Runtime by default; :mod:`quantbench.deploy.runtimes`) and compare
it with quantbench's simulation on the same images."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from quantbench.data import DataBundle
from quantbench.deploy.hazards import cpu_features
from quantbench.deploy.metadata import load_onnx, read_metadata
from quantbench.deploy.ort import ort_version
from quantbench.deploy.runtimes import RuntimeOptions, get_runtime
from quantbench.errors import QuantbenchError
from quantbench.utils.progress import track


@dataclass
class VerifyResult:
    """Simulation vs a real runtime on the same images (top-1 in percent, agreement as a fraction 0-1)."""

    sim_top1: float | None
    real_top1: float | None
    agreement: float
    max_abs_logit_diff: float
    mean_abs_logit_diff: float
    n: int
    int8_kernels: dict[str, int]
    float_ops: list[dict[str, str]]
    int8_complete: bool
    status: str  # "int8" | "partial-int8: ..." -- the mark when some ops ran in float
    kernels_expected: dict[str, int]
    onnx: str
    backend: str
    x64_quant_precision: bool
    onnxruntime: str
    cpu: dict[str, Any]
    int16_overflow_risk: dict[str, Any]
    notes: list[str] = field(default_factory=list)
    runtime: str = "onnxruntime"
    runtime_version: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _notes(record: dict[str, Any], report_int8: dict[str, int], expected: dict[str, int], x64: bool,
           cpu: dict[str, Any]) -> list[str]:
    notes = []
    risk = record.get("int16_overflow_risk", {})
    if risk.get("at_risk") and cpu.get("int16_overflow_possible") and not x64:
        notes.append(
            f"this CPU has AVX2 without VNNI: ONNX Runtime's u8 x s8 kernels add pairs of products in saturating "
            f"int16, and {len(risk['layers'])} layer(s) have int8 weight codes outside [-64, 64], so results can "
            "deviate from exact integer arithmetic; rerun with --x64-quant-precision (ORT converts the weights to "
            "uint8 and runs the exact u8u8 kernel) or export with --reduce-range (7-bit weights)")
    if expected and report_int8 != expected:
        notes.append(f"ONNX Runtime built int8 kernels {report_int8} but the simulation assumed {expected}: where "
                     "they differ the simulation's arithmetic is not what ran")
    return notes


def _faithfulness(record: dict[str, Any], runtime: str) -> str:
    """What the export's backend spec says about ``runtime`` (its ``faithful_to``, as measured)."""
    spec = record["backend"]
    how = (spec.get("faithful_to") or {}).get(runtime)
    if how is not None:
        return f"the {spec['name']} spec is faithful to {runtime}: {how}"
    return (f"the {spec['name']} spec does not model {runtime}'s arithmetic (its requantization rounding, fusions "
            "and float fallbacks), so small differences are expected: docs/DEPLOYMENT.md gives the measured bounds")


class SimulationMismatchError(QuantbenchError, ValueError):
    """The simulation checkpoint is not the one the ONNX was exported with, or the data does not fit the model."""


def check_simulation_hash(record: dict[str, Any], sim_path: str | Path) -> None:
    """Refuse a simulation file whose SHA-256 differs from the one ``export`` recorded in the ONNX."""
    from quantbench.deploy.checkpoint import sha256

    expected = record.get("simulation", {}).get("sha256")
    if expected is None:
        return  # exported through the Python API without a simulation record: nothing to compare
    actual = sha256(sim_path)
    if actual != expected:
        raise SimulationMismatchError(
            f"the simulation {sim_path} has SHA-256 {actual}, but the ONNX was exported with {expected}: the file "
            "was changed or belongs to another export, so a comparison would not test this model; re-export "
            "(quantbench export) to get a matching pair")


def check_data(record: dict[str, Any], config: dict[str, Any], bundle: DataBundle, spec: str) -> None:
    """Refuse data whose class count or image shape is not what the model was exported for."""
    classes = record.get("output", {}).get("classes") or config.get("num_classes")
    origin = f" (exported with --data {config['data']})" if config.get("data") else ""
    if classes is not None and bundle.num_classes != classes:
        raise SimulationMismatchError(
            f"--data {spec} has {bundle.num_classes} classes but the model was exported for {classes}{origin}: "
            "top-1 against these labels would be meaningless; verify with the dataset the model was exported for")
    shape = record.get("input", {}).get("shape", [None])[1:]
    image = tuple(bundle.test[0][0].shape) if len(bundle.test) else None  # type: ignore[arg-type]
    if shape and image is not None and list(image) != list(shape):
        raise SimulationMismatchError(
            f"--data {spec} gives images of shape {list(image)} but the model was exported for {list(shape)}"
            f"{origin}; verify with data of the exported input shape")


@torch.no_grad()
def verify_onnx(onnx_path: str | Path, sim: nn.Module, loader: Iterable, x64_quant_precision: bool = False,
                threads: int | None = None, progress: bool = True, device: str = "cpu",
                runtime: str = "onnxruntime") -> VerifyResult:
    """Run ``onnx_path`` (written by ``quantbench export``) in ``runtime`` (a name of
    :data:`~quantbench.deploy.runtimes.DEPLOY_RUNTIMES`; ONNX Runtime's CPU provider by default) and ``sim`` (the
    simulation it was exported from) on every batch of ``loader``; batches are ``(images, labels)`` or
    images only (top-1 is then None)."""
    rt = get_runtime(runtime)
    rt.require()
    model = load_onnx(str(onnx_path))
    record = read_metadata(model, str(onnx_path))
    loaded = rt.load(Path(onnx_path), RuntimeOptions(threads, x64_quant_precision))
    report = loaded.report
    sim.eval()
    n = agree = sim_ok = real_ok = 0
    has_labels = True
    max_diff, sum_diff, n_logits = 0.0, 0.0, 0
    total = len(loader) if hasattr(loader, "__len__") else None  # type: ignore[arg-type]
    for batch in track(loader, "verifying", total, progress):
        x, y = (batch[0], batch[1]) if isinstance(batch, (list, tuple)) else (batch, None)
        s = sim(x.to(device)).float().cpu().numpy()
        r = loaded.run(np.ascontiguousarray(x.float().cpu().numpy()))
        diff = np.abs(s.astype(np.float64) - r.astype(np.float64))
        max_diff = max(max_diff, float(diff.max()))
        sum_diff += float(diff.sum())
        n_logits += diff.size
        ps, pr = s.argmax(1), r.argmax(1)
        agree += int((ps == pr).sum())
        n += len(ps)
        if y is None or (isinstance(y, torch.Tensor) and y.numel() == 0):
            has_labels = False
        else:
            yy = np.asarray(y)
            sim_ok += int((ps == yy).sum())
            real_ok += int((pr == yy).sum())
    if n == 0:
        from quantbench.errors import DataError

        raise DataError("verify got no images: check --data (and --max-test)")
    expected = dict(Counter(record.get("integer_kernels", {}).values()))
    cpu = cpu_features()
    float_kinds = ", ".join(sorted({f["op"] for f in report.float_ops}))
    n_float = len(report.float_ops)
    status = "int8" if report.int8_complete else f"partial-int8: {n_float} op(s) ran in float ({float_kinds})"
    return VerifyResult(
        sim_top1=100.0 * sim_ok / n if has_labels else None,
        real_top1=100.0 * real_ok / n if has_labels else None,
        agreement=agree / n, max_abs_logit_diff=max_diff, mean_abs_logit_diff=sum_diff / max(n_logits, 1), n=n,
        int8_kernels=report.integer_ops, float_ops=report.float_ops, int8_complete=report.int8_complete,
        status=status, kernels_expected=expected, onnx=str(onnx_path), backend=record["backend"]["name"],
        x64_quant_precision=x64_quant_precision, onnxruntime=ort_version(), cpu=dict(cpu),
        int16_overflow_risk=record.get("int16_overflow_risk", {}),
        notes=_notes(record, report.integer_ops, expected, x64_quant_precision, cpu) if runtime == "onnxruntime"
        else [_faithfulness(record, runtime)],
        runtime=runtime, runtime_version=rt.version(),
    )
