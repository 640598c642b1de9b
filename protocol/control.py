"""The public control client: requests to a running ``kobo-daemon``, and starting one.

A daemon answers requests on its control socket (client ``DEALER`` -> daemon
``ROUTER``, see ``docs/how-it-works.md``).  :class:`ControlClient` sends one
request at a time and waits for its reply; :func:`status` and :func:`shutdown`
are the two a user or a script needs::

    from kohakuboard.protocol import control

    control.ensure_daemon()  # start a detached daemon on the default endpoint unless one answers
    info = control.status()  # or control.status("ipc:///some/dir/kobo")
    control.shutdown()       # drain and exit

The training-side ``Board`` uses the same client for its own requests (open,
acknowledgements, finish) and :func:`ensure_daemon` to start a daemon when none
answers; ``kobo-daemon start|stop|status`` (``daemon/cli.py``) and the tests use
this module too.  It sits in ``protocol``, the layer both the client and the
daemon may import (``tests/test_layers.py``); it is the one module here that
imports zmq.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from typing import Any

import zmq

from . import codec
from . import messages as m
from .endpoint import Endpoint, daemon_alive, ensure_directory, resolve
from .errors import DaemonUnavailable, KoboTimeoutError, ProtocolError, error_from_code


class ControlClient:
    """A connection to the control socket of the daemon on one endpoint.

    ``request`` may be called from any thread (one request at a time).  Used by
    ``Board`` (open, acknowledgements, finish), ``kobo-daemon status|stop`` and
    tests.  Close it when done (or use it as a context manager).
    """

    def __init__(self, ep: Endpoint | str | None = None) -> None:
        self.ep = ep = endpoint(ep)
        self.ctx: zmq.Context[Any] = zmq.Context()
        self._dealer = self.ctx.socket(zmq.DEALER)
        self._dealer.setsockopt(zmq.LINGER, 0)
        self._dealer.connect(ep.control_addr)
        self._lock = threading.Lock()
        self._req = 0

    def request(self, msg_cls: type[m.ControlRequest], env: m.Envelope, timeout: float, *fields: Any) -> Any:
        """Send a control request and wait for its reply.

        Raises the daemon's error (``StorageError``, ``ProtocolError``, ...),
        :class:`DaemonUnavailable` when the daemon is gone, and
        :class:`KoboTimeoutError` after ``timeout`` seconds.
        """
        with self._lock:
            self._req += 1
            req_id = self._req
            env = m.Envelope(env.run, env.client, req_id, env.rank, env.step, env.global_step, time.time())
            self._dealer.send_multipart(codec.encode(msg_cls(env, *fields)))
            deadline = time.monotonic() + timeout
            next_check = time.monotonic() + 0.2
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    exc = KoboTimeoutError(
                        f"kobo-daemon on {self.ep} did not answer {msg_cls.KIND} within {timeout:g}s"
                    )
                    exc.no_answer = True  # type: ignore[attr-defined]  # (not the daemon saying it timed out)
                    raise exc
                if self._dealer.poll(int(min(remaining, 0.05) * 1000) + 1):
                    try:
                        reply = codec.decode(self._dealer.recv_multipart())
                    except ProtocolError:
                        continue
                    if reply.env.seq != req_id:
                        continue  # a late answer to an earlier, timed-out request
                    if isinstance(reply, m.ErrorReply):
                        raise error_from_code(reply.code, reply.message)
                    return reply
                if time.monotonic() >= next_check:
                    next_check = time.monotonic() + 0.2
                    if not daemon_alive(self.ep):
                        # The request may still wait in the socket's queue: a new
                        # socket, so that it never reaches a daemon started later.
                        self._dealer.close(linger=0)
                        self._dealer = self.ctx.socket(zmq.DEALER)
                        self._dealer.setsockopt(zmq.LINGER, 0)
                        self._dealer.connect(self.ep.control_addr)
                        raise DaemonUnavailable(f"kobo-daemon on {self.ep} is not running")

    def close(self) -> None:
        with self._lock:
            self._dealer.close(linger=0)
        self.ctx.term()

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def status(self, timeout: float = 5.0) -> dict[str, Any]:
        """The daemon's status: its runs, clients, queues and counters (``kobo-daemon status --json``)."""
        return self.request(m.StatusRequest, m.Envelope(), timeout).info

    def shutdown(self, timeout: float = 5.0) -> None:
        """Ask the daemon to write everything it holds and exit, as SIGTERM does (returns once it agreed)."""
        self.request(m.ShutdownRequest, m.Envelope(), timeout)


def endpoint(ep: Endpoint | str | None = None) -> Endpoint:
    """``ep`` resolved; None means ``KOBO_DAEMON_ENDPOINT`` or the per-user default, as everywhere."""
    if isinstance(ep, Endpoint):
        return ep
    return resolve(ep or os.environ.get("KOBO_DAEMON_ENDPOINT"), os.environ)


def status(ep: Endpoint | str | None = None, timeout: float = 5.0) -> dict[str, Any]:
    """The status of the daemon on ``ep`` (default: ``KOBO_DAEMON_ENDPOINT`` or the per-user one).

    Raises :class:`DaemonUnavailable` if none runs, :class:`KoboTimeoutError` if it does not answer.
    """
    with ControlClient(ep) as client:
        return client.status(timeout)


def shutdown(ep: Endpoint | str | None = None, timeout: float = 5.0) -> None:
    """Ask the daemon on ``ep`` to drain and exit (it may still be writing when this returns)."""
    with ControlClient(ep) as client:
        client.shutdown(timeout)


# ------------------------------------------------------------ starting a daemon

# The shell line that starts a daemon: in the background, its output appended to
# the endpoint's log, then the shell prints the daemon's pid and exits at once.
# The daemon is then nobody's child here (its parent, the shell, is gone): no
# Popen object of ours outlives the call, nothing to reap, no zombie, and no
# "subprocess is still running" warning when this process exits first (which
# it does: the daemon outlives the training script on purpose).
_LAUNCH = '"$0" -m kohakuboard.daemon run </dev/null >>"$1" 2>&1 & echo $!'


def spawn_daemon(ep: Endpoint | str | None = None) -> int:
    """Start ``kobo-daemon run`` detached from this process (own session, no tty); return its pid.

    Its output goes to ``<endpoint>.log``.
    """
    ep = endpoint(ep)
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


def ensure_daemon(ep: Endpoint | str | None = None, *, autostart: bool = True, timeout: float = 15.0) -> bool:
    """Make sure a daemon runs on ``ep``; return True if we started it.

    Raises :class:`DaemonUnavailable` when none runs and ``autostart`` is off,
    or when the one we started did not come up within ``timeout`` (the message
    quotes the end of its log).
    """
    ep = endpoint(ep)
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
