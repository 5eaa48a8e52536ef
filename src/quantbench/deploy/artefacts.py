"""Backend artefacts written beside the QDQ ONNX: per-tensor ranges in the formats runtimes read.

Both refer to tensor names of ``<model>.float.onnx``, the same graph with every QuantizeLinear /
DequantizeLinear pair removed and weights stored as their dequantized float values (what a runtime that
takes a float model plus quantization ranges expects); activation names are also the inputs of the
QuantizeLinear nodes in the QDQ model.

* ``tensorrt_clip_ranges`` (``<model>.tensorrt.json``): TensorRT implicit-quantization dynamic ranges,
  ``{"tensorrt": {"blob_range": {tensor: amax}}}`` as MQBench writes them, with ``amax = scale * 127`` so
  TensorRT's ``scale = amax / 127`` reproduces the simulated scale exactly. Needs symmetric int8 activations.
* ``snpe_encodings`` (``<model>.encodings.json``): SNPE / AIMET quantization overrides,
  ``{"activation_encodings": {tensor: [enc]}, "param_encodings": {weight: [enc per channel]}}`` with
  ``enc = {bitwidth, min, max, scale, offset, is_symmetric, dtype}``, ``offset = qmin - zero_point``,
  ``min = offset * scale``, ``max = (qmax - zero_point) * scale``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from quantbench.deploy.errors import ExportError
from quantbench.deploy.onnx_graph import Graph
from quantbench.utils.io import atomic_write_text
from quantbench.utils.registry import Registry

Writer = Callable[[dict[str, Any], Path, str], Path]
ARTEFACTS: Registry[Writer] = Registry("artefact")
TRT_AMAX_LEVELS = 127


def float_model_path(onnx_path: Path) -> Path:
    return onnx_path.with_name(onnx_path.stem + ".float.onnx")


def strip_qdq(model: onnx.ModelProto) -> onnx.ModelProto:
    """The float graph: QDQ pairs (and their range Clips) removed, weights dequantized into initializers."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = Graph(out)
    replace: dict[str, str] = {}
    drop: set[int] = set()
    new_inits = []
    for n in g.graph.node:
        if n.op_type == "QuantizeLinear":
            src = n.input[0]
            clip = g.producer.get(src)
            if clip is not None and clip.op_type == "Clip" and clip.name.endswith("/Clip"):
                drop.add(id(clip))
                src = clip.input[0]
            drop.add(id(n))
            for dq in g.consumers.get(n.output[0], []):
                drop.add(id(dq))
                replace[dq.output[0]] = src
        elif n.op_type == "DequantizeLinear" and g.constant(n.input[0]) is not None:
            codes, scale, zp = (g.constant(i) for i in n.input[:3])
            axis = next((a.i for a in n.attribute if a.name == "axis"), 1)
            if scale.ndim == 1 and scale.size > 1:
                shape = [1] * codes.ndim
                shape[axis] = -1
                scale, zp = scale.reshape(shape), zp.reshape(shape)
            value = ((codes.astype(np.float64) - zp.astype(np.float64)) * scale.astype(np.float64)).astype(np.float32)
            name = n.name.split("/")[0] + "." + n.name.split("/")[1]  # "<layer>.weight" / "<layer>.bias"
            new_inits.append(numpy_helper.from_array(value, name))
            replace[n.output[0]] = name
            drop.add(id(n))
    keep = [n for n in g.graph.node if id(n) not in drop]
    for n in keep:
        for k, i in enumerate(n.input):
            while i in replace:
                i = replace[i]
            n.input[k] = i
    for o in g.graph.output:
        while o.name in replace:  # the logits are never quantized; kept for safety
            o.name = replace[o.name]
    del g.graph.node[:]
    g.graph.node.extend(keep)
    g.graph.initializer.extend(new_inits)
    g.prune()
    del out.metadata_props[:]
    return out


def _entry(scale: float, zp: int, qmin: int, qmax: int, symmetric: bool) -> dict[str, Any]:
    bits = max(1, int(np.ceil(np.log2(qmax - qmin + 1))))
    offset = qmin - zp
    return {"bitwidth": bits, "dtype": "int", "is_symmetric": str(symmetric), "scale": scale,
            "offset": offset, "min": offset * scale, "max": (qmax - zp) * scale}


@ARTEFACTS.register("tensorrt_clip_ranges")
def tensorrt_clip_ranges(record: dict[str, Any], onnx_path: Path, float_name: str) -> Path:
    """TensorRT per-tensor dynamic ranges (amax) for every quantized activation."""
    blob: dict[str, float] = {}
    tensors: dict[str, dict[str, Any]] = {}
    for a in record["activations"]:
        if a["dtype"] != "int8" or any(z != 0 for z in a["zero_point"]) or (a["qmin"], a["qmax"]) != (-128, 127):
            raise ExportError(f"TensorRT clip ranges need symmetric int8 activations at 8 bits, but {a['name']} is "
                              f"{a['dtype']} [{a['qmin']}, {a['qmax']}] with zero-point {a['zero_point'][0]}; export "
                              "with --backend tensorrt at --a-bits 8 or drop this artefact (--artefacts none)")
        amax = a["scale"][0] * TRT_AMAX_LEVELS
        blob[a["tensor"]] = amax
        tensors[a["tensor"]] = {"amax": amax, "scale": a["scale"][0], "quantizer": a["name"], "bits": 8}
    weights = {f"{w['layer']}.weight": {"amax": [s * TRT_AMAX_LEVELS for s in w["scale"]], "axis": w["axis"]}
               for w in record["weights"]}
    payload = {"format": "tensorrt-clip-ranges", "version": 1, "model": float_name, "qdq_model": onnx_path.name,
               "tensorrt": {"blob_range": blob}, "tensors": tensors, "weights": weights,
               "note": "amax = scale * 127 (TensorRT int8 scale = amax / 127); tensor names are those of the "
                       "float model and the QuantizeLinear inputs of the QDQ model"}
    out = onnx_path.with_name(onnx_path.stem + ".tensorrt.json")
    atomic_write_text(out, json.dumps(payload, indent=2) + "\n")
    return out


@ARTEFACTS.register("snpe_encodings")
def snpe_encodings(record: dict[str, Any], onnx_path: Path, float_name: str) -> Path:
    """SNPE / AIMET quantization encodings for every activation and weight."""
    sym_a = bool(record["backend"]["activation"]["symmetric"])
    sym_w = bool(record["backend"]["weight"]["symmetric"])
    acts = {a["tensor"]: [_entry(a["scale"][0], a["zero_point"][0], a["qmin"], a["qmax"], sym_a)]
            for a in record["activations"]}
    params = {f"{w['layer']}.weight": [_entry(s, z, w["qmin"], w["qmax"], sym_w)
                                       for s, z in zip(w["scale"], w["zero_point"], strict=True)]
              for w in record["weights"]}
    payload = {"version": "quantbench-1", "model": float_name, "qdq_model": onnx_path.name,
               "activation_encodings": acts, "param_encodings": params}
    out = onnx_path.with_name(onnx_path.stem + ".encodings.json")
    atomic_write_text(out, json.dumps(payload, indent=2) + "\n")
    return out


def write_artefacts(names: list[str], model: onnx.ModelProto, record: dict[str, Any],
                    onnx_path: Path) -> dict[str, Path]:
    """Write the named artefacts (and the float model they refer to) beside ``onnx_path``."""
    writers = {n: ARTEFACTS.get(n) for n in names}  # unknown names fail before anything is written
    if not writers:
        return {}
    fpath = float_model_path(onnx_path)
    out = {n: w(record, onnx_path, fpath.name) for n, w in writers.items()}
    onnx.save(strip_qdq(model), str(fpath))
    out["float_model"] = fpath
    return out
