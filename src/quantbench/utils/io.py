"""Safe output files: a pre-flight check of every output path before any work, and atomic writes (a temp
file in the target's folder, fsync, rename) so nothing is half-written and a failed write keeps the old file.

* A symlink is followed: its target is written, the link stays.
* Only regular files are replaced: a directory, device node, FIFO or socket at the path is refused.
* New files get the mode ``0o666 & ~umask`` (what ``open(path, "w")`` would give); a replaced file keeps its mode.
* Missing parent folders are created (``--out results/r.json``) where that is possible; where it is not (a file in
  the way, a read-only folder) :func:`check_output` says so before the computation starts.
* :class:`AtomicGroup` stages several files and renames them all only when every one was written (``export``).
"""

from __future__ import annotations

import errno
import json
import os
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from quantbench.errors import QuantbenchError


class OutputError(QuantbenchError, OSError):
    """An output path that cannot be written (not a regular file, read-only folder, disk full...)."""


def _umask() -> int:
    """The process umask, read without changing it where Linux allows (other threads never see a wrong one)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def resolve_output(path: str | Path, what: str = "output") -> Path:
    """The file that writing ``path`` will replace: symlinks followed; refuses anything but a regular file."""
    given = Path(path)
    target = Path(os.path.realpath(given))
    if target.exists() and not target.is_file():
        via = f" (via the symlink {given})" if given.is_symlink() else ""
        raise OutputError(f"{what} {target}{via} is {_kind(target.stat().st_mode)}, not a regular file; "
                          "give a file path to write")
    return target


def _reason(exc: OSError) -> str:
    return exc.strerror or type(exc).__name__


def check_output(path: str | Path, what: str = "--out") -> Path:
    """Pre-flight for an output file, before any work: the target is (or will be) a regular file and its folder
    exists or can be created and is writable. Returns the resolved target. Nothing is created."""
    target = resolve_output(path, what)
    folder = target.parent
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        raise OutputError(f"cannot write {what} {path}: {folder} is a file, not a folder; choose another path")
    probe_dir = target.parent if target.parent.exists() else folder
    try:
        fd, probe = tempfile.mkstemp(prefix=".quantbench-probe-", dir=probe_dir)
    except OSError as exc:
        raise OutputError(f"cannot write {what} {path}: {probe_dir} is not writable ({_reason(exc)}); choose a "
                          "writable folder") from None
    os.close(fd)
    os.unlink(probe)
    if target.exists() and not os.access(target, os.W_OK):
        raise OutputError(f"cannot write {what} {path}: the file is read-only; remove it or choose another path")
    return target


class AtomicGroup:
    """Files written to temp files now and renamed over their targets together by :meth:`commit`; on
    :meth:`abort` (or an exception inside ``with``) every temp file is removed and no target is touched."""

    def __init__(self) -> None:
        self._staged: list[tuple[Path, Path]] = []
        self._cleanups: list[Callable[[], None]] = []

    def defer(self, cleanup: Callable[[], None]) -> None:
        """Run ``cleanup`` after the commit or abort (e.g. remove a staging folder)."""
        self._cleanups.append(cleanup)

    def adopt(self, tmp: str | Path, path: str | Path) -> None:
        """Stage a file already written at ``tmp`` (same file system as ``path``) to be renamed to ``path``."""
        target = resolve_output(path)
        mode = stat.S_IMODE(target.stat().st_mode) if target.exists() else 0o666 & ~_umask()
        os.chmod(tmp, mode)
        self._staged.append((Path(tmp), target))

    def write(self, path: str | Path, write: Callable[[BinaryIO], None]) -> Path:
        """Stage ``path``: call ``write`` on a temp file beside it and fsync it; returns the temp file."""
        target = resolve_output(path)
        existed = target.exists()
        mode = stat.S_IMODE(target.stat().st_mode) if existed else 0o666 & ~_umask()
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        except OSError as exc:
            raise OutputError(f"cannot write {target}: {_reason(exc)}; nothing was written") from None
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as f:
                write(f)
                f.flush()
                os.fchmod(f.fileno(), mode)
                os.fsync(f.fileno())
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            hint = "free some space and rerun" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else "rerun"
            kept = "the previous file is unchanged" if existed else "nothing was written"
            raise OutputError(f"could not write {target}: {_reason(exc)}; {kept}; {hint}") from None
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        self._staged.append((tmp, target))
        return tmp

    def commit(self) -> list[Path]:
        done = []
        try:
            for tmp, target in self._staged:
                os.replace(tmp, target)
                done.append(target)
        except BaseException:
            self.abort()
            raise
        self._staged = []
        self._close()
        return done

    def abort(self) -> None:
        for tmp, _ in self._staged:
            tmp.unlink(missing_ok=True)
        self._staged = []
        self._close()

    def _close(self) -> None:
        cleanups, self._cleanups = self._cleanups, []
        for fn in cleanups:
            fn()

    def __enter__(self) -> AtomicGroup:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()


def atomic_write(path: str | Path, write: Callable[[BinaryIO], None]) -> Path:
    """Call ``write`` on a temporary file beside ``path`` (its symlink target), fsync, then rename it over the
    target; on any failure the temporary file is removed and the target keeps its previous content."""
    group = AtomicGroup()
    group.write(path, write)
    group.commit()
    return Path(path)


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda f: f.write(text.encode()))


def atomic_write_json(path: str | Path, data: Any) -> Path:
    return atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")
