"""The relay core: moving messages between a downstream and an upstream daemon, on a thread.

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
sockets live in a context of their own.  It keeps nothing once it is passed
on: what the clients sent and the daemon did not make durable, the clients
send again (their outbox, ``client/_outbox.py``).

Two relays exist, each a :class:`Relay` with its hooks filled in:

* the forwarding node's (:class:`~.forward.ForwardRelay`): downstream are the
  node's IPC sockets, upstream the head's TCP sockets, with CURVE client keys;
* the head's TCP listener's (:mod:`.listen`): downstream are the TCP sockets
  (CURVE server), upstream the head's own IPC sockets, so remote messages go
  through exactly the code local ones go through.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import msgpack
import zmq

from ..protocol import codec
from ..protocol import messages as m
from ..protocol.errors import DaemonUnavailable, KoboError, code_for

log = logging.getLogger("kohakuboard.daemon")

TICK = 0.1  # seconds between housekeeping passes of the relay thread
IDLE_UPSTREAM = 60.0  # an upstream DEALER unused this long (nothing waiting) is closed
STALE_UPSTREAM = 600.0  # ... and one unused this long is closed even with requests waiting
_MAX_WAITING = 256  # requests of one client waiting for the upstream's answer
_DATA_HWM = 16  # messages queued in zmq per data socket (a message can be ~1 MB)


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


class ControlLine:
    """A control ``DEALER`` to the upstream daemon for requests of the relay's own (crash reports,
    node samples; not a client's), opened at first use.

    ``open_socket(handler)`` makes the socket and has ``handler`` called (on the relay thread)
    when it is readable; ``close_socket`` undoes it.  Replies reach ``on_reply`` decoded; one
    that does not decode is skipped.
    """

    def __init__(
        self,
        open_socket: Callable[[Callable[[], None]], zmq.Socket[Any]],
        close_socket: Callable[[zmq.Socket[Any]], None],
        on_reply: Callable[[Any], None],
    ) -> None:
        self._open_socket = open_socket
        self._close_socket = close_socket
        self._on_reply = on_reply
        self._sock: zmq.Socket[Any] | None = None

    def send(self, msg: Any) -> bool:
        """Send ``msg`` without blocking; False when the socket did not take it (upstream unreachable)."""
        if self._sock is None:
            self._sock = self._open_socket(self._readable)
        try:
            self._sock.send_multipart(codec.encode(msg), zmq.NOBLOCK)
        except zmq.Again:
            return False
        return True

    def _readable(self) -> None:
        assert self._sock is not None
        while True:
            try:
                body = self._sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                reply = codec.decode(body)
            except KoboError:
                continue
            self._on_reply(reply)

    def close(self) -> bool:
        """Close the socket (requests on it are lost); whether it was open."""
        if self._sock is None:
            return False
        self._close_socket(self._sock)
        self._sock = None
        return True


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
                events = dict(self._poller.poll(0 if self._more else int(TICK * 1000)))
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
                    next_tick = now + TICK
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
            if self._pending is None and not cast(int, self.down_pull.getsockopt(zmq.EVENTS)) & zmq.POLLIN:
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
            if idle > STALE_UPSTREAM or (idle > IDLE_UPSTREAM and not up.waiting):
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
