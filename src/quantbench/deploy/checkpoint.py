"""A calibrated (PTQ) or trained (QAT) simulation saved to one ``.safetensors`` file and rebuilt from it.

The file holds the prepared model's state dict (weights, BN statistics, every quantizer's scale,
zero-point and range) and, in its metadata, what is needed to rebuild the graph: model name, width,
classes, input size, backend spec and observers. ``quantbench export`` writes one beside the ONNX so
``quantbench verify`` compares against the very simulation that was exported; QAT runs save theirs with
:func:`save_simulation` and export it with ``quantbench export --from FILE``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save

from quantbench.backends.spec import BackendSpec
from quantbench.deploy.errors import ExportError
from quantbench.graph.quantize import prepare, set_quantizing
from quantbench.utils.io import AtomicGroup, atomic_write

KEY = "quantbench_simulation"
SUFFIX = ".qb.safetensors"


def simulation_path(onnx_path: str | Path) -> Path:
    p = Path(onnx_path)
    return p.with_name(p.stem + SUFFIX)


def sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def simulation_bytes(gm: fx.GraphModule, config: dict[str, Any]) -> bytes:
    """The ``.qb.safetensors`` content of a prepared model; ``config`` needs ``model``, ``input_size`` and
    optionally ``width_mult``, ``num_classes``, ``w_observer``, ``a_observer`` (the backend spec is taken from
    the model)."""
    missing = {"model", "input_size"} - config.keys()
    if missing:
        raise ExportError(f"save_simulation needs {sorted(missing)} in config")
    spec: BackendSpec = gm.meta["quantbench"]["backend"]
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in gm.state_dict().items()}
    meta = {**config, "backend": spec.model_dump(mode="json")}
    return save(state, metadata={KEY: json.dumps(meta, sort_keys=True)})


def save_simulation(gm: fx.GraphModule, path: str | Path, config: dict[str, Any],
                    group: AtomicGroup | None = None) -> Path:
    """Save a prepared model (see :func:`simulation_bytes`) atomically, or stage it in ``group``."""
    data = simulation_bytes(gm, config)
    if group is None:
        return atomic_write(path, lambda f: f.write(data))
    group.write(path, lambda f: f.write(data))
    return Path(path)


def read_config(path: str | Path) -> dict[str, Any]:
    """The metadata of a simulation checkpoint, with clear errors for other files."""
    p = Path(path)
    if p.is_dir():
        found = sorted(p.glob(f"*{SUFFIX}"))
        if len(found) != 1:
            raise ExportError(f"{p} holds {len(found)} simulation checkpoints (*{SUFFIX}); pass the file itself")
        p = found[0]
    if not p.is_file():
        raise ExportError(f"simulation checkpoint {p} does not exist; `quantbench export` writes <model>{SUFFIX} "
                          "beside the ONNX, QAT runs save one with quantbench.deploy.save_simulation")
    try:
        with safe_open(str(p), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError) as exc:
        raise ExportError(f"{p} is not a safetensors file ({exc}); expected a quantbench simulation "
                          "checkpoint") from exc
    if KEY not in meta:
        raise ExportError(f"{p} is a safetensors file but not a quantbench simulation checkpoint (no {KEY!r} metadata)")
    return {**json.loads(meta[KEY]), "_path": str(p)}


def _match_folded_layers(gm: fx.GraphModule, state: dict[str, torch.Tensor]) -> None:
    """Layers saved with BN already folded into the conv (a converted QAT model) get that structure."""
    from torch import nn

    from quantbench.graph.qmodules import QuantWeighted

    for name, m in gm.named_modules():
        if not isinstance(m, QuantWeighted):
            continue
        if m.bn is not None and f"{name}.bn.running_mean" not in state:
            m.bn = None
        bias = state.get(f"{name}.module.bias")
        if bias is not None and m.module.bias is None:
            m.module.bias = nn.Parameter(torch.zeros_like(bias), requires_grad=False)


def load_simulation(path: str | Path, device: str = "cpu") -> tuple[fx.GraphModule, dict[str, Any]]:
    """Rebuild the prepared, calibrated model saved by :func:`save_simulation`, quantizing and in eval mode."""
    from quantbench.models import build_model

    config = read_config(path)
    spec = BackendSpec.model_validate(config["backend"])
    model = build_model(config["model"], None, float(config.get("width_mult", 1.0)), config.get("num_classes"))
    example = torch.zeros(1, *config["input_size"])
    gm = prepare(model, spec, example, config.get("w_observer", "minmax"), config.get("a_observer", "minmax"))
    state = load_file(config["_path"])
    _match_folded_layers(gm, state)
    result = gm.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ExportError(f"{config['_path']} does not match model {config['model']!r}: missing "
                          f"{result.missing_keys[:3]}, unexpected {result.unexpected_keys[:3]}")
    set_quantizing(gm, True)
    return gm.to(device).eval(), config
