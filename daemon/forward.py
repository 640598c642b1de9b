"""Moving messages between daemons over TCP: the relay core and the forwarding node daemon.

A :class:`Relay` takes a downstream ``PULL``/``ROUTER`` pair (what clients
connect to) and moves everything it receives to an upstream daemon:

* data: every frame list received on the ``PULL`` is ``PUSH``-ed upstream
  unchanged, in order.  At most one message waits in the relay itself: while
  the upstream socket cannot take it (its send queue of 16 messages is full,
  the peer is slow or unreachable), the relay stops reading, the downstream
  receive queue (16 messages) fills, and the clients' own bounded queues push
  back on ``log()``.  Nothing here grows without bound.
* control: each downstream client socket (ROUTER identity) gets an upstream
  ``DEALER`` of its own, so the upstream ROUTER's reply comes back on that
  socket and goes to the right client, whatever the request kind (requests
  are passed through untouched; kinds added later work without changes here).
  At most ``max_upstreams`` such sockets exist; idle ones are closed.

The relay runs on a thread of its own with a ``zmq.Poller``; its upstream
sockets live in a context of their own.

Two relays exist:

* :class:`ForwardRelay` in a node daemon started with ``--forward``
  (:class:`Forwarder`): downstream are the node's IPC sockets, upstream the
  head's TCP sockets, with CURVE client keys.  It answers ``status`` and
  ``shutdown`` itself (``kobo-daemon stop`` on a node stops that node's
  forwarder, never the head), tags the daemon instance id in replies (see
  below), and reports clients of this node that died without finishing.
* the head's TCP listener (:mod:`.listen`): downstream are the TCP sockets
  (CURVE server), upstream the head's own IPC sockets, so remote messages go
  through exactly the code local ones go through.

Instance ids.  A client re-sends what is not acknowledged as durable when the
``daemon`` id in a reply changes (a restarted daemon).  Through a forwarder,
messages can also be lost between the node and the head while the head keeps
running: the forwarder restarted, or the TCP connection broke with messages
in flight.  So the forwarder replaces the id in replies with
``<head id>@<forwarder instance>[.<reconnections>]``: after either event the
clients see a new id and re-send, and the head stores each call once.

Dead clients.  Only the node that ran a client can tell that its process died.
The forwarder remembers the pid of each client attached through it (from its
``open`` or ``ack_req`` request, once the head has accepted it) and, when that
process is gone without a
``finish``, sends the head a ``finish`` with status ``crashed`` for it, after
everything the client sent has gone upstream.

Node samples.  A forwarder samples its own node like a writing daemon does
(``--system-metrics``, :mod:`.sysmetrics`): the event loop takes the samples
(in a worker thread) and hands them to the relay thread, which sends each one
as a ``log`` message of a client of its own (``sys-<forwarder instance>``) for
every run with a live client of this node, on the same data socket as the
clients' calls, at the rank and latest step of the run's lowest-ranked client
here.  Like a client, it keeps what it sent until the head says it is durable
(a ``flush`` request for sequence number 0, answered at once and attaching
nothing) and sends it again after a reconnection; the head stores each
sequence number once.  The head samples only runs with clients of its own
host, so a forwarded node is sampled once, by its forwarder.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import json
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgpack
import zmq

from ..protocol import codec
from ..protocol import messages as m
from ..protocol.errors import DaemonUnavailable, KoboError, code_for
from ..protocol.peer import process_alive
from .config import DaemonConfig
from .server import Daemon, _sd_notify

log = logging.getLogger("kohakuboard.daemon")

_HOST = socket.gethostname()
_TICK = 0.1  # seconds between housekeeping passes of the relay thread
_IDLE_UPSTREAM = 60.0  # an upstream DEALER unused this long (nothing waiting) is closed
_STALE_UPSTREAM = 600.0  # ... and one unused this long is closed even with requests waiting
_MAX_WAITING = 256  # requests of one client waiting for the upstream's answer
_DATA_HWM = 16  # messages queued in zmq per data socket (a message can be ~1 MB)
_REFUSED_RETRY = 5.0  # seconds between connection attempts after the head refused our key
_MAX_TRACKED = 100_000  # clients remembered for reaping
_SYS_HELD = 64  # node samples of one run kept until the head has them durable (further ones are not taken)
_SYS_ASK_AFTER = 1.0  # seconds after sending a node sample before asking the head whether it is durable
_SYS_ASK_TIMEOUT = 10.0  # a question about durability unanswered this long is asked again
_STEP_KINDS = (m.LogMessage.KIND, m.LogBatch.KIND)  # data whose envelope carries the call's step

# Reply kinds that carry the daemon instance id, and its index in their payload.
_DAEMON_FIELD: dict[str, int] = {}
for _cls in m.ALL_MESSAGES:
    _names = [f.name for f in dataclasses.fields(_cls) if f.name != "env"]
    if "daemon" in _names:
        _DAEMON_FIELD[_cls.KIND] = _names.index("daemon")


class RelaySetupError(KoboError):
    """A relay's addresses or keys are unusable (the daemon refuses to start)."""


def tcp_pair(addr: str, *, bind: bool) -> tuple[str, str]:
    """``tcp://HOST:PORT`` -> (data address on PORT, control address on PORT+1).

    Raises :class:`RelaySetupError` for anything else.
    """
    if not isinstance(addr, str) or not addr.startswith("tcp://"):
        raise RelaySetupError(f"{addr!r} is not a tcp://HOST:PORT address")
    host, sep, port_text = addr[len("tcp://") :].rpartition(":")
    try:
        port = int(port_text)
    except ValueError:
        port = -1
    if not sep or not host or not 1 <= port <= 65534:
        raise RelaySetupError(
            f"{addr!r} is not a tcp://HOST:PORT address with PORT in 1..65534 "
            "(the daemon uses PORT for data and PORT+1 for requests)"
        )
    if not bind and host == "*":
        raise RelaySetupError(f"{addr!r}: name the head's host or address to connect to")
    return f"tcp://{host}:{port}", f"tcp://{host}:{port + 1}"


def raise_fd_limit(wanted: int) -> None:
    """Raise the soft limit on open files towards ``wanted`` (each relayed client costs a few)."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        if soft != resource.RLIM_INFINITY and soft < target:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ImportError, ValueError, OSError) as exc:
        log.debug("could not raise the open file limit: %s", exc)


def _is_ipv6(addr: str) -> bool:
    return "[" in addr


@dataclass(slots=True)
class Head:
    """The first fields of a message's header (read without validating the payload)."""

    kind: str
    run: str
    client: str
    seq: int
    rank: int
    fields: list[Any]
    extra: Any = None  # what a relay remembers about a request until its reply


def peek(frame: Any) -> Head | None:
    """The header of a message, or None when it is not one (the upstream daemon judges it)."""
    buf = frame.buffer if isinstance(frame, zmq.Frame) else frame
    if len(buf) > codec.MAX_HEADER_BYTES:
        return None
    try:
        h = msgpack.unpackb(
            buf,
            raw=False,
            strict_map_key=False,
            max_str_len=codec.MAX_HEADER_BYTES,
            max_bin_len=codec.MAX_HEADER_BYTES,
            max_array_len=codec.MAX_VALUES_PER_LOG,
            max_map_len=codec.MAX_VALUES_PER_LOG,
            max_ext_len=0,
        )
    except Exception:
        return None
    if not isinstance(h, list) or len(h) < 7:
        return None
    kind, run, client, seq, rank = h[2], h[3], h[4], h[5], h[6]
    if not (isinstance(kind, str) and isinstance(run, str) and isinstance(client, str)):
        return None
    if type(seq) is not int or type(rank) is not int:
        return None
    return Head(kind, run, client, seq, rank, h)


class _Upstream:
    """One downstream client socket's own upstream DEALER."""

    __slots__ = ("ident", "sock", "waiting", "last")

    def __init__(self, ident: bytes, sock: zmq.Socket[Any]) -> None:
        self.ident = ident
        self.sock = sock
        self.waiting: collections.deque[Head | None] = collections.deque()
        self.last = time.monotonic()


class Relay:
    """Moves a downstream PULL/ROUTER pair's messages to an upstream daemon, on a thread.

    Subclasses say how upstream sockets are made (:meth:`secure`) and may
    answer requests themselves (:meth:`intercept`).
    """

    name = "relay"
    drain_timeout = 0.0  # how long stop() keeps delivering data already received

    def __init__(
        self,
        down_pull: zmq.Socket[Any],
        down_router: zmq.Socket[Any],
        data_addr: str,
        control_addr: str,
        target: str,
        *,
        max_upstreams: int = 1024,
    ) -> None:
        self.down_pull = down_pull
        self.down_router = down_router
        self.data_addr = data_addr
        self.control_addr = control_addr
        self.target = target  # for messages: "the head kobo-daemon at tcp://..."
        self.max_upstreams = max_upstreams
        self.ctx: zmq.Context[Any] = zmq.Context()
        self.ctx.set(zmq.MAX_SOCKETS, max_upstreams + 64)  # libzmq's default is 1023
        raise_fd_limit(4 * max_upstreams + 1024)
        self.push: zmq.Socket[Any] | None = None
        self.forwarded = 0
        self.received = 0
        self.requests = 0
        self.replies = 0
        self.errors = 0
        self.throttled = 0
        self.failure: BaseException | None = None
        self._ups: collections.OrderedDict[bytes, _Upstream] = collections.OrderedDict()
        self._by_sock: dict[zmq.Socket[Any], _Upstream] = {}
        self._handlers: dict[zmq.Socket[Any], Callable[[], None]] = {}
        self._pending: list[Any] | None = None
        self._interest: zmq.Socket[Any] | None = None
        self._more = False
        self._poller = zmq.Poller()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._linger = 0.0  # seconds the data socket may keep sending after stop

    # ------------------------------------------------------------ lifecycle

    def start(self) -> None:
        self._thread = threading.Thread(target=self._main, name=f"kobo-{self.name}", daemon=True)
        self._thread.start()

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self) -> None:
        """Stop the thread (after at most ``drain_timeout`` of delivering data) and wait for it."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(self.drain_timeout + 10.0)
            if self._thread.is_alive():
                log.error("%s thread did not stop", self.name)

    def close(self) -> None:
        """Stop if running and release the upstream context; idempotent.

        Waits while the data socket lingers (at most ``drain_timeout``).
        """
        if self._closed:
            return
        self.stop()
        self._closed = True
        if self._thread is not None and self._thread.is_alive():
            return  # stuck: leave its sockets alone, the process is exiting
        self.ctx.term()

    # ------------------------------------------------------------ sockets

    def secure(self, sock: zmq.Socket[Any]) -> None:
        """Set the upstream sockets' security options (before connecting)."""

    def _upstream_socket(self, kind: int, addr: str) -> zmq.Socket[Any]:
        sock = self.ctx.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RECONNECT_IVL, 200)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 5000)
        if addr.startswith("tcp://"):
            sock.setsockopt(zmq.TCP_KEEPALIVE, 1)
            sock.setsockopt(zmq.HEARTBEAT_IVL, 5000)
            sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 30000)
            if _is_ipv6(addr):
                sock.setsockopt(zmq.IPV6, 1)
        if kind == zmq.PUSH:
            sock.setsockopt(zmq.SNDHWM, _DATA_HWM)
        else:
            sock.setsockopt(zmq.SNDHWM, _MAX_WAITING)
            sock.setsockopt(zmq.MAXMSGSIZE, codec.MAX_FRAME_BYTES)  # libzmq checks it per frame
        self.secure(sock)
        self.before_connect(sock, kind)
        sock.connect(addr)
        return sock

    def before_connect(self, sock: zmq.Socket[Any], kind: int) -> None:
        """Hook: called on each new upstream socket just before it connects."""

    def _open_push(self) -> None:
        self.push = self._upstream_socket(zmq.PUSH, self.data_addr)
        self._set_interest()

    def _close_push(self) -> None:
        if self.push is not None:
            if self._interest is self.push:
                self._poller.unregister(self.push)
                self._interest = None
            self.push.close(linger=0)
            self.push = None

    def _register(self, sock: Any, flags: int, handler: Callable[[], None] | None = None) -> None:
        self._poller.register(sock, flags)
        if handler is not None:
            self._handlers[sock] = handler

    def _unregister(self, sock: Any) -> None:
        if sock in self._poller:
            self._poller.unregister(sock)
        self._handlers.pop(sock, None)

    def _set_interest(self) -> None:
        """Wait for the upstream to take the held message, or for new data: never both."""
        want = self.push if self._pending is not None else self.down_pull
        if want is self._interest or want is None:
            return
        if self._interest is not None:
            self._poller.unregister(self._interest)
        self._poller.register(want, zmq.POLLOUT if want is self.push else zmq.POLLIN)
        self._interest = want

    # ---------------------------------------------------------------- loop

    def _main(self) -> None:
        try:
            self._open_push()
            self._register(self.down_router, zmq.POLLIN)
            next_tick = 0.0
            while not self._stopping.is_set():
                events = dict(self._poller.poll(0 if self._more else int(_TICK * 1000)))
                self._more = False
                self._move_data()
                if self.down_router in events:
                    self._move_requests()
                for sock in events:
                    up = self._by_sock.get(sock)
                    if up is not None:
                        self._move_replies(up)
                    else:
                        handler = self._handlers.get(sock)
                        if handler is not None:
                            handler()
                now = time.monotonic()
                if now >= next_tick:
                    next_tick = now + _TICK
                    self._close_idle(now)
                    self.tick(now)
            self._drain()
        except BaseException as exc:
            self.failure = exc
            log.exception("%s stopped on an error", self.name)
        finally:
            for up in list(self._ups.values()):
                self._drop_upstream(up)
            if self.push is not None:
                self.push.close(linger=int(self._linger * 1000))
                self.push = None
            self.on_exit()

    def on_exit(self) -> None:
        """Hook: runs on the relay thread after the loop."""

    def tick(self, now: float) -> None:
        """Hook: periodic housekeeping on the relay thread."""

    def _drain(self) -> None:
        """Stopping: keep delivering received data for up to ``drain_timeout``."""
        deadline = time.monotonic() + (self.drain_timeout if self.can_drain() else 0.0)
        while time.monotonic() < deadline and self.push is not None:
            self._move_data()
            if self._pending is None and not self.down_pull.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                break
            self.push.poll(20, zmq.POLLOUT)
        # What zmq still queues goes out while the socket lingers (bounded too).
        self._linger = max(0.0, deadline - time.monotonic()) if self.can_drain() else 0.0

    def can_drain(self) -> bool:
        return False

    def _move_data(self, budget: int = 1024) -> None:
        push = self.push
        if push is None:
            return
        recv = self.down_pull.recv_multipart
        n = 0
        while True:
            if self._pending is not None:
                try:
                    push.send_multipart(self._pending, zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    self.throttled += 1
                    break
                self._pending = None
                self.forwarded += 1
            if n >= budget:
                self._more = True
                break
            try:
                frames = recv(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                break
            n += 1
            self.received += 1
            self.on_data(frames)
            self._pending = frames
        self._set_interest()

    def on_data(self, frames: list[Any]) -> None:
        """Hook: a data message is about to go upstream (unchanged)."""

    def _move_requests(self, budget: int = 256) -> None:
        for _ in range(budget):
            try:
                frames = self.down_router.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            self._request(frames)
        self._more = True

    def _request(self, frames: list[bytes]) -> None:
        if len(frames) < 2:
            return
        ident, body = frames[0], frames[1:]
        head = peek(body[0])
        self.requests += 1
        if self.intercept(ident, body, head):
            return
        why = self.refusal()
        if why is not None:
            self.reply_error(ident, head, why)
            return
        try:
            up = self._upstream(ident)
        except zmq.ZMQError as exc:  # e.g. out of file descriptors: refuse this request, keep relaying
            self.reply_error(ident, head, f"{self.target} cannot take another client now: {exc}")
            return
        if up is None:
            self.reply_error(ident, head, f"too many clients ({self.max_upstreams}) are waiting on {self.target}")
            return
        if len(up.waiting) >= _MAX_WAITING:
            self.reply_error(
                ident, head, f"{len(up.waiting)} requests of this client are already waiting on {self.target}"
            )
            return
        try:
            up.sock.send_multipart(body, zmq.NOBLOCK)
        except zmq.Again:
            self.reply_error(ident, head, f"{self.target} is not reachable")
            return
        up.waiting.append(head)
        up.last = time.monotonic()
        self.request_sent(head, body)

    def intercept(self, ident: bytes, body: list[bytes], head: Head | None) -> bool:
        """Hook: answer a request here instead of passing it on (return True)."""
        return False

    def refusal(self) -> str | None:
        """Hook: why requests cannot be passed on right now (answered with an error at once)."""
        return None

    def request_sent(self, head: Head | None, body: list[bytes]) -> None:
        """Hook: a request went upstream."""

    def reply(self, ident: bytes, msg: Any) -> None:
        try:
            self.down_router.send_multipart([ident, *codec.encode(msg)], zmq.NOBLOCK)
        except zmq.ZMQError as exc:
            log.debug("could not answer a client: %s", exc)

    def reply_error(self, ident: bytes, head: Head | None, text: str, code: int | None = None) -> None:
        self.errors += 1
        env = m.Envelope(head.run, head.client, head.seq) if head is not None else m.Envelope()
        self.reply(ident, m.ErrorReply(env, code_for(DaemonUnavailable()) if code is None else code, text))

    def _upstream(self, ident: bytes) -> _Upstream | None:
        up = self._ups.get(ident)
        if up is not None:
            self._ups.move_to_end(ident)
            return up
        if len(self._ups) >= self.max_upstreams:
            victim = next((u for u in self._ups.values() if not u.waiting), None)
            if victim is None:
                return None
            self._drop_upstream(victim)
        up = _Upstream(ident, self._upstream_socket(zmq.DEALER, self.control_addr))
        self._ups[ident] = up
        self._by_sock[up.sock] = up
        self._register(up.sock, zmq.POLLIN)
        return up

    def _drop_upstream(self, up: _Upstream) -> None:
        self._ups.pop(up.ident, None)
        self._by_sock.pop(up.sock, None)
        self._unregister(up.sock)
        up.sock.close(linger=0)

    def _close_idle(self, now: float) -> None:
        for up in list(self._ups.values()):
            idle = now - up.last
            if idle > _STALE_UPSTREAM or (idle > _IDLE_UPSTREAM and not up.waiting):
                self._drop_upstream(up)

    def answer_waiting(self, text: str) -> None:
        """Answer every request waiting upstream with ``text`` and close the upstream sockets."""
        for up in list(self._ups.values()):
            for head in up.waiting:
                self.reply_error(up.ident, head, text)
            self._drop_upstream(up)

    def _move_replies(self, up: _Upstream, budget: int = 256) -> None:
        for _ in range(budget):
            try:
                body = up.sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if not body:
                continue
            self.replies += 1
            head = peek(body[0])
            request = None
            if head is not None:
                for i, waiting in enumerate(up.waiting):
                    if waiting is not None and waiting.seq == head.seq:
                        request = waiting
                        del up.waiting[i]
                        break
            body = self.reply_received(request, head, body)
            up.last = time.monotonic()
            try:
                self.down_router.send_multipart([up.ident, *body], zmq.NOBLOCK)
            except zmq.ZMQError:
                pass  # the client is gone

    def reply_received(self, request: Head | None, head: Head | None, body: list[bytes]) -> list[bytes]:
        """Hook: a reply came back for ``request``; return the frames to pass on."""
        return body

    def info(self) -> dict[str, Any]:
        return {
            "received": self.received,
            "forwarded": self.forwarded,
            "requests": self.requests,
            "replies": self.replies,
            "errors": self.errors,
            "throttled": self.throttled,
            "upstreams": len(self._ups),
            "holding": int(self._pending is not None),
        }


# ------------------------------------------------------------- forwarding node


@dataclass
class _Client:
    run: str
    client: str
    rank: int
    pid: int
    pid_start: int
    host: str
    last_seq: int = 0
    finishing: bool = False
    reap_id: int = 0
    reap_deadline: float = 0.0
    dead_since: float = 0.0
    reports: int = 0
    step: int = -1  # latest (step, global_step) of its calls seen here (-1: none yet); node samples go there
    global_step: int = 0


class _SysSample:
    """One node sample for one run, encoded, kept until the head has it durable."""

    __slots__ = ("seq", "frames", "sent")

    def __init__(self, seq: int, frames: list[bytes]) -> None:
        self.seq = seq
        self.frames = frames
        self.sent = False


class _SysRun:
    """The node samples of one run not yet confirmed durable by the head."""

    __slots__ = ("held", "unsent", "asked", "ask_at", "last_live")

    def __init__(self) -> None:
        self.held: collections.deque[_SysSample] = collections.deque()  # in seq order
        self.unsent = 0  # the last ``unsent`` of ``held`` are still to be sent (again)
        self.asked = 0.0  # when the outstanding durability question went out (0: none)
        self.ask_at = 0.0  # when to ask next (0: nothing sent to ask about)
        self.last_live = 0.0  # when the run last had a live client here


@dataclass
class ForwardSetup:
    """Where and how a forwarder connects (validated before the daemon starts)."""

    address: str
    data_addr: str
    control_addr: str
    curve: tuple[bytes, bytes, bytes] | None  # (head public, our public, our secret); None: plaintext


def forward_setup(config: DaemonConfig) -> ForwardSetup:
    """Check ``--forward`` and load the keys; raise :class:`KoboError` with what to do."""
    from . import keys

    if getattr(config, "listen", None):
        raise RelaySetupError(
            "--forward and --listen cannot be combined: a forwarding node writes and serves nothing itself"
        )
    address = config.forward or ""
    data_addr, control_addr = tcp_pair(address, bind=False)
    if getattr(config, "insecure_plaintext", False):
        return ForwardSetup(address, data_addr, control_addr, None)
    if not config.head_key:
        raise RelaySetupError(
            f"--forward {address} needs the head's public key: --head-key KEY (or a file holding it; "
            "`kobo-daemon keys show` on the head prints it), or --insecure-plaintext if the head listens without CURVE"
        )
    head_key = keys.load_public(config.head_key)
    directory = keys.key_dir(config.key_dir)
    public, secret = keys.load_pair(directory, keys.CLIENT)
    return ForwardSetup(address, data_addr, control_addr, (head_key, public, secret))


class ForwardRelay(Relay):
    """The relay of a forwarding node: local IPC clients -> the head's TCP sockets."""

    name = "forwarder"

    def __init__(self, daemon: Forwarder, setup: ForwardSetup) -> None:
        super().__init__(
            daemon.pull,
            daemon.router,
            setup.data_addr,
            setup.control_addr,
            f"the head kobo-daemon at {setup.address}",
        )
        self.daemon = daemon
        self.setup = setup
        self.drain_timeout = min(5.0, daemon.config.graceful_timeout)
        self.on_shutdown: Callable[[], None] = lambda: None
        self.state = "connecting"
        self.state_since = time.time()
        self.detail = ""
        self.epoch = 0
        self._connected_once = False
        self._retry_at: float | None = None
        self._refused_logged = -1e9
        self._monitor: zmq.Socket[Any] | None = None
        self._monitors = 0
        self.clients: dict[tuple[str, str], _Client] = {}
        self._reaper: zmq.Socket[Any] | None = None
        self._reap_id = 0
        self._next_reap = 0.0
        self._tracking_full = False
        self.reaped = 0
        # The clients watched, kept in a file beside the endpoint: a forwarder
        # restarted (or killed) while a client died still reports that client.
        self._state_path = daemon.ep.base + ".clients.json"
        self._dirty = False
        self._next_save = 0.0
        self._load_clients()
        # This node's samples (module docstring, "Node samples"): handed over by
        # the event loop (add_sample), sent as the data of a client of our own.
        self.sys_client = "sys-" + daemon.instance
        self._sys_inbox: collections.deque[tuple[float, dict[str, float]]] = collections.deque(maxlen=8)
        self._sys_runs: dict[str, _SysRun] = {}
        self._sys_seq: dict[str, int] = {}  # kept while the forwarder lives: a reopened run continues its numbers
        self._sys_sock: zmq.Socket[Any] | None = None
        self._sys_epoch = 0
        self._sys_asks = 0
        self.sys_stats = {"samples": 0, "sent": 0, "resent": 0, "durable": 0, "not_taken": 0}

    # ----------------------------------------------------------- security

    def secure(self, sock: zmq.Socket[Any]) -> None:
        if self.setup.curve is not None:
            head, public, secret = self.setup.curve
            sock.curve_serverkey = head
            sock.curve_publickey = public
            sock.curve_secretkey = secret

    def before_connect(self, sock: zmq.Socket[Any], kind: int) -> None:
        if kind != zmq.PUSH:
            return
        # The data socket's handshakes tell how the head treats us.
        self._monitors += 1
        mon = sock.get_monitor_socket(
            zmq.EVENT_HANDSHAKE_SUCCEEDED
            | zmq.EVENT_HANDSHAKE_FAILED_AUTH
            | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
            | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
            | zmq.EVENT_DISCONNECTED
            | zmq.EVENT_CONNECT_RETRIED,
            addr=f"inproc://kobo-forward-monitor-{self._monitors}",
        )
        if self._monitor is not None:
            self._unregister(self._monitor)
            self._monitor.close(linger=0)
        self._monitor = mon
        self._register(mon, zmq.POLLIN, self._on_monitor)

    def _on_monitor(self) -> None:
        from zmq.utils.monitor import parse_monitor_message

        assert self._monitor is not None
        while True:
            try:
                ev = parse_monitor_message(self._monitor.recv_multipart(zmq.NOBLOCK))
            except zmq.Again:
                return
            except zmq.ZMQError:
                return
            event, value = ev["event"], ev["value"]
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                if self._connected_once:
                    # Messages in flight on the broken connection may be lost:
                    # a new id in replies makes the clients re-send.
                    self.epoch += 1
                self._connected_once = True
                self._set_state("connected", "")
            elif event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                self._set_state("refused", f"status {value}")
            elif event in (zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL, zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL):
                what = "protocol error" if event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL else "no detail, errno"
                self._set_state("handshake-failed", f"{what} {value:#x}")
            elif event == zmq.EVENT_DISCONNECTED and self.state == "connected":
                self._set_state("disconnected", "")
            elif event == zmq.EVENT_CONNECT_RETRIED and self.state in ("connecting", "disconnected"):
                self._set_state("unreachable", "")

    def _set_state(self, state: str, detail: str) -> None:
        if state == self.state:
            return
        self.state, self.detail, self.state_since = state, detail, time.time()
        if state == "connected":
            log.info(
                "connected to %s%s",
                self.target,
                " (reconnected: clients re-send what was in flight)" if self.epoch else "",
            )
        elif state == "refused":
            why = self.refusal()
            now = time.monotonic()
            if now - self._refused_logged > 60.0:  # retried every few seconds: say it once a minute
                self._refused_logged = now
                log.error("%s", why)
            self.answer_waiting(why or "refused")
            self._retry_at = now + _REFUSED_RETRY
        elif state == "handshake-failed":
            why = self.refusal()
            log.error("%s", why)
            self.answer_waiting(why or "handshake failed")
        elif state in ("disconnected", "unreachable"):
            log.warning("%s is %s; holding data (bounded) until it is back", self.target, state)

    def refusal(self) -> str | None:
        if self.state == "refused":
            key = self.setup.curve[1].decode() if self.setup.curve else "?"
            return (
                f"{self.target} refused this node's CURVE key {key} ({self.detail}): authorize it on the head "
                f"with `kobo-daemon keys authorize -- '{key}'` (the node retries every {_REFUSED_RETRY:g}s)"
            )
        if self.state == "handshake-failed":
            return (
                f"no secure connection to {self.target}: the ZeroMQ handshake failed ({self.detail}); check that "
                "--head-key is what `kobo-daemon keys show` prints on the head, and that both sides agree on "
                "CURVE versus --insecure-plaintext"
            )
        return None

    def can_drain(self) -> bool:
        return self.state == "connected"

    # ------------------------------------------------------------ requests

    def intercept(self, ident: bytes, body: list[bytes], head: Head | None) -> bool:
        if head is None:
            return False
        env = m.Envelope(head.run, head.client, head.seq)
        if head.kind == m.ShutdownRequest.KIND:
            # `kobo-daemon stop` on this node stops this forwarder, never the head.
            self.reply(ident, m.Ack(env))
            self.on_shutdown()
            return True
        if head.kind == m.StatusRequest.KIND:
            self.reply(ident, m.StatusReply(env, self.daemon.status()))
            return True
        return False

    def request_sent(self, head: Head | None, body: list[bytes]) -> None:
        if head is None:
            return
        key = (head.run, head.client)
        if head.kind == m.FinishRun.KIND:
            c = self.clients.get(key)
            if c is not None:
                c.finishing = True
        elif head.kind == m.OpenRun.KIND or (head.kind == m.AckRequest.KIND and key not in self.clients):
            # Watched once the head confirms the attachment (see reply_received).
            try:
                req = codec.decode(body)
            except KoboError:
                return
            if getattr(req, "pid", 0):
                head.extra = _Client(head.run, head.client, head.rank, req.pid, req.pid_start, req.host)

    def _watch(self, c: _Client) -> None:
        key = (c.run, c.client)
        if len(self.clients) >= _MAX_TRACKED and key not in self.clients:
            if not self._tracking_full:
                self._tracking_full = True
                log.warning("watching %d clients: newer ones are not watched for crashes", _MAX_TRACKED)
            return
        old = self.clients.get(key)
        if old is not None:
            c.last_seq = max(c.last_seq, old.last_seq)
            if old.step >= 0:  # its calls seen here are newer than what the head had committed
                c.step, c.global_step = old.step, old.global_step
        self.clients[key] = c
        if old is None or (old.pid, old.pid_start) != (c.pid, c.pid_start):
            self._dirty = True

    def reply_received(self, request: Head | None, head: Head | None, body: list[bytes]) -> list[bytes]:
        if request is not None and head is not None:
            key = (request.run, request.client)
            if request.extra is not None and (
                (request.kind == m.OpenRun.KIND and head.kind == m.RunOpened.KIND)
                or (request.kind == m.AckRequest.KIND and head.kind == m.Acked.KIND)
            ):
                payload = head.fields[10] if len(head.fields) > 10 else None
                if head.kind == m.RunOpened.KIND and isinstance(payload, list) and len(payload) > 2:
                    last_step, last_global_step = payload[1], payload[2]  # where the client's rank stands
                    if type(last_step) is int and type(last_global_step) is int:
                        request.extra.step, request.extra.global_step = max(last_step, 0), last_global_step
                self._watch(request.extra)
            elif request.kind == m.FinishRun.KIND:
                if head.kind == m.Finished.KIND:
                    if self.clients.pop(key, None) is not None:
                        self._dirty = True
                elif key in self.clients:
                    self.clients[key].finishing = False
        if head is not None and head.kind in _DAEMON_FIELD:
            payload = head.fields[10] if len(head.fields) > 10 else None
            i = _DAEMON_FIELD[head.kind]
            if isinstance(payload, list) and len(payload) > i and isinstance(payload[i], str):
                payload[i] = self.tag(payload[i])
                body = [msgpack.packb(head.fields, use_bin_type=True), *body[1:]]
        return body

    def tag(self, head_instance: str) -> str:
        """The daemon id clients see: changes when the head, this forwarder or the connection restarts."""
        suffix = f".{self.epoch}" if self.epoch else ""
        return f"{head_instance}@{self.daemon.instance}{suffix}"

    def on_data(self, frames: list[Any]) -> None:
        if not self.clients:
            return
        head = peek(frames[0])
        if head is not None:
            c = self.clients.get((head.run, head.client))
            if c is not None and head.seq > c.last_seq:  # (not a re-send: those are older)
                c.last_seq = head.seq
                if head.kind in _STEP_KINDS:
                    step, global_step = head.fields[7], head.fields[8]
                    if type(step) is int and type(global_step) is int:
                        c.step, c.global_step = step, global_step

    # ---------------------------------------------------------- housekeeping

    def tick(self, now: float) -> None:
        if self._retry_at is not None and now >= self._retry_at:
            # libzmq gives up on a connection the head refused: try again with
            # fresh sockets (the key may have been authorized meanwhile).
            self._retry_at = None
            self._close_push()
            if self._reaper is not None:  # refused as well: libzmq gave up on it too
                self._unregister(self._reaper)
                self._reaper.close(linger=0)
                self._reaper = None
            self._close_sys_sock()
            self.state = "connecting"
            self._open_push()
        if now >= self._next_reap:
            self._next_reap = now + self.daemon.config.reap_interval
            self._reap(now)
        if self._dirty and now >= self._next_save:
            self._next_save = now + 0.5
            self._save_clients()
        if self._sys_inbox or self._sys_runs:
            self._sys_pass(now)

    def _reap(self, now: float) -> None:
        for c in list(self.clients.values()):
            if c.reap_id:
                if now > c.reap_deadline:
                    # No answer: the head (or the connection) restarted and lost
                    # the report.  Ask again; the report is kept on disk meanwhile.
                    self._report_crash(c, now)
                continue
            if c.finishing or not c.pid or c.host != _HOST or process_alive(c.pid, c.pid_start):
                continue
            if not c.dead_since:
                c.dead_since = now
            if now - c.dead_since < 2.0 and (
                self._pending is not None or self.down_pull.getsockopt(zmq.EVENTS) & zmq.POLLIN
            ):
                # Its last messages may still be here: first send them on (the
                # head waits a few seconds for what is in flight; a report never
                # waits on data only the dead client could re-send).
                continue
            self._report_crash(c, now)

    def _report_crash(self, c: _Client, now: float) -> None:
        if self._reaper is None:
            self._reaper = self._upstream_socket(zmq.DEALER, self.control_addr)
            self._register(self._reaper, zmq.POLLIN, self._on_reaper_reply)
        self._reap_id += 1
        env = m.Envelope(c.run, c.client, self._reap_id, c.rank, 0, 0, time.time())
        try:
            self._reaper.send_multipart(codec.encode(m.FinishRun(env, c.last_seq, "crashed")), zmq.NOBLOCK)
        except zmq.Again:
            return  # the head is not reachable: tried again on the next pass
        if not c.reports:
            log.warning("client pid %d of %s died without finishing: telling the head it crashed", c.pid, c.run)
        else:
            log.info("asking the head again to mark client pid %d of %s crashed", c.pid, c.run)
        c.reports += 1
        c.reap_id = self._reap_id
        c.reap_deadline = now + 10.0  # the head answers within ~5 s (its wait for in-flight data)

    def _on_reaper_reply(self) -> None:
        assert self._reaper is not None
        while True:
            try:
                body = self._reaper.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                reply = codec.decode(body)
            except KoboError:
                continue
            for key, c in list(self.clients.items()):
                if c.reap_id and c.reap_id == reply.env.seq:
                    del self.clients[key]
                    self._dirty = True
                    if isinstance(reply, m.ErrorReply):
                        log.warning("could not mark client pid %d of %s crashed: %s", c.pid, c.run, reply.message)
                    else:
                        self.reaped += 1
                        log.info("marked client pid %d of %s crashed", c.pid, c.run)

    def _load_clients(self) -> None:
        try:
            with open(self._state_path) as f:
                entries = json.load(f)
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            log.warning("cannot read the clients a previous forwarder watched (%s): %s", self._state_path, exc)
            return
        n = 0
        for e in entries if isinstance(entries, list) else []:
            try:
                c = _Client(
                    str(e["run"]),
                    str(e["client"]),
                    int(e["rank"]),
                    int(e["pid"]),
                    int(e["pid_start"]),
                    str(e["host"]),
                    int(e.get("last_seq", 0)),
                )
            except (KeyError, TypeError, ValueError):
                continue
            if c.host == _HOST and len(self.clients) < _MAX_TRACKED:
                self.clients[(c.run, c.client)] = c
                n += 1
        if n:
            log.info("watching %d client(s) a previous forwarder watched (dead ones are reported to the head)", n)

    def _save_clients(self) -> None:
        self._dirty = False
        entries = [
            {
                "run": c.run,
                "client": c.client,
                "rank": c.rank,
                "pid": c.pid,
                "pid_start": c.pid_start,
                "host": c.host,
                "last_seq": c.last_seq,
            }
            for c in self.clients.values()
        ]
        tmp = f"{self._state_path}.{os.getpid()}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                json.dump(entries, f)
            os.replace(tmp, self._state_path)
        except OSError as exc:
            log.warning("cannot save the watched clients to %s: %s", self._state_path, exc)

    def on_exit(self) -> None:
        if self._dirty:
            self._save_clients()
        self._close_sys_sock()
        for sock in (self._reaper, self._monitor):
            if sock is not None:
                self._unregister(sock)
                sock.close(linger=0)
        self._reaper = self._monitor = None

    def info(self) -> dict[str, Any]:
        out = super().info()
        out.update(
            head=self.setup.address,
            secure=self.setup.curve is not None,
            key=self.setup.curve[1].decode() if self.setup.curve else None,
            state=self.state,
            since=self.state_since,
            detail=self.detail,
            reconnections=self.epoch,
            clients=len(self.clients),
            reaped=self.reaped,
            system_metrics={
                "interval": self.daemon.config.system_metrics,
                **self.sys_stats,
                "held": sum(len(r.held) for r in list(self._sys_runs.values())),
            },
        )
        return out

    # ------------------------------------------------------- node samples

    def add_sample(self, wall: float, values: dict[str, float]) -> None:
        """Any thread: a sample of this node, sent on the relay thread's next pass."""
        self._sys_inbox.append((wall, values))

    def _sys_pass(self, now: float) -> None:
        """Take new samples into the runs with a live client here, (re-)send, ask what is durable."""
        while self._sys_inbox:
            wall, values = self._sys_inbox.popleft()
            self._sys_take(wall, values, now)
        if self.epoch != self._sys_epoch:
            # Reconnected: what was in flight (samples, questions) may be lost.
            # Send again what the head has not confirmed; it keeps each seq once.
            self._sys_epoch = self.epoch
            for r in self._sys_runs.values():
                r.unsent = len(r.held)
                r.asked = r.ask_at = 0.0
        for run, r in list(self._sys_runs.items()):
            if not r.held:
                if now - r.last_live > _IDLE_UPSTREAM:
                    del self._sys_runs[run]
                continue
            if now - r.last_live > _STALE_UPSTREAM:  # no live client for long, the head never confirmed
                del self._sys_runs[run]
                continue
            if self.state != "connected" or self.push is None:
                continue
            while r.unsent and self._pending is None:  # clients' data waiting for the socket goes first
                entry = r.held[len(r.held) - r.unsent]
                try:
                    self.push.send_multipart(entry.frames, zmq.NOBLOCK)
                except zmq.Again:
                    return  # the head is slow: the rest on a later pass
                r.unsent -= 1
                self.sys_stats["resent" if entry.sent else "sent"] += 1
                entry.sent = True
                if not r.asked and not r.ask_at:
                    r.ask_at = now + _SYS_ASK_AFTER  # the head writes within its flush interval (< 0.5 s)
            if len(r.held) > r.unsent and (
                (r.asked and now - r.asked > _SYS_ASK_TIMEOUT) or (not r.asked and r.ask_at and now >= r.ask_at)
            ):
                self._sys_ask(run, r, now)

    def _sys_take(self, wall: float, values: dict[str, float], now: float) -> None:
        self.sys_stats["samples"] += 1
        # Per run, the lowest-ranked live client of this node whose step is known.
        chosen: dict[str, _Client] = {}
        for c in self.clients.values():
            if c.host != _HOST or c.finishing or c.reap_id or c.dead_since or c.step < 0:
                continue
            best = chosen.get(c.run)
            if best is None or c.rank < best.rank:
                chosen[c.run] = c
        for run, c in chosen.items():
            r = self._sys_runs.get(run)
            if r is None:
                r = self._sys_runs[run] = _SysRun()
            r.last_live = now
            if len(r.held) >= _SYS_HELD:  # the head has not confirmed for long: leave this one out
                self.sys_stats["not_taken"] += 1
                continue
            seq = self._sys_seq[run] = self._sys_seq.get(run, 0) + 1
            env = m.Envelope(run, self.sys_client, seq, c.rank, c.step, c.global_step, wall)
            r.held.append(_SysSample(seq, codec.encode(m.LogMessage(env, dict(values)))))
            r.unsent += 1

    def _sys_ask(self, run: str, r: _SysRun, now: float) -> None:
        """Ask the head how far the samples of ``run`` are durable (``flush`` of seq 0: answered at once)."""
        if self._sys_sock is None:
            self._sys_sock = self._upstream_socket(zmq.DEALER, self.control_addr)
            self._register(self._sys_sock, zmq.POLLIN, self._on_sys_reply)
        self._sys_asks += 1
        env = m.Envelope(run, self.sys_client, self._sys_asks, 0, 0, 0, time.time())
        try:
            self._sys_sock.send_multipart(codec.encode(m.FlushRequest(env, 0)), zmq.NOBLOCK)
        except zmq.Again:
            r.ask_at = now + _SYS_ASK_AFTER
            return
        r.asked, r.ask_at = now, 0.0

    def _on_sys_reply(self) -> None:
        assert self._sys_sock is not None
        while True:
            try:
                body = self._sys_sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                reply = codec.decode(body)
            except KoboError:
                continue
            r = self._sys_runs.get(reply.env.run)
            if r is None:
                continue
            r.asked = 0.0
            if isinstance(reply, m.Flushed):
                while r.held and r.held[0].seq <= reply.durable_seq:
                    r.held.popleft()
                    r.unsent = min(r.unsent, len(r.held))
                    self.sys_stats["durable"] += 1
            elif isinstance(reply, m.ErrorReply):
                log.debug("system metrics of %s: the head answered %s", reply.env.run, reply.message)
            # Sent ones still unconfirmed: ask again a little later.
            r.ask_at = time.monotonic() + _SYS_ASK_AFTER if len(r.held) > r.unsent else 0.0

    def _close_sys_sock(self) -> None:
        if self._sys_sock is not None:
            self._unregister(self._sys_sock)
            self._sys_sock.close(linger=0)
            self._sys_sock = None
            soon = time.monotonic() + _SYS_ASK_AFTER
            for r in self._sys_runs.values():  # questions on it are lost: ask again
                r.asked = 0.0
                r.ask_at = soon if len(r.held) > r.unsent else 0.0


class Forwarder(Daemon):
    """``kobo-daemon run --forward tcp://HEAD:PORT``: a node daemon that writes nothing itself.

    It holds the endpoint lock and binds the IPC sockets like any daemon (so
    clients and ``kobo-daemon status``/``stop`` work unchanged) and relays
    everything to the head with a :class:`ForwardRelay`.
    """

    def __init__(self, config: DaemonConfig) -> None:
        super().__init__(config)
        self.relay: ForwardRelay | None = None

    def _bind(self) -> None:
        setup = forward_setup(self.config)  # raises before anything is bound
        if setup.curve is None:
            log.warning(
                "!!! forwarding to %s WITHOUT encryption or authentication (--insecure-plaintext): anyone on the "
                "network path can read and alter this node's runs !!!",
                setup.address,
            )
        super()._bind()
        self.relay = ForwardRelay(self, setup)

    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_stop_signal, sig)
        loop.add_signal_handler(signal.SIGHUP, self._on_sighup)
        relay = self.relay
        assert relay is not None
        relay.on_shutdown = lambda: loop.call_soon_threadsafe(self.request_stop)
        relay.start()
        curve = "CURVE" if relay.setup.curve is not None else "PLAINTEXT (--insecure-plaintext)"
        log.info("kobo-daemon %d on %s forwarding to %s (%s)", os.getpid(), self.ep, relay.setup.address, curve)
        self.ready = True
        _sd_notify("READY=1")
        sampling = None
        if self.config.system_metrics > 0:
            sampling = asyncio.create_task(self._sample_node(relay, self.config.system_metrics), name="system-metrics")
        while not self._stop.is_set():
            try:
                await asyncio.wait_for(self._stop.wait(), 0.5)
            except asyncio.TimeoutError:
                pass
            if not relay.alive():
                break
        self._stop.set()  # (also when the relay thread died: ends the sampling)
        if sampling is not None:
            await sampling
        _sd_notify("STOPPING=1")
        log.info("stopping: delivering what is held to the head (at most %.0fs)", relay.drain_timeout)
        await loop.run_in_executor(None, relay.stop)
        if relay.failure is not None:
            raise RuntimeError(f"the forwarding thread failed: {relay.failure!r}") from relay.failure
        log.info("kobo-daemon stopped")

    async def _sample_node(self, relay: ForwardRelay, interval: float) -> None:
        """Sample this node every ``interval`` seconds and hand the samples to the relay thread.

        As the writing daemon's ``_system_metrics`` (worker thread; never takes
        the forwarder down), but the relay thread decides which runs get them
        and delivers them to the head (module docstring, "Node samples").
        """
        from .sysmetrics import NodeSampler

        assert self._stop is not None
        loop = asyncio.get_running_loop()
        try:
            sampler = await loop.run_in_executor(None, NodeSampler, _HOST)
        except Exception as exc:
            log.error("system metrics disabled: %r", exc)
            return
        try:
            while not self._stop.is_set():
                try:
                    await asyncio.wait_for(self._stop.wait(), interval)
                except asyncio.TimeoutError:
                    pass
                values = await loop.run_in_executor(None, sampler.sample)  # every interval: rates cover it
                if values and not self._stop.is_set():
                    relay.add_sample(time.time(), values)
        finally:
            await loop.run_in_executor(None, sampler.close)

    def status(self) -> dict[str, Any]:
        relay = self.relay
        info = relay.info() if relay is not None else {}
        return {
            "pid": os.getpid(),
            "instance": self.instance,
            "endpoint": str(self.ep),
            "uptime": round(time.time() - self.started_at, 3),
            "received": info.get("received", 0),
            "rejected": {},
            "backlog_bytes": 0,
            "throttled": info.get("throttled", 0),
            "runs": [],
            "forward": info,
        }

    def _close_sockets(self) -> None:
        if self.relay is not None:
            self.relay.close()
        super()._close_sockets()
