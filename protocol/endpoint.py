"""Where a daemon's sockets and files live.

An endpoint is named by one string, the value of ``KOBO_DAEMON_ENDPOINT`` or its
default:

* ``ipc:///some/dir/kobo`` (an absolute path; ``~`` is expanded): the daemon binds
  ``ipc:///some/dir/kobo.data`` (PUSH/PULL) and ``ipc:///some/dir/kobo.ctl``
  (DEALER/ROUTER), and keeps ``kobo.lock``, ``kobo.pid`` and ``kobo.log`` beside them.
* the default is ``$XDG_RUNTIME_DIR/kohakuboard/kobo`` when that directory exists
  and belongs to us, otherwise ``/tmp/kohakuboard-$UID/kobo``; the directory is
  created 0700.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

# sockaddr_un.sun_path is 108 bytes on Linux, including the trailing NUL.
_MAX_IPC_PATH = 107


@dataclass(frozen=True)
class Endpoint:
    """Resolved addresses and file paths of one daemon."""

    base: str  # filesystem path prefix, e.g. /run/user/1000/kohakuboard/kobo

    @property
    def directory(self) -> str:
        return os.path.dirname(self.base)

    @property
    def data_addr(self) -> str:
        return f"ipc://{self.base}.data"

    @property
    def control_addr(self) -> str:
        return f"ipc://{self.base}.ctl"

    @property
    def lock_path(self) -> str:
        return f"{self.base}.lock"

    @property
    def pid_path(self) -> str:
        return f"{self.base}.pid"

    @property
    def log_path(self) -> str:
        return f"{self.base}.log"

    def __str__(self) -> str:
        return f"ipc://{self.base}"


def default_base(environ: Mapping[str, str]) -> str:
    """The per-user default endpoint path (not created)."""
    runtime = environ.get("XDG_RUNTIME_DIR")
    uid = os.getuid()
    if runtime and os.path.isdir(runtime):
        try:
            if os.stat(runtime).st_uid == uid:
                return os.path.join(runtime, "kohakuboard", "kobo")
        except OSError:
            pass
    return os.path.join("/tmp", f"kohakuboard-{uid}", "kobo")


def resolve(value: str | None, environ: Mapping[str, str]) -> Endpoint:
    """Turn an endpoint string (or None for the default) into an :class:`Endpoint`.

    Raises ``ValueError`` for a value without the ``ipc://`` scheme, another
    scheme, a relative path (it would mean another daemon in every working
    directory) or a path too long for a Unix socket.
    """
    if not value:
        base = default_base(environ)
    elif value.startswith("ipc://"):
        base = os.path.expanduser(value[len("ipc://") :])
        if not os.path.isabs(base):
            raise ValueError(
                f"KOBO_DAEMON_ENDPOINT={value!r} is a relative path: it would name a different daemon in every "
                f"working directory; give an absolute one, e.g. ipc://{os.path.abspath(base)}"
            )
    elif "://" in value:
        raise ValueError(f"KOBO_DAEMON_ENDPOINT={value!r}: only ipc:// endpoints are supported here")
    else:
        hint = os.path.abspath(os.path.expanduser(value))
        raise ValueError(f"KOBO_DAEMON_ENDPOINT={value!r} has no scheme: write it as ipc://{hint}")
    base = os.path.abspath(base)
    if len(base) + len(".data") > _MAX_IPC_PATH:
        raise ValueError(
            f"daemon endpoint path {base!r} is too long for a Unix socket "
            f"(at most {_MAX_IPC_PATH - 5} characters); set KOBO_DAEMON_ENDPOINT to a shorter path"
        )
    return Endpoint(base)


def ensure_directory(ep: Endpoint) -> None:
    """Create the endpoint's directory 0700 (and tighten it if it exists).

    Raises ``PermissionError`` if the directory belongs to another user.
    """
    d = ep.directory
    os.makedirs(d, mode=0o700, exist_ok=True)
    st = os.stat(d)
    if st.st_uid != os.getuid():
        raise PermissionError(f"daemon directory {d} belongs to uid {st.st_uid}, not to us")
    if st.st_mode & 0o077:
        os.chmod(d, 0o700)


def daemon_alive(ep: Endpoint) -> bool:
    """True when a daemon holds the endpoint's lock file (it is running or starting).

    A running daemon keeps an exclusive ``flock`` on ``<base>.lock`` for its
    whole life; the kernel drops it when the process dies, even on SIGKILL, so
    this never reports a dead daemon as alive (unlike a pid file).
    """
    return lock_held(ep.lock_path)


def lock_held(path: str) -> bool:
    """True when some process holds an exclusive ``flock`` on ``path``; only opens it read-only.

    A missing or unreadable file is not held.
    """
    import fcntl

    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return True
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)
