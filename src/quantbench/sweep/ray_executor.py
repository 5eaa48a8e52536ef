"""Run a sweep on Ray: one Ray task per run, the driver (this process) claims, stores and writes the cards.

* **Where**: ``address=None`` starts a local Ray instance with this machine's cores; ``"auto"`` joins the
  cluster this machine belongs to; ``"ray://HOST:PORT"`` connects to a remote head node (Ray Client).
* **Resources**: each run asks for ``cpus_per_run`` CPUs (default: its torch threads, 1) and one GPU when
  its device is ``cuda`` (Ray then sets ``CUDA_VISIBLE_DEVICES`` for the task). The driver keeps as many runs in
  flight as the cluster can run at once, and claims each in the store just before submitting it, so two
  drivers (or a local sweep) on one store still split the work.
* **Files**: runs read their weights, data and plugins **from paths every node sees** (nothing is shipped);
  relative paths are made absolute from the driver's working directory. Before the first run, one small task
  on every node checks that each path exists there, and a node that lacks one stops the sweep with an error
  naming the node and the path.
* **Records**: the task runs :func:`quantbench.sweep.execute.execute`, as a local worker does, and returns the
  :class:`RunRecord`; the run ids, metrics and cards equal the local runner's. A task whose worker or node
  dies gives a ``failed`` run and the sweep goes on; Ctrl-C cancels what is in flight and marks it, as locally.
"""

from __future__ import annotations

import os
import socket
import sys
from collections import deque
from pathlib import Path
from typing import Any

from quantbench.data.registry import parse_spec
from quantbench.errors import ConfigError
from quantbench.sweep.execute import RunRecord, execute, failed_record
from quantbench.sweep.job import Job
from quantbench.sweep.progress import SweepProgress
from quantbench.sweep.runner import INTERRUPTED, ExecutorOptions, Sink, SweepSummary, claim, finish
from quantbench.utils.optional import require_module

RAY_WORKER_DIED = ("its Ray worker or node died while running it (killed by a signal, out of memory, a crash in "
                   "native code, or the node left the cluster)")


def import_ray() -> Any:
    """The ``ray`` module, or a :class:`ConfigError` naming the extra to install."""
    return require_module("ray", "--executor ray", "ray")


def _task(job: Job, threads: int, env: dict[str, str], paths: list[str]) -> RunRecord:
    """Body of a run's Ray task (in a Ray worker process, reused across tasks like a local pool worker)."""
    import torch

    os.environ.update(env)
    for p in reversed(paths):
        if p not in sys.path:
            sys.path.insert(0, p)
    torch.set_num_threads(max(1, threads))
    return execute(job)


def _missing_here(paths: list[str]) -> tuple[str, list[str]]:
    """Body of the per-node check: this node's host name and the paths it cannot see."""
    return socket.gethostname(), [p for p in paths if not os.path.exists(p)]


def _files(job: Job) -> tuple[str | None, Path | None]:
    """The weights file and the dataset folder ``job`` reads (None where it reads none)."""
    w = job.config.get("weights")
    weights = w if isinstance(w, str) and w and not w.startswith("train:") else None
    data = job.config.get("data")
    return weights, parse_spec(data)[1] if isinstance(data, str) else None


def absolute(job: Job, cwd: Path) -> Job:
    """``job`` with relative weight and data paths made absolute from ``cwd`` (its identity is unchanged)."""
    updates: dict[str, Any] = {}
    weights, folder = _files(job)
    if weights is not None and not Path(weights).expanduser().is_absolute():
        updates["weights"] = str(cwd / weights)
    if folder is not None and not folder.is_absolute():
        kind, _, rest = job.config["data"].partition(":")
        updates["data"] = f"{kind}:{cwd / folder}{''.join(rest.partition('?')[1:])}"
    return job.with_config(**updates) if updates else job


def needed_paths(jobs: list[Job]) -> list[str]:
    """Every file or folder the runs read: weights files and dataset folders (absolute)."""
    return sorted({str(p) for job in jobs for p in _files(job) if p is not None})


def _connect(ray: Any, address: str | None) -> bool:
    """Connect to (or start) Ray; True when this call started it (and must shut it down)."""
    if ray.is_initialized():
        return False
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False}
    try:
        if address is None:
            ray.init(num_cpus=os.cpu_count() or 1, **kwargs)
        else:
            ray.init(address=address, **kwargs)
    except ConnectionError as exc:
        raise ConfigError(f"cannot connect to the Ray cluster at {address!r}: {exc}; start it with `ray start "
                          "--head` (or give --address ray://HOST:10001 for a remote head node)") from None
    return True


def check_cluster(ray: Any, jobs: list[Job], cpus: float) -> int:
    """Refuse what the cluster cannot run (no GPU for cuda runs, too few CPUs per node, a node that cannot see
    the runs' files); return how many runs it can run at once."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    resources = ray.cluster_resources()
    total_cpus = float(resources.get("CPU", 0))
    gpu_runs = any(j.uses_cuda for j in jobs)
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    biggest = max((float(n.get("Resources", {}).get("CPU", 0)) for n in nodes), default=0.0)
    if cpus > biggest:
        raise ConfigError(f"each run asks for {cpus:g} CPUs (--cpus-per-run) but the largest Ray node has "
                          f"{biggest:g}; lower --cpus-per-run")
    if gpu_runs and float(resources.get("GPU", 0)) < 1:
        raise ConfigError("the sweep's runs use device cuda but the Ray cluster has no GPU; add GPU nodes or set "
                          "settings.device: cpu")
    paths = needed_paths(jobs)
    check = ray.remote(num_cpus=0, max_retries=0)(_missing_here)
    refs = [check.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(paths)
            for n in nodes]
    for node, (host, missing) in zip(nodes, ray.get(refs), strict=True):
        if missing:
            shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
            raise ConfigError(f"Ray node {host} ({node.get('NodeManagerAddress', '?')}) cannot see {shown}: the runs "
                              "read weights and data from the same path on every node. Put them on a filesystem "
                              "every node mounts at the same path (NFS, a cluster volume) and rerun")
    slots = int(total_cpus // cpus) if cpus > 0 else len(jobs)
    if gpu_runs:
        slots = min(slots, int(float(resources.get("GPU", 0))))
    return max(1, slots)


def run_on_ray(jobs: list[Job], sink: Sink, summary: SweepSummary, bar: SweepProgress, opts: ExecutorOptions) -> None:
    """Run ``jobs`` as Ray tasks; the sink (store and cards) is written here, in the driver."""
    ray = import_ray()
    started = _connect(ray, opts.address)
    inflight: dict[Any, Job] = {}
    try:
        threads = opts.threads or 1
        cpus = opts.cpus_per_run if opts.cpus_per_run is not None else float(threads)
        shipped = {j.run_id: absolute(j, Path.cwd()) for j in jobs}
        slots = check_cluster(ray, list(shipped.values()), cpus)
        task = ray.remote(max_retries=0)(_task)
        env = {k: v for k, v in os.environ.items() if k.startswith("QUANTBENCH_")}
        paths = [p for p in [os.getcwd(), *sys.path] if p and _user_path(p)]
        queue = deque(jobs)
        while queue or inflight:
            while queue and len(inflight) < slots:
                job = queue.popleft()
                if not claim(job, sink, summary, bar):
                    continue
                ref = task.options(num_cpus=cpus, num_gpus=int(job.uses_cuda),
                                   name=f"quantbench-run-{job.run_id}").remote(shipped[job.run_id], threads, env, paths)
                inflight[ref] = job
            if not inflight:
                break
            ready, _ = ray.wait(list(inflight), num_returns=1)
            for ref in ready:
                job = inflight.pop(ref)
                finish(job, _result(ray, ref, job), sink, summary, bar)
    except KeyboardInterrupt:
        for ref, job in inflight.items():
            ray.cancel(ref, force=True)
            sink.finished(job, failed_record(job, INTERRUPTED))
        raise
    finally:
        if started:
            ray.shutdown()


def _result(ray: Any, ref: Any, job: Job) -> RunRecord:
    """The task's record; a dead worker or node, or a task that could not start, gives a ``failed`` one."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as exc:  # execute() never raises: quantbench missing or broken on the node
        return failed_record(job, f"the Ray task failed before the run could start: {exc}")
    except ray.exceptions.RayError as exc:
        return failed_record(job, f"{RAY_WORKER_DIED} ({type(exc).__name__})")


def _user_path(p: str) -> bool:
    """A ``sys.path`` entry of the user's (the project, plugins), not of the interpreter or its packages."""
    prefixes = {os.path.realpath(x) for x in (sys.prefix, sys.base_prefix, sys.exec_prefix)}
    real = os.path.realpath(p)
    return os.path.isdir(real) and not any(real.startswith(x + os.sep) or real == x for x in prefixes)
