"""Per-run state in the daemon: the batcher, its writer thread, its ledger and its clients.

Each run folder the daemon writes has one :class:`RunChannel`.  Messages for the
run are appended to ``pending`` by the receive loop (on the event loop, no I/O);
the channel's batcher task hands a whole batch to the run's own single writer
thread when the batch is big enough, when the oldest message is
``flush_interval`` old, or at once when a client waits on a flush barrier.  Only
one batch per run is being written at a time; meanwhile the next one fills.

Which calls of a client are new, duplicates or durable is the run's
:class:`~.ledger.Ledger`'s to say (``daemon/ledger.py``); a channel keeps the
clients attached in this daemon instance (:class:`ClientState`), the flush
barriers waiting on the ledger, and the run's storage error.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from ..protocol.errors import StorageError
from ..protocol.messages import DropReport, LogBatch, LogMessage, OutputMessage
from ..protocol.peer import process_alive
from ..storage import format as fmt
from ..storage.writer import RunWriter
from .ingest import RunIngest, prepare_items
from .ledger import Ledger

log = logging.getLogger("kohakuboard.daemon")

# A batch is written once it holds this many bytes, whatever its age: bounds the
# memory one run's batch (and the staged copy being written) can take.
_BATCH_BYTES = 1 << 20
# A batch takes at most this many bytes of rich values (images, arrays), and at
# least one message: each commit then acknowledges a few values (RunChannel._split_rich).
_RICH_BATCH_BYTES = 8 << 20


@dataclass
class ClientState:
    """One client (one Board in one process) attached to a run in this daemon instance.

    How far its calls arrived and are durable is in the run's ledger.
    """

    client: str
    rank: int
    pid: int
    pid_start: int
    host: str
    attached: bool = True
    status: str = "attached"


@dataclass
class _Waiter:
    client: str
    seq: int
    future: asyncio.Future[int]


@dataclass
class RunStats:
    messages: int = 0
    points: int = 0
    batches: int = 0
    peak_pending: int = 0
    write_seconds: float = 0.0
    errors: int = 0
    duplicates: int = 0
    last_error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class RunChannel:
    """Batches and writes everything for one run folder."""

    def __init__(
        self,
        path: str,
        *,
        flush_interval: float,
        batch_messages: int,
        durable: bool = True,
        now: Callable[[], float] = time.monotonic,
        pool: Executor | None = None,
    ) -> None:
        self.path = path
        self.durable = durable
        self.flush_interval = flush_interval
        self.batch_messages = batch_messages
        self._now = now
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="kobo-writer")
        # Rich values are prepared (PNG, binning, KDE) on the daemon's shared
        # compute pool as soon as they arrive: id(msg) -> (msg, future).  The
        # writer thread stages messages in arrival order and takes each result
        # from here when it gets to its message (RunIngest.stage), so order,
        # duplicate detection and the commit point are the writer's as before.
        self._pool = pool
        self.prepared: dict[int, tuple[Any, Any]] = {}
        self.writer: RunWriter | None = None
        # Per client: what is new, a duplicate, durable (loaded when the writer opens).
        self.ledger = Ledger()
        # Turns the batches into the writer's plain calls (writer thread; daemon/ingest.py).
        self.ingest: RunIngest | None = None
        self._writer_lock = asyncio.Lock()
        # One detach at a time: a repeated FinishRun (a client's request that
        # reached a restarted daemon late, next to its retry) answers with the
        # status the first one wrote, not the one before it.
        self._detach_lock = asyncio.Lock()
        self.pending: list[LogMessage | LogBatch | DropReport] = []
        self._pending_calls = 0
        # Memory held for this run: pending (not yet handed to the writer) and
        # unwritten (handed over, or staged after a storage error).  The daemon
        # stops reading its socket while the total is over its limit, so a slow
        # disk backs up into the clients' bounded queues instead of our RSS.
        self.pending_bytes = 0
        self._pending_blob_bytes = 0  # rich values' bytes in pending (see _split_rich)
        self.unwritten_bytes = 0
        self.pending_output: list[OutputMessage] = []
        self._first_pending_at = 0.0
        self.clients: dict[str, ClientState] = {}
        self._waiters: list[_Waiter] = []
        self._has_data = asyncio.Event()
        self._kick = asyncio.Event()
        self._stopping = False
        self._retry = False
        self.error: StorageError | None = None
        self.stats = RunStats()
        self.last_activity = now()
        self.last_heard = now()  # anything from any client of the run: data or a request
        self.crashed_clients = 0
        self.interrupted_clients = 0
        # Clients that called finish() while the disk was failing: detached with
        # their status once their data is written (client -> (last_seq, status)).
        self.deferred_finish: dict[str, tuple[int, str]] = {}
        self._reattaching: dict[str, asyncio.Future[None]] = {}

    # ----------------------------------------------------------- thread work

    async def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run ``fn`` on this run's writer thread."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, lambda: fn(*args, **kwargs))

    async def ensure_writer(self) -> RunWriter:
        # Several clients may open one run at once: only one may create the writer.
        async with self._writer_lock:
            if self.writer is None:
                writer = await self.call(RunWriter, self.path, on_event=log.info, durable=self.durable)
                try:
                    await self.call(self.ledger.load, writer.delivery_marks())
                except BaseException:
                    await self.call(writer.close)
                    raise
                self.writer = writer
                self.ingest = RunIngest(writer, self.ledger)
        return self.writer

    async def event(self, kind: str, detail: str) -> None:
        """Record a run event (opening the run's writer if need be; raises its :class:`StorageError`)."""
        writer = await self.ensure_writer()
        await self.call(writer.event, kind, detail)

    # -------------------------------------------------------------- clients

    @property
    def attached(self) -> list[ClientState]:
        return [c for c in self.clients.values() if c.attached]

    async def attach(self, state: ClientState, meta: dict[str, Any]) -> dict[str, Any]:
        writer = await self.ensure_writer()
        others = len([c for c in self.attached if c.client != state.client])
        # Other processes attached with the same rank (two scripts given one
        # run_id by mistake): their steps will interleave with this client's.
        # Boards of the same process, and processes known to be dead, are left out.
        same_rank = [
            [c.pid, c.host]
            for c in self.attached
            if c.client != state.client
            and c.rank == state.rank
            and (c.pid, c.host) != (state.pid, state.host)
            and not (c.host == socket.gethostname() and c.pid and not process_alive(c.pid, c.pid_start))
        ]
        info = await self.call(
            writer.attach,
            client=state.client,
            rank=state.rank,
            pid=state.pid,
            host=state.host,
            **meta,
        )
        self.clients[state.client] = state
        info["attached"] = others
        info["same_rank"] = same_rank
        self.last_activity = self._now()
        return info

    async def detach(self, client: str, status: str) -> str:
        """Detach a client; when it was the last one, mark the run finished or crashed.

        A client this daemon never saw attach (it attached to a previous daemon
        instance that died) may finish too: the run gets its final status when
        nobody else is attached.
        """
        async with self._detach_lock:
            return await self._detach(client, status)

    async def _detach(self, client: str, status: str) -> str:
        state = self.clients.get(client)
        writer = await self.ensure_writer()
        record = False
        if state is not None and state.attached:
            state.attached = False
            state.status = status
            record = True
        elif state is not None and state.status == status:
            return writer.metadata.get("status", fmt.STATUS_RUNNING)  # a repeated finish
        elif state is not None:
            state.status = status
        else:
            # Attached to a previous daemon instance: remembered as finished, so
            # a repeated request (a client asking again) changes nothing.
            self.clients[client] = ClientState(client, 0, 0, 0, "", attached=False, status=status)
            record = True
        if status == fmt.STATUS_CRASHED:
            self.crashed_clients += 1
        elif status == fmt.STATUS_INTERRUPTED:
            self.interrupted_clients += 1
        final = None
        if not self.attached:
            # crashed beats interrupted beats finished
            final = (
                fmt.STATUS_CRASHED
                if self.crashed_clients
                else fmt.STATUS_INTERRUPTED
                if self.interrupted_clients
                else fmt.STATUS_FINISHED
            )
        if record or final is not None:
            # One trip to the writer thread for both (finish() waits on it).
            await self.call(_detach_and_mark, writer, client if record else None, status, final)
        if final is None:
            return fmt.STATUS_RUNNING
        self.crashed_clients = self.interrupted_clients = 0
        return final

    # ------------------------------------------------------------- messages

    def add(self, msg: LogMessage | LogBatch | OutputMessage | DropReport) -> None:
        """Queue a message for writing (event loop; no I/O)."""
        self.ledger.received(msg.env.client, msg.env.seq)
        now = self.last_heard = self._now()
        if not self.pending and not self.pending_output:
            self._first_pending_at = now
        if not isinstance(msg, OutputMessage):
            self.pending.append(msg)
            self._pending_calls += msg.count if type(msg) is LogBatch else 1
            self.pending_bytes += _pending_estimate(msg)
            if type(msg) is LogMessage:
                if msg.blobs:
                    self._pending_blob_bytes += _blob_bytes(msg)
                if msg.items and self._pool is not None:
                    try:
                        self.prepared[id(msg)] = (msg, self._pool.submit(prepare_items, msg))
                    except RuntimeError:  # the pool is shut down (daemon stopping): the writer does it
                        pass
            n = self._pending_calls
            if n > self.stats.peak_pending:
                self.stats.peak_pending = n
            if n >= self.batch_messages or self.pending_bytes >= _BATCH_BYTES:
                self._kick.set()
        else:
            self.pending_output.append(msg)
            self.pending_bytes += 200 + len(msg.text)
        self.stats.messages += 1
        if self._waiters:
            self._kick.set()
        self._has_data.set()

    @property
    def _parked(self) -> bool:
        """Messages wait for a client's re-send (RunIngest._in_sequence)."""
        return self.ingest is not None and bool(self.ingest.parked)

    def durable_seq(self, client: str) -> int:
        """How far ``client``'s calls are durable (the ledger's word; 0 before the writer opened)."""
        return self.ledger.durable(client)

    async def ensure_client(self, client: str, rank: int, pid: int, pid_start: int, host: str) -> ClientState:
        """The state of a client that may have attached to a previous daemon instance.

        A client re-attaches implicitly with its first acknowledgement request
        after a daemon restart; from then on it is watched like any other (its
        process dying marks the run crashed).  Whether the run already holds
        calls of it (the forwarder's queue or the ZeroMQ pipe delivered them
        first) does not matter: only an attachment here counts.
        """
        state = self.clients.get(client)
        if state is not None:
            return state
        # Requests of one client queued during an outage all arrive at once:
        # the first re-attaches it, the others wait for that one.
        pending = self._reattaching.get(client)
        if pending is not None:
            await asyncio.shield(pending)
            return self.clients[client]
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._reattaching[client] = fut
        try:
            meta = {"name": "", "project": "", "run_id": os.path.basename(self.path), "config": {}}
            await self.attach(ClientState(client, rank, pid, pid_start, host), meta)
            fut.set_result(None)
        except BaseException as exc:
            fut.set_exception(exc)
            fut.exception()  # retrieved: the waiters raise it
            raise
        finally:
            del self._reattaching[client]
        return self.clients[client]

    async def barrier(self, client: str, seq: int, timeout: float) -> int:
        """Wait until every message of ``client`` up to ``seq`` is durable.

        Raises the run's :class:`StorageError` if writing fails meanwhile, and
        ``TimeoutError`` if the messages do not arrive in time.
        """
        if self.writer is None:
            # A run reopened by a restarted daemon: what is durable is in the
            # run's files (a client whose data is all stored has nothing to re-send).
            await self.ensure_writer()
        if self.durable_seq(client) >= seq:
            return self.durable_seq(client)
        if self.error is not None:
            raise self.error
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        waiter = _Waiter(client, seq, fut)
        self._waiters.append(waiter)
        self._kick.set()
        self._has_data.set()
        try:
            return await asyncio.wait_for(asyncio.shield(fut), timeout)
        finally:
            if waiter in self._waiters:
                self._waiters.remove(waiter)

    def _resolve_waiters(self) -> None:
        keep = []
        for w in self._waiters:
            if w.future.done():
                continue
            if self.error is not None:
                w.future.set_exception(self.error)
            elif self.durable_seq(w.client) >= w.seq:
                w.future.set_result(self.durable_seq(w.client))
            else:
                keep.append(w)
        self._waiters = keep

    # -------------------------------------------------------------- batcher

    async def batcher(self) -> None:
        """Write batches until :meth:`stop`; then write what is left and close."""
        try:
            while True:
                parked = self._parked
                if not self.pending and not self.pending_output and not self._retry and not parked:
                    if self._stopping:
                        break
                    self._has_data.clear()
                    await self._has_data.wait()
                    continue
                wait = self._first_pending_at + self.flush_interval - self._now()
                if (self._retry or parked) and not (self.pending or self.pending_output):
                    wait = 1.0  # storage failed, or messages wait for a re-send: look again every second
                if self._stopping and self.ingest is not None:
                    self.ingest.release_parked = True
                if wait > 0 and not self._kick.is_set() and not self._stopping:
                    try:
                        await asyncio.wait_for(self._kick.wait(), wait)
                    except asyncio.TimeoutError:
                        pass
                self._kick.clear()
                await self.flush_now()
                if self._stopping and self._retry and self.error is not None:
                    break  # shutting down and the disk still fails: nothing more to do
        finally:
            await self._close_writer()

    async def flush_now(self) -> None:
        """Write the pending batch (and any batch a storage error left staged)."""
        batch, self.pending = self.pending, []
        self._pending_calls = 0
        in_flight, self.pending_bytes = self.pending_bytes, 0
        if self._pending_blob_bytes > _RICH_BATCH_BYTES and len(batch) > 1:
            batch = self._split_rich(batch)
            in_flight -= self.pending_bytes
        self._pending_blob_bytes = sum(_blob_bytes(m) for m in self.pending) if self.pending else 0
        self.unwritten_bytes += in_flight
        output, self.pending_output = self.pending_output, []
        if not batch and not output and not self._retry and not self._parked:
            self._resolve_waiters()
            return
        started = time.perf_counter()
        try:
            await self.ensure_writer()
            assert self.ingest is not None
            await self.call(self._write, self.ingest, batch, output)
        except StorageError as exc:
            self._retry = True
            self.stats.errors += 1
            if self.error is None or str(self.error) != str(exc):
                log.error("%s", exc)
            self.error = exc
            self.stats.last_error = str(exc)
        else:
            if self.error is not None:
                log.info("%s: writing again after: %s", self.path, self.error)
                if self.writer is not None:
                    await self.call(self.writer.event, "recovered", str(self.error))
            self.error = None
            self._retry = False
            self.unwritten_bytes = 0
            self.stats.batches += 1
            for client, (seq, status) in list(self.deferred_finish.items()):
                if self.durable_seq(client) >= seq:
                    del self.deferred_finish[client]
                    await self.detach(client, status)
        finally:
            self.stats.write_seconds += time.perf_counter() - started
            self.last_activity = self._now()
        self._resolve_waiters()

    def _split_rich(self, batch: list[Any]) -> list[Any]:
        """The first ``_RICH_BATCH_BYTES`` of rich values of ``batch`` (at least one message);
        the rest goes back to ``pending``, to be written right after.

        A batch is acknowledged when it commits: a client whose ``log()`` waits
        for room (64 MiB of 4 MB histograms) then waits for one write of a few
        values, not for everything the daemon held (up to 32 MB) to be written.
        """
        acc = 0
        cut = len(batch)
        for i, msg in enumerate(batch):
            acc += _blob_bytes(msg)
            if acc >= _RICH_BATCH_BYTES:
                cut = i + 1
                break
        if cut >= len(batch):
            return batch
        rest = batch[cut:]
        self.pending = rest
        self._pending_calls = sum(m.count if type(m) is LogBatch else 1 for m in rest)
        self.pending_bytes = sum(_pending_estimate(m) for m in rest)
        self._kick.set()  # the rest is written at once, not after flush_interval
        return batch[:cut]

    def _write(
        self, ingest: RunIngest, batch: list[LogMessage | LogBatch | DropReport], output: list[OutputMessage]
    ) -> None:
        # Runs on the writer thread.  Output is written first: it is small, and a
        # crash traceback matters most when everything else is failing.
        writer = ingest.writer
        before = writer.points_written
        ingest.stage([*output, *batch] if output else batch, self.prepared)
        ingest.commit()  # the ledger's durable numbers move on here
        self.stats.points += writer.points_written - before
        self.stats.duplicates = ingest.ledger.duplicates

    def stop(self) -> None:
        """Ask the batcher to write what is pending, close the run and return."""
        self._stopping = True
        self._kick.set()
        self._has_data.set()

    async def _close_writer(self) -> None:
        for w in self._waiters:
            if not w.future.done():
                w.future.set_exception(self.error or StorageError(f"daemon stopped before {self.path} was written"))
        self._waiters.clear()
        if self.writer is not None:
            writer, self.writer = self.writer, None
            self.ingest = None
            await self.call(writer.close)
        self.prepared.clear()
        self._executor.shutdown(wait=True)

    def info(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "clients": [
                {
                    "client": c.client,
                    "rank": c.rank,
                    "pid": c.pid,
                    "durable_seq": self.ledger.durable(c.client),
                    "received_seq": self.ledger.highest_received(c.client),
                }
                for c in self.attached
            ],
            "pending": self._pending_calls,
            "pending_bytes": self.pending_bytes + self.unwritten_bytes,
            "peak_pending": self.stats.peak_pending,
            "messages": self.stats.messages,
            "points": self.stats.points,
            "batches": self.stats.batches,
            "duplicates": self.stats.duplicates,
            "write_seconds": round(self.stats.write_seconds, 3),
            "error": str(self.error) if self.error else None,
        }


def _pending_estimate(msg: Any) -> int:
    """Memory a pending message holds, as counted against the daemon's backlog bound."""
    if type(msg) is LogBatch:
        # received bytes plus the 32-byte records they become when staged
        return 200 + 5 * len(msg.values) + 64 * msg.count
    if type(msg) is DropReport:
        return 200
    # a decoded dict costs ~80 B a value, its staged record 32 B
    return 200 + 112 * len(msg.scalars) + _blob_bytes(msg)


def _blob_bytes(msg: Any) -> int:
    return sum(len(b) for b in msg.blobs) if type(msg) is LogMessage and msg.blobs else 0


def compute_threads_default() -> int:
    """One compute thread per CPU this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def _detach_and_mark(writer: RunWriter, client: str | None, status: str, final: str | None) -> None:
    """Writer thread: record ``client``'s end (if given), then the run's ``final`` status (if given)."""
    if client is not None:
        writer.detach(client, status)
    if final is not None:
        writer.set_status(final)
