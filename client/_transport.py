"""The client's two connections to the daemon.

* Data: a background sender thread owns a ``PUSH`` socket.  ``log()`` only puts
  a small tuple on a deque; the thread encodes and sends.  Measured on the
  project machine, encoding and sending in the caller costs more than the 5 us
  ``log()`` budget; a deque append costs well under a microsecond.  The deque
  is bounded (``max_queue`` messages): at 80 % a warning is printed once, at
  100 % ``log()`` blocks until the sender catches up, so memory never grows
  without bound and nothing is dropped silently.
* Control: a ``DEALER`` socket for requests that need an answer (open, flush,
  finish, status), used under a lock from whichever thread asks.

zmq and msgpack are imported here, and this module is imported only when the
first Board connects.
"""

from __future__ import annotations

import collections
import sys
from array import array
from itertools import chain
import threading
import time
from typing import Any

import zmq

from ..protocol import codec
from ..protocol import messages as m
from ..protocol.endpoint import Endpoint, daemon_alive
from ..protocol.errors import DaemonUnavailable, KoboTimeoutError, ProtocolError, error_from_code

_STOP = object()
_MAX_BATCH = 1024  # calls per LogBatch: 256 KB at 32 scalars, so the daemon's receive queue stays small


class Sender(threading.Thread):
    """Encodes queued log calls and PUSHes them, in order, on its own thread."""

    def __init__(self, ctx: zmq.Context[Any], ep: Endpoint, run: str, client: str, rank: int, max_queue: int) -> None:
        super().__init__(name="kohakuboard-sender", daemon=True)
        self._ctx = ctx
        self._ep = ep
        self._run = run
        self._client = client
        self._rank = rank
        self.max_queue = max_queue
        self.queue: collections.deque[Any] = collections.deque()
        self._wake = threading.Event()
        self._idle = False
        self._abort = False
        self.sent_seq = 0
        self.peak = 0
        self._warned = False
        self.error: BaseException | None = None
        self.encode_errors = 0
        self.max_queue_bytes = 64 << 20
        self.autostart = True
        self.daemon_restarts = 0
        self._next_revive_check = 0.0
        self.queued_bytes = 0
        self._bytes_lock = threading.Lock()

    def put(self, item: Any, nbytes: int = 0) -> None:
        """Queue one item (caller thread).  Blocks while the queue is full.

        ``nbytes``: the size of the item's binary blobs (images, arrays), which
        count against ``max_queue_bytes`` as well.
        """
        q = self.queue
        n = len(q)
        if n >= self.max_queue * 0.8:
            self._backpressure(n)
        if nbytes:
            self._wait_for_bytes(nbytes)
        q.append(item)
        if self._idle:
            self._wake.set()

    def _wait_for_bytes(self, nbytes: int) -> None:
        # Blobs are the big thing a queue can hold: bound their bytes too.
        with self._bytes_lock:
            self.queued_bytes += nbytes
        if self.queued_bytes > self.max_queue_bytes * 0.8 and not self._warned:
            self._warned = True
            print(
                f"WARNING: Queue size is {self.queued_bytes >> 20} MiB "
                f"({100 * self.queued_bytes // self.max_queue_bytes}% capacity): the kobo-daemon is not keeping up; "
                "log() will block at 100%",
                file=sys.__stderr__ or sys.stderr,
            )
        while self.queued_bytes > self.max_queue_bytes and len(self.queue) and self.is_alive() and not self._abort:
            self._wake.set()
            time.sleep(0.001)

    def _backpressure(self, n: int) -> None:
        if not self._warned:
            self._warned = True
            print(
                f"WARNING: Queue size is {n} ({100 * n // self.max_queue}% capacity): the kobo-daemon is not "
                "keeping up; log() will block at 100% (log less often, or precompute histograms)",
                file=sys.__stderr__ or sys.stderr,
            )
        if n > self.peak:
            self.peak = n
        while len(self.queue) >= self.max_queue and self.is_alive() and not self._abort:
            self._wake.set()
            time.sleep(0.0005)

    def stop(self, timeout: float) -> bool:
        """Send everything queued, then end the thread; False if it could not in time."""
        self.queue.append(_STOP)
        self._wake.set()
        self.join(timeout)
        if self.is_alive():
            self._abort = True
            self.join(1.0)
            return False
        return True

    def run(self) -> None:
        sock = self._ctx.socket(zmq.PUSH)
        sock.setsockopt(zmq.LINGER, 2000)
        # Few messages in zmq's own queue: a LogBatch or an array can be large,
        # and what waits beyond this waits in our deque, where it is counted.
        sock.setsockopt(zmq.SNDHWM, 16)
        sock.connect(self._ep.data_addr)
        q = self.queue
        encode = codec.encode_log
        run, client, rank = self._run, self._client, self._rank
        try:
            while True:
                while q:
                    item = q.popleft()
                    if item is _STOP:
                        return
                    try:
                        if type(item) is tuple:
                            if q and type(q[0]) is tuple:
                                seq, frames = self._encode_batch(item)
                            else:
                                seq, step, gstep, wall, scalars = item
                                frames = encode(run, client, seq, rank, step, gstep, wall, scalars)
                        else:  # a ready message object (rich values, captured output)
                            seq = item.env.seq
                            frames = codec.encode(item)
                            if type(item) is m.LogMessage and item.blobs:
                                size = sum(len(b) for b in item.blobs)
                                with self._bytes_lock:
                                    self.queued_bytes -= size
                    except Exception as exc:
                        # log() validates everything it can, so this is a bug; count
                        # it, tell flush(), and keep the sender (and training) going.
                        self.encode_errors += 1
                        self.error = exc
                        continue
                    self._send(sock, frames)
                    self.sent_seq = seq
                self._idle = True
                if not q:
                    self._wake.wait(0.5)
                    self._wake.clear()
                self._idle = False
        except _Aborted:
            return
        except BaseException as exc:  # pragma: no cover - reported by flush()/finish()
            self.error = exc
        finally:
            sock.close(linger=0 if self._abort else 2000)

    def _encode_batch(self, first: tuple[Any, ...]) -> tuple[int, list[bytes]]:
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
        return last[0], codec.encode(msg)

    def _send(self, sock: zmq.Socket[Any], frames: list[bytes]) -> None:
        while True:
            try:
                sock.send_multipart(frames, zmq.NOBLOCK, copy=False)
                return
            except zmq.Again:
                # The daemon is slow or gone; wait, but stay stoppable.
                if self._abort:
                    raise _Aborted from None
                if not sock.poll(100, zmq.POLLOUT):
                    self._revive_daemon()

    def _revive_daemon(self) -> None:
        """Start a new daemon if ours died, so the training loop never blocks on a dead one.

        Checked at most once a second while sends are refused.  The new daemon
        accepts data for existing run folders, so logging carries on; what the
        dead daemon had received but not written is lost (acknowledged replay
        is not implemented yet).
        """
        now = time.monotonic()
        if now < self._next_revive_check or not self.autostart:
            return
        self._next_revive_check = now + 1.0
        if daemon_alive(self._ep):
            return
        from ._spawn import ensure_daemon

        try:
            if ensure_daemon(self._ep, autostart=True):
                self.daemon_restarts += 1
                print(
                    f"kohakuboard: the kobo-daemon on {self._ep} had stopped; started a new one",
                    file=sys.__stderr__ or sys.stderr,
                )
        except Exception as exc:  # keep trying every second; flush()/finish() report it
            self.error = exc


def _le(code: str, values: Any) -> bytes:
    """Little-endian bytes of an int64 ("q") or float64 ("d") sequence."""
    arr = array(code, values)
    if _BIG_ENDIAN:
        arr.byteswap()
    return arr.tobytes()


_BIG_ENDIAN = sys.byteorder == "big"


class _Aborted(Exception):
    pass


class Connection:
    """A Board's sockets to one daemon."""

    def __init__(self, ep: Endpoint) -> None:
        self.ep = ep
        self.ctx: zmq.Context[Any] = zmq.Context()
        self._dealer = self.ctx.socket(zmq.DEALER)
        self._dealer.setsockopt(zmq.LINGER, 0)
        self._dealer.connect(ep.control_addr)
        self._lock = threading.Lock()
        self._req = 0

    def request(self, msg_cls: type, env: m.Envelope, timeout: float, *fields: Any) -> Any:
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
                    raise KoboTimeoutError(
                        f"kobo-daemon on {self.ep} did not answer {msg_cls.KIND} within {timeout:g}s"
                    )
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
                        raise DaemonUnavailable(f"kobo-daemon on {self.ep} is not running")

    def close(self) -> None:
        with self._lock:
            self._dealer.close(linger=0)
        self.ctx.term()
