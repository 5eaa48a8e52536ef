"""Load and save model weights from local files, with actionable errors on any mismatch."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from quantbench.errors import CheckpointError

SAFETENSORS_SUFFIXES: tuple[str, ...] = (".safetensors",)
TORCH_SUFFIXES: tuple[str, ...] = (".pt", ".pth", ".ckpt")
_MAX_LISTED = 10


def _list_keys(keys: list[str]) -> str:
    shown = ", ".join(keys[:_MAX_LISTED])
    more = f", ... (+{len(keys) - _MAX_LISTED} more)" if len(keys) > _MAX_LISTED else ""
    return shown + more


#: what torch's refusal says is not allowed (its message also suggests unsafe loading, which is never repeated)
_UNPICKLER = re.compile(r"WeightsUnpickler error: Unsupported global: (GLOBAL \S+)|unsupported (GLOBAL \S+)")
SAFE_FORMATS = ("save the weights as .safetensors (quantbench.models.save_weights) or as a plain state dict of "
                "tensors (torch.save(model.state_dict(), path)); pickled objects are never loaded")


def load_error_reason(exc: BaseException) -> str:
    """Why ``torch.load(weights_only=True)`` failed, in one line, without torch's hint to retry with
    ``weights_only=False`` (arbitrary code execution) or to allow-list globals."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    m = _UNPICKLER.search(text)
    if m:
        return f"it holds a pickled object ({m.group(1) or m.group(2)}), not only tensors"
    first = text.splitlines()[0].strip() if text.strip() else ""
    if "weights_only" in first or "Weights only load failed" in first:
        return "it holds pickled objects, not only tensors"
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def _read_torch(path: Path) -> Mapping[str, object]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError for arbitrary objects, RuntimeError for corrupt files
        raise CheckpointError(f"refusing or unable to load {path}: {load_error_reason(exc)}; {SAFE_FORMATS}") \
            from None
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model"):
            inner = obj.get(key)
            if isinstance(inner, Mapping):
                return inner
        return obj
    raise CheckpointError(
        f"{path} holds a {type(obj).__name__}, not a state dict; expected a dict of tensors "
        "(optionally under a 'state_dict' or 'model' key)"
    )


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from ``.safetensors`` or ``.pt/.pth/.ckpt`` (``weights_only=True``).

    Accepts a plain state dict or one nested under ``"state_dict"``/``"model"``; strips a
    ``"module."`` (DataParallel) prefix.
    """
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"checkpoint file not found: {p} (check the path; nothing is downloaded)")
    suffix = p.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        try:
            raw: Mapping[str, object] = load_file(str(p), device="cpu")
        except Exception as exc:
            raise CheckpointError(f"{p} is not a valid safetensors file: {exc}") from exc
    elif suffix in TORCH_SUFFIXES:
        raw = _read_torch(p)
    else:
        raise CheckpointError(
            f"unsupported checkpoint extension {suffix!r} for {p}; "
            f"use one of {', '.join(SAFETENSORS_SUFFIXES + TORCH_SUFFIXES)}"
        )
    state: dict[str, torch.Tensor] = {}
    for key, value in raw.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(
                f"{p}: entry {key!r} is a {type(value).__name__}, not a tensor; expected a state dict"
            )
        name = str(key)
        state[name.removeprefix("module.")] = value
    return state


def load_weights(model: nn.Module, path: str | Path) -> nn.Module:
    """Load the checkpoint at ``path`` into ``model`` strictly and return ``model``.

    Raises :class:`CheckpointError` for a missing file, missing/unexpected keys (a missing
    ``num_batches_tracked`` buffer is tolerated) or a shape mismatch.
    """
    state = read_state_dict(path)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint {path} does not match {type(model).__name__}: "
            f"{len(missing)} missing key(s) [{_list_keys(missing)}], "
            f"{len(unexpected)} unexpected key(s) [{_list_keys(unexpected)}]. "
            "Fix: pick the model name (and width_mult/num_classes) the checkpoint was trained with, "
            "or rename the keys so they match model.state_dict()."
        )
    mismatched = [
        f"{key!r}: checkpoint {tuple(t.shape)} vs model {tuple(expected[key].shape)}"
        for key, t in state.items()
        if t.shape != expected[key].shape
    ]
    if mismatched:
        more = f" (+{len(mismatched) - _MAX_LISTED} more)" if len(mismatched) > _MAX_LISTED else ""
        raise CheckpointError(
            f"checkpoint {path}: shape mismatch for {len(mismatched)} tensor(s): "
            f"{'; '.join(mismatched[:_MAX_LISTED])}{more}. Fix: build the model with the "
            "width_mult/num_classes the checkpoint was trained with."
        )
    model.load_state_dict(state, strict=False)  # keys already checked; only num_batches_tracked may be absent
    return model


def save_weights(model: nn.Module, path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """Save ``model.state_dict()`` to a ``.safetensors`` file (parent folders created); returns the path."""
    p = Path(path)
    if p.suffix.lower() != ".safetensors":
        raise CheckpointError(f"save_weights writes safetensors; use a '.safetensors' path, got {p}")
    p.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(tensors, str(p), metadata=metadata)
    return p
