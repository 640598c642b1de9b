"""The client's outbox: numbers calls, keeps them until durable, re-sends after a daemon restart.

This is the client's half of the delivery protocol (``docs/delivery.md``); it
is the only client code that knows about sequence numbers, acknowledgements
and replay.  Every call of one client gets the next sequence number
(:meth:`Outbox.put_scalars`, :meth:`~Outbox.put_log`, :meth:`~Outbox.put_output`,
in the caller's thread under the Board's lock) and stays here until the daemon
says it is durable:

* ``queue``: calls not yet encoded (scalar tuples, ``LogMessage``,
  ``OutputMessage``, :class:`~._encoding.Drop` markers);
* ``unacked``: every message encoded from them, as an :class:`Entry`
  ``(first, last, frames, calls)``, from the moment it is encoded until the
  daemon acknowledges ``last`` as durable.

The sender thread (:mod:`._sender`) moves calls from one to the other and out
of the socket (:meth:`Outbox.pump`), sends the acknowledgement requests the
outbox asks for (:meth:`~Outbox.ack_request`) and hands the replies back
(:meth:`~Outbox.on_reply`).  When a reply names a different daemon instance
(the daemon was killed and restarted, or a forwarder or its link to the head
restarted), everything not acknowledged is sent again, in order, before
anything new; the daemon drops what it already has, so each call is stored
exactly once.  While the acknowledgement socket has lost its connection
(:meth:`~Outbox.connection_lost`), new data is held back until a daemon
answers, so that a restarted daemon gets the re-sent messages first.

Bounded memory: queued plus unacknowledged data is at most
``max_inflight_bytes`` (and the queue at most ``max_queue`` calls).  At 80 %
one warning goes to the ``kohakuboard`` logger; at 100 % the policy applies:
``block`` makes ``log()`` wait, ``drop`` discards the newest calls and queues
their count, in sequence order, as a ``DropReport``.

``flush()`` and ``finish()`` wait for durability through one path,
:meth:`Outbox.flush`: first asked directly on the Board's control socket (one
thread hop less), then, if that does not settle it, by making the sender
thread ask with a wait until the last call is acknowledged.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable
from typing import Any

from ..protocol import codec
from ..protocol import messages as m
from ..protocol.endpoint import Endpoint
from ..protocol.errors import (
    DaemonUnavailable,
    KoboError,
    KoboTimeoutError,
    ProtocolError,
    TransportError,
    error_from_code,
)
from ._encoding import Drop, EncodeError, Encoder, item_bytes, seq_and_values
from ._notices import warn

STOP = object()  # queued by the sender's stop(): the sender thread ends when it reaches it
_ACK_INTERVAL = 0.1  # seconds between acknowledgement requests while data is unacknowledged
_ACK_RETRY = 0.5  # an acknowledgement request unanswered this long is asked again (duplicates are harmless)
_KEEPALIVE = 30.0  # an idle client asks at least this often, so that the daemon (and a head) hear from it
_SYNC_WAIT_MS = 300  # how long the daemon may hold an acknowledgement request a flush waits on
_FAST_WAIT = 2.0  # the longest flush()'s direct request asks the daemon to wait

# What Outbox.pump found (the sender thread chooses how to wait from it).
SENT = 0  # everything sendable went out
BLOCKED = 1  # the socket could not take the next message, or new data is held back
STOPPING = 2  # the stop marker was reached: the sender thread ends


class Entry:
    """One encoded message kept until acknowledged: seqs ``first..last``, its frames."""

    __slots__ = ("first", "last", "frames", "nbytes", "calls")

    def __init__(self, first: int, last: int, frames: list[Any], calls: int) -> None:
        self.first = first
        self.last = last
        self.frames = frames
        self.nbytes = sum(len(f) for f in frames)
        self.calls = calls


class Outbox:
    """The calls of one client of one run, from their numbering until the daemon has them durable.

    Thread use: ``put_*``, :meth:`flush_drops` run in the caller's thread under
    the Board's lock; :meth:`flush`, :meth:`note_durable`,
    :meth:`unwritten_calls` in any thread; everything else in the sender thread.
    """

    def __init__(
        self,
        ep: Endpoint,
        encoder: Encoder,
        max_queue: int,
        *,
        max_inflight_bytes: int = 64 << 20,
        policy: str = "block",
        daemon_id: str | None = None,
        peer: tuple[int, int, str] = (0, 0, ""),
        request: Callable[..., Any] | None = None,
    ) -> None:
        self.ep = ep
        self.encoder = encoder
        self.peer = peer  # (pid, process start ticks, host) sent with acknowledgement requests
        self._request = request  # the Board's control connection (Connection.request), for flush()
        self.seq = 0  # the last sequence number given out
        self.max_queue = max_queue
        self.limit = max_inflight_bytes
        self._soft_bytes = int(max_inflight_bytes * 0.8)  # the 80 % warning threshold
        self._soft_count = int(max_queue * 0.8)
        self.policy = policy
        self.queue: collections.deque[Any] = collections.deque()
        self.wake = threading.Event()  # set when the idle sender thread has something to do
        self.idle = False  # the sender thread waits on ``wake``
        self.closed = False  # the sender thread has ended (or was given up on): nothing more goes out
        self.sender_error: BaseException | None = None  # what ended the sender thread
        # Bytes: put_bytes grows in the caller (under the Board's lock),
        # taken_bytes in the sender thread; their difference is what is queued.
        self.put_bytes = 0
        self.taken_bytes = 0
        self.unacked: collections.deque[Entry] = collections.deque()
        self.unacked_bytes = 0
        self.unacked_calls = 0
        self.sent_seq = 0
        self.acked_seq = 0
        self.peak = 0
        self._warned = False
        self._warned_full = False
        self.dropped_calls = 0
        self.dropped_values = 0
        self.dropped_lines = 0
        self._drop: Drop | None = None
        self.encode_errors = 0
        # the first call that could not be encoded since flush() last reported one: (seq, error)
        self.encode_error: tuple[int, BaseException] | None = None
        self.storage_error: tuple[int, str] | None = None
        self.daemon_down = False  # no daemon process answers (set by the sender's revival check)
        self.revive_error: BaseException | None = None  # why starting a new one failed
        self.replays = 0
        self.replayed_calls = 0
        self._daemon_id = daemon_id or None
        self._cond = threading.Condition()
        self._want = 0  # a flush()/finish() or a blocked log() waits for this seq to be durable
        self._replies = 0
        self._resend: collections.deque[Entry] = collections.deque()
        # The daemon's connection dropped (it died or restarts): no new data is
        # sent until a daemon answers, so that a restarted daemon gets the
        # re-sent messages before newer ones instead of parking megabytes of
        # newer ones in front of a gap (RunWriter._in_sequence).
        self.hold = False
        self._current: Entry | None = None
        self._query_id = 0
        self._query_at: float | None = None
        self._query_sync = False
        self.unanswered_since: float | None = None  # since when the daemon has not answered (None: it answers)
        self._next_query = 0.0
        self._keepalive_at = time.monotonic() + _KEEPALIVE

    # ---------------------------------------------- caller thread: numbering

    def put_scalars(self, step: int, global_step: int, scalars: dict[str, float]) -> None:
        """Number and queue one scalar ``log()`` call (caller thread, under the Board's lock)."""
        self.seq = seq = self.seq + 1
        item = (seq, step, global_step, time.time(), scalars)
        nbytes = 200 + 60 * len(scalars)
        q = self.queue
        if (
            self.put_bytes - self.taken_bytes + self.unacked_bytes + nbytes > self._soft_bytes
            or len(q) >= self._soft_count
        ) and not self._pressure(item, nbytes):
            return
        # (_queue, inlined: this is every scalar log() call)
        if self._drop is not None:
            q.append(self._drop)
            self._drop = None
        self.put_bytes += nbytes
        q.append(item)
        if self.idle:
            self.wake.set()

    def put_log(
        self, step: int, global_step: int, scalars: dict[str, float], items: list[Any], blobs: list[Any]
    ) -> None:
        """Number and queue one ``log()`` call with rich values (caller thread, under the Board's lock)."""
        self.seq = seq = self.seq + 1
        self._put(m.LogMessage(self._env(seq, step, global_step), scalars, items, blobs))

    def put_output(self, step: int, global_step: int, stream: str, text: str) -> None:
        """Number and queue captured output (caller thread, under the Board's lock)."""
        self.seq = seq = self.seq + 1
        self._put(m.OutputMessage(self._env(seq, step, global_step), stream, text))

    def _env(self, seq: int, step: int, global_step: int) -> m.Envelope:
        e = self.encoder
        return m.Envelope(e.run, e.client, seq, e.rank, step, global_step, time.time())

    def _put(self, item: Any) -> None:
        nbytes = item_bytes(item)
        if (
            self.put_bytes - self.taken_bytes + self.unacked_bytes + nbytes > self._soft_bytes
            or len(self.queue) >= self._soft_count
        ) and not self._pressure(item, nbytes):
            return
        self._queue(item, nbytes)

    def _queue(self, item: Any, nbytes: int) -> None:
        q = self.queue
        if self._drop is not None:
            q.append(self._drop)
            self._drop = None
        self.put_bytes += nbytes
        q.append(item)
        if self.idle:
            self.wake.set()

    def flush_drops(self) -> None:
        """Queue the report of calls dropped since the last one (caller, under the Board's lock)."""
        if self._drop is not None:
            self.queue.append(self._drop)
            self._drop = None
            self.wake.set()

    def _full(self, nbytes: int) -> bool:
        load = self.put_bytes - self.taken_bytes + self.unacked_bytes
        # One item bigger than the whole bound still goes through, alone.
        return (load + nbytes > self.limit and load > 0) or len(self.queue) >= self.max_queue

    def _pressure(self, item: Any, nbytes: int) -> bool:
        """Over 80 % of a bound: warn once; at 100 % drop (False) or wait for room (True)."""
        pending = len(self.queue) + self.unacked_calls
        if pending > self.peak:
            self.peak = pending
        load = self.put_bytes - self.taken_bytes + self.unacked_bytes + nbytes
        if not self._warned:
            self._warned = True
            pct = int(100 * max(load / self.limit, len(self.queue) / self.max_queue))
            warn(
                f"kohakuboard: Queue size is {pending} ({pct}% capacity): {load / 2**20:.1f} MiB of log() calls are "
                f"not yet acknowledged by the kobo-daemon (limit {self.limit / 2**20:.0f} MiB); at 100% log() will "
                f"{'drop the newest calls' if self.policy == 'drop' else 'block'} (log less often, or precompute histograms)"
            )
        if not self._full(nbytes):
            return True
        if self.policy == "drop":
            seq, values = seq_and_values(item)
            d = self._drop
            if d is None:
                d = self._drop = Drop(seq)
            d.last = seq
            if type(item) is m.OutputMessage:  # a captured output line, not a log() call
                d.lines += 1
                self.dropped_lines += 1
            else:
                d.calls += 1
                d.values += values
                self.dropped_calls += 1
                self.dropped_values += values
            if not self._warned_full:
                self._warned_full = True
                warn(
                    "kohakuboard: Queue size is at 100% capacity: dropping the newest log() calls until the "
                    "kobo-daemon catches up; the count is stored in the run (kobo show)"
                )
            return False
        if not self._warned_full:
            self._warned_full = True
            warn("kohakuboard: Queue size is at 100% capacity: log() blocks until the kobo-daemon catches up")
        while self._full(nbytes) and not self.closed:
            self._ask_oldest()
            self.wake.set()
            time.sleep(0.0005)
        return True

    def _ask_oldest(self) -> None:
        """``log()`` waits for room: ask the daemon to make the oldest unacknowledged
        message durable now and to answer as soon as it is (as ``flush()`` asks),
        instead of waiting up to ``_ACK_INTERVAL`` for the next periodic request.
        The wait is then about one daemon write (README "When the daemon cannot
        keep up")."""
        try:
            oldest = self.unacked[0].last
        except IndexError:  # the sender thread released it meanwhile
            return
        if oldest > self._want and oldest > self.acked_seq:
            with self._cond:
                if oldest > self._want:
                    self._want = oldest
                    self._next_query = 0.0

    # ------------------------------------------------- any thread: durability

    def unwritten_calls(self) -> int:
        """Calls queued or sent but not acknowledged as durable (approximate while running)."""
        try:
            queued = sum(1 for x in self.queue if x is not STOP and type(x) is not Drop)
            acked = self.acked_seq
            sent = sum(e.calls for e in self.unacked if e.last > acked)
        except RuntimeError:  # the sender thread changed a deque meanwhile
            queued, sent = len(self.queue), self.unacked_calls
        return queued + sent

    def note_durable(self, durable: int) -> None:
        """The daemon told another thread (a direct request, ``finish()``) that ``durable`` is durable."""
        with self._cond:
            if durable > self.acked_seq:
                self.acked_seq = durable
                self._cond.notify_all()
        self.wake.set()  # the sender thread releases the acknowledged messages

    def flush(self, last: int, timeout: float) -> None:
        """Wait until every call up to ``last`` is durable: the one path of ``flush()`` and ``finish()``.

        Returns at once if it is acknowledged already.  Otherwise asks the
        daemon directly on the Board's control socket to write the batch now
        and answer when ``last`` is durable; anything unusual there (a storage
        error, a daemon restart, no answer in time) is left to the sender
        thread's acknowledged delivery (:meth:`_sync`), which survives a daemon
        restart.  Raises the run's :class:`StorageError` when the daemon
        reports one after this call began, :class:`DaemonUnavailable` at the
        timeout if the daemon is gone, :class:`KoboTimeoutError` otherwise.
        """
        if self.acked_seq >= last:
            return
        deadline = time.monotonic() + timeout
        if self._ask_directly(last, min(timeout, _FAST_WAIT), timeout):
            return
        self._sync(last, max(0.0, deadline - time.monotonic()))

    def _ask_directly(self, last: int, wait: float, timeout: float) -> bool:
        """True when the daemon, asked on the Board's control socket, says ``last`` is durable."""
        if self._request is None:
            return False
        budget = max(0.05, min(wait + 0.5, timeout))
        e = self.encoder
        env = m.Envelope(e.run, e.client, 0, e.rank, 0, 0, time.time())
        try:
            reply = self._request(m.AckRequest, env, budget, last, int(wait * 1000), *self.peer)
        except KoboError:
            return False
        if isinstance(reply, m.Acked) and reply.durable_seq >= last and not reply.error_code:
            self.note_durable(reply.durable_seq)
            return True
        return False

    def _sync(self, seq: int, timeout: float) -> None:
        """Make the sender thread ask (with a wait) until ``seq`` is acknowledged; see :meth:`flush`."""
        deadline = time.monotonic() + timeout
        with self._cond:
            replies0 = self._replies
            if seq > self._want:
                self._want = seq
            self._next_query = 0.0
        self.wake.set()
        with self._cond:
            while self.acked_seq < seq:
                if self.storage_error is not None and self._replies > replies0:
                    raise error_from_code(*self.storage_error)
                if self.closed:
                    raise TransportError(f"the kohakuboard sender thread stopped: {self.sender_error!r}")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    n = max(0, self.unwritten_calls())
                    if self.daemon_down:
                        why = f" ({self.revive_error})" if self.revive_error else ""
                        raise DaemonUnavailable(
                            f"kobo-daemon on {self.ep} is not running{why}; {n} log() call(s) are not written yet"
                        )
                    raise KoboTimeoutError(
                        f"kobo-daemon on {self.ep} did not make the data durable within {timeout:g}s "
                        f"({n} log() call(s) not acknowledged yet)"
                    )
                self._cond.wait(min(remaining, 0.1))

    def close(self, error: BaseException | None = None) -> None:
        """The sender thread ended (``error``: why, if it failed) or is given up on: wake every waiter."""
        if error is not None:
            self.sender_error = error
        with self._cond:
            self.closed = True
            self._cond.notify_all()

    # ------------------------------------------------- sender thread: sending

    def pump(self, send: Callable[[list[Any]], bool]) -> int:
        """Send what is due with ``send`` (False: the socket cannot take it now).

        Re-sends come first, in order; new messages follow unless held back
        (:meth:`connection_lost`) or over the in-flight bound.  Each new
        message is encoded and kept in ``unacked`` before it is sent.
        Returns :data:`SENT`, :data:`BLOCKED` or :data:`STOPPING`.
        """
        if self.unacked and self.unacked[0].last <= self.acked_seq:
            self._release_acked()
        resend = self._resend
        while resend:
            if not send(resend[0].frames):
                return BLOCKED
            self.replayed_calls += resend.popleft().calls
        if self.hold:
            return BLOCKED
        q = self.queue
        while True:
            current = self._current
            if current is None:
                if not q or self.unacked_bytes >= self.limit:
                    return SENT
                item = q.popleft()
                if item is STOP:
                    return STOPPING
                self.taken_bytes += item_bytes(item)
                current = self._current = self._encode(item)
                self.unacked.append(current)
                self.unacked_bytes += current.nbytes
                self.unacked_calls += current.calls
            if not send(current.frames):
                return BLOCKED
            self.sent_seq = current.last
            self._current = None

    def has_sendable(self) -> bool:
        """New calls are queued and the in-flight bound has room for them."""
        return bool(self.queue) and self.unacked_bytes < self.limit

    def _encode(self, item: Any) -> Entry:
        try:
            first, last, frames, calls, taken = self.encoder.encode(item, self.queue)
        except EncodeError as exc:
            # log() validates everything it can, so this is a bug: count it, tell
            # the next flush() (once), and report the calls as dropped so the
            # sequence stays whole and later calls are acknowledged as usual.
            self.taken_bytes += exc.taken
            self.encode_errors += 1
            if self.encode_error is None:
                self.encode_error = (exc.first, exc.__cause__ or exc)
            self.dropped_calls += exc.calls
            self.dropped_values += exc.values
            frames = self.encoder.drop_report(exc.first, exc.last, exc.calls, exc.values)
            return Entry(exc.first, exc.last, frames, 0)
        self.taken_bytes += taken
        return Entry(first, last, frames, calls)

    # ----------------------------------------- sender thread: acknowledgements

    def waiting(self, now: float) -> bool:
        """Whether an answer from the daemon is wanted: data unacknowledged, a waiter, or keepalive due."""
        return bool(self.unacked) or self._want > self.acked_seq or now >= self._keepalive_at

    def flush_waiting(self) -> bool:
        """A ``flush()``/``finish()`` (or a blocked ``log()``) waits on an acknowledgement."""
        return self._want > self.acked_seq

    def ack_request(self, now: float) -> tuple[list[Any], bool] | None:
        """The next acknowledgement request to send when one is due: ``(frames, sync)``, else None.

        ``_query_at`` is when the last request went out (asked again after
        ``_ACK_RETRY`` without an answer).  The sender reports with
        :meth:`ack_sent` whether the socket took it.
        """
        sync = self._want > self.acked_seq
        # A flush() waiting does not wait for the answer to a plain request: its
        # own request makes the daemon write the batch at once.
        upgrade = sync and not self._query_sync
        if not upgrade and self._query_at is not None and now - self._query_at < _ACK_RETRY:
            return None
        if not upgrade and now < self._next_query:
            return None
        last = self.unacked[-1].last if self.unacked else self.acked_seq
        want = min(self._want, last) if sync else last
        self._query_id += 1
        e = self.encoder
        env = m.Envelope(e.run, e.client, self._query_id, e.rank, 0, 0, time.time())
        pid, start, host = self.peer
        req = m.AckRequest(env, want, _SYNC_WAIT_MS if sync else 0, pid, start, host)
        return codec.encode(req), sync

    def ack_sent(self, now: float, sync: bool, taken: bool) -> None:
        """The socket took the request from :meth:`ack_request` (``taken``) or not."""
        if not taken:
            # Not connected (yet: right after the Board opened, or the daemon is
            # down and the alive check will notice): ask again on the next turn
            # of the loop rather than after _ACK_RETRY.
            if self.unanswered_since is None:
                self.unanswered_since = now
            return
        self._query_at = now
        self._keepalive_at = now + _KEEPALIVE
        self._query_sync = sync
        if self.unanswered_since is None:
            self.unanswered_since = now
        self._next_query = now + _ACK_INTERVAL

    def connection_lost(self) -> None:
        """The acknowledgement socket lost its connection: hold new data, ask at once."""
        self.hold = True
        self.ask_now(None)

    def ask_now(self, unanswered_since: float | None) -> None:
        """Ask the daemon again at once (it lost the connection, or it is back / was started again)."""
        self._query_at = None
        self._next_query = 0.0
        if unanswered_since is not None:
            self.unanswered_since = unanswered_since

    def on_reply(self, frames: list[Any]) -> None:
        """A reply on the acknowledgement socket."""
        try:
            reply = codec.decode(frames)
        except ProtocolError:
            return
        if isinstance(reply, m.Acked):
            self._on_acked(reply)
        elif isinstance(reply, m.ErrorReply) and reply.env.seq == self._query_id:
            self._query_at = None  # e.g. the run is not open: asked again later
            self.unanswered_since = None
            self.hold = False

    def _on_acked(self, reply: m.Acked) -> None:
        self.unanswered_since = None
        self.hold = False
        if reply.env.seq == self._query_id:
            self._query_at = None
            self._query_sync = False
        self.daemon_down = False
        if reply.daemon and reply.daemon != self._daemon_id:
            old, self._daemon_id = self._daemon_id, reply.daemon
            if old is not None:
                self._replay(reply.durable_seq)
        durable = reply.durable_seq
        with self._cond:
            if durable > self.acked_seq:
                self.acked_seq = durable
            self._release_acked()
            self.storage_error = (reply.error_code, reply.error) if reply.error_code else None
            self._replies += 1
            self._cond.notify_all()

    def _release_acked(self) -> None:
        """Forget the messages the daemon made durable (sender thread only)."""
        u = self.unacked
        acked = self.acked_seq
        while u and u[0].last <= acked:
            e = u.popleft()
            self.unacked_bytes -= e.nbytes
            self.unacked_calls -= e.calls

    def _replay(self, durable: int) -> None:
        """A different daemon answers: re-send, in order, what the old one did not make durable."""
        self._resend = collections.deque(e for e in self.unacked if e.last > durable)
        self._current = None
        self.replays += 1
        n = sum(e.calls for e in self._resend)
        if n:
            warn(f"kohakuboard: the kobo-daemon on {self.ep} restarted; re-sending {n} unacknowledged log() call(s)")
