"""Two `quantbench bench` processes on one sweep and store split the work; one killed with SIGKILL at a
point the test chooses; a third finishes: every job ran once, no finished run was ever rewritten."""

from __future__ import annotations

import signal

import pytest
import yaml

from quantbench.store import RunRow, open_store, resolve_store_url
from tests.test_store import store_url  # noqa: F401  (a fixture: SQLite, and PostgreSQL when configured)
from tests.test_sweep_plugin import Gate, one_thread, tiny_sweep  # noqa: F401  (one_thread: autouse)
from tests.test_sweep_resume import _exit_note, _reap, _start  # noqa: F401  (_reap: autouse)


def _finished(url: str) -> dict[str, RunRow]:
    """Every column of the done rows (what must never change once a run is done)."""
    with open_store(url, create=False) as store:
        return {r.run_id: r for r in store.query(status="done")}


@pytest.mark.fault(input="two `quantbench bench` on one sweep and store; one is killed with SIGKILL mid-run",
                   message="the survivor: N were taken by another process on this store (not run here); "
                           "a later bench reruns the dead process's run",
                   exit_code=0, kept="every finished run, unchanged; each job ran once (the killed one twice)")
def test_two_bench_processes_split_the_work_and_a_third_reclaims_a_killed_ones_run(tmp_path, store_url):  # noqa: F811
    gate = Gate(tmp_path / "gate")
    data = tiny_sweep("pair", backends=["tensorrt", "academic"], bits=["W8A8", "W4A8"],
                      methods=[{"kind": "fault_test", "calibrator": "minmax", "calib_size": 32,
                                "faults": {"tensorrt": "block", "academic": "block"}, "gate": str(gate.folder)}])
    sweep, out = tmp_path / "sweep.yaml", tmp_path / "out"
    sweep.write_text(yaml.safe_dump(data))
    sqlite = store_url.startswith("sqlite")
    url = resolve_store_url(None, out) if sqlite else store_url
    extra = () if sqlite else ("--store", store_url)
    history: list[dict[str, RunRow]] = []

    def check_no_downgrade() -> None:
        now = _finished(url)
        for before in history:
            for run_id, row in before.items():
                assert now.get(run_id) == row, f"finished run {run_id} was rewritten"
        history.append(now)

    a = _start(sweep, out, *extra)
    pid, j1 = gate.wait(alive=lambda: _exit_note(a))
    assert pid == a.pid
    b = _start(sweep, out, *extra)
    pid, j2 = gate.wait(alive=lambda: _exit_note(b))
    assert pid == b.pid and j2 != j1, "B must skip the run A holds"
    gate.release(a.pid)  # A finishes j1, skips j2 (B holds it), takes j3
    pid, j3 = gate.wait(alive=lambda: _exit_note(a))
    assert pid == a.pid and j3 not in (j1, j2)
    check_no_downgrade()
    b.send_signal(signal.SIGKILL)  # B dies inside j2: its row stays `running`, owned by a gone process
    b.wait(timeout=60)
    gate.release(a.pid)
    pid, j4 = gate.wait(alive=lambda: _exit_note(a))
    assert pid == a.pid and j4 not in (j1, j2, j3)
    check_no_downgrade()
    gate.open()
    gate.release(a.pid)
    text = a.communicate(timeout=120)[0].decode()
    assert a.returncode == 0, text
    assert "3 runs done, 0 failed in this call; 1 were taken by another process" in text, text
    check_no_downgrade()

    c = _start(sweep, out, *extra)  # takes over j2 from the dead B
    text = c.communicate(timeout=120)[0].decode()
    assert c.returncode == 0, text
    assert "3 already complete in the store (skipped), 1 to run" in text and "1 runs done" in text, text
    check_no_downgrade()
    with open_store(url, create=False) as store:
        rows = {r.run_id: r for r in store.query()}
        assert store.integrity_check() == "ok"
    assert set(rows) == {j1, j2, j3, j4} and all(r.status == "done" for r in rows.values())
    assert {k: r.attempts for k, r in rows.items()} == {j1: 1, j2: 2, j3: 1, j4: 1}
    assert rows[j2].owner.split(":")[1] == str(c.pid)  # type: ignore[union-attr]
