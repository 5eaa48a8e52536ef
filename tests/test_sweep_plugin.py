"""Not tests: a sweep plugin (``plugins: [tests.test_sweep_plugin]``) registering method kinds that the
sweep tests use to slow down, fail or kill their own process, plus the small sweeps they share."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from typing import Any, Literal

import pytest
import torch
from pydantic import Field

from quantbench.sweep.job import Job
from quantbench.sweep.methods import METHODS, ContextCache, MethodOutcome, MethodParams, register_method
from quantbench.sweep.methods.ptq import PTQMethod, PTQParams

PLUGIN = "tests.test_sweep_plugin"


class FaultParams(PTQParams):
    """PTQ that first sleeps, then on the backends named in ``faults`` raises or SIGKILLs its own process."""

    kind: Literal["fault_test"] = "fault_test"  # type: ignore[assignment]
    sleep: float = 0.0
    faults: dict[str, Literal["raise", "kill"]] = Field(default_factory=dict)


if "fault_test" not in METHODS:

    @register_method
    class FaultMethod(PTQMethod):
        name = "fault_test"
        params_type = FaultParams
        description = "test-only: PTQ with injected delays and faults"

        def config_fields(self, params: MethodParams) -> dict[str, Any]:
            assert isinstance(params, FaultParams)
            return {**super().config_fields(params), "sleep": params.sleep, "faults": dict(params.faults)}

        def run(self, job: Job, cache: ContextCache) -> MethodOutcome:
            c = job.config
            time.sleep(float(c["sleep"]))
            fault = c["faults"].get(c["backend"])
            if fault == "raise":
                raise RuntimeError("injected failure for the test")
            if fault == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            return super().run(job, cache)


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """Import into a test module: one torch thread there (tiny models on busy cores run far faster)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def tiny_sweep(name: str = "tiny", backends: list[str] | None = None, methods: list[dict[str, Any]] | None = None,
               bits: list[str] | None = None, **extra: Any) -> dict[str, Any]:
    """A fast sweep on the randomly initialised digits CNN (no training): few calibration and test images."""
    return {
        "name": name,
        "plugins": [PLUGIN],
        "models": [{"model": "digits_cnn", "weights": None, "data": "digits"}],
        "backends": backends or ["tensorrt", "academic"],
        "methods": methods or [{"kind": "ptq", "calibrator": "minmax", "calib_size": 32, "calib_batch_size": 32}],
        "bits": bits or ["W8A8"],
        "settings": {"max_test": 64, "eval_batch_size": 64},
        **extra,
    }
