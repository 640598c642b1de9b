"""Turning queued calls into wire frames (the sender thread's encoding step).

A queued call is one of: a scalar ``log()`` call as the tuple
``(seq, step, global_step, wall, {name: float})``, a rich ``LogMessage``, a
captured ``OutputMessage``, or a :class:`Drop` standing for calls the drop
policy discarded.  :class:`Encoder` makes the frames of one such item, packing
a scalar call with the scalar calls queued right behind it that log the same
names into one ``LogBatch``.  It knows nothing of sequence numbers beyond
copying them into the messages, nor of acknowledgements (see :mod:`._outbox`).
"""

from __future__ import annotations

import collections
import sys
import time
from array import array
from itertools import chain
from typing import Any

from ..protocol import codec
from ..protocol import messages as m

MAX_BATCH = 1024  # calls per LogBatch: 256 KB at 32 scalars, so the daemon's receive queue stays small


class EncodeError(Exception):
    """Calls ``first..last`` could not be encoded (a bug: ``log()`` checks everything it can).

    ``calls``/``values``: how many calls and values they hold; ``taken``: the
    :func:`item_bytes` of the calls taken from the queue besides the first.
    The cause is ``__cause__``.
    """

    def __init__(self, first: int, last: int, calls: int, values: int, taken: int) -> None:
        super().__init__(f"calls {first}..{last} could not be encoded")
        self.first, self.last, self.calls, self.values, self.taken = first, last, calls, values, taken


class Drop:
    """Calls ``first..last`` discarded by the drop policy; sent as one DropReport."""

    __slots__ = ("first", "last", "calls", "values", "lines")

    def __init__(self, first: int) -> None:
        self.first = self.last = first
        self.calls = self.values = self.lines = 0


def scalar_bytes(item: tuple[Any, ...]) -> int:
    """:func:`item_bytes` of a scalar call (the fast path of ``log()``)."""
    return 200 + 60 * len(item[4])


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


def seq_and_values(item: Any) -> tuple[int, int]:
    """The sequence number of a queued call and how many values it logs."""
    if type(item) is tuple:
        return item[0], len(item[4])
    if type(item) is m.LogMessage:
        return item.env.seq, len(item.scalars) + len(item.items)
    return item.env.seq, 0


class Encoder:
    """Encodes the queued calls of one client of one run."""

    __slots__ = ("run", "client", "rank")

    def __init__(self, run: str, client: str, rank: int) -> None:
        self.run = run
        self.client = client
        self.rank = rank

    def encode(self, item: Any, queue: collections.deque[Any]) -> tuple[int, int, list[Any], int, int]:
        """The frames of ``item``: ``(first seq, last seq, frames, calls, bytes taken from queue)``.

        A scalar call followed in ``queue`` by scalar calls of the same names is
        packed with them into one ``LogBatch``; those are popped from ``queue``
        and their :func:`item_bytes` returned as the last element.  A
        :class:`Drop` becomes a ``DropReport`` (0 calls).  Raises
        :class:`EncodeError` for what the codec cannot encode.
        """
        try:
            return self._encode(item, queue)
        except EncodeError:
            raise
        except Exception as exc:
            seq, values = seq_and_values(item)
            raise EncodeError(seq, seq, 1, values, 0) from exc

    def _encode(self, item: Any, queue: collections.deque[Any]) -> tuple[int, int, list[Any], int, int]:
        if type(item) is tuple:
            if queue and type(queue[0]) is tuple:
                return self._encode_batch(item, queue)
            seq, step, gstep, wall, scalars = item
            return seq, seq, codec.encode_log(self.run, self.client, seq, self.rank, step, gstep, wall, scalars), 1, 0
        if type(item) is Drop:
            frames = self.drop_report(item.first, item.last, item.calls, item.values, item.lines)
            return item.first, item.last, frames, 0, 0
        return item.env.seq, item.env.seq, codec.encode(item), 1, 0

    def drop_report(self, first: int, last: int, calls: int, values: int, lines: int = 0) -> list[Any]:
        """The frames of the DropReport standing for calls ``first..last`` (so the sequence stays whole)."""
        env = m.Envelope(self.run, self.client, last, self.rank, 0, 0, time.time())
        return codec.encode(m.DropReport(env, first, calls, values, lines))

    def _encode_batch(
        self, first: tuple[Any, ...], queue: collections.deque[Any]
    ) -> tuple[int, int, list[Any], int, int]:
        """Pack ``first`` and the queued calls right after it that log the same names.

        Only used when calls are already waiting: at low rates every call is
        sent on its own at once, at high rates this turns per-value Python work
        in the daemon into array copies.
        """
        names = tuple(first[4])
        rows = [first]
        while queue and len(rows) < MAX_BATCH:
            nxt = queue[0]
            if type(nxt) is not tuple or tuple(nxt[4]) != names:
                break
            rows.append(queue.popleft())
        taken = sum(200 + 60 * len(r[4]) for r in rows[1:])
        last = rows[-1]
        env = m.Envelope(self.run, self.client, last[0], self.rank, last[1], last[2], last[3])
        try:
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
            frames = codec.encode(msg)
        except Exception as exc:
            values = sum(len(r[4]) for r in rows)
            raise EncodeError(first[0], last[0], len(rows), values, taken) from exc
        return first[0], last[0], frames, len(rows), taken


def _le(code: str, values: Any) -> bytes:
    """Little-endian bytes of an int64 ("q") or float64 ("d") sequence."""
    arr = array(code, values)
    if _BIG_ENDIAN:
        arr.byteswap()
    return arr.tobytes()


_BIG_ENDIAN = sys.byteorder == "big"
