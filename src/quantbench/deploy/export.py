"""Export a calibrated (PTQ or QAT) simulation to ONNX with QuantizeLinear / DequantizeLinear pairs.

Exporter: ``torch.onnx.export(..., dynamo=False)``, the TorchScript-based exporter, chosen on purpose.
torch 2.14's default is the dynamo exporter, which needs ``onnxscript`` and translates ATen ops through
its own library: quantization would have to go through ``quantized_decomposed`` ops or a custom
translation table, and its optimizer rewrites the graph afterwards. The TorchScript exporter turns each of
our stand-in modules (:mod:`quantbench.deploy.qdq`) into exactly the nodes its ``symbolic`` emits, with no
extra dependency, in well under a second for a ResNet; it is deprecated upstream, so a failure names the
fix. The opset is 13 by default (per-channel ``axis`` needs >= 13; ONNX Runtime folds Clip into
QuantizeLinear only for QuantizeLinear versions 10 and 13, and the simulation assumes that rule), at most 18.
"""

from __future__ import annotations

import copy
import io
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
import torch.fx as fx

from quantbench import __version__
from quantbench.deploy.errors import ExportError
from quantbench.deploy.hazards import weight_overflow_risk
from quantbench.deploy.lower import check_exportable, lower_for_export
from quantbench.deploy.metadata import write_metadata
from quantbench.deploy.onnx_graph import name_qdq_nodes, op_counts
from quantbench.deploy.qdq import ExportQDQ, ExportWeighted, recording
from quantbench.deploy.sink import sink_dequantize
from quantbench.graph.qmodules import QuantWeighted
from quantbench.graph.requant import integer_groups
from quantbench.utils.io import AtomicGroup

MIN_OPSET, MAX_OPSET, DEFAULT_OPSET = 13, 18, 13
INPUT_NAME, OUTPUT_NAME = "input", "logits"
EXPORTER = {
    "name": "torchscript",
    "call": "torch.onnx.export(model, args, f, dynamo=False, autograd_inlining=False)",
    "why": "exact QDQ nodes from autograd.Function.symbolic, no onnxscript dependency; the dynamo exporter "
           "(torch's default) would need onnxscript and a custom translation table for the same graph",
}


@dataclass
class ExportResult:
    """What was written and how it looks."""

    path: Path
    record: dict[str, Any]
    ops: dict[str, int]
    artefacts: dict[str, Path] = field(default_factory=dict)

    @property
    def n_activation_qdq(self) -> int:
        return len(self.record["activations"])

    @property
    def n_weights(self) -> int:
        return len(self.record["weights"])


def _dtype_name(t: torch.Tensor) -> str:
    return {torch.int8: "int8", torch.uint8: "uint8", torch.int32: "int32"}[t.dtype]


def _expected(emod: fx.GraphModule) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for m in emod.modules():
        if isinstance(m, ExportQDQ):
            out[m.qname] = {"scale": m.s.numpy(), "zero_point": m.z.numpy(), "clip": m.clip}
        elif isinstance(m, ExportWeighted):
            out[f"{m.lname}.weight"] = {"codes": m.w_codes.numpy()}
            if m.bias_quantized:
                out[f"{m.lname}.bias"] = {"codes": m.b_codes.numpy()}
    return out


def _run_exporter(emod: fx.GraphModule, example: torch.Tensor, opset: int) -> tuple[onnx.ModelProto, list]:
    buf = io.BytesIO()
    with recording(emod) as emitted, warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice and tracer warnings
        try:
            torch.onnx.export(
                emod, (example,), buf, dynamo=False, opset_version=opset, input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME], dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                autograd_inlining=False, do_constant_folding=True,
            )
        except (TypeError, NotImplementedError, RuntimeError) as exc:
            raise ExportError(
                f"torch.onnx.export with dynamo=False (the TorchScript exporter) failed in torch {torch.__version__}: "
                f"{exc}. If this torch removed the TorchScript exporter, install a torch that still has it "
                "(it is present up to at least 2.14)") from exc
        emitted = list(emitted)
    return onnx.load_model_from_string(buf.getvalue()), emitted


def _classes(model: onnx.ModelProto) -> int | None:
    """The logits' width (class count) of the exported graph, None when it is not static."""
    dims = model.graph.output[0].type.tensor_type.shape.dim
    return int(dims[-1].dim_value) if len(dims) >= 2 and dims[-1].dim_value > 0 else None


def _record(gm: fx.GraphModule, emod: fx.GraphModule, where: dict[str, dict], opset: int,
            example: torch.Tensor, extra: dict[str, Any], classes: int | None = None) -> dict[str, Any]:
    spec = gm.meta["quantbench"]["backend"]
    acts, weights, biases = [], [], []
    weight_codes: dict[str, np.ndarray] = {}
    for m in emod.modules():
        if isinstance(m, ExportQDQ):
            lo, hi = (-128, 127) if m.qmin < 0 else (0, 255)
            acts.append({
                "name": m.qname, **where[m.qname], "dtype": _dtype_name(m.z),
                "bits": int(np.log2(m.qmax - m.qmin + 1) + 0.5) if m.qmax > m.qmin else 1,
                "qmin": m.qmin, "qmax": m.qmax, "narrow": (m.qmin, m.qmax) != (lo, hi),
                "scale": m.s.reshape(-1).tolist(), "zero_point": m.z.reshape(-1).int().tolist(),
                "axis": m.axis, "copy_of": m.copy_of,
            })
        elif isinstance(m, ExportWeighted):
            wq = gm.get_submodule(m.lname).weight_quantizer
            lo, hi = (-128, 127) if wq.qmin < 0 else (0, 255)
            weight_codes[m.lname] = m.w_codes.numpy()
            weights.append({
                "layer": m.lname, **where[f"{m.lname}.weight"], "dtype": _dtype_name(m.w_codes),
                "bits": wq.scheme.bits, "qmin": wq.qmin, "qmax": wq.qmax, "narrow": (wq.qmin, wq.qmax) != (lo, hi),
                "per_channel": m.weight_axis is not None, "axis": m.weight_axis,
                "scale": m.w_scale.reshape(-1).tolist(), "zero_point": m.w_zp.reshape(-1).int().tolist(),
            })
            if m.bias_quantized:
                biases.append({"layer": m.lname, **where[f"{m.lname}.bias"], "dtype": "int32",
                               "scale": m.b_scale.tolist(), "rule": "scale = s_in * s_w, zero-point 0, rne"})
    narrow = [a["name"] for a in acts if a["narrow"]] + [w["layer"] + ".weight" for w in weights if w["narrow"]]
    float_layers = [n for n, m in gm.named_modules() if isinstance(m, QuantWeighted) and m.weight_quantizer is None]
    notes = []
    if narrow:
        notes.append("narrow integer ranges (sub-8-bit or [-127, 127]) are stored in int8/uint8 containers: weight "
                     "codes lie inside [qmin, qmax]; activations are clipped to [qmin, qmax] before QuantizeLinear")
    if spec.reduce_range:
        notes.append("reduce_range: 7-bit weights in int8 containers (no int16 overflow on AVX2 without VNNI)")
    return {
        "quantbench_version": __version__,
        "exporter": {**EXPORTER, "torch": torch.__version__, "onnx": onnx.__version__, "opset": opset},
        "backend": spec.model_dump(mode="json"),
        "input": {"name": INPUT_NAME, "shape": [None, *example.shape[1:]]},
        "output": {"name": OUTPUT_NAME, "classes": classes},
        "activations": acts,
        "weights": weights,
        "biases": biases,
        "float_layers": float_layers,
        "narrow_ranges": narrow,
        "bn_folded": spec.fold_bn,
        "integer_kernels": integer_groups(gm),
        "int16_overflow_risk": weight_overflow_risk(weight_codes).to_dict(),
        "notes": notes,
        **extra,
    }


def check_opset(opset: int) -> int:
    """Refuse an opset the QDQ export does not support (call it before calibrating)."""
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise ExportError(f"--opset {opset} is not supported: use {MIN_OPSET}..{MAX_OPSET} (per-channel QDQ, "
                          f"QuantizeLinear's axis, needs >= {MIN_OPSET}; ONNX Runtime's Clip/QuantizeLinear fusion, "
                          f"which the simulation assumes, only matches QuantizeLinear up to opset {MAX_OPSET})")
    return opset


def export_onnx(gm: fx.GraphModule, example_input: torch.Tensor, path: str | Path, *, opset: int = DEFAULT_OPSET,
                extra: dict[str, Any] | None = None, artefacts: list[str] | None = None,
                group: AtomicGroup | None = None) -> ExportResult:
    """Write ``gm`` (prepared and calibrated for a deployable backend) as a QDQ ONNX model at ``path``.

    ``extra`` goes into the metadata record (the CLI stores the model, data and calibration settings and
    the simulation checkpoint there). ``artefacts`` names backend artefact writers (default: the
    backend's own, e.g. TensorRT clip ranges); pass ``[]`` for none. Every file is written atomically and
    all together; with ``group`` they are only staged there and appear when the caller commits it.
    """
    check_opset(opset)
    spec = check_exportable(gm)
    from quantbench.deploy.artefacts import ARTEFACTS

    names = list(spec.artefacts) if artefacts is None else artefacts
    for n in names:
        ARTEFACTS.get(n)  # an unknown name fails before anything is written
    path = Path(path)
    example = example_input[:1].detach().to("cpu", torch.float32)
    emod = lower_for_export(gm).to("cpu")
    model, emitted = _run_exporter(emod, example, opset)
    where = name_qdq_nodes(model, emitted, _expected(emod))
    # the artefacts' float model comes from the plain QDQ graph (copied only when an artefact needs it)
    before_sinking = copy.deepcopy(model) if names else model
    for qnode, ops in sink_dequantize(model).items():
        name = qnode.rsplit("/", 1)[0]
        where[name] = {**where[name], "quantize": None, "on_codes": ops}
    record = _record(gm, emod, where, opset, example, extra or {}, _classes(model))
    write_metadata(model, record)
    model.producer_name, model.producer_version = "quantbench", __version__
    onnx.checker.check_model(model)
    own = group is None
    group = AtomicGroup() if group is None else group
    try:  # every file is staged first; nothing is visible unless all of them were written
        written = _stage_artefacts(names, before_sinking, record, path, group)
        data = model.SerializeToString()
        group.write(path, lambda f: f.write(data))
        if own:
            group.commit()
    except BaseException:
        if own:
            group.abort()
        raise
    return ExportResult(path, record, op_counts(model.graph.node), written)


def _stage_artefacts(names: list[str], model: onnx.ModelProto, record: dict[str, Any], path: Path,
                     group: AtomicGroup) -> dict[str, Path]:
    """Write the artefacts into a hidden staging folder beside ``path`` and stage them into ``group``."""
    from quantbench.deploy.artefacts import write_artefacts

    if not names:
        return {}
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".staging", dir=path.parent))
    group.defer(lambda: shutil.rmtree(staging, ignore_errors=True))
    written = write_artefacts(names, model, record, staging / path.name)  # raises if a format cannot hold it
    final = {}
    for key, p in written.items():
        final[key] = path.with_name(p.name)
        group.adopt(p, final[key])
    return final


__all__ = ["DEFAULT_OPSET", "EXPORTER", "ExportResult", "check_opset", "export_onnx"]


def export_float_onnx(model: torch.nn.Module, example: torch.Tensor, path: str | Path) -> Path:
    """The float model as ONNX (opset 13, TorchScript exporter, dynamic batch; input ``input``, output
    ``logits``): the FP32 baseline that runtimes' int8 speed is measured against."""
    path = Path(path)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), (example,), str(path), dynamo=False, opset_version=13,
                          input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    return path
