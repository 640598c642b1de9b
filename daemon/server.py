"""The daemon: ``Daemon(config).run()`` = startup, serve, shutdown.

One asyncio loop owns two sockets: a ``PULL`` socket for data and a ``ROUTER``
socket for requests that need an answer.  Both are plain (synchronous) pyzmq
sockets whose file descriptors are watched with ``loop.add_reader``; on
readiness the loop drains them with non-blocking receives up to a budget.  This
costs far less per message than awaiting one ``zmq.asyncio`` future per
message, and the receive loop ends by flag and timeout, never by cancelling a
receive in flight.

Decoded data is routed to the run's :class:`~.runs.RunChannel`, whose batcher
writes on the run's own thread.  Every long-lived task is a child of one
``asyncio.TaskGroup`` (on Python 3.10, the ``taskgroup`` backport's).

Shutdown (SIGTERM, SIGINT or a ``shutdown`` request): stop taking requests,
drain the data socket, let every run write what it holds (bounded by
``graceful_timeout``), release the lock, exit 0.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol, cast

import zmq

from ..protocol import codec
from ..protocol import messages as m
from ..protocol.endpoint import ensure_directory
from ..protocol.errors import KoboError, MalformedMessage, ProtocolError, StorageError, code_for
from ..protocol.peer import process_alive
from ..storage import format as fmt
from .config import DaemonConfig
from .runs import ClientState, RunChannel, compute_threads_default
from .security import PeerGuard, check_run_path, run_path_problem

if sys.version_info >= (3, 11):
    from asyncio import TaskGroup
else:  # the backport, a dependency on Python 3.10 (asyncio.TaskGroup is new in 3.11)
    from taskgroup import TaskGroup

log = logging.getLogger("kohakuboard.daemon")

EXIT_OK = 0
EXIT_STARTUP_FAILURE = 3  # systemd: RestartPreventExitStatus=3
EXIT_ALREADY_RUNNING = 4

_RECV_BUDGET = 4096
# Messages ZeroMQ queues per client in the daemon (the clients queue 16 more
# on their side).  A LogBatch is ~256 KB, a rich value up to megabytes: while the
# daemon throttles its reading (backlog over max_backlog_bytes), what waits here
# is outside every other bound, so the queue is short and the rest waits in the
# clients' bounded queues.  16 took 8 clients ingesting to ~33 MB here.
_RCVHWM = 4
_CRASH_WAIT = 5.0  # seconds a crash report waits for the dead client's last data
_HOST = socket.gethostname()


class AlreadyRunning(KoboError):
    """Another daemon holds the endpoint's lock."""


class Service(Protocol):
    """What a daemon runs on its endpoint instead of writing runs (see :meth:`Daemon.run`)."""

    def prepare(self) -> None: ...

    def bound(self) -> None: ...

    async def serve(self) -> None: ...

    def close(self) -> None: ...


class Daemon:
    """A ``kobo-daemon`` serving one endpoint."""

    def __init__(self, config: DaemonConfig) -> None:
        self.config = config
        self.ep = config.endpoint
        self.runs: dict[str, RunChannel] = {}
        self.rejected: Counter[str] = Counter()
        self.received = 0
        self.throttled = 0
        self.started_at = time.time()
        self._stop: asyncio.Event | None = None  # created inside the loop
        # the socket loops' readable events: a stop sets them too, so a loop sees it at once
        self._wakeups: list[asyncio.Event] = []
        self._lock_fd: int | None = None
        self.peer_guard: PeerGuard | None = None  # refuses other uids (security.py)
        self._tcp: Any = None  # the --listen TCP listener (listen.py)
        self._ctx: zmq.Context[Any] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._pool: ThreadPoolExecutor | None = None
        self._tg: TaskGroup | None = None
        self._last_reject_log = 0.0
        self.ready = False
        self._early_signal: int | None = None  # SIGTERM/SIGINT before the loop's handlers
        # Changes with every start: a client that sees a new id re-sends what the
        # previous instance never acknowledged.
        self.instance = f"{os.getpid()}-{os.urandom(6).hex()}"

    # --------------------------------------------------------------- startup

    def acquire_lock(self) -> None:
        """Take the endpoint lock or raise :class:`AlreadyRunning`."""
        ensure_directory(self.ep)
        fd = os.open(self.ep.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            pid = _read_pid(self.ep.pid_path)
            raise AlreadyRunning(
                f"a kobo-daemon{f' (pid {pid})' if pid else ''} is already running on {self.ep}"
            ) from None
        self._lock_fd = fd
        with open(self.ep.pid_path, "w") as f:
            f.write(f"{os.getpid()}\n")

    def release_lock(self) -> None:
        """Remove the pid file and the socket files this daemon bound, then drop the lock.

        Removed while the lock is still held, so never a successor's files.
        """
        if self._lock_fd is None:
            return
        paths = [self.ep.pid_path]
        if getattr(self, "_bound", False):
            paths += [addr[len("ipc://") :] for addr in (self.ep.data_addr, self.ep.control_addr)]
        for path in paths:
            try:
                os.unlink(path)
            except OSError:
                pass
        os.close(self._lock_fd)
        self._lock_fd = None

    def _bind(self) -> None:
        ctx = self._ctx = zmq.Context()
        self.peer_guard = PeerGuard(ctx)  # before any bind, so no connection escapes the check
        self.pull = ctx.socket(zmq.PULL)
        self.router = ctx.socket(zmq.ROUTER)
        for sock in (self.pull, self.router):
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.MAXMSGSIZE, codec.MAX_FRAME_BYTES)  # libzmq checks it per frame
            self.peer_guard.protect(sock)
        self.pull.setsockopt(zmq.RCVHWM, _RCVHWM)
        self.router.setsockopt(zmq.ROUTER_MANDATORY, 0)
        # A stale socket file from a crashed daemon would make bind fail; we hold
        # the lock, so nobody else is using it.
        for addr in (self.ep.data_addr, self.ep.control_addr):
            path = addr[len("ipc://") :]
            if os.path.exists(path):
                os.unlink(path)
        old_umask = os.umask(0o177)  # sockets 0600
        try:
            self._bound = True  # from here on the socket files are ours to remove
            self.pull.bind(self.ep.data_addr)
            self.router.bind(self.ep.control_addr)
        finally:
            os.umask(old_umask)

    def run(self, service: Service | None = None) -> int:
        """Serve until stopped; return the process exit code.

        ``service``: what to do with the endpoint instead of writing runs (a
        forwarding node, ``forward.Forwarder``): this daemon takes the lock,
        binds the IPC sockets and handles signals; the service checks its
        settings before the sockets are bound (``prepare``, raising
        :class:`KoboError` to refuse to start), takes them over once bound
        (``bound``), serves (``serve``, in this daemon's event loop) and is
        closed before the sockets are.
        """
        # A SIGTERM before the event loop installs its handlers (while binding)
        # must still mean "drain and exit 0", not death by signal.
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, self._remember_signal)
        try:
            self.acquire_lock()
        except AlreadyRunning as exc:
            log.error("%s", exc)
            return EXIT_ALREADY_RUNNING
        except OSError as exc:
            log.error("cannot use daemon directory %s: %s", self.ep.directory, exc)
            return EXIT_STARTUP_FAILURE
        try:
            try:
                if service is not None:
                    service.prepare()
                elif self.config.listen:  # TCP for other nodes (listen.py), up before the IPC sockets appear
                    from .listen import open_file_limit, start_tcp_listener

                    # Each remote client costs an IPC connection from the listener process.
                    open_file_limit()

                    self._tcp = start_tcp_listener(self.config)
                self._bind()
                if service is not None:
                    service.bound()
            except zmq.ZMQError as exc:
                log.error("cannot bind %s: %s", self.ep, exc)
                return EXIT_STARTUP_FAILURE
            except KoboError as exc:  # --listen/--forward without keys, bad address, port in use
                log.error("%s", exc)
                return EXIT_STARTUP_FAILURE
            asyncio.run(self.serve() if service is None else service.serve())
            return EXIT_OK
        finally:
            if self._tcp is not None:
                self._tcp.close()
            if service is not None:
                service.close()
            self._close_sockets()
            self.release_lock()

    # ----------------------------------------------------------------- serve

    def handle_signals(self) -> asyncio.Event:
        """In the running loop: SIGTERM/SIGINT set the returned stop event (a second one exits at once),
        SIGHUP reopens log files.  A signal that came before the loop stops it now."""
        loop = asyncio.get_running_loop()
        stop = self._stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_stop_signal, sig)
        loop.add_signal_handler(signal.SIGHUP, self._on_sighup)
        if self._early_signal is not None:
            self._on_stop_signal(self._early_signal)
        return stop

    async def serve(self) -> None:
        stop = self.handle_signals()
        log.info("kobo-daemon %d listening on %s", os.getpid(), self.ep)
        self.ready = True
        sd_notify("READY=1")
        async with TaskGroup() as tg:
            self._tg = tg
            data_task = tg.create_task(self._data_loop(), name="data")
            tg.create_task(self._control_loop(), name="control")
            tg.create_task(self._housekeeping(), name="housekeeping")
            if self.config.system_metrics > 0:
                tg.create_task(self._system_metrics(self.config.system_metrics), name="system-metrics")
            await stop.wait()
            sd_notify("STOPPING=1")
            log.info("stopping: draining and flushing %d run(s)", len(self.runs))
            await data_task  # ends after a final drain
            for ch in self.runs.values():
                ch.stop()
            batchers = [t for t in self._tasks if t.get_name().startswith("batcher:")]
            if batchers:
                done, still = await asyncio.wait(batchers, timeout=self.config.graceful_timeout)
                for t in still:
                    log.error("gave up flushing %s after %.0fs", t.get_name()[8:], self.config.graceful_timeout)
                    t.cancel()
            for t in list(self._tasks):
                if not t.done():
                    t.cancel()
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        log.info("kobo-daemon stopped")

    def _spawn(self, coro: Any, name: str) -> asyncio.Task[Any]:
        assert self._tg is not None
        task = self._tg.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _remember_signal(self, sig: int, frame: Any) -> None:
        self._early_signal = sig

    def _on_stop_signal(self, sig: int) -> None:
        if self._stop is not None and self._stop.is_set():
            log.warning("second %s: exiting now", signal.Signals(sig).name)
            os._exit(1)
        log.info("received %s", signal.Signals(sig).name)
        self.request_stop()

    def _stop_event(self) -> asyncio.Event:
        """The stop event, for the loop's tasks (serve() makes it before it starts them)."""
        assert self._stop is not None
        return self._stop

    def request_stop(self) -> None:
        if self._stop is not None:
            self._stop.set()
            for event in self._wakeups:  # the socket loops stop now, not after their poll interval
                event.set()

    def _on_sighup(self) -> None:
        log.info("SIGHUP: reopening log files")
        for handler in logging.getLogger().handlers:
            if isinstance(handler, logging.FileHandler):
                handler.close()  # reopened lazily on the next record
        for ch in self.runs.values():
            if ch.writer is not None:
                w = ch.writer
                ch._executor.submit(w.reopen_logs)

    # ------------------------------------------------------------------ data

    async def _wait_readable(self, sock: zmq.Socket[Any], event: asyncio.Event, timeout: float) -> None:
        event.clear()
        if self._stop is not None and self._stop.is_set():
            return
        # ZMQ_FD is edge-triggered: check EVENTS after clearing, before sleeping.
        if cast(int, sock.getsockopt(zmq.EVENTS)) & zmq.POLLIN:
            return
        try:
            await asyncio.wait_for(event.wait(), timeout)
        except asyncio.TimeoutError:
            pass

    async def _data_loop(self) -> None:
        loop = asyncio.get_running_loop()
        readable = asyncio.Event()
        fd = self.pull.fileno()
        loop.add_reader(fd, readable.set)
        self._wakeups.append(readable)
        stop = self._stop_event()
        try:
            while not stop.is_set():
                if self.backlog() > self.config.max_backlog_bytes:
                    # The writers are behind: leave messages in the socket (and
                    # so in the clients' bounded queues) until they catch up.
                    self.throttled += 1
                    await asyncio.sleep(0.005)
                    continue
                if self.drain_data(_RECV_BUDGET) >= _RECV_BUDGET:
                    await asyncio.sleep(0)
                    continue
                await self._wait_readable(self.pull, readable, 0.25)
            # Final drain: everything clients sent before we stopped is written.
            while self.drain_data(_RECV_BUDGET):
                while self.backlog() > self.config.max_backlog_bytes:
                    await asyncio.sleep(0.005)  # the batchers are still writing
        finally:
            loop.remove_reader(fd)

    def backlog(self) -> int:
        """Bytes of received data not yet written, over all runs."""
        return sum(ch.pending_bytes + ch.unwritten_bytes for ch in self.runs.values())

    def drain_data(self, budget: int) -> int:
        """Receive and route up to ``budget`` data messages without blocking."""
        n = 0
        recv = self.pull.recv_multipart
        while n < budget:
            try:
                frames = recv(zmq.NOBLOCK, copy=False)  # large values stay in the frames ZeroMQ received
            except zmq.Again:
                break
            n += 1
            try:
                msg = codec.decode(frames)
            except ProtocolError as exc:
                self._reject(type(exc).__name__, exc)
                self._fill_hole(frames, exc)
                continue
            if msg.KIND not in m.DATA_KINDS:
                self._reject("WrongSocket", f"{msg.KIND} request sent on the data socket")
                continue
            ch = self.runs.get(msg.env.run)
            if ch is None:
                ch = self._channel_for_unknown_run(msg.env.run)
                if ch is None:
                    continue
            ch.add(msg)
            if ch.pending_bytes + ch.unwritten_bytes > self.config.max_backlog_bytes:
                break  # large values: let the writers catch up before reading more
        self.received += n
        return n

    def _fill_hole(self, frames: Any, exc: ProtocolError) -> None:
        """A refused ``log()`` or output message still takes its place in its client's sequence.

        Its client never sends it again (it re-sends only to a new daemon), so
        without this its number would stay missing and the client's durable
        number would stop below it for good: every later ``flush()`` timing
        out, ``log()`` blocking at the in-flight bound.  Instead, for a run open
        here, the call is stored as a drop of one call (``clients.dropped_calls``,
        shown by ``kobo show`` and the viewer) and a ``refused`` event says why.
        """
        peeked = codec.peek_envelope(frames)
        if peeked is None:
            return  # no sender or number to account it to
        kind, env = peeked
        ch = self.runs.get(env.run)
        if ch is None or env.seq < 1 or kind not in (m.LogMessage.KIND, m.OutputMessage.KIND):
            return  # a batch's or a drop report's numbers are in its unreadable payload
        calls = 1 if kind == m.LogMessage.KIND else 0
        ch.add(m.DropReport(m.Envelope(env.run, env.client, env.seq, env.rank, 0, 0, time.time()), env.seq, calls))
        what = "log() call" if calls else "captured output"
        self._spawn(
            self._run_event(
                ch,
                "refused",
                f"client {env.client}: {kind} message #{env.seq} refused ({exc}); its {what} is counted as dropped",
            ),
            f"refused:{env.run}",
        )

    async def _run_event(self, ch: RunChannel, kind: str, detail: str) -> None:
        try:
            await ch.event(kind, detail)
        except KoboError as exc:
            log.error("%s: could not record a %s event: %s", ch.path, kind, exc)

    def _channel_for_unknown_run(self, run: str) -> RunChannel | None:
        # Data for a run this daemon never opened: a client of a previous daemon
        # instance.  Accept it only for an existing run folder.
        if not os.path.isabs(run) or not os.path.isfile(os.path.join(run, fmt.METADATA_JSON)):
            self._reject("UnknownRun", f"data for {run!r}, which was never opened")
            return None
        problem = run_path_problem(run)
        if problem is not None:
            self._reject("RunPath", f"data for {run!r}: {problem}")
            return None
        return self._channel(run)

    def _channel(self, run: str) -> RunChannel:
        ch = self.runs.get(run)
        if ch is None:
            ch = self.runs[run] = RunChannel(
                run,
                flush_interval=self.config.flush_interval,
                batch_messages=self.config.batch_messages,
                durable=self.config.durability == "sync",
                pool=self.compute_pool(),
            )
            self._spawn(self._run_batcher(ch), f"batcher:{run}")
        return ch

    def compute_pool(self) -> ThreadPoolExecutor:
        """The threads that do the CPU work of rich values for every run (created at first use).

        Threads, not processes: what they run (zlib, numpy's reductions and
        binning, SHA-256) releases the GIL on large buffers, and a thread reads
        the received frames where they are instead of pickling megabytes to
        another process.
        """
        if self._pool is None:
            n = self.config.compute_threads or compute_threads_default()
            self._pool = ThreadPoolExecutor(n, thread_name_prefix="kobo-compute")
        return self._pool

    async def _run_batcher(self, ch: RunChannel) -> None:
        try:
            await ch.batcher()
        except Exception:
            log.exception("batcher of %s failed", ch.path)
        finally:
            if self.runs.get(ch.path) is ch:
                del self.runs[ch.path]

    def _reject(self, reason: str, detail: object) -> None:
        self.rejected[reason] += 1
        now = time.monotonic()
        if now - self._last_reject_log > 1.0:  # rate-limited: a flood must not flood the log
            self._last_reject_log = now
            log.warning("rejected message (%s): %s [%d rejected so far]", reason, detail, sum(self.rejected.values()))

    # --------------------------------------------------------------- control

    async def _control_loop(self) -> None:
        loop = asyncio.get_running_loop()
        readable = asyncio.Event()
        fd = self.router.fileno()
        loop.add_reader(fd, readable.set)
        self._wakeups.append(readable)
        stop = self._stop_event()
        try:
            while not stop.is_set():
                for _ in range(256):
                    try:
                        frames = self.router.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    self._on_request(frames)
                else:
                    await asyncio.sleep(0)
                    continue
                await self._wait_readable(self.router, readable, 0.25)
        finally:
            loop.remove_reader(fd)

    def _on_request(self, frames: list[bytes]) -> None:
        if len(frames) < 2:
            self._reject("MalformedMessage", "request without an identity frame")
            return
        ident, body = frames[0], frames[1:]
        try:
            req = codec.decode(body)
        except ProtocolError as exc:
            self._reject(type(exc).__name__, exc)
            self._reply(ident, m.ErrorReply(m.Envelope(), code_for(exc), str(exc)))
            return
        if req.KIND not in m.REQUEST_KINDS:
            self._reject("WrongSocket", f"{req.KIND} sent on the control socket")
            self._reply(ident, m.ErrorReply(req.env, code_for(ProtocolError()), f"{req.KIND} is not a request"))
            return
        self._spawn(self._handle(ident, req), f"request:{req.KIND}")

    def _reply(self, ident: bytes, msg: Any) -> None:
        try:
            self.router.send_multipart([ident, *codec.encode(msg)], zmq.NOBLOCK)
        except zmq.ZMQError as exc:
            log.debug("could not reply to a client: %s", exc)

    async def _handle(self, ident: bytes, req: Any) -> None:
        env = m.Envelope(run=req.env.run, client=req.env.client, seq=req.env.seq)
        try:
            reply = await self._dispatch(req, env)
        except (KoboError, OSError, asyncio.TimeoutError) as exc:
            if isinstance(exc, asyncio.TimeoutError):
                text = f"timed out waiting for data of {req.env.run}"
            else:
                text = str(exc)
            reply = m.ErrorReply(env, code_for(exc), text)
        except Exception as exc:  # never let one request take the daemon down
            log.exception("request %s failed", req.KIND)
            reply = m.ErrorReply(env, code_for(exc), f"internal error: {exc!r}")
        self._reply(ident, reply)

    async def _dispatch(self, req: Any, env: m.Envelope) -> Any:
        if isinstance(req, m.OpenRun):
            return await self._open(req, env)
        if isinstance(req, m.FlushRequest):
            ch = self._attached_channel(req)
            durable = await ch.barrier(req.env.client, req.last_seq, self.config.graceful_timeout)
            return m.Flushed(env, durable)
        if isinstance(req, m.FinishRun):
            # On a storage error the data stays staged and the client is detached
            # with its status once the data is written; on a timeout it stays
            # attached, and the reaper marks the run crashed if the process dies.
            ch = self._attached_channel(req)
            status = req.status if req.status in fmt.STATUSES else fmt.STATUS_FINISHED
            # A crash report (often a forwarder's, for a dead process) waits only
            # a little for the data: what has not arrived by then never will.
            wait = self.config.graceful_timeout
            if status == fmt.STATUS_CRASHED:
                wait = min(wait, _CRASH_WAIT)
            try:
                durable = await ch.barrier(req.env.client, req.last_seq, wait)
            except StorageError:
                ch.deferred_finish[req.env.client] = (req.last_seq, status)
                raise
            except asyncio.TimeoutError:
                if status != fmt.STATUS_CRASHED:
                    raise
                durable = ch.durable_seq(req.env.client)
                await ch.event(
                    "client_data_missing",
                    f"client {req.env.client} crashed after sending calls up to #{req.last_seq}; only calls up to "
                    f"#{durable} arrived (the rest died with it)",
                )
            final = await ch.detach(req.env.client, status)
            return m.Finished(env, durable, final)
        if isinstance(req, m.AckRequest):
            return await self._ack(req, env)
        if isinstance(req, m.StatusRequest):
            return m.StatusReply(env, self.status())
        if isinstance(req, m.ShutdownRequest):
            self.request_stop()
            return m.Ack(env)
        raise ProtocolError(f"unhandled request {req.KIND}")  # pragma: no cover

    async def _ack(self, req: m.AckRequest, env: m.Envelope) -> m.Acked:
        """Tell a client how far its data is durable (waiting a little if asked)."""
        ch = self._attached_channel(req)
        client = req.env.client
        # A client this instance never heard of re-attaches after a restart: the data it waits for went
        # to the previous instance.  Answered at once, it learns of this instance and re-sends that data
        # (instead of the request being held, for data that is not coming, until its wait runs out).
        reattached = client not in ch.clients
        await ch.ensure_client(client, req.env.rank, req.pid, req.pid_start, req.host)
        if req.want_seq > ch.durable_seq(client) and req.wait_ms > 0 and ch.error is None and not reattached:
            try:
                await ch.barrier(client, req.want_seq, min(req.wait_ms, 5000) / 1000)
            except (asyncio.TimeoutError, StorageError):
                pass  # answered below with what is durable and the run's error
        err = ch.error
        return m.Acked(env, ch.durable_seq(client), self.instance, code_for(err) if err else 0, str(err) if err else "")

    def _attached_channel(self, req: Any) -> RunChannel:
        ch = self.runs.get(req.env.run)
        if ch is None:
            if not os.path.isfile(os.path.join(req.env.run, fmt.METADATA_JSON)):
                raise StorageError(f"run {req.env.run} is not open in this daemon")
            check_run_path(req.env.run)
            ch = self._channel(req.env.run)
        ch.last_heard = time.monotonic()
        return ch

    async def _open(self, req: m.OpenRun, env: m.Envelope) -> m.RunOpened:
        run = req.env.run
        if not os.path.isabs(run):
            raise StorageError(f"run path must be absolute, got {run!r}")
        check_run_path(run)  # no '..', and a place its user could write
        if not _is_json(req.config):  # else metadata.json could never be written again
            raise MalformedMessage(
                f"run config must be JSON data (string keys; no NaN, inf or bytes; at most {MAX_CONFIG_DEPTH} levels deep)"
            )
        ch = self._channel(run)
        state = ClientState(req.env.client, req.env.rank, req.pid, req.pid_start, req.host)
        meta = {
            "name": req.name,
            "project": req.project,
            "run_id": req.run_id,
            "config": req.config,
            "world_size": req.world_size,
            "annotation": req.annotation,
        }
        info = await ch.attach(state, meta)
        return m.RunOpened(
            env,
            info["created"],
            info["last_step"],
            info["last_global_step"],
            info["attached"],
            self.instance,
            info.get("kinds") or {},
            str(info.get("name") or ""),
            info.get("same_rank") or [],
        )

    # ---------------------------------------------------------- housekeeping

    async def _housekeeping(self) -> None:
        """Mark runs of dead client processes crashed; close idle runs."""
        stop = self._stop_event()
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), self.config.reap_interval)
            except asyncio.TimeoutError:
                pass
            if stop.is_set():
                break
            dead = [
                (ch, c)
                for ch in list(self.runs.values())
                for c in ch.attached
                if c.client not in ch.deferred_finish
                and c.host == _HOST
                and c.pid
                and not process_alive(c.pid, c.pid_start)
            ]
            if dead:
                self.drain_data(1 << 30)  # whatever the dead process sent is already here
            for ch, c in dead:
                log.warning("client pid %d of %s died without finishing", c.pid, ch.path)
                try:
                    await ch.flush_now()
                    await ch.detach(c.client, fmt.STATUS_CRASHED)
                except KoboError as exc:
                    log.error("could not mark %s crashed: %s", ch.path, exc)
            if self.config.stale_run > 0:
                await self._end_stale_runs()
            now = time.monotonic()
            for ch in list(self.runs.values()):
                if (
                    not ch.attached
                    and not ch.pending
                    and ch.error is None
                    and now - ch.last_activity > self.config.idle_close
                ):
                    ch.stop()

    async def _end_stale_runs(self) -> None:
        """Mark crashed the runs no live writer is known for and nothing came from for ``stale_run`` seconds.

        A client's process can be judged only on its own machine.  A client on
        another node whose forwarder could not report its end (both died, the
        forwarder's state was lost) would leave its run ``running`` forever;
        live clients are heard from at least every 30 s (their keepalive), so
        silence for ``stale_run`` means they are gone.
        """
        now = time.monotonic()
        limit = self.config.stale_run
        for ch in list(self.runs.values()):
            clients = ch.attached
            if not clients or now - ch.last_heard < limit or ch.error is not None:
                continue
            if any(c.host == _HOST and c.pid and process_alive(c.pid, c.pid_start) for c in clients):
                continue  # a live process here: it may just be idle
            who = ", ".join(f"pid {c.pid or '?'} on {c.host or '?'} (rank {c.rank})" for c in clients[:8])
            why = (
                f"nothing arrived from its {len(clients)} client(s) for {now - ch.last_heard:.0f}s (limit "
                f"--stale-run {limit:g}s) and none is known to be alive: {who}{' ...' if len(clients) > 8 else ''}"
            )
            log.warning("marking %s crashed: %s", ch.path, why)
            try:
                await ch.event("stale", why)
                for c in clients:
                    await ch.detach(c.client, fmt.STATUS_CRASHED)
            except KoboError as exc:
                log.error("could not mark %s crashed: %s", ch.path, exc)

    async def _system_metrics(self, interval: float) -> None:
        """Sample this node every ``interval`` seconds into each run with a live client here.

        Written as data of a client of the daemon's own (``sys-<instance>``,
        rank 0, sequence numbers per run), at the run's latest rank-0 step and
        global step, so the samples line up with training on every x axis and
        resuming a run does not continue from them.  The sampling (``/proc``,
        NVML) runs in a worker thread; training processes do nothing for it.
        Only clients of this host count: a client of another node (through its
        forwarder) gets that node's samples from the forwarder (forward.py,
        "Node samples"), so no node is sampled twice into a run.
        """
        from .sysmetrics import NodeSampler

        loop = asyncio.get_running_loop()
        try:
            sampler = await loop.run_in_executor(None, NodeSampler, _HOST)
        except Exception as exc:  # never take the daemon down for this
            log.error("system metrics disabled: %r", exc)
            return
        client = "sys-" + self.instance
        seqs: dict[str, int] = {}  # kept while the daemon lives: a reopened run continues its numbers
        stop = self._stop_event()
        try:
            while not stop.is_set():
                try:
                    await asyncio.wait_for(stop.wait(), interval)
                except asyncio.TimeoutError:
                    pass
                values = await loop.run_in_executor(None, sampler.sample)  # every interval: rates cover it
                if stop.is_set() or not values:
                    continue
                wall = time.time()
                for ch in list(self.runs.values()):
                    if ch.error is not None or not any(c.host == _HOST for c in ch.attached):
                        continue
                    try:
                        writer = await ch.ensure_writer()
                        step, global_step = await ch.call(writer.last_step, 0)
                    except KoboError:
                        continue
                    seq = seqs[ch.path] = seqs.get(ch.path, 0) + 1
                    ch.add(m.LogMessage(m.Envelope(ch.path, client, seq, 0, step, global_step, wall), dict(values)))
        finally:
            await loop.run_in_executor(None, sampler.close)

    def status(self) -> dict[str, Any]:
        return {
            "pid": os.getpid(),
            "instance": self.instance,
            "endpoint": str(self.ep),
            "uptime": round(time.time() - self.started_at, 3),
            "received": self.received,
            "rejected": {**self.rejected, **(self.peer_guard.counts() if self.peer_guard else {})},
            "backlog_bytes": self.backlog(),
            "throttled": self.throttled,
            "runs": [ch.info() for ch in self.runs.values()],
            **({"listen": self._tcp.info()} if self._tcp is not None else {}),
        }

    def _close_sockets(self) -> None:
        if self._ctx is not None:
            for sock in (getattr(self, "pull", None), getattr(self, "router", None)):
                if sock is not None:
                    sock.close(linger=0)
            if self.peer_guard is not None:
                self.peer_guard.close()
            self._ctx.term()
            self._ctx = None


MAX_CONFIG_DEPTH = 100  # as the client's to_config


def _is_json(value: Any) -> bool:
    """Whether ``value`` is plain JSON data (what ``json.dump(allow_nan=False)`` writes), at most
    ``MAX_CONFIG_DEPTH`` levels of dicts and lists deep."""
    stack = [(value, 0)]
    while stack:  # not recursive: a hostile config may nest deeply
        v, depth = stack.pop()
        t = type(v)
        if t is dict or t is list:
            if depth >= MAX_CONFIG_DEPTH:  # json.dump of metadata.json would recurse too deep
                return False
            if t is dict:
                if any(type(k) is not str for k in v):
                    return False
                stack.extend((x, depth + 1) for x in v.values())
            else:
                stack.extend((x, depth + 1) for x in v)
        elif t is float:
            if v - v != 0.0:  # NaN or infinite
                return False
        elif v is not None and t not in (str, int, bool):
            return False
    return True


def _read_pid(path: str) -> int | None:
    try:
        with open(path) as f:
            return int(f.read().strip() or 0) or None
    except (OSError, ValueError):
        return None


def sd_notify(state: str) -> None:
    """Tell systemd our state over ``$NOTIFY_SOCKET`` (no-op elsewhere)."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.connect(addr)
            s.sendall(state.encode())
    except OSError as exc:
        print(f"kobo-daemon: sd_notify failed: {exc}", file=sys.stderr)
