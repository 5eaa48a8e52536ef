"""Where the results store lives: a SQLAlchemy URL, SQLite in the output folder by default."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy.engine import make_url

from quantbench.errors import StoreError

DEFAULT_DB_NAME = "quantbench.db"
SQLITE_MAGIC = b"SQLite format 3\x00"


def resolve_store_url(store: str | None, out: Path) -> str:
    """``store`` as given (a SQLAlchemy URL or a path to an SQLite file), or ``OUT/quantbench.db``."""
    if store is None:
        return f"sqlite:///{(out / DEFAULT_DB_NAME).resolve()}"
    if "://" in store:
        try:
            make_url(store)
        except Exception as exc:
            raise StoreError(f"--store {store!r} is not a valid database URL ({exc}); use e.g. "
                             "sqlite:///path/quantbench.db or postgresql+psycopg://user@host/db") from exc
        return store
    return f"sqlite:///{Path(store).expanduser().resolve()}"


def sqlite_path(url: str) -> Path | None:
    """The file of an SQLite URL (None for other databases and in-memory SQLite)."""
    u = make_url(url)
    if u.get_backend_name() != "sqlite" or not u.database or u.database == ":memory:":
        return None
    return Path(u.database)


def display(url: str) -> str:
    """The URL without its password, or the SQLite file path."""
    path = sqlite_path(url)
    return str(path) if path is not None else make_url(url).render_as_string(hide_password=True)


def check_sqlite_file(path: Path, create: bool) -> None:
    """Refuse a missing store (when not creating) or a file that is not SQLite, touching nothing."""
    if not path.exists():
        if not create:
            raise StoreError(f"no results store at {path}: run `quantbench bench SWEEP.yaml` (or `quantbench demo`) "
                             "first, or pass --out/--store to point at one")
        if not path.parent.is_dir():
            path.parent.mkdir(parents=True, exist_ok=True)
        return
    if path.is_dir():
        raise StoreError(f"results store {path} is a directory, not an SQLite file; pass another --store")
    try:
        with path.open("rb") as f:
            head = f.read(len(SQLITE_MAGIC))
    except OSError as exc:
        raise StoreError(f"results store {path} cannot be read ({exc}); check its permissions") from exc
    if head and head != SQLITE_MAGIC:
        raise StoreError(f"results store {path} is not an SQLite database (corrupt or another kind of file); "
                         "it was left untouched: move it away or pass another --store")
