"""Atomic writes: whole files with the permissions a plain open() would give."""

import os

import pytest

from lightning_unlearn.utils import atomic_write, atomic_write_text


def test_atomic_write_replaces_whole_file_with_umask_permissions(tmp_path):
    path = tmp_path / "sub" / "report.json"
    atomic_write_text(path, "old")
    old_umask = os.umask(0o027)
    try:
        atomic_write_text(path, "new")
        assert (path.stat().st_mode & 0o777) == 0o640
    finally:
        os.umask(old_umask)
    assert path.read_text() == "new"
    assert [p.name for p in path.parent.iterdir()] == ["report.json"]  # no temporary file left


def test_failed_write_keeps_the_previous_file_and_no_temporary(tmp_path):
    path = tmp_path / "profile.pt"
    atomic_write_text(path, "previous")

    def explode(handle):
        handle.write(b"partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(path, explode)
    assert path.read_text() == "previous"
    assert [p.name for p in tmp_path.iterdir()] == ["profile.pt"]
