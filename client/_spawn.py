"""Starting a detached daemon when none answers, like a per-user service."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from ..protocol.endpoint import Endpoint, daemon_alive, ensure_directory
from ..protocol.errors import DaemonUnavailable


# Daemons this process started.  Kept so that Popen does not warn about a child
# still running when it is garbage-collected (the daemon outlives us on purpose),
# and polled so that one that exits is reaped rather than left a zombie.
_spawned: list[subprocess.Popen[bytes]] = []


def spawn_daemon(ep: Endpoint) -> subprocess.Popen[bytes]:
    """Start ``kobo-daemon run`` detached from this process (own session, no tty).

    Its output goes to ``<endpoint>.log``.  The child is never waited for by
    us: it outlives the training script on purpose.
    """
    ensure_directory(ep)
    env = dict(os.environ)
    env["KOBO_DAEMON_ENDPOINT"] = str(ep)
    _spawned[:] = [p for p in _spawned if p.poll() is None]
    log = open(ep.log_path, "ab")
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "kohakuboard.daemon", "run"],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            env=env,
            cwd="/",
            start_new_session=True,
            close_fds=True,
        )
        _spawned.append(proc)
        return proc
    finally:
        log.close()


def ensure_daemon(ep: Endpoint, *, autostart: bool, timeout: float = 15.0) -> bool:
    """Make sure a daemon runs on ``ep``; return True if we started it.

    Raises :class:`DaemonUnavailable` when none runs and ``autostart`` is off,
    or when the one we started did not come up within ``timeout`` (the message
    quotes the end of its log).
    """
    if daemon_alive(ep):
        return False
    if not autostart:
        raise DaemonUnavailable(
            f"no kobo-daemon is running on {ep} and KOBO_DAEMON_AUTOSTART=0; start one with `kobo-daemon start`"
        )
    proc = spawn_daemon(ep)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if daemon_alive(ep) and os.path.exists(ep.control_addr[len("ipc://") :]):
            return True
        code = proc.poll()
        if code is not None and not daemon_alive(ep):
            if code == 4:  # another client's daemon won the race: fine
                continue
            break
        time.sleep(0.01)
    raise DaemonUnavailable(f"could not start kobo-daemon on {ep}: {_tail(ep.log_path)}")


def _tail(path: str, n: int = 600) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - n))
            return f.read().decode(errors="replace").strip() or "(no output)"
    except OSError:
        return "(no log)"
