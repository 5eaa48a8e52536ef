"""Honest run identity: the code hash covers every module a run imports; data and weights are
fingerprinted by content (cached by path, size, mtime and inode)."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest

from quantbench.sweep import identity
from quantbench.sweep.execute import execute
from quantbench.sweep.expand import expand
from quantbench.sweep.load import parse_sweep
from quantbench.sweep.methods import ContextCache
from tests.test_sweep_plugin import one_thread, tiny_sweep  # noqa: F401  (one_thread: autouse)


@pytest.fixture(autouse=True)
def fresh_digest_cache(tmp_path, monkeypatch):
    """Each test gets its own on-disk digest cache and an empty in-process one."""
    monkeypatch.setenv("QUANTBENCH_DIGEST_CACHE", str(tmp_path / "digests.json"))
    monkeypatch.setattr(identity, "_DIGESTS", {})
    monkeypatch.setattr(identity, "_disk_loaded", False)
    identity.data_fingerprint.cache_clear()
    yield
    identity.data_fingerprint.cache_clear()


def test_the_code_hash_covers_every_module_a_run_imports(tmp_path):
    sweep = tiny_sweep(backends=["tensorrt"])
    job = expand(parse_sweep(sweep, tmp_path)).jobs[0]
    assert execute(job, ContextCache()).status == "done"
    covered = {p.resolve() for p in identity.code_files(tuple(sweep["plugins"]))}
    loaded = {Path(m.__file__).resolve() for name, m in list(sys.modules.items())
              if (name == "quantbench" or name.startswith("quantbench.") or name in sweep["plugins"])
              and getattr(m, "__file__", None)}
    assert loaded - covered == set(), "modules a run imports that the code hash misses"
    assert identity.PACKAGE / "qat" / "config.py" in covered and identity.PACKAGE / "report" / "size.py" in covered
    assert job.identity["code_version"] == identity.code_version(tuple(sweep["plugins"]))


def _dataset(root: Path) -> Path:
    (root / "a").mkdir(parents=True)
    (root / "a" / "1.bin").write_bytes(b"\x00" * 100)
    (root / "b.bin").write_bytes(b"hello")
    return root


def test_data_is_fingerprinted_by_content_not_path(tmp_path):
    first = _dataset(tmp_path / "one")
    fp = identity.data_fingerprint(f"imagefolder:{first}")
    second = tmp_path / "elsewhere" / "two"
    shutil.copytree(first, second)
    assert identity.data_fingerprint(f"imagefolder:{second}") == fp, "same files at another path: same id"
    (second / "a" / "1.bin").write_bytes(b"\x00" * 99 + b"\x01")  # same size and name, other content
    identity.data_fingerprint.cache_clear()
    assert identity.data_fingerprint(f"imagefolder:{second}") != fp


def test_digests_are_cached_on_disk_by_path_size_mtime_and_inode(tmp_path, monkeypatch):
    f = tmp_path / "w.bin"
    f.write_bytes(b"abc")
    real = identity.file_digest(str(f))
    cache = json.loads(Path(os.environ["QUANTBENCH_DIGEST_CACHE"]).read_text())
    entry = cache[str(f.resolve())]
    assert entry[3] == real
    # a new process (empty memory) trusts the disk cache while the stamp matches: it does not read the file
    entry[3] = "cached-digest"
    Path(os.environ["QUANTBENCH_DIGEST_CACHE"]).write_text(json.dumps(cache))
    monkeypatch.setattr(identity, "_DIGESTS", {})
    monkeypatch.setattr(identity, "_disk_loaded", False)
    assert identity.file_digest(str(f)) == "cached-digest"
    st = f.stat()
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # touched: hashed again
    assert identity.file_digest(str(f)) == real


@pytest.mark.fault(input="a corrupt digest cache file ($QUANTBENCH_DIGEST_CACHE)",
                   message="(none: the cache is ignored and rewritten)", exit_code=0,
                   kept="run ids: digests are recomputed from the files")
def test_a_corrupt_digest_cache_is_ignored_and_rewritten(tmp_path):
    path = Path(os.environ["QUANTBENCH_DIGEST_CACHE"])
    path.write_text("{not json")
    f = tmp_path / "w.bin"
    f.write_bytes(b"abc")
    assert identity.file_digest(str(f)) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert str(f.resolve()) in json.loads(path.read_text())
