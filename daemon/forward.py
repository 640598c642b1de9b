"""The forwarding node daemon (``kobo-daemon run --forward tcp://HEAD:PORT``).

A :class:`Forwarder` is a plain :class:`~.server.Daemon` (endpoint lock, IPC
sockets, signals, instance id) running a different service: instead of
writing, a :class:`ForwardRelay` (a :class:`~.relay.Relay`, on a thread of its
own) moves everything from the node's IPC sockets to the head's TCP sockets,
with CURVE client keys.  It answers ``status`` and ``shutdown`` itself
(``kobo-daemon stop`` on a node stops that node's forwarder, never the head),
tags the daemon instance id in replies (see below), reports clients of this
node that died without finishing, and delivers this node's own system
metrics (:mod:`.node_samples`).

Instance ids.  A client re-sends what is not acknowledged as durable when the
``daemon`` id in a reply changes (a restarted daemon).  Through a forwarder,
messages can also be lost between the node and the head while the head keeps
running: the forwarder restarted, or the TCP connection broke with messages
in flight.  So the forwarder replaces the id in replies with
``<head id>@<forwarder instance>[.<reconnections>]``: after either event the
clients see a new id and re-send, and the head stores each call once.

Dead clients.  Only the node that ran a client can tell that its process died;
the forwarder watches the clients attached through it and reports the ones
that die without finishing to the head (:mod:`.crash_reports`).

Node samples.  The forwarder samples its own node and delivers the samples to
the head as the calls of a client of its own, kept until durable and re-sent
after a reconnection (:mod:`.node_samples`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import msgpack
import zmq

from ..protocol import codec
from ..protocol import messages as m
from ..protocol.errors import KoboError
from .config import DaemonConfig
from .crash_reports import HOST, Client, CrashReports
from .node_samples import NodeSamples
from .relay import Head, Relay, RelaySetupError, peek, tcp_pair
from .server import Daemon, sd_notify

log = logging.getLogger("kohakuboard.daemon")

_REFUSED_RETRY = 5.0  # seconds between connection attempts after the head refused our key

# Reply kinds that carry the daemon instance id, and its index in their payload.
_DAEMON_FIELD: dict[str, int] = {}
for _cls in m.ALL_MESSAGES:
    _names = [f.name for f in dataclasses.fields(_cls) if f.name != "env"]
    if "daemon" in _names:
        _DAEMON_FIELD[_cls.KIND] = _names.index("daemon")


# ------------------------------------------------------------- forwarding node


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

    def __init__(self, forwarder: Forwarder, setup: ForwardSetup) -> None:
        node = forwarder.daemon  # its IPC sockets, endpoint and instance id
        super().__init__(
            node.pull,
            node.router,
            setup.data_addr,
            setup.control_addr,
            f"the head kobo-daemon at {setup.address}",
        )
        self.forwarder = forwarder
        self.instance = node.instance
        self.config = forwarder.config
        self.setup = setup
        self.drain_timeout = min(5.0, self.config.graceful_timeout)
        self.on_shutdown: Callable[[], object] = lambda: None  # what it returns is ignored
        self.state = "connecting"
        self.state_since = time.time()
        self.detail = ""
        self.epoch = 0
        self._connected_once = False
        self._retry_at: float | None = None
        self._refused_logged = -1e9
        self._monitor: zmq.Socket[Any] | None = None
        self._monitors = 0
        # The clients of this node, watched for crashes (crash_reports.py), kept
        # in a file beside the endpoint.
        self.crashes = CrashReports(node.ep.base + ".clients.json", self._open_control, self._close_control)
        self._next_reap = 0.0
        # This node's samples (node_samples.py): handed over by the event loop
        # (add_sample), sent as the data of a client of our own.
        self.samples = NodeSamples("sys-" + node.instance, self._open_control, self._close_control)

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
            self.reply(ident, m.StatusReply(env, self.forwarder.status()))
            return True
        return False

    def request_sent(self, head: Head | None, body: list[bytes]) -> None:
        if head is None:
            return
        key = (head.run, head.client)
        if head.kind == m.FinishRun.KIND:
            self.crashes.finishing(key, True)
        elif head.kind == m.OpenRun.KIND or (head.kind == m.AckRequest.KIND and key not in self.crashes.clients):
            # Watched once the head confirms the attachment (see reply_received).
            try:
                req = codec.decode(body)
            except KoboError:
                return
            if getattr(req, "pid", 0):
                head.extra = Client(head.run, head.client, head.rank, req.pid, req.pid_start, req.host)

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
                self.crashes.watch(request.extra)
            elif request.kind == m.FinishRun.KIND:
                if head.kind == m.Finished.KIND:
                    self.crashes.finished(key)
                else:
                    self.crashes.finishing(key, False)
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
        return f"{head_instance}@{self.instance}{suffix}"

    def on_data(self, frames: list[Any]) -> None:
        if not self.crashes.clients:
            return
        head = peek(frames[0])
        if head is not None:
            self.crashes.seen(head.run, head.client, head.seq, head.kind, head.fields)

    # ---------------------------------------------------------- housekeeping

    def tick(self, now: float) -> None:
        if self._retry_at is not None and now >= self._retry_at:
            # libzmq gives up on a connection the head refused: try again with
            # fresh sockets (the key may have been authorized meanwhile).
            self._retry_at = None
            self._close_push()
            self.crashes.close_socket()  # refused as well: libzmq gave up on it too
            self.samples.close_socket()
            self.state = "connecting"
            self._open_push()
        if now >= self._next_reap:
            self._next_reap = now + self.config.reap_interval
            self.crashes.reap(now, self._data_waiting)
        self.crashes.save_if_changed(now)
        if self.samples.busy():
            self._pass_samples(now)

    def _data_waiting(self) -> bool:
        """Messages of the node's clients wait to go upstream (held here, or in the IPC socket)."""
        return self._pending is not None or bool(cast(int, self.down_pull.getsockopt(zmq.EVENTS)) & zmq.POLLIN)

    def on_exit(self) -> None:
        self.crashes.close()
        self.samples.close_socket()
        if self._monitor is not None:
            self._unregister(self._monitor)
            self._monitor.close(linger=0)
            self._monitor = None

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
            clients=len(self.crashes.clients),
            reaped=self.crashes.reaped,
            system_metrics={
                "interval": self.config.system_metrics,
                **self.samples.stats,
                "held": self.samples.held(),
            },
        )
        return out

    # ------------------------------------------------------- node samples

    def add_sample(self, wall: float, values: dict[str, float]) -> None:
        """Any thread: a sample of this node, sent on the relay thread's next pass."""
        self.samples.add(wall, values)

    def _pass_samples(self, now: float) -> None:
        connected = self.state == "connected" and self.push is not None
        here = self.crashes.live_here()
        self.samples.step(now, self.epoch, here, self.push if connected else None, self._pending is not None)

    def _open_control(self, handler: Callable[[], None]) -> zmq.Socket[Any]:
        sock = self._upstream_socket(zmq.DEALER, self.control_addr)
        self._register(sock, zmq.POLLIN, handler)
        return sock

    def _close_control(self, sock: zmq.Socket[Any]) -> None:
        self._unregister(sock)
        sock.close(linger=0)


class Forwarder:
    """``kobo-daemon run --forward tcp://HEAD:PORT``: a node daemon that writes nothing itself.

    Composed from a plain :class:`~.server.Daemon`, which holds the endpoint
    lock, binds the IPC sockets (so clients and ``kobo-daemon status``/``stop``
    work unchanged), answers signals and names the instance; the forwarder is
    the service that daemon runs (``Daemon.run(service)``): instead of the
    daemon's own loops, a :class:`ForwardRelay` relays everything to the head.
    """

    def __init__(self, config: DaemonConfig) -> None:
        self.config = config
        self.daemon = Daemon(config)
        self.setup: ForwardSetup | None = None
        self.relay: ForwardRelay | None = None

    def run(self) -> int:
        """Serve until stopped; return the process exit code."""
        return self.daemon.run(self)

    # ----------------------------------------------- Daemon.run's service

    def prepare(self) -> None:
        """Before the IPC sockets are bound: check ``--forward`` and load the keys (raises KoboError)."""
        setup = self.setup = forward_setup(self.config)
        if setup.curve is None:
            log.warning(
                "!!! forwarding to %s WITHOUT encryption or authentication (--insecure-plaintext): anyone on the "
                "network path can read and alter this node's runs !!!",
                setup.address,
            )

    def bound(self) -> None:
        """The daemon's IPC sockets are bound: the relay takes them over."""
        assert self.setup is not None
        self.relay = ForwardRelay(self, self.setup)

    async def serve(self) -> None:
        daemon = self.daemon
        loop = asyncio.get_running_loop()
        stop = daemon.handle_signals()
        relay = self.relay
        assert relay is not None
        relay.on_shutdown = lambda: loop.call_soon_threadsafe(daemon.request_stop)
        relay.start()
        curve = "CURVE" if relay.setup.curve is not None else "PLAINTEXT (--insecure-plaintext)"
        log.info("kobo-daemon %d on %s forwarding to %s (%s)", os.getpid(), daemon.ep, relay.setup.address, curve)
        daemon.ready = True
        sd_notify("READY=1")
        sampling = None
        if self.config.system_metrics > 0:
            sampling = asyncio.create_task(
                self._sample_node(relay, stop, self.config.system_metrics), name="system-metrics"
            )
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), 0.5)
            except asyncio.TimeoutError:
                pass
            if not relay.alive():
                break
        stop.set()  # (also when the relay thread died: ends the sampling)
        if sampling is not None:
            await sampling
        sd_notify("STOPPING=1")
        log.info("stopping: delivering what is held to the head (at most %.0fs)", relay.drain_timeout)
        await loop.run_in_executor(None, relay.stop)
        if relay.failure is not None:
            raise RuntimeError(f"the forwarding thread failed: {relay.failure!r}") from relay.failure
        log.info("kobo-daemon stopped")

    def close(self) -> None:
        """Before the daemon closes its sockets: stop the relay and release its upstream sockets."""
        if self.relay is not None:
            self.relay.close()

    # ------------------------------------------------------------------

    async def _sample_node(self, relay: ForwardRelay, stop: asyncio.Event, interval: float) -> None:
        """Sample this node every ``interval`` seconds and hand the samples to the relay thread.

        As the writing daemon's ``_system_metrics`` (worker thread; never takes
        the forwarder down), but the relay thread decides which runs get them
        and delivers them to the head (:mod:`.node_samples`).
        """
        from .sysmetrics import NodeSampler

        loop = asyncio.get_running_loop()
        try:
            sampler = await loop.run_in_executor(None, NodeSampler, HOST)
        except Exception as exc:
            log.error("system metrics disabled: %r", exc)
            return
        try:
            while not stop.is_set():
                try:
                    await asyncio.wait_for(stop.wait(), interval)
                except asyncio.TimeoutError:
                    pass
                values = await loop.run_in_executor(None, sampler.sample)  # every interval: rates cover it
                if values and not stop.is_set():
                    relay.add_sample(time.time(), values)
        finally:
            await loop.run_in_executor(None, sampler.close)

    def status(self) -> dict[str, Any]:
        relay = self.relay
        daemon = self.daemon
        info = relay.info() if relay is not None else {}
        return {
            "pid": os.getpid(),
            "instance": daemon.instance,
            "endpoint": str(daemon.ep),
            "uptime": round(time.time() - daemon.started_at, 3),
            "received": info.get("received", 0),
            "rejected": {},
            "backlog_bytes": 0,
            "throttled": info.get("throttled", 0),
            "runs": [],
            "forward": info,
        }
