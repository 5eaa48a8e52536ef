"""Shared fixtures: where ../shared is, and a skip when it is absent."""

from __future__ import annotations

from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[2] / "shared"
RESNET20 = SHARED / "models" / "resnet20_cifar10.safetensors"
CIFAR = SHARED / "data" / "cifar10"

needs_shared = pytest.mark.skipif(
    not (RESNET20.is_file() and CIFAR.is_dir()),
    reason=f"needs the shared models and data at {SHARED} (clone the repo with ../shared beside it)",
)
