"""Shared fixtures: where ../shared is, and a skip when it is absent."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# the fused torch.compile kernels cost seconds to compile per process and shape; tests of them opt in explicitly
os.environ.setdefault("QUANTBENCH_NO_COMPILE", "1")

SHARED = Path(__file__).resolve().parents[2] / "shared"
RESNET20 = SHARED / "models" / "resnet20_cifar10.safetensors"
CIFAR = SHARED / "data" / "cifar10"

needs_shared = pytest.mark.skipif(
    not (RESNET20.is_file() and CIFAR.is_dir()),
    reason=f"needs the shared models and data at {SHARED} (clone the repo with ../shared beside it)",
)
