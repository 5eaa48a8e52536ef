"""The results store's tables (SQLAlchemy Core) and its schema version."""

from __future__ import annotations

from collections.abc import Callable

from sqlalchemy import Column, Connection, Float, Integer, MetaData, String, Table, Text, text

#: Bump when the tables change and add a migration from the previous version to MIGRATIONS.
SCHEMA_VERSION = 2

metadata = MetaData()

schema_info = Table(
    "quantbench_schema",
    metadata,
    Column("key", String(64), primary_key=True),
    Column("value", String(256), nullable=False),
)

#: One row per run: the columns people filter and sort on, plus JSON text for the rest.
runs = Table(
    "runs",
    metadata,
    Column("run_id", String(32), primary_key=True),
    Column("sweep", String(200), index=True),
    Column("status", String(16), index=True, nullable=False),  # running | done | failed
    Column("owner", String(300)),  # HOST:PID:START of the process that claimed the run (store/owner.py)
    Column("method", String(32)),
    Column("method_label", String(200)),
    Column("model", String(100), index=True),
    Column("data", String(500)),
    Column("backend", String(200), index=True),
    Column("w_bits", Integer),
    Column("a_bits", Integer),
    Column("seed", Integer),
    Column("fp_top1", Float),
    Column("quant_top1", Float),
    Column("agreement", Float),
    Column("model_size_bytes", Integer),
    Column("wall_seconds", Float),
    Column("config", Text, nullable=False),  # JSON: the fully resolved run configuration
    Column("metrics", Text),  # JSON
    Column("environment", Text),  # JSON: torch, device, CPU/GPU name, ...
    Column("card", Text),  # JSON: the quantization card
    Column("error", Text),
    Column("code_version", String(64)),
    Column("attempts", Integer, nullable=False, default=0),
    Column("created_at", String(40)),
    Column("started_at", String(40)),
    Column("finished_at", String(40)),
)

#: ``MIGRATIONS[n]`` upgrades a store at schema version ``n`` to ``n + 1`` inside one transaction.
def _add_owner(conn: Connection) -> None:
    conn.execute(text("ALTER TABLE runs ADD COLUMN owner VARCHAR(300)"))


MIGRATIONS: dict[int, Callable[[Connection], None]] = {1: _add_owner}
