"""The quantbench record stored in an exported ONNX file (``metadata_props['quantbench']``)."""

from __future__ import annotations

import json
from typing import Any

import onnx

from quantbench.deploy.errors import NotOurOnnxError

KEY = "quantbench"
FORMAT = "quantbench-qdq"
FORMAT_VERSION = 1


def write_metadata(model: onnx.ModelProto, record: dict[str, Any]) -> None:
    """Store ``record`` (JSON) in the model's metadata, replacing an earlier one."""
    keep = [p for p in model.metadata_props if p.key != KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(keep)
    entry = model.metadata_props.add()
    entry.key = KEY
    entry.value = json.dumps({"format": FORMAT, "format_version": FORMAT_VERSION, **record}, sort_keys=True)


def read_metadata(model: onnx.ModelProto, path: str = "the model") -> dict[str, Any]:
    """The quantbench record of an exported model; refuses files quantbench did not write."""
    for p in model.metadata_props:
        if p.key == KEY:
            try:
                data = json.loads(p.value)
            except json.JSONDecodeError as exc:
                raise NotOurOnnxError(f"{path}: its quantbench metadata is not valid JSON ({exc}); re-export it "
                                      "with `quantbench export`") from exc
            if data.get("format") != FORMAT:
                break
            if data.get("format_version", 0) > FORMAT_VERSION:
                raise NotOurOnnxError(f"{path} was written by a newer quantbench (format {data['format_version']});"
                                      " upgrade quantbench or re-export")
            return data
    raise NotOurOnnxError(f"{path} was not exported by `quantbench export` (no quantbench record in its metadata): "
                          "verify compares ONNX Runtime against quantbench's simulation of the same model, so "
                          "export the model with `quantbench export` first")


def load_onnx(path: str) -> onnx.ModelProto:
    """Read an ONNX file with a clear error for missing, unreadable or corrupt files."""
    from pathlib import Path

    p = Path(path)
    if not p.is_file():
        raise NotOurOnnxError(f"ONNX file {p} does not exist; export one with `quantbench export --out {p.name}`")
    try:
        model = onnx.load(str(p))
        onnx.checker.check_model(model)
    except Exception as exc:  # protobuf DecodeError, ValidationError, ...: all mean "not a valid model"
        raise NotOurOnnxError(f"{p} is not a valid ONNX model (corrupt or truncated?): {type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else ''}; re-export it with `quantbench "
                              "export`") from exc
    return model
