"""The deployment-runtime interface and its registry: how to load an exported QDQ ONNX in a real runtime, run it
on a batch, and say which ops ran in integer arithmetic (one file per runtime in this package)."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from quantbench.deploy.errors import RuntimeUnavailableError
from quantbench.utils.registry import Registry


@dataclass
class OpReport:
    """What the runtime made of the model: integer kernels, and compute ops it ran in float (with why)."""

    integer_ops: dict[str, int]
    float_ops: list[dict[str, str]] = field(default_factory=list)
    all_ops: dict[str, int] = field(default_factory=dict)

    @property
    def int8_complete(self) -> bool:
        return not self.float_ops

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "int8_complete": self.int8_complete}


class Loaded(Protocol):
    """A model compiled by a runtime: ``run`` maps an (N, C, H, W) float32 batch to the (N, classes) output."""

    report: OpReport

    def run(self, x: np.ndarray) -> np.ndarray: ...


@dataclass(frozen=True)
class RuntimeOptions:
    """Options every runtime reads (those that do not apply are ignored): CPU threads, and ONNX Runtime's
    ``session.x64quantprecision``."""

    threads: int | None = None
    x64_quant_precision: bool = False


@dataclass(frozen=True)
class Runtime:
    """One real runtime. ``missing()`` is None when it can run here, else why not (with the install command)."""

    name: str
    description: str
    missing: Callable[[], str | None]
    version: Callable[[], str]
    load: Callable[[Path, RuntimeOptions], Loaded]

    def require(self) -> None:
        why = self.missing()
        if why is not None:
            raise RuntimeUnavailableError(f"runtime {self.name!r} cannot run here: {why}")


DEPLOY_RUNTIMES: Registry[Runtime] = Registry("deployment runtime")


def requires(what: str, install: str, *modules: str) -> Callable[[], str | None]:
    """A ``Runtime.missing`` that imports ``modules`` and, when one is missing, says what to install."""
    def missing() -> str | None:
        try:
            for name in modules:
                importlib.import_module(name)
        except ImportError:
            return f"{what} is not installed ({install})"
        return None
    return missing


def register_runtime(rt: Runtime) -> Runtime:
    return DEPLOY_RUNTIMES.add(rt.name, rt)


def get_runtime(name: str) -> Runtime:
    """The runtime ``name`` (an error listing the registered ones otherwise)."""
    return DEPLOY_RUNTIMES.get(name)
