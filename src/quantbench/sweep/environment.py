"""Where a run ran: library versions, device, CPU and GPU names."""

from __future__ import annotations

import platform
from functools import cache
from pathlib import Path
from typing import Any

import torch

import quantbench


@cache
def cpu_name() -> str:
    """The CPU model name from /proc/cpuinfo, else what platform knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: str) -> dict[str, Any]:
    """A JSON-able description of this process's environment."""
    gpu = torch.cuda.get_device_name() if device == "cuda" and torch.cuda.is_available() else None
    return {
        "quantbench": quantbench.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(terse=True),
        "host": platform.node(),
        "device": device,
        "cpu": cpu_name(),
        "gpu": gpu,
        "torch_threads": torch.get_num_threads(),
    }
