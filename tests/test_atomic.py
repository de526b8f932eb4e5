"""Atomic writes: a failed write keeps the old file whole and leaves no temporary file."""

from __future__ import annotations

import errno
import json
import os
import stat
from pathlib import Path

import pytest

from expflow_flows import atomic
from expflow_flows.runs.rundir import RunDir


class _DiskFull:
    """A file object that takes half of what it is given, then fails like a full disk."""

    def __init__(self, fh):
        self.fh = fh

    def write(self, data: bytes) -> int:
        self.fh.write(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.fh.close()

    def __getattr__(self, name):
        return getattr(self.fh, name)


def test_disk_full_keeps_the_old_metrics_and_no_partial_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = RunDir.create(tmp_path / "run")
    run.write_metrics({"loss": 1.0})
    real_fdopen = os.fdopen
    monkeypatch.setattr(atomic.os, "fdopen", lambda *a, **k: _DiskFull(real_fdopen(*a, **k)))
    with pytest.raises(OSError, match="No space left"):
        run.write_metrics({"loss": 0.5, "acc": 0.9})
    assert run.read_json("metrics.json") == {"loss": 1.0}
    assert sorted(p.name for p in run.path.iterdir()) == ["metrics.json"]


def test_failed_writer_keeps_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "data.h5"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic.replacing(target) as tmp:
        tmp.write_bytes(b"half of the new")
        raise RuntimeError("writer crashed")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["data.h5"]


def test_replacing_without_overwrite_refuses_an_existing_file(tmp_path: Path) -> None:
    target = tmp_path / "pkg.tar.gz"
    target.write_bytes(b"first")
    with pytest.raises(FileExistsError), atomic.replacing(target, overwrite=False) as tmp:
        tmp.write_bytes(b"second")
    assert target.read_bytes() == b"first"
    assert [p.name for p in tmp_path.iterdir()] == ["pkg.tar.gz"]


def test_private_file_has_mode_0600_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        path = atomic.write_json(tmp_path / "pin.json", {"hash": "x"}, mode=0o600, durable=True)
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert json.loads(path.read_text()) == {"hash": "x"}
