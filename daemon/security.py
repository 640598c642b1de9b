"""Who may talk to the daemon, and where it may write for them.

Peer credentials
    The endpoint's directory is 0700 and its sockets 0600, so normally only the
    daemon's user can even connect.  Should the permissions be opened up (by
    hand, a shared ``KOBO_DAEMON_ENDPOINT`` in a world-writable place, a bad
    umask), the daemon still checks who is at the other end of every
    connection, on both the data and the control socket.

    How: ZeroMQ's authentication protocol (ZAP, RFC 27).  Both sockets get a
    ZAP domain with ``ZMQ_ZAP_ENFORCE_DOMAIN``, so libzmq asks the handler
    bound at ``inproc://zeromq.zap.01`` about every new connection before any
    message of it is delivered, and refuses the connection when no handler
    answers (fail closed).  For an ``ipc://`` connection on Linux, libzmq puts
    the kernel's ``SO_PEERCRED`` of the peer in the request's address field,
    ``"<host>:<uid>:<gid>:<pid>"``; :class:`PeerGuard` answers 200 for the
    daemon's own uid and 400 for anything else (including an address without
    credentials).  Refusals are counted (``status()["rejected"]["PeerUid"]``)
    and logged, rate-limited.

    Why not the alternatives (measured with the bundled libzmq 4.3.5):
    ``ZMQ_IPC_FILTER_UID`` does refuse other uids, but it is deprecated and
    gives no hook to count or log a refusal (only an ``ACCEPT_FAILED`` monitor
    event without the uid); checking the ``Peer-Address`` property of every
    message would cost a property lookup per message on the hot path and would
    let the connection in.  ZAP costs one round trip per connection and none
    per message.

Run paths
    An ``OpenRun`` carries an absolute path chosen by the client.
    :func:`run_path_problem` refuses one that is not absolute, has a ``..``
    component, or whose nearest existing ancestor the requesting user could not
    create entries in, judged by its permission bits (owner, group, other: the
    way the kernel judges an ordinary user, so a daemon running as root does
    not write where its user could only write by virtue of being root).
"""

from __future__ import annotations

import logging
import os
import stat
import threading
import time
from collections.abc import Iterable
from typing import Any

import zmq

from ..protocol.errors import StorageError
from ..protocol.runpath import run_path_too_long

log = logging.getLogger("kohakuboard.daemon")

ZAP_ENDPOINT = "inproc://zeromq.zap.01"
ZAP_DOMAIN = b"kohakuboard"
REFUSED_REASON = "PeerUid"
_LOG_INTERVAL = 1.0  # seconds between two refusal log lines


def peer_credentials(address: str) -> tuple[int, int, int] | None:
    """``(uid, gid, pid)`` from a ZAP address like ``"localhost:1000:1000:4242"``.

    None when the address carries no credentials (not an ``ipc://`` peer, or a
    libzmq built without ``SO_PEERCRED``).  The pid is 0 when missing (BSDs).
    """
    parts = address.rsplit(":", 3)
    if len(parts) != 4:
        return None
    try:
        uid, gid = int(parts[1]), int(parts[2])
    except ValueError:
        return None
    try:
        pid = int(parts[3]) if parts[3] else 0
    except ValueError:
        pid = 0
    return uid, gid, pid


class PeerGuard:
    """A ZAP handler that lets in only connections from ``allowed_uids``.

    Create it on the daemon's context *before* binding, call :meth:`protect`
    on every socket before its ``bind``, and :meth:`close` before terminating
    the context.  The handler runs on a thread of its own, so a busy event
    loop never delays a handshake.
    """

    def __init__(self, ctx: zmq.Context[Any], allowed_uids: Iterable[int] | None = None) -> None:
        self.allowed = frozenset(allowed_uids) if allowed_uids is not None else frozenset({os.geteuid()})
        self.refused = 0
        self.accepted = 0
        self._last_log = 0.0
        self._zap = ctx.socket(zmq.ROUTER)
        self._zap.setsockopt(zmq.LINGER, 0)
        self._zap.bind(ZAP_ENDPOINT)
        self._wake_r, self._wake_w = os.pipe()
        self._thread = threading.Thread(target=self._serve, name="kobo-zap", daemon=True)
        self._thread.start()

    def protect(self, sock: zmq.Socket[Any]) -> None:
        """Make libzmq ask this guard about every connection of ``sock`` (call before bind)."""
        sock.setsockopt(zmq.ZAP_DOMAIN, ZAP_DOMAIN)
        sock.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)

    def counts(self) -> dict[str, int]:
        """Refusals to merge into the daemon's ``rejected`` counters."""
        return {REFUSED_REASON: self.refused} if self.refused else {}

    def decide(self, address: str) -> tuple[bool, str]:
        """Whether a peer at ``address`` may connect, and the user id or reason."""
        cred = peer_credentials(address)
        if cred is None:
            return False, f"no peer credentials in address {address!r}"
        uid, gid, pid = cred
        if uid in self.allowed:
            return True, str(uid)
        return False, f"uid {uid} (gid {gid}, pid {pid or '?'}) is not the daemon's user"

    def close(self, timeout: float = 5.0) -> None:
        """Stop the handler thread (it closes its socket); idempotent."""
        if self._wake_w < 0:
            return
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.error("ZAP handler did not stop within %.0fs", timeout)
        for fd in (self._wake_r, self._wake_w):
            os.close(fd)
        self._wake_r = self._wake_w = -1

    # ---------------------------------------------------------------- thread

    def _serve(self) -> None:
        poller = zmq.Poller()
        poller.register(self._zap, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        try:
            while True:
                ready = dict(poller.poll())
                if self._wake_r in ready:
                    return
                while True:
                    try:
                        frames = self._zap.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    self._answer(frames)
        except Exception:  # the context is going away, or a bug: connections stay refused
            log.exception("ZAP handler stopped")
        finally:
            self._zap.close(linger=0)

    def _answer(self, frames: list[bytes]) -> None:
        # ROUTER framing: [routing id, b"", "1.0", request id, domain, address,
        # identity, mechanism, credentials...]; the reply is
        # [routing id, b"", "1.0", request id, status, text, user id, metadata].
        try:
            delim = frames.index(b"")
        except ValueError:
            return  # not a ZAP request: nothing sensible to answer
        route, body = frames[:delim], frames[delim + 1 :]
        request_id = body[1] if len(body) > 1 else b""
        try:
            if len(body) < 6 or body[0] != b"1.0":
                raise ValueError("malformed ZAP request")
            ok, detail = self.decide(body[3].decode("utf-8", "replace"))
        except Exception as exc:
            ok, detail = False, f"cannot judge the connection: {exc}"
        if ok:
            self.accepted += 1
            reply = [b"200", b"OK", detail.encode(), b""]
        else:
            self._refused(detail)
            reply = [b"400", b"connection refused: not the daemon's user", b"", b""]
        try:
            self._zap.send_multipart([*route, b"", b"1.0", request_id, *reply], zmq.NOBLOCK)
        except zmq.ZMQError as exc:
            log.debug("could not answer a ZAP request: %s", exc)

    def _refused(self, detail: str) -> None:
        self.refused += 1
        now = time.monotonic()
        if now - self._last_log >= _LOG_INTERVAL:  # rate-limited: a flood must not flood the log
            self._last_log = now
            log.warning("refused a connection: %s [%d refused so far]", detail, self.refused)


# ------------------------------------------------------------------ run paths


def _may_create_in(st: os.stat_result, uid: int, gids: frozenset[int]) -> bool:
    """Whether permission bits let ``uid``/``gids`` create entries in a directory (w and x)."""
    mode = st.st_mode
    if st.st_uid == uid:
        need = stat.S_IWUSR | stat.S_IXUSR
    elif st.st_gid in gids:
        need = stat.S_IWGRP | stat.S_IXGRP
    else:
        need = stat.S_IWOTH | stat.S_IXOTH
    return mode & need == need


def _may_search(st: os.stat_result, uid: int, gids: frozenset[int]) -> bool:
    mode = st.st_mode
    if st.st_uid == uid:
        return bool(mode & stat.S_IXUSR)
    if st.st_gid in gids:
        return bool(mode & stat.S_IXGRP)
    return bool(mode & stat.S_IXOTH)


def _acl_allows(path: str, uid: int, mode: int) -> bool:
    # Permission bits do not show POSIX ACL entries for named users.  When the
    # requesting user is the daemon's own non-root user, ask the kernel (for
    # root it would always say yes, so root is judged by the bits alone).
    if uid == 0 or uid != os.geteuid():
        return False
    if os.access in os.supports_effective_ids:
        return os.access(path, mode, effective_ids=True)
    return os.access(path, mode)


def run_path_problem(path: Any, uid: int | None = None, gids: Iterable[int] | None = None) -> str | None:
    """Why a run folder must not be written at ``path`` for ``uid``/``gids``; None if it may.

    ``uid``/``gids`` default to the daemon's own (the only peers it lets in).
    """
    if not isinstance(path, str) or not path:
        return "it is not a path"
    if "\0" in path:
        return "it contains a NUL character"
    if not os.path.isabs(path):
        return "it is not an absolute path"
    if ".." in path.split("/"):
        return "it contains a '..' component"
    too_long = run_path_too_long(path)
    if too_long is not None:
        return too_long
    if uid is None:
        uid = os.geteuid()
    group_ids = frozenset(gids) if gids is not None else frozenset({os.getegid(), *os.getgroups()})

    # The nearest existing ancestor (the run folder itself when resuming).
    ancestor = os.path.normpath(path)
    while True:
        try:
            st = os.stat(ancestor)
            break
        except (FileNotFoundError, NotADirectoryError):
            parent = os.path.dirname(ancestor)
            if parent == ancestor:
                return "no part of it exists"
            ancestor = parent
        except OSError as exc:
            return f"{ancestor} cannot be examined ({exc.strerror})"
    if not stat.S_ISDIR(st.st_mode):
        return f"{ancestor} is not a directory"
    if not _may_create_in(st, uid, group_ids) and not _acl_allows(ancestor, uid, os.W_OK | os.X_OK):
        return (
            f"{ancestor} (owner uid {st.st_uid}, group {st.st_gid}, mode {stat.S_IMODE(st.st_mode):04o}) "
            f"is not writable by uid {uid}"
        )
    # Every directory above it (symlinks resolved) must be searchable too.
    real = os.path.realpath(ancestor)
    above = os.path.dirname(real)
    while True:
        try:
            st = os.stat(above)
        except OSError as exc:
            return f"{above} cannot be examined ({exc.strerror})"
        if not _may_search(st, uid, group_ids) and not _acl_allows(above, uid, os.X_OK):
            return f"{above} (mode {stat.S_IMODE(st.st_mode):04o}) cannot be entered by uid {uid}"
        parent = os.path.dirname(above)
        if parent == above:
            return None
        above = parent


def check_run_path(path: Any, uid: int | None = None, gids: Iterable[int] | None = None) -> None:
    """Raise :class:`StorageError` naming ``path`` and the reason when it must not be written."""
    problem = run_path_problem(path, uid, gids)
    if problem is not None:
        raise StorageError(f"refusing to write run {path!r}: {problem}")
