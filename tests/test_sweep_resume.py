"""Killing a sweep loses no finished run and reruns nothing that finished; crashing runs are recorded as
failed while the sweep goes on (also when a worker process dies)."""

from __future__ import annotations

import contextlib
import os
import select
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from rich.console import Console

from quantbench.cli.bench import run_sweep_file
from quantbench.errors import StoreError
from quantbench.store import open_store, resolve_store_url
from quantbench.sweep.expand import expand
from quantbench.sweep.identity import code_version
from quantbench.sweep.load import parse_sweep
from quantbench.sweep.runner import run_jobs
from quantbench.sweep.sink import StoreSink
from tests.test_store import store_url  # noqa: F401  (a fixture: SQLite, and PostgreSQL when configured)
from tests.test_sweep_plugin import Gate, one_thread, tiny_sweep  # noqa: F401  (one_thread: autouse)

ROOT = Path(__file__).resolve().parents[1]
BACKENDS = ["tensorrt", "academic", "fbgemm", "snpe"]


def _gated_sweep(tmp_path: Path, gate: Gate, blocked: str = "fbgemm") -> Path:
    """Six runs; those on ``blocked`` wait at ``gate`` until the test releases them."""
    data = tiny_sweep("resume", backends=BACKENDS[:3], bits=["W8A8", "W4A8"],
                      methods=[{"kind": "fault_test", "calibrator": "minmax", "calib_size": 32,
                                "faults": {blocked: "block"}, "gate": str(gate.folder)}])
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _rows(db: Path | str) -> dict[str, tuple[str, str | None, int]]:
    """run_id -> (status, finished_at, attempts), read through a separate connection (WAL lets us); ``db`` is
    an SQLite file or a database URL."""
    if isinstance(db, str):
        try:
            with open_store(db, create=False) as store:
                return {r.run_id: (r.status, r.finished_at, r.attempts) for r in store.query()}
        except StoreError:  # no store there yet
            return {}
    if not db.exists():
        return {}
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
    try:
        return {r[0]: (r[1], r[2], r[3]) for r in con.execute("SELECT run_id, status, finished_at, attempts FROM runs")}
    except sqlite3.OperationalError:  # the table does not exist yet
        return {}
    finally:
        con.close()


_STARTED: list[subprocess.Popen[bytes]] = []


@pytest.fixture(autouse=True)
def _reap() -> Iterator[None]:
    """A failed test leaves no bench process blocked at its gate."""
    yield
    while _STARTED:
        proc = _STARTED.pop()
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start(sweep: Path, out: Path, *extra: str) -> subprocess.Popen[bytes]:
    """``quantbench bench`` in a subprocess that imports this checkout's code (``src`` first on the path);
    killed after the test if still running (import :func:`_reap` with it)."""
    path = os.pathsep.join([str(ROOT / "src"), str(ROOT), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path.rstrip(os.pathsep), "PYTHONFAULTHANDLER": "1"}
    cmd = [sys.executable, "-m", "quantbench.cli.main", "bench", str(sweep), "--out", str(out), "--quiet",
           "--threads", "1", *extra]
    # SIGINT at its default: a test run started in the background (bash `&` without job control) inherits SIGINT
    # ignored, and the sweep would then rightly ignore the test's Ctrl-C
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            preexec_fn=_default_sigint)
    _STARTED.append(proc)
    return proc


def _communicate_or_dump(proc: subprocess.Popen[bytes], timeout: float) -> bytes:
    """The output of ``proc`` once it exits; if it has not exited within ``timeout`` seconds, SIGABRT makes its
    faulthandler (PYTHONFAULTHANDLER, set by :func:`_start`) print every thread's stack, and the test fails
    showing where the process hung."""
    try:
        return proc.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGABRT)
        stdout = proc.communicate(timeout=30)[0]
        raise AssertionError(f"the sweep did not exit {timeout:g} s after the signal; its threads:\n"
                             f"{stdout.decode(errors='replace')[-6000:]}") from None


def _exit_note(proc: subprocess.Popen[bytes]) -> str:
    """For a failed wait: how the process ended, if it did."""
    if proc.poll() is None:
        return " (the sweep is still running)"
    return f"; the sweep ended with {proc.returncode}: {proc.stdout.read().decode()}"  # type: ignore[union-attr]


def _blocked_run(gate: Gate, proc: subprocess.Popen[bytes], db: Path | str) -> str:
    """Wait until ``proc`` blocks in a gated run; that run is ``running`` in the store, the others before it done."""
    pid, run_id = gate.wait(alive=lambda: _exit_note(proc))
    assert pid == proc.pid
    assert _rows(db)[run_id][0] == "running"
    return run_id


@pytest.mark.fault(input="kill -9 of `quantbench bench` while a run is in progress",
                   message="(none: the process is gone); rerunning says N already complete, M to run",
                   exit_code=0, kept="every finished run and its card; the rerun runs only the unfinished ones")
def test_kill_9_mid_sweep_loses_nothing_and_rerun_runs_nothing_twice(tmp_path, store_url):  # noqa: F811
    gate = Gate(tmp_path / "gate")
    sweep, out = _gated_sweep(tmp_path, gate), tmp_path / "out"
    sqlite = store_url.startswith("sqlite")
    db: Path | str = out / "quantbench.db" if sqlite else store_url
    extra = () if sqlite else ("--store", store_url)
    proc = _start(sweep, out, *extra)
    _blocked_run(gate, proc, db)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    before = {k: v for k, v in _rows(db).items() if v[0] == "done"}
    assert 2 <= len(before) < 6, "kill -9 must land mid-sweep"
    assert all(attempts == 1 for _, _, attempts in before.values())

    code_version.cache_clear()  # the subprocess hashed the source just now: so do we
    gate.open()  # the rerun goes through the gated runs
    console = Console(record=True, width=200)
    code = run_sweep_file(sweep, out, None if sqlite else store_url, 1, "refuse", False, False, console)
    text = console.export_text()
    assert code == 0, text
    assert f"{len(before)} already complete in the store (skipped), {6 - len(before)} to run" in text
    with open_store(store_url if not sqlite else resolve_store_url(None, out), create=False) as store:
        assert store.integrity_check() == "ok"
    after = _rows(db)
    assert len(after) == 6 and all(s == "done" for s, _, _ in after.values())
    for run_id, row in before.items():
        assert after[run_id] == row, f"finished run {run_id} was run again or changed"
    assert sorted(p.stem for p in (out / "cards").glob("*.json")) == sorted(after)


@pytest.mark.fault(input="Ctrl-C (SIGINT) during `quantbench bench`",
                   message="interrupted ... rerun the same command to resume", exit_code=130,
                   kept="every finished run; the interrupted run is marked failed, not left running")
def test_sigint_stops_the_sweep_cleanly_and_keeps_finished_runs(tmp_path):
    gate = Gate(tmp_path / "gate")
    sweep, out = _gated_sweep(tmp_path, gate), tmp_path / "out"
    db = out / "quantbench.db"
    proc = _start(sweep, out)
    blocked = _blocked_run(gate, proc, db)  # never released: SIGINT arrives while it runs
    proc.send_signal(signal.SIGINT)
    stdout = _communicate_or_dump(proc, 120)
    assert proc.returncode == 130, stdout.decode()
    assert "rerun the same command to resume" in stdout.decode()
    rows = _rows(db)
    assert sum(s == "done" for s, _, _ in rows.values()) >= 1
    assert all(s in ("done", "failed") for s, _, _ in rows.values()), "the interrupted run is marked, not left running"
    assert rows[blocked][0] == "failed" and sum(s == "done" for s, _, _ in rows.values()) < 6


def test_crashing_runs_are_recorded_and_the_parallel_sweep_goes_on(tmp_path):
    faults = {"snpe": "kill", "academic": "raise"}
    data = tiny_sweep("crash", backends=BACKENDS,
                      methods=[{"kind": "fault_test", "calibrator": "minmax", "calib_size": 32, "faults": faults}])
    jobs = expand(parse_sweep(data, tmp_path)).jobs
    with open_store(resolve_store_url(None, tmp_path)) as store:
        summary = run_jobs(jobs, StoreSink(store, tmp_path / "cards"), workers=2, progress=False)
        rows = {r.backend: r for r in store.query()}
    assert summary.done == 2 and summary.failed == 2 and not summary.interrupted
    assert rows["tensorrt"].status == rows["fbgemm"].status == "done"
    assert rows["snpe"].status == "failed" and "worker process died" in (rows["snpe"].error or "")
    assert rows["academic"].status == "failed" and "RuntimeError: injected failure" in (rows["academic"].error or "")
    assert rows["tensorrt"].environment["torch_threads"] >= 1


def _wait_gone(pid: int, timeout: float) -> bool:
    """Block until process ``pid`` (not our child) has exited, at most ``timeout`` seconds (Linux pidfd)."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        return bool(select.select([fd], [], [], timeout)[0])
    finally:
        os.close(fd)


@pytest.mark.skipif(not hasattr(os, "pidfd_open"), reason="needs Linux pidfd_open to wait for non-child processes")
@pytest.mark.fault(input="kill -9 of `quantbench bench --workers 2` while both workers run",
                   message="(none: the process is gone)", exit_code=-9,
                   kept="every finished run; the worker processes exit with their parent instead of living on")
def test_kill_9_of_a_parallel_sweep_ends_its_workers(tmp_path):
    gate = Gate(tmp_path / "gate")
    data = tiny_sweep("orphans", backends=["tensorrt", "academic"],
                      methods=[{"kind": "fault_test", "calibrator": "minmax", "calib_size": 32,
                                "faults": {"tensorrt": "block", "academic": "block"}, "gate": str(gate.folder)}])
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(yaml.safe_dump(data))
    proc = _start(sweep, tmp_path / "out", "--workers", "2")
    workers = {gate.wait(alive=lambda: _exit_note(proc))[0] for _ in range(2)}  # both block in a worker
    assert proc.pid not in workers and len(workers) == 2
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    try:
        for pid in workers:
            assert _wait_gone(pid, timeout=60), f"worker {pid} outlived its parent"
    finally:
        for pid in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


_ORPHAN_CHILD = """
import os, threading
from quantbench.sweep import orphan
orphan._set_pdeathsig = lambda: False  # the portable fallback, as where prctl is unavailable
orphan.WATCHDOG_SECONDS = 0.05
print(orphan.exit_with_parent(os.getppid()), flush=True)
threading.Event().wait()  # blocks for ever: only the watchdog can end this process
"""

_ORPHAN_PARENT = """
import subprocess, sys
child = subprocess.Popen([sys.executable, "-c", sys.argv[1]], stdout=subprocess.PIPE)
print(child.pid, child.stdout.readline().decode().strip(), flush=True)
sys.stdin.read()
"""


@pytest.mark.skipif(not hasattr(os, "pidfd_open"), reason="needs Linux pidfd_open to wait for non-child processes")
def test_the_watchdog_fallback_ends_a_worker_whose_parent_died():
    path = os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    parent = subprocess.Popen([sys.executable, "-c", _ORPHAN_PARENT, _ORPHAN_CHILD], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, env={**os.environ, "PYTHONPATH": path})
    _STARTED.append(parent)
    line = parent.stdout.readline().decode().split()  # type: ignore[union-attr]
    assert len(line) == 2 and line[1] == "watchdog", line
    child = int(line[0])
    parent.kill()
    parent.wait(timeout=30)
    try:
        assert _wait_gone(child, timeout=60), "the watchdog did not end the orphaned worker"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signal.SIGKILL)
