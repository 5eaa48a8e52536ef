"""Killing a sweep loses no finished run and reruns nothing that finished; crashing runs are recorded as
failed while the sweep goes on (also when a worker process dies)."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import yaml
from rich.console import Console

from quantbench.cli.bench import run_sweep_file
from quantbench.store import open_store, resolve_store_url
from quantbench.sweep.expand import expand
from quantbench.sweep.identity import code_version
from quantbench.sweep.load import parse_sweep
from quantbench.sweep.runner import run_jobs
from quantbench.sweep.sink import StoreSink
from tests.test_sweep_plugin import one_thread, tiny_sweep  # noqa: F401  (one_thread: autouse)

ROOT = Path(__file__).resolve().parents[1]
BACKENDS = ["tensorrt", "academic", "fbgemm", "snpe"]


def _slow_sweep(tmp_path: Path, sleep: float = 0.3) -> Path:
    data = tiny_sweep("resume", backends=BACKENDS[:3], bits=["W8A8", "W4A8"],
                      methods=[{"kind": "fault_test", "calibrator": "minmax", "calib_size": 32, "sleep": sleep}])
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _rows(db: Path) -> dict[str, tuple[str, str | None, int]]:
    """run_id -> (status, finished_at, attempts), read through a separate connection (WAL lets us)."""
    if not db.exists():
        return {}
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
    try:
        return {r[0]: (r[1], r[2], r[3]) for r in con.execute("SELECT run_id, status, finished_at, attempts FROM runs")}
    except sqlite3.OperationalError:  # the table does not exist yet
        return {}
    finally:
        con.close()


def _start(sweep: Path, out: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "quantbench.cli.main", "bench", str(sweep), "--out", str(out), "--quiet",
           "--threads", "1"]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _wait_for_done(proc: subprocess.Popen[bytes], db: Path, n: int, timeout: float = 150.0) -> None:
    deadline = time.monotonic() + timeout
    while sum(s == "done" for s, _, _ in _rows(db).values()) < n:
        assert proc.poll() is None, f"the sweep ended early: {proc.stdout.read().decode()}"  # type: ignore[union-attr]
        assert time.monotonic() < deadline, "the sweep made no progress"
        time.sleep(0.05)


def test_kill_9_mid_sweep_loses_nothing_and_rerun_runs_nothing_twice(tmp_path):
    sweep, out = _slow_sweep(tmp_path), tmp_path / "out"
    db = out / "quantbench.db"
    proc = _start(sweep, out)
    _wait_for_done(proc, db, 2)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    before = {k: v for k, v in _rows(db).items() if v[0] == "done"}
    assert 2 <= len(before) < 6, "kill -9 must land mid-sweep"
    assert all(attempts == 1 for _, _, attempts in before.values())

    code_version.cache_clear()  # the subprocess hashed the source just now: so do we
    console = Console(record=True, width=200)
    code = run_sweep_file(sweep, out, None, 1, "refuse", False, False, console)
    text = console.export_text()
    assert code == 0, text
    assert f"{len(before)} already complete in the store (skipped), {6 - len(before)} to run" in text
    after = _rows(db)
    assert len(after) == 6 and all(s == "done" for s, _, _ in after.values())
    for run_id, row in before.items():
        assert after[run_id] == row, f"finished run {run_id} was run again or changed"
    assert sorted(p.stem for p in (out / "cards").glob("*.json")) == sorted(after)


def test_sigint_stops_the_sweep_cleanly_and_keeps_finished_runs(tmp_path):
    sweep, out = _slow_sweep(tmp_path, sleep=0.5), tmp_path / "out"
    db = out / "quantbench.db"
    proc = _start(sweep, out)
    _wait_for_done(proc, db, 1)
    proc.send_signal(signal.SIGINT)
    stdout, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, stdout.decode()
    assert "rerun the same command to resume" in stdout.decode()
    rows = _rows(db)
    assert sum(s == "done" for s, _, _ in rows.values()) >= 1
    assert all(s in ("done", "failed") for s, _, _ in rows.values()), "the interrupted run is marked, not left running"


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
