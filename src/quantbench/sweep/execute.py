"""Run one job in this process and turn whatever happens into a :class:`RunRecord` (never raises)."""

from __future__ import annotations

import os
import time
import traceback
from dataclasses import dataclass, field
from typing import Any

import torch

from quantbench.sweep.environment import environment
from quantbench.sweep.job import Job
from quantbench.sweep.load import import_plugins
from quantbench.sweep.methods import METHODS, ContextCache
from quantbench.sweep.orphan import exit_with_parent

#: Models and data loaded by earlier runs in this process (one per worker process).
_CACHE = ContextCache()


@dataclass
class RunRecord:
    """The outcome of one run: ``done`` with metrics and a card, or ``failed`` with the error."""

    run_id: str
    status: str
    wall_seconds: float
    environment: dict[str, Any]
    metrics: dict[str, Any] = field(default_factory=dict)
    card: dict[str, Any] | None = None
    error: str | None = None

    def columns(self) -> dict[str, Any]:
        """Store columns (the job's own columns are added by the caller)."""
        m = self.metrics
        return {"status": self.status, "metrics": m, "card": self.card, "environment": self.environment,
                "error": self.error, "fp_top1": m.get("fp_top1"), "quant_top1": m.get("quant_top1"),
                "agreement": m.get("agreement"), "wall_seconds": self.wall_seconds,
                "model_size_bytes": int(m["model_size_bytes"]) if m.get("model_size_bytes") is not None else None}


def failed_record(job: Job, error: str, wall: float = 0.0) -> RunRecord:
    return RunRecord(job.run_id, "failed", wall, environment(job.config.get("device", "cpu")), error=error)


def execute(job: Job, cache: ContextCache | None = None) -> RunRecord:
    """Run ``job``; an exception becomes a ``failed`` record carrying the error and its traceback.

    KeyboardInterrupt and SystemExit are not caught: the sweep's runner handles them.
    """
    t0 = time.perf_counter()
    try:
        import_plugins(job.plugins)
        outcome = METHODS.get(job.method).run(job, cache if cache is not None else _CACHE)
    except Exception as exc:
        tb = traceback.format_exc(limit=-8)
        return failed_record(job, f"{type(exc).__name__}: {exc}\n{tb}", time.perf_counter() - t0)
    wall = time.perf_counter() - t0
    return RunRecord(job.run_id, "done", wall, environment(job.config.get("device", "cpu")),
                     metrics={**outcome.metrics, "wall_seconds": wall}, card=outcome.card)


def init_worker(threads: int, counter: Any = None, parent: int | None = None, gpus: list[str] | None = None) -> None:
    """Initializer of worker processes: end with the ``parent`` process (see :mod:`quantbench.sweep.orphan`),
    share the CPU cores fairly between workers and, given several ``gpus``, pin each worker to one of them
    round-robin through ``CUDA_VISIBLE_DEVICES`` before CUDA starts (``counter`` is a shared
    ``multiprocessing.Value`` numbering the workers), so a run's ``cuda`` is its own GPU."""
    if parent is not None:
        exit_with_parent(parent)
    torch.set_num_threads(max(1, threads))
    if counter is not None and gpus:
        with counter.get_lock():
            index = counter.value
            counter.value += 1
        os.environ["CUDA_VISIBLE_DEVICES"] = gpus[index % len(gpus)]


def execute_in_worker(job: Job) -> RunRecord:
    """Entry point of worker processes."""
    return execute(job)
