"""Before running: make the weights that quantbench trains itself (``weights: train``) exist."""

from __future__ import annotations

from pathlib import Path

from quantbench.sweep.job import Job
from quantbench.sweep.methods import METHODS
from quantbench.sweep.weights import ensure_trained


def materialize_weights(jobs: list[Job], cache: Path, progress: bool = True) -> list[Job]:
    """Jobs whose weights are a ``train:MODEL:DATA`` recipe get the cached file's path (trained once)."""
    paths: dict[str, str] = {}
    out = []
    for job in jobs:
        w = job.config.get("weights")
        if isinstance(w, str) and w.startswith("train:"):
            if w not in paths:
                _, model, data = w.split(":", 2)
                paths[w] = str(ensure_trained(model, data, cache, progress))
            job = job.with_config(weights=paths[w])
        out.append(job)
    return out


def assign_run_dirs(jobs: list[Job], root: Path) -> list[Job]:
    """Jobs whose method keeps files (``needs_run_dir``: a trained checkpoint) get ``root/<name>`` as their folder
    (the run id, or a name runs sharing one training share: :meth:`Method.run_dir_name`), so a rerun of the same
    identity finds what an earlier one left."""
    out = []
    for job in jobs:
        method = METHODS.get(job.method)
        out.append(job.with_config(run_dir=str(root / method.run_dir_name(job))) if method.needs_run_dir else job)
    return out
