"""A forwarding node's own system metrics: numbered, kept until the head has them durable, re-sent.

A forwarder samples its own node like a writing daemon does
(``--system-metrics``, :mod:`.sysmetrics`): the event loop takes the samples
(in a worker thread) and hands them to the relay thread (:meth:`NodeSamples.add`),
which sends each one as a ``log`` message of a client of its own
(``sys-<forwarder instance>``) for every run with a live client of this node,
on the same data socket as the clients' calls, at the rank and latest step of
the run's lowest-ranked client here.  Like a client's outbox
(``client/_outbox.py``), :class:`NodeSamples` numbers them per run, keeps what
it sent until the head says it is durable (a ``flush`` request for sequence
number 0, answered at once and attaching nothing) and sends it again after a
reconnection; the head stores each sequence number once.  The head samples
only runs with clients of its own host, so a forwarded node is sampled once,
by its forwarder.

Everything here runs on the relay thread (except :meth:`NodeSamples.add`).
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

import zmq

from ..protocol import codec
from ..protocol import messages as m
from .relay import IDLE_UPSTREAM, STALE_UPSTREAM, ControlLine

log = logging.getLogger("kohakuboard.daemon")

HELD = 64  # node samples of one run kept until the head has them durable (further ones are not taken)
ASK_AFTER = 1.0  # seconds after sending a node sample before asking the head whether it is durable
ASK_TIMEOUT = 10.0  # a question about durability unanswered this long is asked again


class _Sample:
    """One node sample for one run, encoded, kept until the head has it durable."""

    __slots__ = ("seq", "frames", "sent")

    def __init__(self, seq: int, frames: list[bytes]) -> None:
        self.seq = seq
        self.frames = frames
        self.sent = False


class _Run:
    """The node samples of one run not yet confirmed durable by the head."""

    __slots__ = ("held", "unsent", "asked", "ask_at", "last_live")

    def __init__(self) -> None:
        self.held: collections.deque[_Sample] = collections.deque()  # in seq order
        self.unsent = 0  # the last ``unsent`` of ``held`` are still to be sent (again)
        self.asked = 0.0  # when the outstanding durability question went out (0: none)
        self.ask_at = 0.0  # when to ask next (0: nothing sent to ask about)
        self.last_live = 0.0  # when the run last had a live client here


class NodeSamples:
    """The samples of this node on their way to the head.

    ``open_socket(handler)`` makes an upstream control ``DEALER`` whose
    replies call ``handler`` (on the relay thread); ``close_socket`` undoes it.
    """

    def __init__(
        self,
        client: str,
        open_socket: Callable[[Callable[[], None]], zmq.Socket[Any]],
        close_socket: Callable[[zmq.Socket[Any]], None],
    ) -> None:
        self.client = client  # "sys-<forwarder instance>"
        self._line = ControlLine(open_socket, close_socket, self._on_reply)
        self._inbox: collections.deque[tuple[float, dict[str, float]]] = collections.deque(maxlen=8)
        self._runs: dict[str, _Run] = {}
        self._seq: dict[str, int] = {}  # kept while the forwarder lives: a reopened run continues its numbers
        self._epoch = 0
        self._asks = 0
        self.stats = {"samples": 0, "sent": 0, "resent": 0, "durable": 0, "not_taken": 0}

    def add(self, wall: float, values: dict[str, float]) -> None:
        """Any thread: a sample of this node, taken on the relay thread's next pass."""
        self._inbox.append((wall, values))

    def busy(self) -> bool:
        """Samples are waiting to be taken, or runs hold samples."""
        return bool(self._inbox or self._runs)

    def held(self) -> int:
        return sum(len(r.held) for r in list(self._runs.values()))

    def step(
        self, now: float, epoch: int, clients: Iterable[Any], push: zmq.Socket[Any] | None, data_waiting: bool
    ) -> None:
        """Take new samples into the runs with a live client here, (re-)send, ask what is durable.

        ``epoch``: the relay's reconnection count (a change means what was in
        flight may be lost); ``clients``: the watched clients of this node;
        ``push``: the upstream data socket while connected, else None;
        ``data_waiting``: a client's message waits for that socket (it goes first).
        """
        while self._inbox:
            wall, values = self._inbox.popleft()
            self._take(wall, values, now, clients)
        if epoch != self._epoch:
            # Reconnected: what was in flight (samples, questions) may be lost.
            # Send again what the head has not confirmed; it keeps each seq once.
            self._epoch = epoch
            for r in self._runs.values():
                r.unsent = len(r.held)
                r.asked = r.ask_at = 0.0
        for run, r in list(self._runs.items()):
            if not r.held:
                if now - r.last_live > IDLE_UPSTREAM:
                    del self._runs[run]
                continue
            if now - r.last_live > STALE_UPSTREAM:  # no live client for long, the head never confirmed
                del self._runs[run]
                continue
            if push is None:
                continue
            while r.unsent and not data_waiting:  # clients' data waiting for the socket goes first
                entry = r.held[len(r.held) - r.unsent]
                try:
                    push.send_multipart(entry.frames, zmq.NOBLOCK)
                except zmq.Again:
                    return  # the head is slow: the rest on a later pass
                r.unsent -= 1
                self.stats["resent" if entry.sent else "sent"] += 1
                entry.sent = True
                if not r.asked and not r.ask_at:
                    r.ask_at = now + ASK_AFTER  # the head writes within its flush interval (< 0.5 s)
            if len(r.held) > r.unsent and (
                (r.asked and now - r.asked > ASK_TIMEOUT) or (not r.asked and r.ask_at and now >= r.ask_at)
            ):
                self._ask(run, r, now)

    def _take(self, wall: float, values: dict[str, float], now: float, clients: Iterable[Any]) -> None:
        self.stats["samples"] += 1
        # Per run, the lowest-ranked live client of this node whose step is known.
        chosen: dict[str, Any] = {}
        for c in clients:
            if c.finishing or c.reap_id or c.dead_since or c.step < 0:
                continue
            best = chosen.get(c.run)
            if best is None or c.rank < best.rank:
                chosen[c.run] = c
        for run, c in chosen.items():
            r = self._runs.get(run)
            if r is None:
                r = self._runs[run] = _Run()
            r.last_live = now
            if len(r.held) >= HELD:  # the head has not confirmed for long: leave this one out
                self.stats["not_taken"] += 1
                continue
            seq = self._seq[run] = self._seq.get(run, 0) + 1
            env = m.Envelope(run, self.client, seq, c.rank, c.step, c.global_step, wall)
            r.held.append(_Sample(seq, codec.encode(m.LogMessage(env, dict(values)))))
            r.unsent += 1

    def _ask(self, run: str, r: _Run, now: float) -> None:
        """Ask the head how far the samples of ``run`` are durable (``flush`` of seq 0: answered at once)."""
        self._asks += 1
        env = m.Envelope(run, self.client, self._asks, 0, 0, 0, time.time())
        if not self._line.send(m.FlushRequest(env, 0)):
            r.ask_at = now + ASK_AFTER
            return
        r.asked, r.ask_at = now, 0.0

    def _on_reply(self, reply: Any) -> None:
        r = self._runs.get(reply.env.run)
        if r is None:
            return
        r.asked = 0.0
        if isinstance(reply, m.Flushed):
            while r.held and r.held[0].seq <= reply.durable_seq:
                r.held.popleft()
                r.unsent = min(r.unsent, len(r.held))
                self.stats["durable"] += 1
        elif isinstance(reply, m.ErrorReply):
            log.debug("system metrics of %s: the head answered %s", reply.env.run, reply.message)
        # Sent ones still unconfirmed: ask again a little later.
        r.ask_at = time.monotonic() + ASK_AFTER if len(r.held) > r.unsent else 0.0

    def close_socket(self) -> None:
        """Close the question socket (the head refused us, or the relay stops); questions on it are lost."""
        if self._line.close():
            soon = time.monotonic() + ASK_AFTER
            for r in self._runs.values():  # questions on it are lost: ask again
                r.asked = 0.0
                r.ask_at = soon if len(r.held) > r.unsent else 0.0
