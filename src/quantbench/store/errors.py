"""Turn database driver errors into one clear :class:`StoreError` message."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy.exc import DBAPIError, SQLAlchemyError

from quantbench.errors import StoreError

#: (substring of the driver's message, what it means for the user) checked in order.
_KINDS: tuple[tuple[str, str], ...] = (
    ("lock timeout", "is locked by another process (a running sweep or an open transaction); wait for it to "
                     "finish or pass another --store"),
    ("connection refused", "cannot be reached: the database server refused the connection; check that it runs "
                           "and the URL's host and port"),
    ("could not connect", "cannot be reached: no database server answers there; check that it runs and the URL"),
    ("no such file or directory", "cannot be reached: no database server listens there; check that it runs and "
                                  "the URL's host (socket folder) and port"),
    ("timeout expired", "cannot be reached: the database server did not answer in time; check the URL"),
    ("locked", "is locked by another process (a running sweep or an open connection); wait for it to finish "
               "or pass another --store"),
    ("busy", "is busy in another process; wait for it to finish or pass another --store"),
    ("disk is full", "could not be written: the disk is full; free space and rerun (finished runs are kept)"),
    ("disk i/o", "could not be written: disk I/O error; check the disk and rerun (finished runs are kept)"),
    ("readonly", "is read-only (permissions); make the file and its folder writable or pass another --store"),
    ("read-only", "is read-only (permissions); make the file and its folder writable or pass another --store"),
    ("unable to open", "cannot be opened (missing folder or permissions); check the path or pass another --store"),
    ("permission denied", "cannot be opened: permission denied; check the path or pass another --store"),
    ("not a database", "is not a valid SQLite database (corrupt or another kind of file)"),
    ("malformed", "is corrupt (database disk image is malformed)"),
)


def describe_db_error(exc: BaseException) -> str:
    """What a driver error means, in words."""
    text = str(getattr(exc, "orig", None) or exc).lower()
    for needle, meaning in _KINDS:
        if needle in text:
            return meaning
    return f"failed: {getattr(exc, 'orig', None) or exc}"


@contextmanager
def guard(location: str, action: str) -> Iterator[None]:
    """Re-raise database errors met while doing ``action`` on the store at ``location`` as StoreError."""
    try:
        yield
    except (DBAPIError, SQLAlchemyError) as exc:
        raise StoreError(
            f"results store {location} {describe_db_error(exc)} (while {action}; the transaction was rolled back, "
            "nothing in the store was changed)"
        ) from exc
