"""The results store: schema version, WAL, refusing newer/corrupt/locked/foreign stores without touching
them, transactions that leave the store consistent when a write fails, queries and exports."""

from __future__ import annotations

import csv
import io
import json
import os
import socket
import sqlite3
import subprocess
import sys

import pytest
from sqlalchemy import create_engine, event, inspect

from quantbench.errors import StoreError, StoreVersionError
from quantbench.store import SCHEMA_VERSION, open_store, resolve_store_url
from quantbench.store.export import to_csv, to_json
from quantbench.store.owner import current_owner
from quantbench.store.schema import runs
from quantbench.store.url import sqlite_path
from tests.conftest import service_missing

COLUMNS = {"sweep": "s", "method": "ptq", "method_label": "minmax", "model": "digits_cnn", "data": "digits",
           "backend": "tensorrt", "w_bits": 8, "a_bits": 8, "seed": 0, "config": {"model": "digits_cnn"}}


def _save(store, run_id: str, quant: float = 97.5, card: dict | None = None, **extra) -> None:
    store.mark_started(run_id, COLUMNS)
    store.save(run_id, {**COLUMNS, "status": "done", "fp_top1": 98.0, "quant_top1": quant, "agreement": 0.99,
                        "metrics": {"calib_seconds": 0.5, "fp_top1": 98.0}, "environment": {"torch": "x"},
                        "card": card or {"run": {"run_id": run_id}}, **extra})


def _url(tmp_path) -> str:
    return resolve_store_url(None, tmp_path)


PG_ENV = "QUANTBENCH_TEST_PG_URL"  # e.g. postgresql+psycopg://user@/db?host=/run/postgresql (emptied by the tests)


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request, tmp_path) -> str:
    """An empty store: SQLite in tmp_path, or the PostgreSQL database named by $QUANTBENCH_TEST_PG_URL
    (its tables are dropped first; skipped when the variable is not set)."""
    if request.param == "sqlite":
        return _url(tmp_path)
    url = os.environ.get(PG_ENV)
    if not url:
        service_missing("postgresql", f"set {PG_ENV} to a PostgreSQL database the tests may empty to run the "
                                      "store tests on it (.ci/pg-start starts one)")
    engine = create_engine(url)
    with engine.begin() as conn:  # an empty database: every table of the test database's public schema goes
        conn.exec_driver_sql("DROP SCHEMA public CASCADE")
        conn.exec_driver_sql("CREATE SCHEMA public")
    engine.dispose()
    return url


def _sql(url: str, *statements: str) -> None:
    """Run SQL on the store's database behind quantbench's back (one transaction), on SQLite or PostgreSQL."""
    engine = create_engine(url)
    with engine.begin() as conn:
        for st in statements:
            conn.exec_driver_sql(st)
    engine.dispose()


def _snapshot(url: str) -> list[tuple]:
    """Every row of every table (what "left untouched" compares)."""
    engine = create_engine(url)
    with engine.connect() as conn:
        names = sorted(inspect(conn).get_table_names())
        rows = [(n, *r) for n in names for r in conn.exec_driver_sql(f"SELECT * FROM {n}").all()]
    engine.dispose()
    return sorted(rows, key=repr)


def test_new_store_has_the_schema_version(store_url):
    with open_store(store_url) as store:
        assert store.schema_version == SCHEMA_VERSION
        _save(store, "a" * 16)
        assert store.integrity_check() == "ok"
    engine = create_engine(store_url)
    with engine.connect() as conn:
        version = conn.exec_driver_sql("SELECT value FROM quantbench_schema WHERE key='schema_version'").scalar()
        assert set(inspect(conn).get_table_names()) == {"quantbench_schema", "runs"}
    engine.dispose()
    assert version == str(SCHEMA_VERSION)


def test_a_new_sqlite_store_uses_wal(tmp_path):
    with open_store(_url(tmp_path)) as store:
        _save(store, "a" * 16)
    con = sqlite3.connect(tmp_path / "quantbench.db")
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    version = con.execute("SELECT value FROM quantbench_schema WHERE key='schema_version'").fetchone()[0]
    assert version == str(SCHEMA_VERSION)
    con.close()


def test_rows_roundtrip_and_upsert_counts_attempts(store_url):
    with open_store(store_url) as store:
        assert store.claim("0123456789abcdef", COLUMNS)
        assert store.save("0123456789abcdef", {**COLUMNS, "status": "failed", "error": "boom"})
        _save(store, "0123456789abcdef", quant=96.0)  # the retry of a failed run
        _save(store, "0123999999999999", backend="snpe")
        row = store.get("0123456789")
        assert row.attempts == 2 and row.quant_top1 == 96.0 and row.card == {"run": {"run_id": "0123456789abcdef"}}
        assert row.error is None
        assert row.config == {"model": "digits_cnn"} and row.status == "done"
        with pytest.raises(StoreError, match="ambiguous"):
            store.get("0123")
        with pytest.raises(StoreError, match="no run 'ffff'"):
            store.get("ffff")
        assert [r.backend for r in store.query(backend="snpe")] == ["snpe"]
        assert len(store.query(status="done", sweep="s")) == 2
        rows = store.query()
    table = list(csv.DictReader(io.StringIO(to_csv(rows))))
    assert table[0]["run_id"] == "0123456789abcdef" and table[0]["calib_seconds"] == "0.5"
    data = json.loads(to_json(rows))
    assert data[1]["backend"] == "snpe" and data[0]["card"]["run"]["run_id"] == "0123456789abcdef"


def test_store_from_a_newer_schema_is_refused_with_both_versions(store_url):
    with open_store(store_url) as store:
        _save(store, "a" * 16)
    _sql(store_url, "UPDATE quantbench_schema SET value='7' WHERE key='schema_version'")
    before = _snapshot(store_url)
    with pytest.raises(StoreVersionError) as err:
        open_store(store_url)
    assert "schema version 7" in str(err.value) and f"up to {SCHEMA_VERSION}" in str(err.value)
    assert _snapshot(store_url) == before


@pytest.mark.parametrize("content", [b"this is not a database at all" * 100,
                                     b"SQLite format 3\x00" + b"\xff" * 4000])
def test_corrupt_store_gives_a_clear_error_and_is_left_untouched(tmp_path, content):
    path = tmp_path / "quantbench.db"
    path.write_bytes(content)
    with pytest.raises(StoreError) as err:
        open_store(_url(tmp_path))
    assert "corrupt" in str(err.value) or "not an SQLite database" in str(err.value) or \
        "not a valid SQLite" in str(err.value)
    assert path.read_bytes() == content


def test_foreign_database_is_refused(store_url):
    if store_url.startswith("sqlite"):
        sqlite3.connect(sqlite_path(store_url)).close()  # the file must exist to hold a table
    _sql(store_url, "CREATE TABLE customers (id INTEGER)", "INSERT INTO customers VALUES (1)")
    with pytest.raises(StoreError, match=r"not a quantbench results store \(tables: customers\)"):
        open_store(store_url)
    assert _snapshot(store_url) == [("customers", 1)]


def test_locked_store_gives_a_clear_error_and_keeps_its_data(store_url):
    with open_store(store_url) as store:
        _save(store, "a" * 16)
    holder = create_engine(store_url).connect()
    holder.exec_driver_sql("BEGIN EXCLUSIVE" if store_url.startswith("sqlite") else "BEGIN")
    if not store_url.startswith("sqlite"):
        holder.exec_driver_sql("LOCK TABLE runs IN ACCESS EXCLUSIVE MODE")
    try:
        with pytest.raises(StoreError, match="locked by another process"), \
                open_store(store_url, timeout=0.2) as store:
            _save(store, "b" * 16)
    finally:
        holder.exec_driver_sql("ROLLBACK")
        holder.close()
    with open_store(store_url) as store:
        assert [r.run_id for r in store.query()] == ["a" * 16]


def test_disk_full_during_a_write_rolls_back_and_the_store_stays_consistent(tmp_path):
    with open_store(_url(tmp_path)) as store:
        _save(store, "a" * 16)
        store.engine.dispose()
        # a real SQLITE_FULL: the database may not grow past its current pages
        event.listen(store.engine, "connect", lambda c, _: c.execute("PRAGMA max_page_count = 1"))
        with pytest.raises(StoreError, match="disk is full"):
            _save(store, "b" * 16, card={"run": {"pad": "x" * 200_000}})
    with open_store(_url(tmp_path)) as store:
        rows = {r.run_id: r for r in store.query()}
    # the failed save was rolled back as a whole: b is still only "started", a is untouched
    assert rows["a" * 16].status == "done" and rows["a" * 16].card == {"run": {"run_id": "a" * 16}}
    assert rows["b" * 16].status == "running" and rows["b" * 16].card is None


def test_read_commands_never_create_a_store(store_url):
    with pytest.raises(StoreError, match=r"no results store at|is empty: run `quantbench bench` first"):
        open_store(store_url, create=False)
    if store_url.startswith("sqlite"):
        assert not sqlite_path(store_url).exists()
    assert _snapshot(store_url) == []


def test_an_unreachable_database_server_gives_a_clear_error(tmp_path):
    pytest.importorskip("psycopg")
    url = f"postgresql+psycopg://postgres@/postgres?host={tmp_path}&port=1"  # no server listens there
    with pytest.raises(StoreError, match=r"cannot be reached: no database server listens there"):
        open_store(url, timeout=2)


def test_store_urls():
    assert resolve_store_url("postgresql+psycopg://u:secret@db/qb", None).startswith("postgresql+psycopg://")  # type: ignore[arg-type]
    with pytest.raises(StoreError, match="not a valid database URL"):
        resolve_store_url("nope://::", None)  # type: ignore[arg-type]


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.mark.fault(input="a second process saves a run (done elsewhere) as failed, e.g. stopped with SIGTERM",
                   message="(none: the save is refused)", exit_code=0,
                   kept="the done row, its metrics and its attempt count")
def test_a_done_run_is_never_downgraded_nor_claimed_again(store_url):
    me, other = str(current_owner()), f"{socket.gethostname()}:{os.getppid()}:"
    with open_store(store_url) as store:
        assert store.claim("a" * 16, COLUMNS, owner=me)
        assert store.save("a" * 16, {**COLUMNS, "status": "done", "quant_top1": 97.0}, owner=me)
        assert not store.claim("a" * 16, COLUMNS, owner=other)
        assert not store.save("a" * 16, {**COLUMNS, "status": "failed", "error": "stopped"}, owner=other)
        assert not store.save("a" * 16, {**COLUMNS, "status": "failed", "error": "stopped"})
        assert not store.save("a" * 16, {**COLUMNS, "status": "done", "quant_top1": 1.0}, owner=me)
        row = store.get("a" * 16)
        assert (row.status, row.quant_top1, row.attempts, row.error) == ("done", 97.0, 1, None)
        assert store.integrity_check() == "ok"


@pytest.mark.fault(input="two processes claim the same run; the owner of a `running` run dies (kill -9)",
                   message="(none: the second claim is refused; a later process takes over the dead owner's run)",
                   exit_code=0, kept="one owner per run; the reclaimed run counts one more attempt")
def test_claims_are_exclusive_and_only_a_gone_owners_run_is_reclaimed(store_url):
    host = socket.gethostname()
    alive = f"{host}:{os.getppid()}:"  # our parent: alive, start time not recorded
    with open_store(store_url) as store:
        assert store.claim("a" * 16, COLUMNS, owner=alive)
        assert not store.claim("a" * 16, COLUMNS, owner="x:1:1")  # held by a live process
        assert store.get("a" * 16).owner == alive
        # a dead pid, our own pid with another start time (pid reused), another host, no owner (schema 1)
        cases = {"b": (f"{host}:{_dead_pid()}:1", True), "c": (f"{host}:{os.getpid()}:0", True),
                 "d": (f"elsewhere.invalid:{_dead_pid()}:1", False), "e": (None, True)}
        for key, (owner, expected) in cases.items():
            run_id = key * 16
            assert store.claim(run_id, COLUMNS, owner="placeholder:1:1")
            with store.engine.begin() as conn:
                conn.execute(runs.update().where(runs.c.run_id == run_id).values(owner=owner))
            assert store.claim(run_id, COLUMNS) is expected, key
            assert store.get(run_id).attempts == (2 if expected else 1), key


def test_a_schema_1_store_is_migrated_and_keeps_its_runs(store_url):
    with open_store(store_url) as store:
        _save(store, "a" * 16)
    _sql(store_url, "ALTER TABLE runs DROP COLUMN owner",
         "UPDATE quantbench_schema SET value='1' WHERE key='schema_version'")
    with open_store(store_url) as store:
        assert store.schema_version == SCHEMA_VERSION == 2
        row = store.get("a" * 16)
        assert row.status == "done" and row.owner is None and row.quant_top1 == 97.5
        assert store.claim("b" * 16, COLUMNS) and store.get("b" * 16).owner == str(current_owner())
        assert store.integrity_check() == "ok"
