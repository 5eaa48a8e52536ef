"""Output files (``--out``): symlinks followed, only regular files replaced, the umask honoured, checked before
any work, atomic (a failed write keeps the old file), and ``ptq --out`` never overwrites a foreign file."""

from __future__ import annotations

import errno
import json
import os
import stat

import pytest
from typer.testing import CliRunner

from quantbench.cli.main import app
from quantbench.utils import io
from quantbench.utils.io import AtomicGroup, OutputError, atomic_write_text, check_output

runner = CliRunner()
PTQ = ["ptq", "--model", "digits_cnn", "--data", "digits", "--calib-size", "32", "--max-test", "32", "--quiet"]


def _no_work(monkeypatch):
    """Fail loudly if the command starts computing (the pre-flight must refuse first)."""
    import quantbench.ptq.pipeline as pipeline

    def boom(*a, **k):
        raise AssertionError("the computation ran before the --out check")
    monkeypatch.setattr(pipeline, "run_ptq", boom)


# ------------------------------------------------------------------------------------------- atomic_write
def test_a_symlink_is_followed_and_stays_a_link(tmp_path):
    target = tmp_path / "real.json"
    target.write_text("old")
    link = tmp_path / "link.json"
    link.symlink_to(target)
    atomic_write_text(link, "new")
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert target.read_text() == "new"


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_new_files_honour_the_umask_and_replaced_files_keep_their_mode(tmp_path, mask):
    old = os.umask(mask)
    try:
        path = atomic_write_text(tmp_path / "new.txt", "x")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask
    kept = tmp_path / "kept.txt"
    kept.write_text("a")
    kept.chmod(0o640)
    atomic_write_text(kept, "b")
    assert stat.S_IMODE(kept.stat().st_mode) == 0o640 and kept.read_text() == "b"


@pytest.mark.fault(input="an output path that is a FIFO, a directory or a device (e.g. --out /dev/full)",
                   message="... is a FIFO, not a regular file; give a file path to write", exit_code=2,
                   kept="the special file (never replaced by a regular file)")
def test_special_files_are_refused_not_replaced(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(OutputError, match="is a FIFO, not a regular file"):
        atomic_write_text(fifo, "x")
    assert stat.S_ISFIFO(fifo.stat().st_mode)
    with pytest.raises(OutputError, match="is a directory"):
        atomic_write_text(tmp_path, "x")
    link = tmp_path / "to-pipe"
    link.symlink_to(fifo)
    with pytest.raises(OutputError, match="via the symlink"):
        check_output(link)
    if os.path.exists("/dev/full"):
        with pytest.raises(OutputError, match="character device"):
            check_output("/dev/full")
        assert stat.S_ISCHR(os.stat("/dev/full").st_mode)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipe", "to-pipe"]  # no temp files left


@pytest.mark.fault(input="disk full (ENOSPC) while writing --out", exit_code=2,
                   message="could not write PATH: No space left on device; the previous file is unchanged; "
                           "free some space and rerun", kept="the previous file, byte for byte")
def test_a_full_disk_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "r.json"
    path.write_text("old result")

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(io.os, "fsync", full)
    with pytest.raises(OutputError, match="No space left on device; the previous file is unchanged"):
        atomic_write_text(path, "new result")
    assert path.read_text() == "old result" and [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_a_group_writes_all_files_or_none(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    with pytest.raises(RuntimeError), AtomicGroup() as g:
        g.write(a, lambda f: f.write(b"a"))
        raise RuntimeError("the second file failed")
    assert list(tmp_path.iterdir()) == []
    with AtomicGroup() as g:
        g.write(a, lambda f: f.write(b"a"))
        g.write(b, lambda f: f.write(b"b"))
        assert not a.exists()  # nothing is visible before the commit
    assert a.read_text() == "a" and b.read_text() == "b"


# --------------------------------------------------------------------------------------------- pre-flight
@pytest.mark.fault(input="--out in a folder that is not writable", exit_code=2,
                   message="cannot write --out PATH: FOLDER is not writable (Permission denied); choose a writable "
                           "folder", kept="everything; the computation never starts")
def test_an_unwritable_folder_is_refused_before_any_work(tmp_path, monkeypatch):
    _no_work(monkeypatch)

    def denied(*a, **k):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
    monkeypatch.setattr(io.tempfile, "mkstemp", denied)  # as a read-only folder answers (root ignores chmod)
    res = runner.invoke(app, [*PTQ, "--out", str(tmp_path / "r.json")])
    assert res.exit_code == 2 and "is not writable (Permission denied)" in res.output, res.output


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_folder_is_refused(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(OutputError, match="not writable"):
            check_output(ro / "r.json")
    finally:
        ro.chmod(0o755)


@pytest.mark.fault(input="--out is a directory, a device, or under a path whose parent is a file", exit_code=2,
                   message="--out PATH is a directory, not a regular file / FOLDER is a file, not a folder",
                   kept="everything; the computation never starts")
@pytest.mark.parametrize("case", ["directory", "file-as-parent", "device"])
def test_impossible_out_paths_are_refused_before_any_work(tmp_path, monkeypatch, case):
    _no_work(monkeypatch)
    (tmp_path / "f").write_text("x")
    if case == "device" and not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full here")
    out = {"directory": tmp_path, "file-as-parent": tmp_path / "f" / "sub" / "r.json", "device": "/dev/full"}[case]
    res = runner.invoke(app, [*PTQ, "--out", str(out)])
    assert res.exit_code == 2, res.output
    assert ("not a regular file" in res.output) or ("is a file, not a folder" in res.output), res.output
    assert "wrote" not in res.output and (tmp_path / "f").read_text() == "x"


def test_a_missing_parent_folder_is_created(tmp_path):
    res = runner.invoke(app, [*PTQ, "--out", str(tmp_path / "a" / "b" / "r.json")])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "a" / "b" / "r.json").read_text())["model"] == "digits_cnn"


# ------------------------------------------------------------------------------- ptq --out onto a file
@pytest.mark.fault(input="ptq --out onto an existing file that is not a quantbench ptq result",
                   message="--out PATH exists and is not a quantbench ptq result; refusing to overwrite it: choose "
                           "another path or pass --force", exit_code=2, kept="the existing file")
@pytest.mark.parametrize("content", ["my notes, not JSON\n", '{"some": "other json"}\n', "[1, 2]\n"])
def test_ptq_refuses_to_overwrite_a_foreign_file(tmp_path, monkeypatch, content):
    path = tmp_path / "notes.txt"
    path.write_text(content)
    with monkeypatch.context() as m:
        _no_work(m)
        res = runner.invoke(app, [*PTQ, "--out", str(path)])
    assert res.exit_code == 2 and "is not a quantbench ptq result" in res.output and "--force" in res.output
    assert path.read_text() == content
    res = runner.invoke(app, [*PTQ, "--out", str(path), "--force"])
    assert res.exit_code == 0, res.output
    assert json.loads(path.read_text())["model"] == "digits_cnn"


def test_ptq_replaces_its_own_previous_result_and_writes_through_a_symlink(tmp_path):
    real = tmp_path / "real.json"
    link = tmp_path / "r.json"
    link.symlink_to(real)
    for _ in range(2):  # the second run overwrites the first result without --force
        res = runner.invoke(app, [*PTQ, "--out", str(link)])
        assert res.exit_code == 0, res.output
    assert link.is_symlink() and json.loads(real.read_text())["backend"] == "academic"


@pytest.mark.fault(input="--out (or --png) of export/verify/latency/size is a directory", exit_code=2,
                   message="--out PATH is a directory, not a regular file; give a file path to write",
                   kept="everything; the command refuses before any work")
@pytest.mark.parametrize("args", [
    ["export", "--model", "digits_cnn", "--data", "digits", "--out", "{d}"],
    ["verify", "--onnx", "{d}/missing.onnx", "--data", "digits", "--out", "{d}"],
    ["latency", "--model", "digits_cnn", "--out", "{d}"],
    ["latency", "--model", "digits_cnn", "--png", "{d}"],
    ["size", "--model", "digits_cnn", "--out", "{d}"],
], ids=["export", "verify", "latency-out", "latency-png", "size"])
def test_every_command_checks_its_out_path_first(tmp_path, args):
    res = runner.invoke(app, [a.format(d=tmp_path) for a in args])
    assert res.exit_code == 2 and "is a directory, not a regular file" in res.output, res.output
