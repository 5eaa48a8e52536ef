"""The results store: SQLite (WAL) by default, any SQLAlchemy database via a URL."""

from quantbench.store.db import ResultsStore, RunRow, open_store
from quantbench.store.schema import SCHEMA_VERSION
from quantbench.store.url import DEFAULT_DB_NAME, resolve_store_url

__all__ = ["DEFAULT_DB_NAME", "SCHEMA_VERSION", "ResultsStore", "RunRow", "open_store", "resolve_store_url"]
