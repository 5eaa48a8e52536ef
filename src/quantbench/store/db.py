"""The results store: one row per run in SQLite (WAL) or any SQLAlchemy database (e.g. PostgreSQL)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event, func, inspect, select
from sqlalchemy.exc import IntegrityError

from quantbench.errors import StoreError, StoreVersionError
from quantbench.store.errors import guard
from quantbench.store.owner import current_owner, reclaimable
from quantbench.store.schema import MIGRATIONS, SCHEMA_VERSION, metadata, runs, schema_info
from quantbench.store.url import check_sqlite_file, display, sqlite_path

JSON_COLUMNS = ("config", "metrics", "environment", "card")


def now() -> str:
    """UTC timestamp, ISO 8601 to the second (sorts as text)."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass
class RunRow:
    """One stored run, JSON columns decoded."""

    run_id: str
    status: str
    owner: str | None = None
    sweep: str | None = None
    method: str | None = None
    method_label: str | None = None
    model: str | None = None
    data: str | None = None
    backend: str | None = None
    w_bits: int | None = None
    a_bits: int | None = None
    seed: int | None = None
    fp_top1: float | None = None
    quant_top1: float | None = None
    agreement: float | None = None
    model_size_bytes: int | None = None
    wall_seconds: float | None = None
    config: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    environment: dict[str, Any] = field(default_factory=dict)
    card: dict[str, Any] | None = None
    error: str | None = None
    code_version: str | None = None
    attempts: int = 0
    created_at: str | None = None
    started_at: str | None = None
    finished_at: str | None = None

    @classmethod
    def from_mapping(cls, m: Any) -> RunRow:
        data = dict(m)
        for c in JSON_COLUMNS:
            data[c] = json.loads(data[c]) if data.get(c) else ({} if c != "card" else None)
        return cls(**data)

    def flat(self) -> dict[str, Any]:
        """Scalar columns plus metrics, for tables and CSV."""
        out = {k: v for k, v in self.__dict__.items() if k not in JSON_COLUMNS}
        for k, v in self.metrics.items():
            if not isinstance(v, (dict, list)):
                out.setdefault(k, v)
        return out


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")  # readers never block the writer; safe for concurrent workers
    cur.execute("PRAGMA synchronous=FULL")  # a committed run survives kill -9 and power loss
    cur.close()


def _connect_args(url: str, timeout: float) -> dict[str, Any]:
    """How long a write waits for another process's lock before giving up: SQLite's busy timeout, PostgreSQL's
    ``lock_timeout`` (and a connect timeout), so a held lock gives a clear error instead of a hang."""
    if url.startswith("sqlite"):
        return {"timeout": timeout}
    if url.startswith("postgresql"):
        return {"options": f"-c lock_timeout={max(1, int(timeout * 1000))}", "connect_timeout": max(1, int(timeout))}
    return {}


class ResultsStore:
    """Open (and create or migrate) a store; every write is one transaction."""

    def __init__(self, url: str, create: bool = True, timeout: float = 10.0) -> None:
        self.url = url
        self.location = display(url)
        path = sqlite_path(url)
        if path is not None:
            check_sqlite_file(path, create)
        connect_args = _connect_args(url, timeout)
        try:
            self.engine: Engine = create_engine(url, connect_args=connect_args)
        except Exception as exc:  # a missing driver (e.g. psycopg) or a malformed URL
            raise StoreError(f"cannot open results store {self.location}: {exc}") from exc
        if self.engine.dialect.name == "sqlite":
            event.listen(self.engine, "connect", _sqlite_pragmas)
        with guard(self.location, "opening it"):
            self._init_schema(create)

    # -- schema ------------------------------------------------------------------------------
    def _init_schema(self, create: bool) -> None:
        with self.engine.begin() as conn:
            if self.engine.dialect.name == "sqlite":
                result = conn.exec_driver_sql("PRAGMA quick_check").scalar()
                if result != "ok":
                    raise StoreError(f"results store {self.location} is corrupt (integrity check: {result}); "
                                     "it was left untouched: move it away or pass another --store")
            tables = set(inspect(conn).get_table_names())
            if schema_info.name not in tables:
                if tables:
                    raise StoreError(f"{self.location} is a database but not a quantbench results store "
                                     f"(tables: {', '.join(sorted(tables))}); it was left untouched")
                if not create:
                    raise StoreError(f"results store {self.location} is empty: run `quantbench bench` first")
                metadata.create_all(conn)
                conn.execute(schema_info.insert().values(key="schema_version", value=str(SCHEMA_VERSION)))
                return
            version = self._version(conn)
            if version > SCHEMA_VERSION:
                raise StoreVersionError(
                    f"results store {self.location} was created by a newer quantbench (store schema version "
                    f"{version}; this quantbench reads versions up to {SCHEMA_VERSION}): upgrade quantbench or "
                    "pass another --store; the store was left untouched"
                )
            for v in range(version, SCHEMA_VERSION):
                MIGRATIONS[v](conn)
            if version < SCHEMA_VERSION:
                conn.execute(schema_info.update().where(schema_info.c.key == "schema_version")
                             .values(value=str(SCHEMA_VERSION)))

    def _version(self, conn: Connection) -> int:
        value = conn.execute(select(schema_info.c.value).where(schema_info.c.key == "schema_version")).scalar()
        try:
            return int(value)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            raise StoreError(f"results store {self.location} has no valid schema version ({value!r}); "
                             "it was left untouched") from None

    @property
    def schema_version(self) -> int:
        with guard(self.location, "reading its version"), self.engine.connect() as conn:
            return self._version(conn)

    # -- writes ------------------------------------------------------------------------------
    # Concurrency: every state change is one conditional UPDATE (or an INSERT that fails on the primary
    # key) whose WHERE names the state it expects, and the rowcount says whether it happened. That is
    # atomic on SQLite (the write statement takes the write lock and re-reads) and on PostgreSQL (a
    # concurrent UPDATE re-checks its WHERE on the committed row), so two processes never both claim a
    # run, and a ``done`` row is never written again.
    def _row_state(self, run_id: str) -> tuple[str, str | None] | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(runs.c.status, runs.c.owner).where(runs.c.run_id == run_id)).first()
        return None if row is None else (row[0], row[1])

    def _insert(self, run_id: str, values: dict[str, Any]) -> bool:
        """Insert a new row in its own transaction; False when another process inserted it first."""
        try:
            with self.engine.begin() as conn:
                conn.execute(runs.insert().values(run_id=run_id, created_at=values.get("started_at") or now(),
                                                  **values))
        except IntegrityError:
            return False
        return True

    def claim(self, run_id: str, columns: dict[str, Any], owner: str | None = None) -> bool:
        """Take run ``run_id`` to run it: status ``running``, one more attempt, ``owner`` (default: this
        process, see :mod:`quantbench.store.owner`). Claimable: a new run, a ``failed`` one, or one left
        ``running`` by an owner that is gone. False (nothing written) when the run is ``done`` or held by
        a live process, including when another process claimed it first."""
        owner = owner or str(current_owner())
        with guard(self.location, f"claiming run {run_id}"):
            values = _encode({**columns, "status": "running", "owner": owner, "started_at": now(),
                              "error": None, "finished_at": None})
            values.pop("attempts", None)
            state = self._row_state(run_id)
            if state is None:
                return self._insert(run_id, {**values, "attempts": 1})
            status, old_owner = state
            if status == "done" or (status == "running" and not reclaimable(old_owner)):
                return False
            same_owner = runs.c.owner.is_(None) if old_owner is None else runs.c.owner == old_owner
            with self.engine.begin() as conn:
                result = conn.execute(runs.update()
                                      .where(runs.c.run_id == run_id, runs.c.status == status, same_owner)
                                      .values(attempts=runs.c.attempts + 1, **values))
            return result.rowcount == 1

    def mark_started(self, run_id: str, columns: dict[str, Any]) -> bool:
        """Alias of :meth:`claim` for this process."""
        return self.claim(run_id, columns)

    def save(self, run_id: str, columns: dict[str, Any], owner: str | None = None) -> bool:
        """Store a finished (``done``) or ``failed`` run in one transaction (committed on return).

        A ``done`` row is never written again; with ``owner``, only a row that this owner holds
        (``running``) is written. False when nothing was written for either reason."""
        with guard(self.location, f"saving run {run_id}"):
            values = _encode({**columns, "finished_at": now()})
            values.pop("attempts", None)
            cond = [runs.c.run_id == run_id, runs.c.status != "done"]
            if owner is not None:
                cond += [runs.c.owner == owner, runs.c.status == "running"]
            with self.engine.begin() as conn:
                result = conn.execute(runs.update().where(*cond).values(**values))
            if result.rowcount == 1:
                return True
            if owner is None and self._row_state(run_id) is None:
                return self._insert(run_id, {**values, "attempts": 1})
            return False

    def integrity_check(self) -> str:
        """``ok`` or the database's complaint (SQLite's full ``PRAGMA integrity_check``; other databases
        keep their own integrity), then the store's invariants on every database: no finished run without a
        time, no run id twice."""
        with guard(self.location, "checking its integrity"), self.engine.connect() as conn:
            if self.engine.dialect.name == "sqlite":
                result = str(conn.exec_driver_sql("PRAGMA integrity_check").scalar())
                if result != "ok":
                    return result
            bad = conn.execute(select(runs.c.run_id).where(runs.c.status == "done",
                                                           runs.c.finished_at.is_(None))).first()
            twice = conn.execute(select(runs.c.run_id).group_by(runs.c.run_id)
                                 .having(func.count() > 1)).first()
        if bad is not None:
            return f"run {bad[0]} is done without a finish time"
        return "ok" if twice is None else f"run {twice[0]} is stored more than once"

    # -- reads -------------------------------------------------------------------------------
    def statuses(self, run_ids: Iterable[str] | None = None) -> dict[str, str]:
        """run_id -> status for the given runs (all runs when None)."""
        q = select(runs.c.run_id, runs.c.status)
        with guard(self.location, "reading run statuses"), self.engine.connect() as conn:
            rows = conn.execute(q).all()
        wanted = None if run_ids is None else set(run_ids)
        return {r[0]: r[1] for r in rows if wanted is None or r[0] in wanted}

    def query(self, run_ids: Iterable[str] | None = None, **filters: Any) -> list[RunRow]:
        """Runs whose columns equal the given values (None values are ignored), oldest first;
        ``run_ids`` keeps only those runs."""
        q = select(runs)
        if run_ids is not None:
            q = q.where(runs.c.run_id.in_(list(run_ids)))
        for key, value in filters.items():
            if value is None:
                continue
            if key not in runs.c:
                raise StoreError(f"cannot filter on {key!r}; columns: {', '.join(runs.c.keys())}")
            q = q.where(runs.c[key] == value)
        q = q.order_by(runs.c.created_at, runs.c.run_id)
        with guard(self.location, "reading runs"), self.engine.connect() as conn:
            return [RunRow.from_mapping(r._mapping) for r in conn.execute(q)]

    def get(self, run_id: str) -> RunRow:
        """The run whose id is ``run_id`` or starts with it (unique prefix)."""
        q = select(runs).where(runs.c.run_id.startswith(run_id, autoescape=True))
        with guard(self.location, f"reading run {run_id}"), self.engine.connect() as conn:
            rows = [RunRow.from_mapping(r._mapping) for r in conn.execute(q.limit(11))]
        if not rows:
            raise StoreError(f"no run {run_id!r} in {self.location}; `quantbench runs` lists the run ids")
        if len(rows) > 1:
            ids = ", ".join(r.run_id for r in rows[:10])
            raise StoreError(f"run id prefix {run_id!r} is ambiguous in {self.location}: {ids}; give more characters")
        return rows[0]

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> ResultsStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _encode(values: dict[str, Any]) -> dict[str, Any]:
    out = dict(values)
    for c in JSON_COLUMNS:
        if c in out and out[c] is not None and not isinstance(out[c], str):
            out[c] = json.dumps(out[c], sort_keys=True, default=str)
    unknown = set(out) - set(runs.c.keys())
    if unknown:
        raise StoreError(f"internal: unknown run columns {sorted(unknown)}")
    return out


def open_store(url: str, create: bool = True, timeout: float = 10.0) -> ResultsStore:
    """Open the store at ``url``; ``create`` False refuses a store that does not exist yet."""
    return ResultsStore(url, create=create, timeout=timeout)
