"""From received messages to plain writer calls: how the daemon stores what clients send.

``storage.writer.RunWriter`` stores rows and blobs and commits them; it knows
nothing of the wire, of clients' sequence numbers or of acknowledgements.  This
module is the translation, in two parts:

* :func:`prepare_items` (the daemon's compute pool, as soon as a message with
  rich values arrives, ``RunChannel.add``): applies the item rule again
  (``protocol/items.py``), reads each item's arrays out of the message's blobs
  and prepares the value storage writes (PNG encoding, binning, KDE:
  ``storage/rich.py``, ``storage/values.py``, ``protocol/binning.py``).
* :class:`RunIngest` (the run's writer thread, ``RunChannel._write``): walks a
  batch of ``LogMessage``/``LogBatch``/``OutputMessage``/``DropReport`` in
  arrival order, holds back messages that arrive after a gap in their client's
  sequence numbers, claims each call's sequence numbers from the run's ledger
  (``daemon/ledger.py``, ``Ledger.claim``: a re-sent call the run already has
  is dropped there), and hands the writer per-column arrays, the calls' steps,
  output text, drop counts and the prepared rich values.  Then
  :meth:`RunIngest.commit` makes it durable: ``RunWriter.commit`` with the
  ledger's marks in the same transaction.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from ..protocol.binning import bin_histogram
from ..protocol.items import InvalidItem, check_item, item_array
from ..protocol.messages import DropReport, LogBatch, LogMessage, OutputMessage
from ..storage import format as fmt
from ..storage import rich
from ..storage.writer import RunWriter
from .ledger import Ledger

# A message that arrives after a gap waits this long (or until this many bytes
# wait) for its client to re-send the calls before it (RunIngest._in_sequence).
_PARK_SECONDS = 10.0
_PARK_BYTES = 32 << 20

Message = LogMessage | LogBatch | OutputMessage | DropReport


class RunIngest:
    """Stages one run's received messages into its :class:`RunWriter` (writer thread only)."""

    def __init__(
        self, writer: RunWriter, ledger: Ledger | None = None, *, now: Callable[[], float] = time.time
    ) -> None:
        """``ledger``: the run's (a :class:`Ledger` loaded from ``writer`` when not given)."""
        self.writer = writer
        self.ledger = ledger if ledger is not None else Ledger(writer.delivery_marks())
        self._now = now
        self._parked: dict[str, list[tuple[int, float, Any]]] = {}
        self.parked_bytes = 0
        # Set when the run is closing: messages held back for a gap are stored anyway.
        self.release_parked = False

    @property
    def parked(self) -> int:
        """Clients with messages held back for a re-send (see :meth:`_in_sequence`)."""
        return len(self._parked)

    def stage(self, batch: Iterable[Message], prepared: dict[int, Any] | None = None) -> None:
        """Stage a batch of messages in the writer, ready to commit.

        Values of one metric keep the order of the batch.  Pure CPU work.
        ``prepared`` maps ``id(msg)`` to ``(msg, future)`` for messages whose
        rich values are being prepared on the daemon's compute pool
        (:func:`prepare_items`); a message's entry is removed when it is staged
        (or found to be a duplicate), and the future's result used in its place.
        """
        # Training loops log the same keys call after call, so single messages
        # are grouped by (rank, key tuple) and each group becomes one 2-D array,
        # and a LogBatch already is one: numpy conversions per group instead of
        # Python work per value.
        writer, ledger = self.writer, self.ledger
        # segment: (rank, names, order, steps, global_steps, walls, values[n, k])
        segments: list[tuple[int, tuple[str, ...], Any, Any, Any, Any, Any]] = []
        groups: dict[tuple[int, tuple[str, ...]], list[Any]] = {}
        pos = 0
        for msg in self._in_sequence(batch):
            pre = prepared.pop(id(msg), None) if prepared else None
            env = msg.env
            if type(msg) is LogBatch:
                n = msg.count
                if n == 0:
                    continue
                seqs = np.frombuffer(msg.seqs, dtype="<i8")
                steps = np.frombuffer(msg.steps, dtype="<i8")
                gsteps = np.frombuffer(msg.global_steps, dtype="<i8")
                walls = np.frombuffer(msg.walls, dtype="<f8")
                values = np.frombuffer(msg.values, dtype="<f8").reshape(n, len(msg.names))
                keep = ledger.claim_each(env.client, seqs)
                if keep is not None:  # a re-send: keep only calls this run does not have
                    if not keep.any():
                        continue
                    seqs, steps, gsteps, walls, values = (
                        seqs[keep],
                        steps[keep],
                        gsteps[keep],
                        walls[keep],
                        values[keep],
                    )
                    n = len(seqs)
                segments.append((env.rank, tuple(msg.names), np.arange(pos, pos + n), steps, gsteps, walls, values))
                writer.stage_calls(env.rank, steps, gsteps, walls)
                pos += n
                continue
            seq = env.seq
            if type(msg) is OutputMessage:
                if ledger.claim(env.client, seq, seq) and msg.text:
                    writer.stage_output(msg.text)
                continue
            if type(msg) is DropReport:
                if not ledger.claim(env.client, msg.first_seq, seq):
                    continue
                writer.stage_drops(env.client, msg.calls, msg.values, msg.lines)
                if msg.lines:
                    writer.stage_output(
                        f"[kohakuboard: {msg.lines} line(s) of output dropped here: the queue was full "
                        f"(queue_policy='drop')]\n"
                    )
                continue
            if not ledger.claim(env.client, seq, seq):
                continue
            writer.stage_calls(env.rank, env.step, env.global_step, env.wall)
            if msg.items:
                _stage_items(writer, msg, _prepared_result(pre))
            sc = msg.scalars
            key = (env.rank, tuple(sc))
            g = groups.get(key)
            if g is None:
                groups[key] = g = [[], [], [], [], []]
            g[0].append(pos)
            g[1].append(env.step)
            g[2].append(env.global_step)
            g[3].append(env.wall)
            g[4].append(tuple(sc.values()))
            pos += 1
        for (rank, names), (order, steps, gsteps, walls, rows) in groups.items():
            if not names:
                continue
            segments.append(
                (
                    rank,
                    names,
                    np.array(order, dtype=np.intp),
                    np.array(steps, dtype=np.int64),
                    np.array(gsteps, dtype=np.int64),
                    np.array(walls, dtype=np.float64),
                    np.array(rows, dtype=np.float64).reshape(len(rows), len(names)),
                )
            )
        writer.stage_scalars(segments)

    def commit(self) -> dict[str, int]:
        """Commit what is staged with the ledger's marks; the new durable number of each client
        it covered.  On a :class:`StorageError` the staged rest and the claims stay for the next try."""
        self.writer.commit(self.ledger.marks())
        return self.ledger.committed()

    def _in_sequence(self, batch: Iterable[Any]) -> list[Any]:
        """The batch in the order to store it, holding back messages that arrive after a gap.

        After a daemon restart a client's newest messages can reach the new
        daemon before the client notices the restart and re-sends the older
        ones the dead daemon lost.  Such a message (its first sequence number
        is beyond anything seen of its client) waits here until the re-sent
        ones fill the gap, so a metric's points stay in call order; after
        ``_PARK_SECONDS``, over ``_PARK_BYTES``, or when the run is closed, it
        is stored anyway.
        """
        parked = self._parked
        out: list[Any] = []
        ends: dict[str, int] = {}
        now = self._now()
        for msg in batch:
            c = msg.env.client
            first, last = _seq_span(msg)
            end = ends.get(c)
            if end is None:
                end = self.ledger.highest_seen(c)
            if first > end + 1:
                parked.setdefault(c, []).append((first, now, msg))
                self.parked_bytes += _msg_bytes(msg)
                continue
            out.append(msg)
            end = max(end, last)
            waiting = parked.get(c)
            if waiting:
                waiting.sort(key=lambda t: t[0])
                while waiting and waiting[0][0] <= end + 1:
                    _, _, held = waiting.pop(0)
                    self.parked_bytes -= _msg_bytes(held)
                    out.append(held)
                    end = max(end, _seq_span(held)[1])
                if not waiting:
                    del parked[c]
            ends[c] = end
        if parked:
            for c in list(parked):
                waiting = sorted(parked[c], key=lambda t: t[0])
                if (
                    self.release_parked
                    or self.parked_bytes > _PARK_BYTES
                    or now - min(t[1] for t in waiting) > _PARK_SECONDS
                ):
                    del parked[c]
                    for _, _, held in waiting:
                        self.parked_bytes -= _msg_bytes(held)
                        out.append(held)
                    self.writer.event(
                        "gap", f"client {c}: stored messages from seq {waiting[0][0]} on without the ones before them"
                    )
        return out


def stage(writer: RunWriter, batch: Iterable[Message]) -> RunIngest:
    """Stage one batch of messages in ``writer`` with nothing held over (an import, a test);
    the returned :class:`RunIngest` commits it with its calls' marks."""
    ingest = RunIngest(writer)
    ingest.release_parked = True
    ingest.stage(batch)
    return ingest


def _seq_span(msg: Any) -> tuple[int, int]:
    """First and last sequence number a data message carries."""
    if type(msg) is LogBatch:
        if msg.count == 0:
            return msg.env.seq, msg.env.seq
        seqs = np.frombuffer(msg.seqs, dtype="<i8")
        return int(seqs[0]), int(seqs[-1])
    if type(msg) is DropReport:
        return msg.first_seq, msg.env.seq
    return msg.env.seq, msg.env.seq


def _msg_bytes(msg: Any) -> int:
    if type(msg) is LogBatch:
        return 200 + len(msg.values) + 32 * msg.count
    if type(msg) is LogMessage:
        return 200 + 100 * len(msg.scalars) + sum(len(b) for b in msg.blobs)
    if type(msg) is OutputMessage:
        return 200 + len(msg.text)
    return 200


# ------------------------------------------------------------------ rich values


def _call(env: Any) -> rich.Call:
    return rich.Call(env.client, env.seq, env.rank, env.step, env.global_step, env.wall)


def _stage_items(writer: RunWriter, msg: LogMessage, prepared: list[tuple[str, Any]] | None = None) -> None:
    """Queue the writes of a message's rich values.  Their CPU work (PNG,
    binning, KDE) is ``prepared``, done by :func:`prepare_items` on the
    daemon's compute pool, or done here when not given.  A malformed item is
    logged and skipped: one bad value must not block the run."""
    env = msg.env
    if prepared is None:
        prepared = prepare_items(msg)
    call = _call(env)
    for item, (outcome, value) in zip(msg.items, prepared):
        name, kind, meta = item[0], item[1], item[2]
        if outcome == "invalid":  # a hostile or buggy client's item: nothing of it is written
            writer.event("rejected_item", f"{kind} {name!r:.80} at step {env.step}: {value}")
            continue
        if outcome == "bug":  # a valid item the daemon cannot prepare: a bug, said loudly
            writer.event("rejected_item", f"BUG: valid {kind} {name!r} at step {env.step} failed: {value!r}")
            continue
        if kind == "media":
            writer.stage_media(call, name, value, str(meta.get("caption") or ""), meta.get("source"))
        elif kind == "table":
            media = [
                (mv, str(mm.get("caption") or ""), mm.get("source")) for mm, mv in zip(meta.get("media") or [], value)
            ]
            writer.stage_table(call, name, [str(c) for c in meta["columns"]], meta["rows"], media)
        elif kind == "histogram":
            writer.stage_histogram(call, name, *value)
        elif kind == "tensor":
            writer.stage_tensor(
                call,
                name,
                value,
                namespace=meta.get("namespace"),
                metadata=meta.get("metadata") or {},
                source_dtype=str(meta.get("source_dtype") or ""),
            )
        else:
            writer.stage_kde(call, name, value)


class _BlobView:
    """The blobs one item may use, with checked conversion to arrays."""

    def __init__(self, blobs: list[Any], refs: list[int]) -> None:
        self._blobs = blobs
        self._refs = set(refs)

    def raw(self, ref: Any) -> Any:
        """The blob as received (bytes or a memoryview of the ZeroMQ frame): not copied."""
        if type(ref) is not int or ref not in self._refs:
            raise ValueError(f"blob reference {ref!r} is not one of the item's")
        return self._blobs[ref]

    def array(self, meta: dict[str, Any]) -> np.ndarray:
        return item_array(meta, self._blobs, self._refs)


# Pure functions of one item (no run state): the daemon runs them on its compute
# pool as messages arrive (daemon/runs.py); the run's writer thread only queues
# the writes of their results, in message order.


def _prepare_media(env: Any, name: str, meta: dict[str, Any], blobs: _BlobView) -> rich.MediaValue:
    if meta.get("encoding") == "raw":
        return rich.media_from_pixels(blobs.array(meta))
    ext = str(meta.get("ext") or "bin")
    media_type = str(meta.get("media_type") or "image")
    return rich.media_from_file(blobs.raw(meta["ref"]), ext, media_type)


def _prepare_table(env: Any, name: str, meta: dict[str, Any], blobs: _BlobView) -> list[rich.MediaValue]:
    columns = meta["columns"]
    for r in meta["rows"]:
        if not isinstance(r, list) or len(r) != len(columns):
            raise ValueError("table row does not match its columns")
    return [_prepare_media(env, f"{name}#{k}", mm, blobs) for k, mm in enumerate(meta.get("media") or [])]


def _prepare_histogram(env: Any, name: str, meta: dict[str, Any], blobs: _BlobView) -> tuple[str, bytes]:
    """``(precision, record)``: the histogram's fixed-size row (format.HISTOGRAM_HEADER)."""
    precision = meta.get("precision", "exact")
    if precision not in fmt.HISTOGRAM_FILES:
        raise ValueError(f"unknown histogram precision {precision!r}")
    if meta.get("binned"):
        edges = blobs.array(meta["edges"]).astype(np.float64)
        counts = np.rint(blobs.array(meta["counts"])).astype(np.int64)
        nan, posinf, neginf = (int(meta.get(k, 0)) for k in ("nan", "posinf", "neginf"))
        total = int(counts.sum())
    else:
        h = bin_histogram(blobs.array(meta["values"]), int(meta.get("num_bins", 64)))
        edges, counts = h["edges"], h["counts"]
        nan, posinf, neginf, total = h["nan"], h["posinf"], h["neginf"], h["total"]
    record = rich.histogram_record(
        precision, env.step, env.global_step, env.wall, edges, counts, nan, posinf, neginf, total
    )
    return precision, record


def _prepare_tensor(env: Any, name: str, meta: dict[str, Any], blobs: _BlobView) -> tuple[Any, ...]:
    """``(dtype, shape, payload)``; the payload is the received buffer itself, not a copy."""
    return rich.tensor_payload(blobs.array(meta["array"]))  # validates dtype, shape and size


def _prepare_kde(env: Any, name: str, meta: dict[str, Any], blobs: _BlobView) -> tuple[Any, ...]:
    """``(grid_size, bandwidth, count, payload)``."""
    if meta.get("precomputed"):
        return rich.kde_payload(blobs.array(meta["grid"]), blobs.array(meta["density"]), None, None)
    bw = meta.get("bandwidth")
    return rich.kde_from_values(blobs.array(meta["values"]), int(meta.get("grid_size", 256)), float(bw) if bw else None)


_PREPARE: dict[str, Callable[..., Any]] = {
    "media": _prepare_media,
    "table": _prepare_table,
    "histogram": _prepare_histogram,
    "tensor": _prepare_tensor,
    "kde": _prepare_kde,
}


def _prepared_result(pre: Any) -> list[tuple[str, Any]] | None:
    """The result of a ``(msg, future)`` entry of :meth:`RunIngest.stage`'s ``prepared``,
    or None (the writer thread then does the work itself): none given, or the
    pool was shut down before it ran."""
    if pre is None:
        return None
    try:
        return pre[1].result()
    except Exception:  # cancelled (pool shut down), or out of memory in a worker
        return None


def prepare_items(msg: LogMessage) -> list[tuple[str, Any]]:
    """The CPU work of a message's rich values, one ``(outcome, value)`` per item.

    ``("ok", value)`` for :func:`_stage_items`; ``("invalid", why)`` for an
    item the protocol's rule refuses (protocol.items, applied again in the
    daemon); ``("bug", exc)`` for a valid item that failed.  Thread-safe:
    reads the message only.
    """
    out: list[tuple[str, Any]] = []
    for item in msg.items:
        try:
            check_item(item, msg.blobs)  # the client's own rule, applied again (protocol.items)
        except Exception as exc:
            out.append(
                ("invalid", str(exc) if isinstance(exc, InvalidItem) else f"BUG: the rule itself failed: {exc!r:.200}")
            )
            continue
        name, kind, meta, refs = item
        try:
            out.append(("ok", _PREPARE[kind](msg.env, name, meta, _BlobView(msg.blobs, refs))))
        except Exception as exc:
            out.append(("bug", exc))
    return out
