"""What identifies a run: content fingerprints of its inputs and the version of the code that ran it."""

from __future__ import annotations

import hashlib
import json
from functools import cache
from pathlib import Path
from typing import Any

import quantbench
from quantbench.data import parse_spec

PACKAGE = Path(quantbench.__file__).resolve().parent
#: Parts of the package whose changes can change a run's numbers (not the CLI, store or report).
RESULT_CODE = ("quant", "observers", "backends", "graph", "models", "data", "ptq", "train", "config.py",
               "sweep/methods")


@cache
def code_version() -> str:
    """``<version>+<hash>`` over the source that computes results, so an edit there invalidates old runs."""
    h = hashlib.sha256()
    for part in RESULT_CODE:
        root = PACKAGE / part
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.suffix in (".py", ".yaml"))
        for f in files:
            h.update(str(f.relative_to(PACKAGE)).encode())
            h.update(f.read_bytes())
    return f"{quantbench.__version__}+{h.hexdigest()[:12]}"


@cache
def file_digest(path: str) -> str:
    """sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@cache
def data_fingerprint(spec: str) -> str:
    """``kind`` or ``kind:<hash of the relative paths and sizes of its files>`` (machine-independent)."""
    kind, path = parse_spec(spec)
    if path is None:
        return kind
    if not path.exists():
        return f"{kind}:missing"
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    h = hashlib.sha256()
    for f in files:
        rel = f.name if f == path else str(f.relative_to(path))
        h.update(f"{rel}\0{f.stat().st_size}\n".encode())
    return f"{kind}:{h.hexdigest()[:16]}"


def weights_identity(weights: str | None) -> str | None:
    """The weights' content hash, or the recipe (``train:...``) for weights made by quantbench."""
    if weights is None or weights.startswith("train:"):
        return weights
    return f"sha256:{file_digest(weights)}"


def run_id(identity: dict[str, Any]) -> str:
    """16 hex digits of sha256 over the canonical JSON of a run's identity."""
    blob = json.dumps(identity, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
