"""Replacing a file atomically: the one helper every layer uses.

A file is written under a temporary name in its own directory and renamed over
the target, so a reader sees the old contents or the new ones, never half a
file, and a failed write (disk full) leaves no temporary file behind.  Used for
run folders' ``metadata.json`` and media files (storage), the daemon's CURVE
keys, systemd unit files (:mod:`.systemd`) and the viewer's accounts file.

It lives in ``protocol``, the bottom layer, because it depends on nothing and
more than one layer above needs it (``tests/test_layers.py``).
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable


def temp_name(path: str) -> str:
    """A fresh temporary name beside ``path`` (``{path}.tmp-{pid}-{random}``)."""
    return f"{path}.tmp-{os.getpid()}-{secrets.token_hex(4)}"


def fsync_dir(directory: str) -> None:
    """fsync a directory, so the names it gained survive a power loss."""
    fd = os.open(directory or ".", os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(
    path: str,
    data: bytes | bytearray | memoryview | str,
    *,
    mode: int | None = 0o644,
    fsync: bool = True,
    sync_dir: bool = False,
    prepare: Callable[[int], None] | None = None,
) -> None:
    """Replace ``path`` with ``data`` (text is written as UTF-8) through a temporary file and a rename.

    ``mode``: the file's permission bits whatever the umask (``None``: the
    umask decides, as for ``open()``).  ``fsync``: the data reaches the disk
    before the rename.  ``sync_dir``: the directory is synced after it, so the
    new name is durable too.  ``prepare(fd)`` runs on the open temporary file
    before anything is written (e.g. to change its owner).  The temporary file
    is created exclusively, never follows a symlink, and is removed if anything
    fails.
    """
    if isinstance(data, str):
        data = data.encode("utf-8")
    tmp = temp_name(path)
    fd = os.open(
        tmp,
        os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
        0o666 if mode is None else mode,
    )
    try:
        try:
            if mode is not None:
                os.fchmod(fd, mode)
            if prepare is not None:
                prepare(fd)
            view = memoryview(data).cast("B")
            while view:
                view = view[os.write(fd, view) :]
            if fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    if sync_dir:
        fsync_dir(os.path.dirname(path))
