"""Starting a detached daemon when none answers, like a per-user service."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from ..protocol.endpoint import Endpoint, daemon_alive, ensure_directory
from ..protocol.errors import DaemonUnavailable

# The shell line that starts a daemon: in the background, its output appended to
# the endpoint's log, then the shell prints the daemon's pid and exits at once.
# The daemon is then nobody's child here (its parent, the shell, is gone): no
# Popen object of ours outlives the call, nothing to reap, no zombie, and no
# "subprocess is still running" warning when this process exits first (which
# it does: the daemon outlives the training script on purpose).
_LAUNCH = '"$0" -m kohakuboard.daemon run </dev/null >>"$1" 2>&1 & echo $!'


def spawn_daemon(ep: Endpoint) -> int:
    """Start ``kobo-daemon run`` detached from this process (own session, no tty); return its pid.

    Its output goes to ``<endpoint>.log``.
    """
    ensure_directory(ep)
    env = dict(os.environ)
    env["KOBO_DAEMON_ENDPOINT"] = str(ep)
    out = subprocess.run(
        ["/bin/sh", "-c", _LAUNCH, sys.executable, ep.log_path],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=env,
        cwd="/",
        start_new_session=True,
        close_fds=True,
        check=False,
        timeout=30,
    )
    try:
        return int(out.stdout.strip())
    except ValueError:
        raise DaemonUnavailable(
            f"could not start kobo-daemon on {ep}: the launcher printed {out.stdout[:80]!r}"
        ) from None


def _gone(pid: int) -> bool:
    """True when process ``pid`` has exited (or is a zombie nobody reaped yet)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
        return state in (b"Z", b"X")
    except (OSError, IndexError):
        return False


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
    pid = spawn_daemon(ep)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if daemon_alive(ep) and os.path.exists(ep.control_addr[len("ipc://") :]):
            return True
        if _gone(pid) and not daemon_alive(ep):
            # It exited: failed, or another client's daemon won the race (exit 4)
            # and holds the lock by now; give that one a moment to appear.
            time.sleep(0.05)
            if not daemon_alive(ep):
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
