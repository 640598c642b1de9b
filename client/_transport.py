"""The client's connections to the daemon.

* Data: a background sender thread owns a ``PUSH`` socket.  ``log()`` only puts
  a small tuple on a deque; the thread encodes and sends.  Measured on the
  project machine, encoding and sending in the caller costs more than the 5 us
  ``log()`` budget; a deque append costs well under a microsecond.
* Acknowledged delivery: every message the thread sends stays in ``unacked``
  until the daemon says it is durable.  The thread asks (:class:`AckRequest`
  on a ``DEALER`` socket of its own) every 100 ms while it holds unacknowledged
  messages.  When the answer comes from a different daemon instance (the
  daemon was killed and restarted), it re-sends everything not acknowledged,
  in order; the daemon drops what it already has, so each call is stored
  exactly once.  When nobody answers and the daemon process is gone, the
  thread starts a new daemon (unless autostart is off).
* Bounded memory: queued plus unacknowledged data is at most
  ``max_inflight_bytes`` (and the queue at most ``max_queue`` calls).  At 80 %
  a warning is printed once ("Queue size is N (80% capacity)"); at 100 % the
  policy applies: ``block`` (default) makes ``log()`` wait for the daemon,
  ``drop`` discards the newest calls and reports them to the daemon, which
  stores the count in the run (``kobo show`` prints it).  Nothing is dropped
  silently.
* Control: a ``DEALER`` socket for requests that need an answer (open, finish,
  status), used under a lock from whichever thread asks
  (``protocol.control.ControlClient``, the public control client).

zmq and msgpack are imported here, and this module is imported only when the
first Board connects.
"""

from __future__ import annotations

import collections
import sys
import threading
import time
from array import array
from itertools import chain
from typing import Any

import zmq

from ..protocol import codec
from ..protocol import messages as m
from ..protocol.endpoint import Endpoint, daemon_alive
from ..protocol.errors import (
    DaemonUnavailable,
    KoboTimeoutError,
    ProtocolError,
    TransportError,
    error_from_code,
)

_STOP = object()
_MAX_BATCH = 1024  # calls per LogBatch: 256 KB at 32 scalars, so the daemon's receive queue stays small
_ACK_INTERVAL = 0.1  # seconds between acknowledgement requests while data is unacknowledged
_ACK_RETRY = 0.5  # an acknowledgement request unanswered this long is asked again (duplicates are harmless)
_ALIVE_CHECK = 1.0  # how often to check for a dead daemon while it does not answer
_KEEPALIVE = 30.0  # an idle client asks at least this often, so that the daemon (and a head) hear from it
_SYNC_WAIT_MS = 300  # how long the daemon may hold an acknowledgement request a flush waits on


def item_bytes(item: Any) -> int:
    """What a queued item is counted as against ``max_inflight_bytes``.

    Roughly its memory while queued: a scalar call is a tuple and a dict of
    floats (measured ~200 B + ~60 B a value); a rich call holds its blobs.
    """
    t = type(item)
    if t is tuple:
        return 200 + 60 * len(item[4])
    if t is m.LogMessage:
        return 1000 + sum(len(b) for b in item.blobs)
    if t is m.OutputMessage:
        return 200 + len(item.text)
    return 0


def _seq_and_values(item: Any) -> tuple[int, int]:
    if type(item) is tuple:
        return item[0], len(item[4])
    if type(item) is m.LogMessage:
        return item.env.seq, len(item.scalars) + len(item.items)
    return item.env.seq, 0


class _Entry:
    """One sent message kept until acknowledged: seqs ``first..last``, its frames."""

    __slots__ = ("first", "last", "frames", "nbytes", "calls")

    def __init__(self, first: int, last: int, frames: list[Any], calls: int) -> None:
        self.first = first
        self.last = last
        self.frames = frames
        self.nbytes = sum(len(f) for f in frames)
        self.calls = calls


class _Drop:
    """Calls ``first..last`` discarded by the drop policy; sent as one DropReport."""

    __slots__ = ("first", "last", "calls", "values", "lines")

    def __init__(self, first: int) -> None:
        self.first = self.last = first
        self.calls = self.values = self.lines = 0


class Sender(threading.Thread):
    """Encodes queued log calls, PUSHes them in order, and keeps them until acknowledged."""

    def __init__(
        self,
        ctx: zmq.Context[Any],
        ep: Endpoint,
        run: str,
        client: str,
        rank: int,
        max_queue: int,
        *,
        max_inflight_bytes: int = 64 << 20,
        policy: str = "block",
        daemon_id: str | None = None,
        ident: tuple[int, int, str] = (0, 0, ""),
    ) -> None:
        super().__init__(name="kohakuboard-sender", daemon=True)
        self._ctx = ctx
        self._ep = ep
        self._run = run
        self._client = client
        self._rank = rank
        self.peer = ident  # (pid, process start ticks, host) sent with acknowledgement requests
        self.max_queue = max_queue
        self.limit = max_inflight_bytes
        self._soft_bytes = int(max_inflight_bytes * 0.8)  # the 80 % warning threshold
        self._soft_count = int(max_queue * 0.8)
        self.policy = policy
        self.autostart = True
        self.queue: collections.deque[Any] = collections.deque()
        self._wake = threading.Event()
        self._idle = False
        self._abort = False
        # Bytes: put_bytes grows in the caller (under the Board's lock),
        # taken_bytes in this thread; their difference is what is queued.
        self.put_bytes = 0
        self.taken_bytes = 0
        self.unacked: collections.deque[_Entry] = collections.deque()
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
        self._drop: _Drop | None = None
        self.error: BaseException | None = None  # what stopped the sender thread
        self.encode_errors = 0
        # the first call that could not be encoded since flush() last reported one: (seq, error)
        self.encode_error: tuple[int, BaseException] | None = None
        self.storage_error: tuple[int, str] | None = None
        self.daemon_down = False
        self.revive_error: BaseException | None = None
        self.replays = 0
        self.replayed_calls = 0
        self._daemon_id = daemon_id or None
        self._cond = threading.Condition()
        self._want = 0
        self._replies = 0
        self._resend: collections.deque[_Entry] = collections.deque()
        # The daemon's connection dropped (it died or restarts): no new data is
        # sent until a daemon answers, so that a restarted daemon gets the
        # re-sent messages before newer ones instead of parking megabytes of
        # newer ones in front of a gap (daemon/ingest.py, RunIngest._in_sequence).
        self._hold = False
        self._current: _Entry | None = None
        self._query_id = 0
        self._query_at: float | None = None
        self._query_sync = False
        self._unanswered_since: float | None = None
        self._next_query = 0.0
        self._next_alive_check = 0.0
        self._keepalive_at = time.monotonic() + _KEEPALIVE

    # ------------------------------------------------------- caller thread

    def put(self, item: Any) -> bool:
        """Queue one call (caller thread, under the Board's lock).

        Returns False when the drop policy discarded it.  Blocks at 100 % under
        the block policy.
        """
        q = self.queue
        nbytes = 200 + 60 * len(item[4]) if type(item) is tuple else item_bytes(item)
        if (
            self.put_bytes - self.taken_bytes + self.unacked_bytes + nbytes > self._soft_bytes
            or len(q) >= self._soft_count
        ) and not self._pressure(item, nbytes):
            return False
        if self._drop is not None:
            q.append(self._drop)
            self._drop = None
        self.put_bytes += nbytes
        q.append(item)
        if self._idle:
            self._wake.set()
        return True

    def flush_drops(self) -> None:
        """Queue the report of calls dropped since the last one (caller, under the Board's lock)."""
        if self._drop is not None:
            self.queue.append(self._drop)
            self._drop = None
            self._wake.set()

    def _full(self, nbytes: int) -> bool:
        load = self.put_bytes - self.taken_bytes + self.unacked_bytes
        # One item bigger than the whole bound still goes through, alone.
        return (load + nbytes > self.limit and load > 0) or len(self.queue) >= self.max_queue

    def _pressure(self, item: Any, nbytes: int) -> bool:
        pending = len(self.queue) + self.unacked_calls
        if pending > self.peak:
            self.peak = pending
        load = self.put_bytes - self.taken_bytes + self.unacked_bytes + nbytes
        if not self._warned:
            self._warned = True
            pct = int(100 * max(load / self.limit, len(self.queue) / self.max_queue))
            print(
                f"WARNING: Queue size is {pending} ({pct}% capacity): {load / 2**20:.1f} MiB of log() calls are not "
                f"yet acknowledged by the kobo-daemon (limit {self.limit / 2**20:.0f} MiB); at 100% log() will "
                f"{'drop the newest calls' if self.policy == 'drop' else 'block'} (log less often, or precompute histograms)",
                file=sys.__stderr__ or sys.stderr,
            )
        if not self._full(nbytes):
            return True
        if self.policy == "drop":
            seq, values = _seq_and_values(item)
            d = self._drop
            if d is None:
                d = self._drop = _Drop(seq)
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
                print(
                    "WARNING: Queue size is at 100% capacity: dropping the newest log() calls until the kobo-daemon "
                    "catches up; the count is stored in the run (kobo show)",
                    file=sys.__stderr__ or sys.stderr,
                )
            return False
        if not self._warned_full:
            self._warned_full = True
            print(
                "WARNING: Queue size is at 100% capacity: log() blocks until the kobo-daemon catches up",
                file=sys.__stderr__ or sys.stderr,
            )
        while self._full(nbytes) and self.is_alive() and not self._abort:
            self._ask_oldest()
            self._wake.set()
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

    def unwritten_calls(self) -> int:
        """Calls queued or sent but not acknowledged as durable (approximate while running)."""
        try:
            queued = sum(1 for x in self.queue if x is not _STOP and type(x) is not _Drop)
            acked = self.acked_seq
            sent = sum(e.calls for e in self.unacked if e.last > acked)
        except RuntimeError:  # the sender thread changed a deque meanwhile
            queued, sent = len(self.queue), self.unacked_calls
        return queued + sent

    def note_durable(self, durable: int) -> None:
        """The daemon told another thread (flush()'s fast path) that ``durable`` is durable."""
        with self._cond:
            if durable > self.acked_seq:
                self.acked_seq = durable
                self._cond.notify_all()
        self._wake.set()  # the thread releases the acknowledged messages

    def sync(self, seq: int, timeout: float) -> None:
        """Wait until the daemon acknowledges every message up to ``seq`` as durable.

        Survives a daemon restart (the thread re-sends).  Raises the run's
        :class:`StorageError` when the daemon reports one after this call
        began, :class:`DaemonUnavailable` at the timeout if the daemon is gone,
        :class:`KoboTimeoutError` otherwise.
        """
        deadline = time.monotonic() + timeout
        with self._cond:
            replies0 = self._replies
            if seq > self._want:
                self._want = seq
            self._next_query = 0.0
        self._wake.set()
        with self._cond:
            while self.acked_seq < seq:
                if self.storage_error is not None and self._replies > replies0:
                    raise error_from_code(*self.storage_error)
                if not self.is_alive():
                    raise TransportError(f"the kohakuboard sender thread stopped: {self.error!r}")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    n = max(0, self.unwritten_calls())
                    if self.daemon_down:
                        why = f" ({self.revive_error})" if self.revive_error else ""
                        raise DaemonUnavailable(
                            f"kobo-daemon on {self._ep} is not running{why}; {n} log() call(s) are not written yet"
                        )
                    raise KoboTimeoutError(
                        f"kobo-daemon on {self._ep} did not make the data durable within {timeout:g}s "
                        f"({n} log() call(s) not acknowledged yet)"
                    )
                self._cond.wait(min(remaining, 0.1))

    def stop(self, timeout: float) -> bool:
        """End the thread after sending what is queued; False if it could not in time."""
        self.queue.append(_STOP)
        self._wake.set()
        self.join(timeout)
        if self.is_alive():
            self._abort = True
            self.join(1.0)
            return False
        return True

    # ------------------------------------------------------- sender thread

    def run(self) -> None:
        push = self._ctx.socket(zmq.PUSH)
        push.setsockopt(zmq.LINGER, 0)
        # Few messages in zmq's own queue: a LogBatch or an array can be large,
        # and what waits beyond this waits in our deque, where it is counted.
        push.setsockopt(zmq.SNDHWM, 16)
        # Queue only on a live connection: what is sent while the daemon is down
        # waits in our deque (counted, bounded) instead of in a pipe that a dead
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
        try:
            self._loop(push, ack, both, monitor)
        except BaseException as exc:  # pragma: no cover - reported by flush()/finish()
            self.error = exc
        finally:
            try:
                ack.disable_monitor()
            except zmq.ZMQError:
                pass
            monitor.close(linger=0)
            push.close(linger=0)
            ack.close(linger=0)
            with self._cond:
                self._cond.notify_all()

    def _loop(self, push: zmq.Socket[Any], ack: zmq.Socket[Any], both: zmq.Poller, monitor: zmq.Socket[Any]) -> None:
        q = self.queue
        while True:
            if self._abort:
                return
            self._read_monitor(monitor)
            self._read_acks(ack)
            if self.unacked and self.unacked[0].last <= self.acked_seq:
                self._release_acked()
            blocked = False
            while self._resend:
                if not self._try_send(push, self._resend[0].frames):
                    blocked = True
                    break
                self.replayed_calls += self._resend.popleft().calls
            stopping = False
            if self._hold:
                blocked = True
            if not blocked:
                while True:
                    if self._current is None:
                        if not q or self.unacked_bytes >= self.limit:
                            break
                        item = q.popleft()
                        if item is _STOP:
                            stopping = True
                            break
                        self.taken_bytes += item_bytes(item)
                        entry = self._encode(item)
                        self.unacked.append(entry)
                        self.unacked_bytes += entry.nbytes
                        self.unacked_calls += entry.calls
                        self._current = entry
                    if not self._try_send(push, self._current.frames):
                        blocked = True
                        break
                    self.sent_seq = self._current.last
                    self._current = None
            if stopping:
                return
            now = time.monotonic()
            waiting = self.unacked or self._want > self.acked_seq or now >= self._keepalive_at
            if waiting:
                self._ask(ack, now)
            if self._hold:
                ack.poll(20)  # the answer of a daemon (old or new) releases the hold
            elif blocked:
                both.poll(20)
            elif q and self.unacked_bytes < self.limit:
                continue
            elif self._want > self.acked_seq:
                ack.poll(5)  # a flush()/finish() waits on the answer
            elif waiting:
                # Answers are picked up within 10 ms; a new log() call wakes us at once.
                self._idle = True
                if not q:
                    self._wake.wait(0.01)
                self._wake.clear()
                self._idle = False
            else:
                self._idle = True
                if not q:
                    self._wake.wait(0.5)
                self._wake.clear()
                self._idle = False

    def _try_send(self, push: zmq.Socket[Any], frames: list[Any]) -> bool:
        try:
            push.send_multipart(frames, zmq.NOBLOCK, copy=False)
            return True
        except zmq.Again:
            return False

    def _encode(self, item: Any) -> _Entry:
        try:
            if type(item) is tuple:
                q = self.queue
                if q and type(q[0]) is tuple:
                    first, last, frames, calls = self._encode_batch(item)
                    return _Entry(first, last, frames, calls)
                seq, step, gstep, wall, scalars = item
                frames = codec.encode_log(self._run, self._client, seq, self._rank, step, gstep, wall, scalars)
                return _Entry(seq, seq, frames, 1)
            if type(item) is _Drop:
                return self._drop_entry(item.first, item.last, item.calls, item.values, item.lines)
            return _Entry(item.env.seq, item.env.seq, codec.encode(item), 1)
        except Exception as exc:
            # log() validates everything it can, so this is a bug: count it, tell
            # the next flush() (once), and report the call as dropped so the
            # sequence stays whole and later calls are acknowledged as usual.
            self.encode_errors += 1
            seq, values = _seq_and_values(item)
            if self.encode_error is None:
                self.encode_error = (seq, exc)
            self.dropped_calls += 1
            self.dropped_values += values
            return self._drop_entry(seq, seq, 1, values)

    def _drop_entry(self, first: int, last: int, calls: int, values: int, lines: int = 0) -> _Entry:
        """The DropReport standing for calls ``first..last`` (so the sequence stays whole)."""
        env = m.Envelope(self._run, self._client, last, self._rank, 0, 0, time.time())
        return _Entry(first, last, codec.encode(m.DropReport(env, first, calls, values, lines)), 0)

    def _encode_batch(self, first: tuple[Any, ...]) -> tuple[int, int, list[Any], int]:
        """Pack ``first`` and the queued calls right after it that log the same names.

        Only used when calls are already waiting: at low rates every call is
        sent on its own at once, at high rates this turns per-value Python work
        in the daemon into array copies.
        """
        q = self.queue
        names = tuple(first[4])
        rows = [first]
        while q and len(rows) < _MAX_BATCH:
            nxt = q[0]
            if type(nxt) is not tuple or tuple(nxt[4]) != names:
                break
            rows.append(q.popleft())
        for r in rows[1:]:
            self.taken_bytes += 200 + 60 * len(r[4])
        last = rows[-1]
        env = m.Envelope(self._run, self._client, last[0], self._rank, last[1], last[2], last[3])
        msg = m.LogBatch(
            env,
            list(names),
            len(rows),
            _le("q", [r[0] for r in rows]),
            _le("q", [r[1] for r in rows]),
            _le("q", [r[2] for r in rows]),
            _le("d", [r[3] for r in rows]),
            _le("d", chain.from_iterable(r[4].values() for r in rows)),
        )
        return first[0], last[0], codec.encode(msg), len(rows)

    # ---------------------------------------------------- acknowledgements

    def _ask(self, ack: zmq.Socket[Any], now: float) -> None:
        """Send an acknowledgement request when one is due; watch for a dead daemon.

        ``_query_at`` is when the last request went out (asked again after
        ``_ACK_RETRY`` without an answer), ``_unanswered_since`` when the
        daemon last answered anything (checked for a dead process after
        ``_ALIVE_CHECK``).
        """
        if self._unanswered_since is not None and now - self._unanswered_since > _ALIVE_CHECK:
            self._check_daemon(now)
        sync = self._want > self.acked_seq
        # A flush() waiting does not wait for the answer to a plain request: its
        # own request makes the daemon write the batch at once.
        upgrade = sync and not self._query_sync
        if not upgrade and self._query_at is not None and now - self._query_at < _ACK_RETRY:
            return
        if not upgrade and now < self._next_query:
            return
        last = self.unacked[-1].last if self.unacked else self.acked_seq
        want = min(self._want, last) if sync else last
        self._query_id += 1
        env = m.Envelope(self._run, self._client, self._query_id, self._rank, 0, 0, time.time())
        pid, start, host = self.peer
        req = m.AckRequest(env, want, _SYNC_WAIT_MS if sync else 0, pid, start, host)
        try:
            ack.send_multipart(codec.encode(req), zmq.NOBLOCK)
        except zmq.Again:
            # Not connected (yet: right after the Board opened, or the daemon is
            # down and the alive check will notice): ask again on the next turn
            # of the loop rather than after _ACK_RETRY.
            if self._unanswered_since is None:
                self._unanswered_since = now
            return
        self._query_at = now
        self._keepalive_at = now + _KEEPALIVE
        self._query_sync = sync
        if self._unanswered_since is None:
            self._unanswered_since = now
        self._next_query = now + _ACK_INTERVAL

    def _read_monitor(self, monitor: zmq.Socket[Any]) -> None:
        """The acknowledgement socket lost its connection: hold new data, ask at once."""
        while True:
            try:
                monitor.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            self._hold = True
            self._query_at = None
            self._next_query = 0.0

    def _read_acks(self, ack: zmq.Socket[Any]) -> None:
        while True:
            try:
                frames = ack.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                reply = codec.decode(frames)
            except ProtocolError:
                continue
            if isinstance(reply, m.Acked):
                self._on_acked(reply)
            elif isinstance(reply, m.ErrorReply) and reply.env.seq == self._query_id:
                self._query_at = None  # e.g. the run is not open: asked again later
                self._unanswered_since = None
                self._hold = False

    def _on_acked(self, reply: m.Acked) -> None:
        self._unanswered_since = None
        self._hold = False
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
            print(
                f"kohakuboard: the kobo-daemon on {self._ep} restarted; re-sending {n} unacknowledged log() call(s)",
                file=sys.__stderr__ or sys.stderr,
            )

    def _check_daemon(self, now: float) -> None:
        """The daemon does not answer: if its process is gone, start a new one.

        While it is down, look every 0.2 s, so that a daemon restarted by
        someone else (systemd, by hand, another client) is asked at once.
        """
        if now < self._next_alive_check:
            return
        self._next_alive_check = now + (0.2 if self.daemon_down else _ALIVE_CHECK)
        if daemon_alive(self._ep):
            if self.daemon_down:  # it is back: ask now rather than after the retry interval
                self.daemon_down = False
                self._query_at = None
                self._unanswered_since = now
                self._next_query = 0.0
            return  # alive, maybe only slow (or stopped): keep waiting
        self.daemon_down = True
        if not self.autostart:
            return
        from ..protocol.control import ensure_daemon

        try:
            if ensure_daemon(self._ep, autostart=True):
                print(
                    f"kohakuboard: the kobo-daemon on {self._ep} had stopped; started a new one",
                    file=sys.__stderr__ or sys.stderr,
                )
            self.daemon_down = False
            self._query_at = None
            self._unanswered_since = time.monotonic()
            self._next_query = 0.0
        except Exception as exc:  # keep trying; flush()/finish() time out and say so
            self.revive_error = exc


def _le(code: str, values: Any) -> bytes:
    """Little-endian bytes of an int64 ("q") or float64 ("d") sequence."""
    arr = array(code, values)
    if _BIG_ENDIAN:
        arr.byteswap()
    return arr.tobytes()


_BIG_ENDIAN = sys.byteorder == "big"
