"""Atomic checkpoints that load with ``torch.load(weights_only=True)``, RNG state included."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from quantbench.errors import CheckpointError, ConfigError
from quantbench.models.weights import load_error_reason
from quantbench.utils.io import atomic_write

FORMAT = "quantbench-qat/1"


class ResumeMismatchError(ConfigError):
    """A resume checkpoint written by a run with another configuration."""


def rng_state() -> dict[str, Any]:
    """torch (CPU and CUDA), numpy and python RNG states as tensors, lists and numbers."""
    np_state = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"name": str(np_state[0]), "keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": {"version": py_version, "state": list(py_state), "gauss": py_gauss},
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> Path:
    """``torch.save`` to a temporary file in the same folder, then ``os.replace``: a crash leaves the previous
    checkpoint intact."""
    return atomic_write(path, lambda f: torch.save({"format": FORMAT, **payload}, f))


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` (tensors and plain containers only)."""
    path = Path(path)
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # any unpickling failure means "not our checkpoint"
        raise CheckpointError(f"cannot read QAT checkpoint {path}: {load_error_reason(exc)}; quantbench writes "
                              "its checkpoints as tensors and plain containers only (never pickled objects): "
                              "delete it, or start anew with --overwrite or another --out-dir") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a quantbench QAT checkpoint ({FORMAT})")
    return ckpt
