"""The head daemon's TCP listener (``kobo-daemon run --listen tcp://HOST:PORT``).

Each ``--listen tcp://HOST:PORT`` binds two TCP sockets: data (``PULL``) on
PORT and requests (``ROUTER``) on PORT+1; forwarders are pointed at
``tcp://HEAD:PORT`` and use both.  The IPC sockets stay as they are.

Security: the TCP sockets are CURVE servers with the daemon's
``server.key_secret``, and a ZAP handler (pyzmq's ``ThreadAuthenticator``)
lets in only the client public keys listed under the ``authorized`` path (see
:mod:`.keys`); a connection with any other key, or without CURVE, is refused
during the handshake, before any message of it is read.  ``--insecure-plaintext``
is the only way to listen without CURVE, and the daemon then logs a warning.

A process of its own.  Anyone who can reach the port can open TCP connections,
and every one costs a file descriptor.  So the TCP sockets live in a child
process (``python -m kohakuboard.daemon.listen``, started and restarted by the
daemon, :class:`ListenerProcess`) with a file table of its own: however many
connections strangers open, the daemon's IPC sockets, run files and control
socket never run short of descriptors (libzmq aborts the process when an IPC
accept fails with ``EMFILE``; here that can only be the listener, and the
daemon restarts it).  Inside the child, :class:`ConnectionGuard` watches the
sockets' ZeroMQ monitor events and bounds what strangers can hold: a
connection must finish its handshake within ``handshake_timeout``
(``ZMQ_HANDSHAKE_IVL``), at most ``max_connections`` connections are open
(derived from the open file limit, raised to its hard limit, less a reserve),
at most ``max_per_address`` from one address, of which at most
``max_handshakes_per_address`` still within their handshake time; a connection
over a limit is shut down as soon as it is seen.  Every refused or failed peer
is counted by kind and address (``kobo-daemon status``) and logged, at most
once a second.

How messages reach the daemon: a :class:`~.relay.Relay` thread in the child
passes every message on to the daemon's own IPC sockets, unchanged.  Remote
data is thus decoded, checked and written by exactly the code local data goes
through.  A ``shutdown`` request is not accepted over TCP.

Run paths: a message names its run by the absolute path the *client* chose,
and the head writes it at that path on the head's file system, as the
daemon's user.  Use a base directory that exists on the head (the same
``KOBO_BASE_DIR`` on every node, typically a path on the head's disk or a
shared file system).  An authorized node can write wherever the head's
daemon user can: authorize only nodes you trust with that.
"""

from __future__ import annotations

import collections
import functools
import json
import logging
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections import Counter
from typing import Any

import zmq

from ..protocol import codec
from ..protocol import messages as m
from ..protocol.endpoint import resolve
from ..protocol.errors import KoboError, code_for
from . import keys
from .config import DaemonConfig
from .relay import Head, Relay, RelaySetupError, tcp_pair

log = logging.getLogger("kohakuboard.daemon")
BIND_WAIT_S = 20.0  # how long a new listener waits for its ports to be released

ZAP_DOMAIN = "kohakuboard-tcp"
FD_RESERVE = 256  # descriptors the listener keeps for its relay, authenticator and logs
FDS_PER_CONNECTION = 3  # a node's connection, and the relay's socket + IPC connection for it
_MAX_ADDRESSES = 1024  # peer addresses remembered with their counts
_LOG_INTERVAL = 1.0  # seconds between two log lines about refused peers
_SWEEP_INTERVAL = 5.0
_CLOSE_LIMIT = 3.0  # seconds the listener process may take to close its sockets before it exits anyway


def open_file_limit() -> int:
    """Raise the soft limit on open files to the hard limit; return the soft limit now."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as exc:
            log.debug("could not raise the open file limit to %s: %s", hard, exc)
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


def connection_limit(config: DaemonConfig, fd_limit: int) -> int:
    """The most TCP connections the listener keeps open (``max_connections``, or from the file limit)."""
    budget = max(16, (fd_limit - FD_RESERVE) // FDS_PER_CONNECTION)
    return min(config.max_connections, budget) if config.max_connections else budget


def _bytes_received(fd: int) -> int:
    """Bytes TCP connection ``fd`` has received (Linux ``TCP_INFO``); -1 if unknown."""
    try:
        s = socket.socket(fileno=fd)
    except OSError:
        return -1
    try:
        info = s.getsockopt(socket.IPPROTO_TCP, getattr(socket, "TCP_INFO", 11), 192)
    except OSError:
        return -1
    finally:
        s.detach()
    # struct tcp_info: 8 bytes of u8 fields, 24 u32, then pacing_rate,
    # max_pacing_rate, bytes_acked, bytes_received (u64 each; Linux >= 4.1).
    return struct.unpack_from("=Q", info, 128)[0] if len(info) >= 136 else -1


class _Conn:
    __slots__ = ("ip", "port", "since", "refused", "mon", "confirmed")

    def __init__(self, ip: str, port: int, since: float, mon: int) -> None:
        self.ip, self.port, self.since, self.mon = ip, port, since, mon
        self.refused = ""
        self.confirmed = False  # a handshake success was attributed to it


_EVENTS = (
    zmq.EVENT_ACCEPTED
    | zmq.EVENT_ACCEPT_FAILED
    | zmq.EVENT_DISCONNECTED
    | zmq.EVENT_HANDSHAKE_SUCCEEDED
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
)


class ConnectionGuard:
    """Bounds, counts and logs the TCP connections of the listener's sockets.

    libzmq accepts connections by itself; its monitor events tell the guard
    about each one (``ACCEPTED`` carries the descriptor, ``DISCONNECTED`` too,
    a ``HANDSHAKE_FAILED_*`` event comes just before the ``DISCONNECTED`` of
    its connection).  A connection over a limit is ``shutdown()`` (libzmq
    then closes it as it would any peer that hangs up).  Runs on the relay's
    thread: its :attr:`monitors` are registered in the relay's poller, handled by :meth:`on_event`.
    """

    def __init__(
        self, ctx: zmq.Context[Any], socks: list[zmq.Socket[Any]], ports: set[int], config: DaemonConfig, fd_limit: int
    ) -> None:
        self.ports = ports
        self.handshake_timeout = config.handshake_timeout
        self.max_connections = connection_limit(config, fd_limit)
        self.max_per_address = config.max_per_address
        self.max_handshakes = min(config.max_handshakes_per_address, config.max_per_address)
        self.fd_limit = fd_limit
        self.conns: dict[int, _Conn] = {}
        self.by_ip: dict[str, set[int]] = {}
        self.refused: Counter[str] = Counter()
        self.peers: collections.OrderedDict[str, Counter[str]] = collections.OrderedDict()
        self.accepted = 0
        self.handshakes = 0
        self.disconnected = 0
        self._unlogged: Counter[tuple[str, str]] = Counter()
        self._last_log = 0.0
        self._next_sweep = time.monotonic() + _SWEEP_INTERVAL
        self.monitors: list[zmq.Socket[Any]] = []
        self._lock = threading.Lock()  # info() runs on another thread than the events
        self._failure: dict[zmq.Socket[Any], tuple[str, int]] = {}
        self._lost: set[int] = set()
        for n, sock in enumerate(socks):
            addr = f"inproc://kobo-tcp-monitor-{os.getpid()}-{n}"
            sock.monitor(addr, _EVENTS)
            mon = ctx.socket(zmq.PAIR)
            mon.setsockopt(zmq.RCVHWM, 100_000)  # a flood's events; beyond, the handshake timeout still applies
            mon.setsockopt(zmq.LINGER, 0)
            mon.connect(addr)
            self.monitors.append(mon)

    def close(self) -> None:
        for mon in self.monitors:
            mon.close(linger=0)
        self.monitors = []

    # ------------------------------------------------------------- events

    def on_event(self, mon: zmq.Socket[Any]) -> None:
        with self._lock:
            self._on_event(mon)

    def _on_event(self, mon: zmq.Socket[Any]) -> None:
        from zmq.utils.monitor import parse_monitor_message

        for _ in range(4096):
            try:
                ev = parse_monitor_message(mon.recv_multipart(zmq.NOBLOCK))
            except zmq.Again:
                return
            except (zmq.ZMQError, ValueError, KeyError):
                continue
            event, value = ev["event"], ev["value"]
            if event == zmq.EVENT_ACCEPTED:
                self._accepted(value, id(mon))
            elif event == zmq.EVENT_DISCONNECTED:
                self._disconnected(mon, value)
            elif event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self.handshakes += 1
                self._failure.pop(mon, None)
                self._credit_handshake(id(mon))
            elif event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                self._failure[mon] = ("unauthorized_key", value)
            elif event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
                if value == zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH:
                    kind = "mechanism_mismatch"  # plaintext ZeroMQ against CURVE (or the reverse)
                elif value in (zmq.PROTOCOL_ERROR_ZMTP_CRYPTOGRAPHIC, zmq.PROTOCOL_ERROR_ZMTP_KEY_EXCHANGE):
                    kind = "bad_crypto"  # e.g. a node with the wrong --head-key
                else:
                    kind = "protocol_error"  # not ZeroMQ, or a broken peer
                self._failure[mon] = (kind, value)
            elif event == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL:
                self._failure[mon] = ("", value)
            elif event == zmq.EVENT_ACCEPT_FAILED:
                self._count("?", "accept_failed")  # e.g. EMFILE: the connection waits in the kernel's queue

    def _credit_handshake(self, mon: int) -> None:
        """Mark the connection whose handshake just succeeded (the event does not name it).

        The oldest connection of this socket still handshaking that has
        received more than a greeting (an idle stranger has received nothing);
        failing that, the oldest one still handshaking.
        """
        fallback = None
        for fd, conn in self.conns.items():
            if conn.mon != mon or conn.confirmed or conn.refused:
                continue
            if fallback is None:
                fallback = conn
            if _bytes_received(fd) > 64:
                conn.confirmed = True
                return
        if fallback is not None:
            fallback.confirmed = True

    def _accepted(self, fd: int, mon: int) -> None:
        peer = self._peer(fd)
        if peer is None:
            # Closed already (a peer failing fast is gone before we look): its
            # failure is counted under the address "?".
            if len(self._lost) < 65536:
                self._lost.add(fd)
            return
        ip, port = peer
        self.accepted += 1
        now = time.monotonic()
        self._forget(fd)  # a reused descriptor: its previous connection is closed
        self._lost.discard(fd)
        conn = self.conns[fd] = _Conn(ip, port, now, mon)
        fds = self.by_ip.setdefault(ip, set())
        fds.add(fd)
        why = ""
        if len(self.conns) > self.max_connections:
            why = "too_many_connections"
        elif len(fds) > self.max_per_address:
            why = "too_many_from_address"
        else:
            young = sum(
                1 for f in fds if not self.conns[f].confirmed and now - self.conns[f].since < self.handshake_timeout
            )
            if young > self.max_handshakes:
                why = "too_many_handshakes_from_address"
        if why:
            conn.refused = why
            self._count(ip, why)
            try:
                s = socket.socket(fileno=fd)
                try:
                    s.shutdown(socket.SHUT_RDWR)  # libzmq sees the hang-up and closes it
                finally:
                    s.detach()
            except OSError:
                pass

    def _peer(self, fd: int) -> tuple[str, int] | None:
        """The peer (address, port) of our TCP connection at ``fd``; None if ``fd`` is something else now."""
        try:
            s = socket.socket(fileno=fd)
        except OSError:
            return None
        try:
            if s.family not in (socket.AF_INET, socket.AF_INET6) or s.type != socket.SOCK_STREAM:
                return None
            local, peer = s.getsockname(), s.getpeername()
        except OSError:
            return None
        finally:
            s.detach()
        if local[1] not in self.ports:
            return None
        ip = peer[0]
        if ip.startswith("::ffff:"):
            ip = ip[7:]
        return ip, peer[1]

    def _forget(self, fd: int) -> _Conn | None:
        conn = self.conns.pop(fd, None)
        if conn is not None:
            fds = self.by_ip.get(conn.ip)
            if fds is not None:
                fds.discard(fd)
                if not fds:
                    del self.by_ip[conn.ip]
        return conn

    def _disconnected(self, mon: zmq.Socket[Any], fd: int) -> None:
        conn = self._forget(fd)
        failure = self._failure.pop(mon, None)
        lost = fd in self._lost
        self._lost.discard(fd)
        self.disconnected += 1
        if conn is not None and conn.refused:
            return  # one we refused (counted then)
        if failure is not None and failure[0] == "unauthorized_key":
            return  # counted by the ZAP handler, which knows the address
        if failure is None:
            if conn is None and not lost or conn is not None and conn.confirmed:
                return  # a peer that left
            # Closed before its handshake ended with no failure event: the peer
            # hung up, or libzmq dropped it for not speaking ZMTP 3 (garbage).
            failure = ("closed_in_handshake", 0)
        kind, _ = failure
        ip = conn.ip if conn is not None else "?"
        if not kind:
            age = time.monotonic() - conn.since if conn is not None else 0.0
            kind = "handshake_timeout" if age >= self.handshake_timeout - 0.5 else "closed_in_handshake"
        self._count(ip, kind)

    def count_refused(self, ip: str, kind: str) -> None:
        """Count a refusal decided elsewhere (the ZAP handler's thread)."""
        with self._lock:
            self._count(ip, kind)

    def _count(self, ip: str, kind: str) -> None:
        self.refused[kind] += 1
        per = self.peers.get(ip)
        if per is None:
            if len(self.peers) >= _MAX_ADDRESSES:
                self.peers.popitem(last=False)
            per = self.peers[ip] = Counter()
        else:
            self.peers.move_to_end(ip)
        per[kind] += 1
        self._unlogged[(ip, kind)] += 1

    # ------------------------------------------------------- housekeeping

    def tick(self, now: float) -> None:
        with self._lock:
            self._tick(now)

    def _tick(self, now: float) -> None:
        if self._unlogged and now - self._last_log >= _LOG_INTERVAL:
            self._last_log = now
            top = self._unlogged.most_common(6)
            more = sum(self._unlogged.values()) - sum(n for _, n in top)
            log.warning(
                "refused or failed TCP peers: %s%s [%d open connection(s); %s so far]",
                ", ".join(f"{ip} {kind} x{n}" for (ip, kind), n in top),
                f", and {more} more" if more > 0 else "",
                len(self.conns),
                ", ".join(f"{k} {n}" for k, n in self.refused.most_common()),
            )
            self._unlogged.clear()
        if now >= self._next_sweep:
            # Monitor events can be dropped under a flood: forget connections
            # whose descriptor no longer holds them.
            self._next_sweep = now + _SWEEP_INTERVAL
            for fd, conn in list(self.conns.items()):
                if now - conn.since > self.handshake_timeout and self._peer(fd) != (conn.ip, conn.port):
                    self._forget(fd)

    def info(self) -> dict[str, Any]:
        with self._lock:
            return self._info()

    def _info(self) -> dict[str, Any]:
        top = sorted(self.peers.items(), key=lambda kv: -sum(kv[1].values()))[:50]
        return {
            "open": len(self.conns),
            "accepted": self.accepted,
            "handshakes": self.handshakes,
            "refused": dict(self.refused),
            "by_address": {ip: dict(c) for ip, c in top},
            "limits": {
                "max_connections": self.max_connections,
                "max_per_address": self.max_per_address,
                "max_handshakes_per_address": self.max_handshakes,
                "handshake_timeout": self.handshake_timeout,
                "open_file_limit": self.fd_limit,
            },
        }


def _authenticator(ctx: zmq.Context[Any]) -> Any:
    """pyzmq's ZAP handler thread, remembering the peer address of the request it is answering."""
    from zmq.auth.thread import ThreadAuthenticator

    class _Authenticator(ThreadAuthenticator):
        peer_address = "?"

        async def handle_zap_message(self, msg: list[bytes]) -> None:
            self.peer_address = msg[3].decode("utf-8", "replace") if len(msg) > 3 and msg[3] else "?"
            await super().handle_zap_message(msg)

    return _Authenticator(ctx, log=logging.getLogger("kohakuboard.daemon.zap"))


class _KeyCheck:
    """The CURVE callback: the authorized keys, plus the refused peer's address for the guard.

    libzmq's ``HANDSHAKE_FAILED_AUTH`` event does not say who was refused and
    its connection may be gone before the guard can ask; the ZAP request does.
    """

    def __init__(self, authorized: keys.AuthorizedKeys, listener: TcpListener) -> None:
        self.authorized = authorized
        self.listener = listener

    def callback(self, domain: str, key: bytes) -> bool:
        ok = self.authorized.callback(domain, key)
        if not ok and self.listener.guard is not None:
            ip = getattr(self.listener.auth, "peer_address", "?")
            self.listener.guard.count_refused(ip[7:] if ip.startswith("::ffff:") else ip, "unauthorized_key")
        return ok


class _HeadRelay(Relay):
    name = "tcp-listener"
    guard: ConnectionGuard | None = None

    def intercept(self, ident: bytes, body: list[bytes], head: Head | None) -> bool:
        if head is not None and head.kind == m.ShutdownRequest.KIND:
            self.reply_error(
                ident,
                head,
                "shutdown is not accepted over TCP: stop the head on its own machine",
                code=code_for(KoboError()),
            )
            return True
        return False

    def start(self) -> None:
        guard = self.guard  # set once, before start()
        if guard is not None:
            for mon in guard.monitors:
                self._register(mon, zmq.POLLIN, functools.partial(guard.on_event, mon))
        super().start()

    def tick(self, now: float) -> None:
        if self.guard is not None:
            self.guard.tick(now)

    def on_exit(self) -> None:
        if self.guard is not None:
            for mon in self.guard.monitors:
                self._unregister(mon)
            self.guard.close()


class TcpListener:
    """The TCP sockets, their authenticator and the relay into the daemon's IPC sockets."""

    def __init__(self, config: DaemonConfig) -> None:
        self.addresses = list(config.listen)
        self.secure = not config.insecure_plaintext
        pairs = [tcp_pair(a, bind=True) for a in self.addresses]
        self.authorized: keys.AuthorizedKeys | None = None
        server_keys: tuple[bytes, bytes] | None = None
        if self.secure:
            directory = keys.key_dir(config.key_dir)
            try:
                server_keys = keys.load_pair(directory, keys.SERVER)
            except keys.KeyProblem as exc:
                raise RelaySetupError(
                    f"--listen {' '.join(self.addresses)} refused: {exc}. Listening on TCP needs CURVE keys: run "
                    "`kobo-daemon keys generate`, then authorize each forwarding node's client key with "
                    "`kobo-daemon keys authorize KEY`; or pass --insecure-plaintext to accept unencrypted, "
                    "unauthenticated connections from anyone who can reach the port"
                ) from None
            path = keys.authorized_path(config.authorized, directory)
            self.authorized = keys.AuthorizedKeys(path)
            if not self.authorized.keys():
                log.warning(
                    "no authorized client keys in %s yet: every node is refused until one is added "
                    "(kobo-daemon keys authorize KEY; no restart needed)",
                    path,
                )
        fd_limit = open_file_limit()
        self.ctx: zmq.Context[Any] = zmq.Context()
        self.ctx.set(zmq.MAX_SOCKETS, max(1024, fd_limit))  # sockets are bounded by descriptors, not by this
        self.auth: Any = None
        self.guard: ConnectionGuard | None = None
        self.pull = self.ctx.socket(zmq.PULL)
        self.router = self.ctx.socket(zmq.ROUTER)
        self.relay: _HeadRelay | None = None
        try:
            if server_keys is not None:
                # Bound before any CURVE socket binds; ZAP_ENFORCE_DOMAIN makes
                # libzmq refuse connections should the handler ever be missing.
                self.auth = _authenticator(self.ctx)
                self.auth.start()
                assert self.authorized is not None  # loaded with the server keys
                self.auth.configure_curve_callback(ZAP_DOMAIN, _KeyCheck(self.authorized, self))
            for sock in (self.pull, self.router):
                sock.setsockopt(zmq.LINGER, 0)
                sock.setsockopt(zmq.MAXMSGSIZE, codec.MAX_FRAME_BYTES)  # libzmq checks it per frame
                sock.setsockopt(zmq.TCP_KEEPALIVE, 1)
                sock.setsockopt(zmq.HEARTBEAT_IVL, 5000)
                sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 30000)
                # A stranger's connection holds a descriptor this long at most.
                sock.setsockopt(zmq.HANDSHAKE_IVL, int(config.handshake_timeout * 1000))
                if any("[" in a for a in self.addresses):
                    sock.setsockopt(zmq.IPV6, 1)
                if server_keys is not None:
                    sock.setsockopt(zmq.ZAP_DOMAIN, ZAP_DOMAIN.encode())
                    sock.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)
                    sock.curve_secretkey = server_keys[1]
                    sock.curve_publickey = server_keys[0]
                    sock.curve_server = True
            self.pull.setsockopt(zmq.RCVHWM, 16)
            self.router.setsockopt(zmq.ROUTER_MANDATORY, 0)
            for data_addr, control_addr in pairs:
                for sock, addr in ((self.pull, data_addr), (self.router, control_addr)):
                    # The listener of a daemon that was just killed may still be
                    # closing its sockets (it learns of the death by a signal, and
                    # under load it has taken over 5 s): wait for the port.
                    deadline = time.monotonic() + BIND_WAIT_S
                    while True:
                        try:
                            sock.bind(addr)
                            break
                        except zmq.ZMQError as exc:
                            if exc.errno != zmq.EADDRINUSE or time.monotonic() > deadline:
                                raise RelaySetupError(f"cannot listen on {addr}: {exc}") from None
                            time.sleep(0.1)
            ports = {int(a.rsplit(":", 1)[1]) for pair in pairs for a in pair}
            self.guard = ConnectionGuard(self.ctx, [self.pull, self.router], ports, config, fd_limit)
            self.relay = _HeadRelay(
                self.pull,
                self.router,
                config.endpoint.data_addr,
                config.endpoint.control_addr,
                f"the kobo-daemon on {config.endpoint}",
            )
            self.relay.guard = self.guard
        except BaseException:
            self.close()
            raise
        if self.secure:
            log.info(
                "listening on %s (data) and %s (requests) with CURVE; server key %s; authorized keys: %s",
                ", ".join(p[0] for p in pairs),
                ", ".join(p[1] for p in pairs),
                server_keys[0].decode() if server_keys else "?",
                self.authorized.path if self.authorized else "?",
            )
        else:
            for _ in range(2):
                log.warning(
                    "!!! listening on %s WITHOUT encryption or authentication (--insecure-plaintext): anyone who "
                    "can reach these ports can read the traffic and write run folders anywhere this user can !!!",
                    ", ".join(f"{d} and {c}" for d, c in pairs),
                )
        self.relay.start()

    def info(self) -> dict[str, Any]:
        out: dict[str, Any] = {"addresses": self.addresses, "secure": self.secure}
        if self.authorized is not None:
            out.update(
                authorized=self.authorized.path, accepted=self.authorized.accepted, refused=self.authorized.refused
            )
        if self.relay is not None:
            out.update(self.relay.info())
        if self.guard is not None:
            out["peers"] = self.guard.info()
        return out

    def close(self) -> None:
        """Stop the relay, the authenticator and the sockets; idempotent."""
        if self.relay is not None:
            self.relay.close()
            self.relay = None
        if self.ctx.closed:
            return
        if self.guard is not None:
            self.guard.close()  # (the relay thread closed it already if it ran)
        for sock in (self.pull, self.router):
            sock.close(linger=0)
        if self.auth is not None:
            self.auth.stop()
            self.auth = None
        self.ctx.term()


# ------------------------------------------------------ the listener process


def _config_spec(config: DaemonConfig) -> str:
    return json.dumps(
        {
            "endpoint": str(config.endpoint),
            "listen": list(config.listen),
            "key_dir": config.key_dir,
            "authorized": config.authorized,
            "insecure_plaintext": config.insecure_plaintext,
            "log_level": config.log_level,
            "handshake_timeout": config.handshake_timeout,
            "max_connections": config.max_connections,
            "max_per_address": config.max_per_address,
            "max_handshakes_per_address": config.max_handshakes_per_address,
        }
    )


def child_main(spec_text: str) -> int:
    """``python -m kohakuboard.daemon.listen SPEC``: the listener process (started by the daemon).

    Prints one JSON line ``{"ready": ...}`` or ``{"error": ...}``, then its
    status as a JSON line every half second; exits when its stdin closes (the
    daemon stopped or died: at most ``_CLOSE_LIMIT`` later) or on SIGTERM, and
    is killed with its daemon (``PR_SET_PDEATHSIG``).
    """
    spec = json.loads(spec_text)
    logging.basicConfig(
        level=getattr(logging, spec.get("log_level") or "INFO", logging.INFO),
        format="%(asctime)s %(levelname)s kobo-daemon[tcp]: %(message)s",
        stream=sys.stderr,
    )
    try:  # die with the daemon, whatever kills it
        import ctypes

        # SIGKILL, not a signal to handle: a daemon started again at once (systemd,
        # a client's autostart) needs the ports now, and the listener holds nothing
        # to save (the relay keeps no data; clients re-send).  A handled SIGTERM
        # waited for the main thread, and the ports stayed bound for over 20 s.
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:
        pass
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the daemon, which stops us in order
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    stop = threading.Event()  # set by the stdin thread: its EOF means the daemon stopped or died
    # SIGTERM only leaves a mark, seen by the loop below within half a second: stop.set() in the
    # handler, which runs in the main thread, deadlocked when the signal came while that thread was
    # inside stop.wait() (which holds the event's lock), and the process then never exited, keeping
    # the TCP port from a restarted daemon
    terminated: list[int] = []
    signal.signal(signal.SIGTERM, lambda signum, frame: terminated.append(signum))
    out = sys.stdout

    def say(obj: dict[str, Any]) -> None:
        out.write(json.dumps(obj) + "\n")
        out.flush()

    spec["endpoint"] = resolve(spec["endpoint"], {})  # always an ipc:// address: no default to look up
    try:
        listener = TcpListener(DaemonConfig(**spec))
    except KoboError as exc:
        say({"error": str(exc)})
        return 3
    except Exception as exc:
        say({"error": f"cannot listen on {' '.join(spec['listen'])}: {exc!r}"})
        return 3

    def watch_stdin() -> None:
        try:
            while os.read(0, 4096):
                pass
        except OSError:
            pass
        _exit_after(_CLOSE_LIMIT)  # however the main thread is doing
        stop.set()

    threading.Thread(target=watch_stdin, name="kobo-stdin", daemon=True).start()
    try:
        say({"ready": True, **listener.info()})
        last = ""
        while not stop.wait(0.5) and not terminated:
            if listener.relay is None or not listener.relay.alive():
                log.error("the TCP relay stopped; exiting (the daemon starts a new listener)")
                return 1
            text = json.dumps(listener.info())
            if text != last:
                last = text
                try:
                    say(json.loads(text))
                except (BrokenPipeError, OSError):
                    return 0
        return 0
    finally:
        # The listener holds no data (the relay keeps nothing; clients re-send), and
        # its daemon may be gone: closing must not keep the ports bound, so a close
        # that hangs (a socket zmq cannot let go of) ends the process anyway.
        _exit_after(_CLOSE_LIMIT)
        listener.close()


def _exit_after(seconds: float) -> None:
    """End this (listener) process after ``seconds`` whatever its threads are doing."""
    watchdog = threading.Timer(seconds, os._exit, args=(0,))
    watchdog.daemon = True
    watchdog.start()


class ListenerProcess:
    """The daemon's side of the listener process: start it, restart it if it dies, stop it."""

    def __init__(self, config: DaemonConfig) -> None:
        self.config = config
        self.spec = _config_spec(config)
        self.restarts = 0
        self._latest: dict[str, Any] = {"addresses": list(config.listen), "secure": not config.insecure_plaintext}
        self._closing = threading.Event()
        self.proc = self._spawn_ready()  # raises RelaySetupError
        self._thread = threading.Thread(target=self._supervise, name="kobo-tcp-supervisor", daemon=True)
        self._thread.start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _spawn_ready(self) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            [sys.executable, "-m", "kohakuboard.daemon.listen", self.spec],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            close_fds=True,
        )
        assert proc.stdout is not None
        deadline = time.monotonic() + 60.0
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([proc.stdout], [], [], left)[0]:
                proc.kill()
                proc.wait()
                raise RelaySetupError(f"the TCP listener for {' '.join(self.config.listen)} did not start within 60s")
            line = proc.stdout.readline()
            if not line:
                code = proc.wait()
                raise RelaySetupError(f"the TCP listener process exited ({code}) before it was ready")
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            if "error" in msg:
                proc.wait()
                raise RelaySetupError(msg["error"])
            if msg.get("ready"):
                msg.pop("ready")
                self._latest = msg
                return proc

    def _supervise(self) -> None:
        backoff = 1.0
        while True:
            proc = self.proc
            assert proc.stdout is not None
            for line in proc.stdout:
                try:
                    self._latest = json.loads(line)
                    backoff = 1.0
                except ValueError:
                    pass
            code = proc.wait()
            if self._closing.is_set():
                return
            log.error(
                "the TCP listener process (pid %d) exited with %s; starting a new one in %.0fs", proc.pid, code, backoff
            )
            while not self._closing.wait(backoff):
                backoff = min(30.0, backoff * 2)
                try:
                    self.proc = self._spawn_ready()
                except KoboError as exc:
                    log.error("%s", exc)
                    continue
                self.restarts += 1
                log.info("TCP listener process restarted (pid %d)", self.proc.pid)
                break
            else:
                return

    def info(self) -> dict[str, Any]:
        return {**self._latest, "pid": self.proc.pid, "restarts": self.restarts}

    def close(self) -> None:
        self._closing.set()
        proc = self.proc
        try:
            if proc.stdin is not None:
                proc.stdin.close()  # the child exits when its stdin closes
        except OSError:
            pass
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        self._thread.join(5)
        if proc.stdout is not None:
            proc.stdout.close()


def start_tcp_listener(config: DaemonConfig) -> ListenerProcess | None:
    """Listen on ``config.listen`` in a child process (None when it is empty).

    Raises :class:`KoboError` if that is impossible (no keys, bad address, port in use).
    """
    if not getattr(config, "listen", None):
        return None
    return ListenerProcess(config)


if __name__ == "__main__":
    sys.exit(child_main(sys.argv[1]))
