"""Run a sweep's pending jobs in this process or in worker processes; the caller's sink stores each result.

Each run is claimed from the sink before it starts (another process on the same store may hold or have
finished it: then it is skipped) and handed to the sink (which commits it to the store) as soon as it
finishes, so a killed sweep loses nothing that finished and two sweeps on one store split the work.
A run that raises, or whose worker process dies, is recorded as ``failed`` and the sweep goes on.

Executors (a registry): ``local`` (this process, or a pool of spawned worker processes) and ``ray``
(:mod:`quantbench.sweep.ray_executor`, one Ray task per run). Whatever runs the jobs, this process claims,
stores and writes the cards, so the records do not depend on the executor.
"""

from __future__ import annotations

import multiprocessing
import os
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from typing import Protocol

import torch
from rich.console import Console

from quantbench.sweep.execute import RunRecord, execute, execute_in_worker, failed_record, init_worker
from quantbench.sweep.job import Job
from quantbench.sweep.methods import ContextCache
from quantbench.sweep.progress import SweepProgress
from quantbench.utils.registry import Registry

INTERRUPTED = "interrupted before it finished (the sweep was stopped); rerun the sweep to run it again"
WORKER_DIED = ("its worker process died while running it (killed by a signal, out of memory or a crash in native "
               "code)")


class Sink(Protocol):
    """Receives runs as they start and finish (the store and the card files)."""

    def started(self, job: Job) -> bool:
        """Claim the job; False when it is finished or running elsewhere (then it is not run)."""
        ...

    def finished(self, job: Job, record: RunRecord) -> None: ...


@dataclass
class SweepSummary:
    """What a call to :func:`run_jobs` did."""

    records: list[RunRecord] = field(default_factory=list)
    interrupted: bool = False
    elsewhere: int = 0  # jobs another process had finished or was running when this one came to them

    @property
    def done(self) -> int:
        return sum(r.status == "done" for r in self.records)

    @property
    def failed(self) -> int:
        return sum(r.status == "failed" for r in self.records)


def pending(jobs: Iterable[Job], statuses: dict[str, str]) -> list[Job]:
    """Jobs not yet ``done`` in the store (failed and interrupted runs are run again)."""
    return [j for j in jobs if statuses.get(j.run_id) != "done"]


@dataclass(frozen=True)
class ExecutorOptions:
    """How to run the jobs. ``workers``: local worker processes; ``threads``: torch threads per run;
    ``address``: the Ray cluster (None: start a local instance); ``cpus_per_run``: Ray CPUs per run."""

    workers: int = 1
    threads: int | None = None
    address: str | None = None
    cpus_per_run: float | None = None


Executor = Callable[[list[Job], Sink, SweepSummary, SweepProgress, ExecutorOptions], None]
EXECUTORS: Registry[Executor] = Registry("sweep executor")


def run_jobs(jobs: list[Job], sink: Sink, workers: int = 1, progress: bool = True,
             console: Console | None = None, threads: int | None = None, executor: str = "local",
             options: ExecutorOptions | None = None) -> SweepSummary:
    """Run ``jobs`` on ``executor``; locally, ``workers`` > 1 uses that many spawned processes (the parent
    still does all writing).

    ``threads``: torch threads per process (default: torch's own when serial, ``cores // workers`` in
    workers). One thread is much faster for small models on busy cores (no OpenMP oversubscription).
    """
    run = EXECUTORS.get(executor)
    opts = options or ExecutorOptions(workers=workers, threads=threads)
    summary = SweepSummary()
    saved = torch.get_num_threads()
    with SweepProgress(len(jobs), progress, console) as bar:
        try:
            run(jobs, sink, summary, bar, opts)
        except KeyboardInterrupt:
            summary.interrupted = True
        finally:
            torch.set_num_threads(saved)
    return summary


@EXECUTORS.register("local")
def run_local(jobs: list[Job], sink: Sink, summary: SweepSummary, bar: SweepProgress, opts: ExecutorOptions) -> None:
    """This process (one worker) or a pool of spawned worker processes."""
    if opts.workers <= 1:
        if opts.threads:
            torch.set_num_threads(opts.threads)
        _serial(jobs, sink, summary, bar)
    else:
        threads = opts.threads or max(1, (os.cpu_count() or 1) // opts.workers)
        _parallel(jobs, sink, summary, bar, opts.workers, threads, visible_gpus(jobs))


@EXECUTORS.register("ray")
def run_ray(jobs: list[Job], sink: Sink, summary: SweepSummary, bar: SweepProgress, opts: ExecutorOptions) -> None:
    """One Ray task per run (``pip install 'quantbench[ray]'``)."""
    from quantbench.sweep.ray_executor import run_on_ray

    run_on_ray(jobs, sink, summary, bar, opts)


def visible_gpus(jobs: list[Job]) -> list[str]:
    """The GPUs local workers are pinned to, one each (``CUDA_VISIBLE_DEVICES``), when some job runs on cuda
    and this machine has more than one GPU; else none (no pinning)."""
    if not any(j.uses_cuda for j in jobs):
        return []
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [d.strip() for d in env.split(",") if d.strip()] if env is not None else \
        [str(i) for i in range(torch.cuda.device_count())]
    return ids if len(ids) > 1 else []


def finish(job: Job, rec: RunRecord, sink: Sink, summary: SweepSummary, bar: SweepProgress) -> None:
    sink.finished(job, rec)
    summary.records.append(rec)
    bar.advance(f"{job.description}: {rec.status}")


def claim(job: Job, sink: Sink, summary: SweepSummary, bar: SweepProgress) -> bool:
    if sink.started(job):
        return True
    summary.elsewhere += 1
    bar.advance(f"{job.description}: claimed by another process")
    return False


def _serial(jobs: list[Job], sink: Sink, summary: SweepSummary, bar: SweepProgress) -> None:
    cache = ContextCache()
    for job in jobs:
        if not claim(job, sink, summary, bar):
            continue
        try:
            rec = execute(job, cache)
        except KeyboardInterrupt:
            sink.finished(job, failed_record(job, INTERRUPTED))
            raise
        finish(job, rec, sink, summary, bar)


def _pool(workers: int, threads: int, gpus: list[str] | None = None) -> ProcessPoolExecutor:
    """Spawned workers (no fork: safe with threads and CUDA); each numbered to pick its GPU from ``gpus``;
    each ends when this process dies."""
    ctx = multiprocessing.get_context("spawn")
    return ProcessPoolExecutor(workers, mp_context=ctx, initializer=init_worker,
                               initargs=(threads, ctx.Value("i", 0), os.getpid(), gpus or []))


def _isolate(suspects: list[Job], sink: Sink, summary: SweepSummary, bar: SweepProgress, threads: int,
             gpus: list[str]) -> None:
    """Run the jobs that were in flight when a worker died one at a time, to tell the culprit from bystanders."""
    pool: ProcessPoolExecutor | None = None
    try:
        for job in suspects:
            pool = pool or _pool(1, threads, gpus)
            try:
                rec = pool.submit(execute_in_worker, job).result()
            except BrokenProcessPool:
                rec = failed_record(job, WORKER_DIED)
                pool.shutdown(wait=True, cancel_futures=True)
                pool = None
            finish(job, rec, sink, summary, bar)
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)


def _parallel(jobs: list[Job], sink: Sink, summary: SweepSummary, bar: SweepProgress, workers: int,
              threads: int, gpus: list[str]) -> None:
    queue = deque(jobs)
    inflight: dict[Future[RunRecord], Job] = {}
    pool: ProcessPoolExecutor | None = None
    try:
        while queue or inflight:
            while queue and len(inflight) < workers:
                job = queue.popleft()
                if not claim(job, sink, summary, bar):
                    continue
                pool = pool or _pool(workers, threads, gpus)
                inflight[pool.submit(execute_in_worker, job)] = job
            if not inflight:
                break
            done, _ = wait(inflight, return_when=FIRST_COMPLETED)
            suspects: list[Job] = []
            for fut in done:
                job = inflight.pop(fut)
                try:
                    rec = fut.result()
                except BrokenProcessPool:
                    suspects.append(job)
                    continue
                except Exception as exc:  # e.g. a result that cannot be sent back
                    rec = failed_record(job, f"{type(exc).__name__}: {exc}")
                finish(job, rec, sink, summary, bar)
            if suspects:
                suspects += inflight.values()
                inflight.clear()
                if pool is not None:
                    pool.shutdown(wait=True, cancel_futures=True)
                pool = None
                _isolate(suspects, sink, summary, bar, threads, gpus)
    except KeyboardInterrupt:
        for job in inflight.values():
            sink.finished(job, failed_record(job, INTERRUPTED))
        raise
    finally:
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
