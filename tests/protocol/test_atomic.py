"""protocol.atomic.write_atomic: the one way every layer replaces a file."""

from __future__ import annotations

import os
import stat

import pytest

from kohakuboard.protocol.atomic import write_atomic


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_replaces_the_file_with_the_mode_asked_whatever_the_umask(tmp_path):
    path = tmp_path / "f.json"
    path.write_text("old")
    old = os.umask(0o077)
    try:
        write_atomic(str(path), "new ü", mode=0o644, sync_dir=True)
    finally:
        os.umask(old)
    assert path.read_bytes() == "new ü".encode() and _mode(path) == 0o644
    write_atomic(str(path), memoryview(b"\x00\x01\x02"), mode=0o600)
    assert path.read_bytes() == b"\x00\x01\x02" and _mode(path) == 0o600
    assert os.listdir(tmp_path) == ["f.json"]


def test_mode_none_leaves_the_umask_to_decide(tmp_path):
    old = os.umask(0o027)
    try:
        write_atomic(str(tmp_path / "blob"), b"x" * 100, mode=None, fsync=False)
    finally:
        os.umask(old)
    assert _mode(tmp_path / "blob") == 0o640


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"old")

    def fail(fd: int) -> None:
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        write_atomic(str(path), b"new", prepare=fail)
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["f"]


def test_the_temporary_is_never_a_followed_symlink(tmp_path, monkeypatch):
    """The temporary name is fresh and opened O_EXCL | O_NOFOLLOW: a planted name is never written through."""
    from kohakuboard.protocol import atomic

    target = tmp_path / "elsewhere"
    planted = tmp_path / "f.tmp-planted"
    planted.symlink_to(target)
    monkeypatch.setattr(atomic, "temp_name", lambda path: str(planted))
    with pytest.raises(FileExistsError):
        write_atomic(str(tmp_path / "f"), b"data")
    assert not target.exists() and not (tmp_path / "f").exists()
