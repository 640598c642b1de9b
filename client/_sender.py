"""The sender thread: moves the outbox's messages through the client's data socket.

``log()`` only numbers a call and puts it in the outbox (a deque append,
well under the 5 us ``log()`` budget; encoding and sending in the caller would
cost more).  This thread, ``kohakuboard-sender``, owns the client's data
``PUSH`` socket and an acknowledgement ``DEALER`` of its own: on every turn it
hands the acknowledgement replies to the outbox, lets the outbox send what is
due (:meth:`~._outbox.Outbox.pump`: re-sends first, then new calls, encoded
on this thread by :mod:`._encoding`), sends the acknowledgement request the
outbox asks for, lets :mod:`._revival` start a new daemon when the old one is
gone, and then waits for the socket, an answer or new calls.  What is
acknowledged, what is re-sent and why is the outbox's business alone.

zmq is imported here, and this module is imported only when the first Board
connects.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import zmq

from ..protocol.endpoint import Endpoint
from ._outbox import BLOCKED, STOP, STOPPING, Outbox
from ._revival import Revival


class Sender(threading.Thread):
    """Sends one outbox's messages to the daemon of ``ep`` until stopped."""

    def __init__(self, ctx: zmq.Context[Any], ep: Endpoint, outbox: Outbox, revival: Revival) -> None:
        super().__init__(name="kohakuboard-sender", daemon=True)
        self._ctx = ctx
        self._ep = ep
        self.outbox = outbox
        self.revival = revival
        self.error: BaseException | None = None  # what stopped the thread
        self._abort = False

    def stop(self, timeout: float) -> bool:
        """End the thread after sending what is queued; False if it could not in time."""
        out = self.outbox
        out.queue.append(STOP)
        out.wake.set()
        self.join(timeout)
        if self.is_alive():
            self._abort = True
            out.close()  # a log() blocked at the bound returns
            self.join(1.0)
            return False
        return True

    def run(self) -> None:
        push = self._ctx.socket(zmq.PUSH)
        push.setsockopt(zmq.LINGER, 0)
        # Few messages in zmq's own queue: a LogBatch or an array can be large,
        # and what waits beyond this waits in the outbox, where it is counted.
        push.setsockopt(zmq.SNDHWM, 16)
        # Queue only on a live connection: what is sent while the daemon is down
        # waits in the outbox (counted, bounded) instead of in a pipe that a dead
        # daemon's successor would receive and the replay would send again.
        push.setsockopt(zmq.IMMEDIATE, 1)
        push.connect(self._ep.data_addr)
        ack = self._ctx.socket(zmq.DEALER)
        ack.setsockopt(zmq.LINGER, 0)
        ack.setsockopt(zmq.SNDHWM, 8)
        ack.setsockopt(zmq.IMMEDIATE, 1)
        ack.connect(self._ep.control_addr)
        monitor = ack.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        both = zmq.Poller()
        both.register(push, zmq.POLLOUT)
        both.register(ack, zmq.POLLIN)
        error = None
        try:
            self._loop(push, ack, both, monitor)
        except BaseException as exc:  # pragma: no cover - reported by flush()/finish()
            self.error = error = exc
        finally:
            try:
                ack.disable_monitor()
            except zmq.ZMQError:
                pass
            monitor.close(linger=0)
            push.close(linger=0)
            ack.close(linger=0)
            self.outbox.close(error)

    def _loop(self, push: zmq.Socket[Any], ack: zmq.Socket[Any], both: zmq.Poller, monitor: zmq.Socket[Any]) -> None:
        out = self.outbox

        def send(frames: list[Any]) -> bool:
            try:
                push.send_multipart(frames, zmq.NOBLOCK, copy=False)
                return True
            except zmq.Again:
                return False

        while True:
            if self._abort:
                return
            if _drained(monitor):
                out.connection_lost()
                self.revival.connection_lost()
            while True:
                try:
                    frames = ack.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                out.on_reply(frames)
            state = out.pump(send)
            if state == STOPPING:
                return
            blocked = state == BLOCKED
            now = time.monotonic()
            waiting = out.waiting(now)
            if waiting:
                self.revival.check(now)
                request = out.ack_request(now)
                if request is not None:
                    frames, sync = request
                    try:
                        ack.send_multipart(frames, zmq.NOBLOCK)
                        taken = True
                    except zmq.Again:
                        taken = False
                    out.ack_sent(now, sync, taken)
            if out.hold:
                ack.poll(20)  # the answer of a daemon (old or new) releases the hold
            elif blocked:
                both.poll(20)
            elif out.has_sendable():
                continue
            elif out.flush_waiting():
                ack.poll(5)  # a flush()/finish() waits on the answer
            else:
                # Answers are picked up within 10 ms when one is wanted; a new log() call wakes us at once.
                out.idle = True
                if not out.queue:
                    out.wake.wait(0.01 if waiting else 0.5)
                out.wake.clear()
                out.idle = False


def _drained(monitor: zmq.Socket[Any]) -> bool:
    """Read every event of the acknowledgement socket's monitor; True if there was one (a disconnection)."""
    seen = False
    while True:
        try:
            monitor.recv_multipart(zmq.NOBLOCK)
        except zmq.Again:
            return seen
        seen = True
