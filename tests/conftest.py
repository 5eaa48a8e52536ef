"""Shared fixtures: where ../shared is, and a skip when it is absent."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, NoReturn

import pytest

# the fused torch.compile kernels cost seconds to compile per process and shape; tests of them opt in explicitly
os.environ.setdefault("QUANTBENCH_NO_COMPILE", "1")

@pytest.fixture
def torch_one_thread():
    """One torch thread for the test (small models on busy cores run far faster), restored afterwards. Use with
    ``pytestmark = pytest.mark.usefixtures("torch_one_thread")``."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


SHARED = Path(__file__).resolve().parents[2] / "shared"
RESNET20 = SHARED / "models" / "resnet20_cifar10.safetensors"
CIFAR = SHARED / "data" / "cifar10"

needs_shared = pytest.mark.skipif(
    not (RESNET20.is_file() and CIFAR.is_dir()),
    reason=f"needs the shared models and data at {SHARED} (clone the repo with ../shared beside it)",
)


#: Services CI must have (comma-separated, e.g. "postgresql,ray"): a test that would skip for lack of one fails.
REQUIRED_SERVICES = {s.strip() for s in os.environ.get("QUANTBENCH_REQUIRE_SERVICES", "").split(",") if s.strip()}


def service_missing(name: str, reason: str) -> NoReturn:
    """Skip a test whose outside service is not available here, or fail it where the service is required."""
    if name in REQUIRED_SERVICES:
        pytest.fail(f"{reason} ($QUANTBENCH_REQUIRE_SERVICES names {name}: it must run here)", pytrace=False)
    pytest.skip(reason)


def _service(report: Any) -> str | None:
    for name in ("postgresql", "ray"):
        if f"[{name}" in report.nodeid or f"-{name}]" in report.nodeid or name in getattr(report, "keywords", {}):
            return name
    return None


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """One line saying how many tests of each outside service ran (CI's log must show none skipped)."""
    counts: dict[str, dict[str, int]] = {}
    for outcome in ("passed", "failed", "skipped", "error"):
        for report in terminalreporter.stats.get(outcome, []):
            name = _service(report) if hasattr(report, "nodeid") else None
            if name is not None and (report.when == "call" or outcome in ("skipped", "error")):
                counts.setdefault(name, {}).setdefault(outcome, 0)
                counts[name][outcome] += 1
    if counts:
        terminalreporter.write_line("outside services: " + "; ".join(
            f"{name}: " + ", ".join(f"{n} {o}" for o, n in sorted(c.items())) for name, c in sorted(counts.items())))
