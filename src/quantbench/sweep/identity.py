"""What identifies a run: content fingerprints of its inputs and the version of the code that ran it.

**Code.** The hash covers every ``.py`` and data file (``.yaml``, ``.json``) of the installed quantbench
package, plus the source of the sweep's plugin modules. Hashing the whole package rather than a list of
"result" sub-packages (which once missed ``qat/`` and ``report/size.py``) or the modules a method happened
to import (known only after it ran, while the run id is needed before, to skip finished runs) cannot miss
a module a method imports, lazily or through a registry. The price: an edit anywhere in the package
(the CLI too) gives new run ids, so such runs are run again; stored runs are never lost.

**Data and weights.** Fingerprinted by the sha256 of their bytes (for a dataset folder: of each file,
with its path relative to the folder), so the same files at another path or on another machine give the
same id and an edited file gives a new one. Digests are cached by path, size, mtime and inode, in the
process and in ``$QUANTBENCH_DIGEST_CACHE`` (default ``$XDG_CACHE_HOME/quantbench/digests.json``), so a
large dataset is read once, not once per sweep.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
from functools import cache
from pathlib import Path
from typing import Any

import quantbench
from quantbench.data import parse_spec
from quantbench.utils.io import atomic_write_text

PACKAGE = Path(quantbench.__file__).resolve().parent
CODE_SUFFIXES = (".py", ".yaml", ".yml", ".json")
_SKIP_DIRS = {"__pycache__"}


def code_files(plugins: tuple[str, ...] = ()) -> list[Path]:
    """The files :func:`code_version` hashes: the whole package's sources and the plugin modules' files."""
    files = sorted(p for p in PACKAGE.rglob("*") if p.suffix in CODE_SUFFIXES and p.is_file()
                   and not _SKIP_DIRS & set(p.relative_to(PACKAGE).parts))
    for name in plugins:
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.origin and Path(spec.origin).is_file():
            files.append(Path(spec.origin).resolve())
    return files


@cache
def code_version(plugins: tuple[str, ...] = ()) -> str:
    """``<version>+<hash>`` over :func:`code_files`, so any edit to the code invalidates old runs."""
    h = hashlib.sha256()
    for f in code_files(plugins):
        name = str(f.relative_to(PACKAGE)) if f.is_relative_to(PACKAGE) else f"plugin:{f.name}"
        h.update(name.encode() + b"\0")
        h.update(f.read_bytes())
    return f"{quantbench.__version__}+{h.hexdigest()[:12]}"


# -- content digests, cached by (path, size, mtime, inode) -----------------------------------------
_DIGESTS: dict[str, tuple[int, int, int, str]] = {}
_disk_loaded = False


def digest_cache_path() -> Path:
    env = os.environ.get("QUANTBENCH_DIGEST_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "quantbench" / "digests.json"


def _load_disk() -> None:
    global _disk_loaded
    if _disk_loaded:
        return
    _disk_loaded = True
    try:
        data = json.loads(digest_cache_path().read_text())
        for path, entry in data.items():
            _DIGESTS.setdefault(path, tuple(entry))  # type: ignore[arg-type]
    except (OSError, ValueError, TypeError):
        pass  # no cache or an unreadable one: digests are recomputed


def _save_disk() -> None:
    with contextlib.suppress(OSError):  # a cache that cannot be written only costs time
        atomic_write_text(digest_cache_path(), json.dumps({k: list(v) for k, v in _DIGESTS.items()}))


def _digests(paths: list[Path]) -> list[str]:
    _load_disk()
    out, changed = [], False
    for path in paths:
        key, st = str(path.resolve()), path.stat()
        stamp = (st.st_size, st.st_mtime_ns, st.st_ino)
        hit = _DIGESTS.get(key)
        if hit is not None and tuple(hit[:3]) == stamp:
            out.append(hit[3])
            continue
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        _DIGESTS[key] = (*stamp, h.hexdigest())
        out.append(h.hexdigest())
        changed = True
    if changed:
        _save_disk()
    return out


def file_digest(path: str) -> str:
    """sha256 of a file's bytes (cached while the file's size, mtime and inode stay the same)."""
    return _digests([Path(path)])[0]


@cache
def data_fingerprint(spec: str) -> str:
    """``kind`` or ``kind:<hash of the relative paths and contents of its files>`` (machine-independent;
    memoised per process: the files are listed and stat-ed once per dataset, not once per combination)."""
    kind, path = parse_spec(spec)
    if path is None:
        return kind
    if not path.exists():
        return f"{kind}:missing"
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    h = hashlib.sha256()
    for f, digest in zip(files, _digests(files), strict=True):
        rel = f.name if f == path else str(f.relative_to(path))
        h.update(f"{rel}\0{digest}\n".encode())
    return f"{kind}:{h.hexdigest()[:16]}"


def weights_identity(weights: str | None) -> str | None:
    """The weights' content hash, or the recipe (``train:...``) for weights made by quantbench."""
    if weights is None or weights.startswith("train:"):
        return weights
    return f"sha256:{file_digest(weights)}"


def run_id(identity: dict[str, Any]) -> str:
    """16 hex digits of sha256 over the canonical JSON of a run's identity."""
    blob = json.dumps(identity, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
