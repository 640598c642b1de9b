"""``kobo-serve`` under load (issue 13): 50 readers on a run that a training script writes at full speed.

Everything runs on this machine, over loopback, and stops by itself:

* data (written through the real client and daemon, :class:`IsolatedDaemon`):
  ``default/big1m`` (``loss``, 1,000,000 points, finished), a few small finished
  runs in ``default`` and ``other``;
* a real ``kobo-serve`` process (``python -m kohakuboard.viewer.serve_cli``) on
  127.0.0.1, port 0, over that folder, with one user (``user add --password-stdin``)
  and an API token (``token create``) sent as ``Authorization: Bearer``; its
  default log level (info: access log on, as the systemd unit runs it);
* a training script (its own process): ``Board`` on a new run, then ``log()`` of
  32 scalars per call in a loop for ``--duration`` seconds (8 s), then ``flush()``.
  Durable values/s = values read back through ``RunReader`` (every point of the
  32 metrics; ``m0`` checked value by value) / (first ``log()`` .. ``flush()``
  returned).

Phases, per repeat (the order alternates between repeats):

1. **alone**: the training script with the server up and nobody reading;
2. **loaded**: the same with ``--readers`` (50) concurrent readers in a load-generator process of
   their own (``--role load``; asyncio + one ``httpx.AsyncClient`` each, as one browser page each)
   at the lowest CPU priority (``--reader-nice 19`` and ``SCHED_IDLE``, ``--no-reader-sched-idle``
   to turn that off): the simulated browsers, which in real use run on other machines, take as little
   CPU from training as the scheduler allows, and their CPU time is counted apart (``/proc``).
   kobo-serve runs with its defaults (``--nice 10``, ``--sched-idle``: see ``viewer/serve.py``
   ``yield_cpu``).  Each reader holds ``/api/events?runs=default/<live run>`` (SSE)
   open and, in a loop with a random 0.2-0.5 s pause, requests the run list ``/api/runs``, the
   live run's summary, the live ``m0`` chart once (``width=1000``) and then its tail
   (``series?metric=m0&start=N&width=1000``, N = the previous answer's ``committed``, as the page asks), and every 5th loop the
   1M-point chart ``/api/runs/default/big1m/series?metric=loss&width=1000``.  The readers are
   connected (stream open, first loop done) before the training script starts logging;
   latencies count for requests started between its first ``log()`` and its ``flush()`` returning;
3. **static**: the same readers against the cheapest possible server (``--role static``: one
   asyncio stream per connection, a path prefix picks bytes recorded from kobo-serve; an SSE event
   every 0.25 s), at the server's niceness, at the request rate the readers reached on kobo-serve
   in the phase before (a loop every ``period`` s) and with tails as long.  What training loses
   here is what the readers and any HTTP server at all cost it on this machine; the difference to
   phase 2 is kobo-serve's own cost;
4. with ``--pinned``, also **alone, pinned** and **loaded, pinned**: the same two
   with the training script and the daemon on CPU 0 and the server and the
   readers on CPU 1 (``sched_setaffinity`` of every thread).  No CPU is shared
   then, so what is left of a slowdown comes through the files (locks, I/O) --
   or from other processes on the machine, which the scheduler moves to the
   less busy CPU 0 (on a shared machine that makes it worse, not cleaner).

Whether the readers slow training through CPU time or otherwise also shows in
every run: the training script's values per CPU-second of its own (with and
without readers) and its client queue peak (``log()`` blocks when the daemon
falls behind).

Then the baseline without load: **one reader** (no training script) makes the
same requests in a tight loop (``--single`` loops, 10-30 ms pauses), every loop
with the 1M-point chart.

Recorded: p50/p99 per request kind (client side, i.e. including the wait in
this process's event loop), the ``Server-Timing`` of the series requests
(read/reduce inside the server's worker thread), SSE ``run`` events per reader,
errors (any exception or non-200), the writer's durable values/s with and
without readers (and their ratio per repeat), CPU seconds of the server, the
daemon, the training script and the load generator (the readers) per phase, and of
everything else on the machine (``/proc/stat`` busy time minus those: other
processes, the noise), the server's VmRSS (sampled every 50 ms), and
``/api/stats`` polls of the shared live poller against what one poller per
stream would have made.

Prints a markdown table and writes ``results/serve.json`` (``--json``), and the
metric records to ``--out`` for ``run_all.py``.  The machine has 2 cores: the
training script, its daemon, the server and the readers share them, so the
readers' CPU (client side, here; remote browsers in real use) counts against
training too: the static phase measures how much.  About 3.5 minutes (``--quick``:
about 1; ``--pinned``: about 5).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import random
import secrets
import struct
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

import _common as c
from bench_viewer import ServerProcess, spike_series, timing_of

N_POINTS = 1_000_000
BIG_RUN = "big1m"
N_METRICS = 32
BIG_EVERY = 5  # loaded readers ask for the 1M-point chart every 5th loop
THINK_S = (0.2, 0.5)  # pause between a reader's loops
SINGLE_THINK_S = (0.01, 0.03)
KINDS = ("runs", "summary", "chart", "tail", "big")
PAGE_WIDTH = 1000  # the chart width the readers' tails carry, as the page's do (longer tails come reduced)
KIND_NAMES = {
    "runs": "run list",
    "summary": "live run summary",
    "chart": "live m0 chart (width 1000)",
    "tail": "live m0 tail (start=N)",
    "big": "1M-point chart (width 1000)",
}
CLK_TCK = os.sysconf("SC_CLK_TCK")


def serve_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "kohakuboard.viewer.serve_cli", *args]


def cpu_s(pid: int | None) -> float | None:
    """utime + stime of ``pid`` in seconds (None if it is gone)."""
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/stat") as f:
            parts = f.read().rsplit(")", 1)[1].split()
        return (int(parts[11]) + int(parts[12])) / CLK_TCK
    except (OSError, IndexError, ValueError):
        return None


def own_cpu_s() -> float:
    t = os.times()
    return t.user + t.system


STAT_FIELDS = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")


def machine_ticks() -> list[int]:
    """The machine's CPU time by kind (``/proc/stat``, first line), in ticks."""
    with open("/proc/stat") as f:
        return [int(v) for v in f.readline().split()[1 : 1 + len(STAT_FIELDS)]]


def machine_share(t0: list[int], t1: list[int]) -> dict[str, float]:
    """% of the machine's capacity (all cores) per kind between two :func:`machine_ticks`."""
    d = [b - a for a, b in zip(t0, t1)]
    total = sum(d) or 1
    out = {k: 100 * v / total for k, v in zip(STAT_FIELDS, d)}
    return {"busy": out["user"] + out["nice"] + out["system"] + out["irq"] + out["softirq"], **out}


ALL_CPUS = sorted(os.sched_getaffinity(0))


def pin(pid: int | None, cpus: set[int] | list[int]) -> None:
    """Set the CPU affinity of every thread of ``pid`` (threads made later inherit their creator's)."""
    if pid is None:
        return
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return
    for tid in tids:
        try:
            os.sched_setaffinity(int(tid), set(cpus))
        except OSError:
            pass


# ------------------------------------------------------------------ data


def write_runs(base_dir: str) -> dict[str, Any]:
    """The finished 1M-point run and a few small finished runs."""
    from kohakuboard.client import Board

    y, _ = spike_series(N_POINTS)
    values = y.tolist()
    b = Board("big-1m", {"kind": "big"}, run_id=BIG_RUN, base_dir=base_dir, capture_output=False)
    log = b.log
    t0 = time.perf_counter()
    for v in values:
        log(loss=v)
    b.flush()
    t1 = time.perf_counter()
    b.finish()
    c.log(f"wrote {BIG_RUN}: 1M points in {t1 - t0:.2f} s")
    for k in range(6):
        project = "default" if k < 4 else "other"
        with Board(
            f"small-{k}",
            {"lr": 0.1 * (k + 1), "batch": 32},
            project=project,
            run_id=f"small{k}",
            base_dir=base_dir,
            capture_output=False,
        ) as sb:
            for i in range(200):
                sb.log(loss=1.0 / (i + 1), acc=i / 200)
    return {"write_1m_s": t1 - t0, "big_path": b.path}


# ------------------------------------------------------------ the writer


WRITER_SCRIPT = r"""
import json, os, sys, time
from kohakuboard.client import Board
run_id, base_dir, duration = sys.argv[1], sys.argv[2], float(sys.argv[3])
names = [f"m{i}" for i in range(32)]
b = Board(name=run_id, config={"bench": "serve"}, run_id=run_id, base_dir=base_dir, capture_output=False)
b.log(**{n: -1.0 for n in names})  # the run and its 32 metrics exist before the readers come
b.flush()
print("ready", b.path, flush=True)
if sys.stdin.readline().strip() != "go":
    b.finish()
    sys.exit(0)
log = b.log
calls = 0
cpu0 = os.times()
t0 = time.time()
p0 = time.perf_counter()
end = p0 + duration
while True:
    for _ in range(200):
        v = float(calls)
        log(**{n: v for n in names})
        calls += 1
    if time.perf_counter() >= end:
        break
p1 = time.perf_counter()
b.flush()
p2 = time.perf_counter()
cpu1 = os.times()
stats = b.stats()
print(json.dumps({"calls": calls, "t0": t0, "t_logged": t0 + (p1 - p0), "t_flushed": t0 + (p2 - p0),
                  "log_s": p1 - p0, "elapsed_s": p2 - p0, "flush_s": p2 - p1,
                  "cpu_s": (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system),
                  "dropped_values": stats["dropped_values"], "peak_queue": stats["peak_queue"]}), flush=True)
b.finish()
"""


class Writer:
    """The training script: started, waits for ``go``, logs for ``duration`` s, flushes, reports, finishes."""

    def __init__(self, run_id: str, base_dir: str, duration: float) -> None:
        self.run_id = run_id
        self.proc = subprocess.Popen(
            [sys.executable, "-c", WRITER_SCRIPT, run_id, base_dir, str(duration)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
        )
        line = self.readline(60)
        if not line.startswith("ready "):
            raise RuntimeError(f"the training script did not start: {line!r} (exit {self.proc.poll()})")
        self.path = line.split(" ", 1)[1].strip()

    def readline(self, timeout: float) -> str:
        out: list[str] = []
        t = threading.Thread(target=lambda: out.append(self.proc.stdout.readline()), daemon=True)  # type: ignore[union-attr]
        t.start()
        t.join(timeout)
        if not out or not out[0]:
            raise RuntimeError(f"the training script said nothing within {timeout:.0f} s (exit {self.proc.poll()})")
        return out[0]

    def go(self) -> None:
        self.proc.stdin.write("go\n")  # type: ignore[union-attr]
        self.proc.stdin.flush()  # type: ignore[union-attr]

    def result(self, timeout: float) -> dict[str, Any]:
        return json.loads(self.readline(timeout))

    def wait(self, timeout: float = 60) -> None:
        try:
            self.proc.wait(timeout)
        finally:
            self.kill()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def read_back(path: str, calls: int) -> dict[str, Any]:
    """Every point of the 32 metrics through ``RunReader``; ``m0`` must be -1, 0, 1, ..., calls - 1."""
    import numpy as np

    from kohakuboard.storage.reader import RunReader

    t0 = time.perf_counter()
    points = {}
    with RunReader(path) as r:
        for i in range(N_METRICS):
            s = r.series(f"m{i}")
            points[f"m{i}"] = len(s)
            if i == 0:
                want = np.arange(-1, len(s) - 1, dtype=np.float64)
                assert np.array_equal(np.asarray(s["value"]), want), "m0 is not the logged sequence"
    total = sum(points.values())
    return {
        "points": points,
        "values": total - N_METRICS,
        "complete": all(n == calls + 1 for n in points.values()),
        "read_s": time.perf_counter() - t0,
    }


# ------------------------------------------------------------- readers


def in_server(timing: dict[str, float]) -> float:
    """ms a series request spent in the server's worker: read + reduce, or the answer-cache lookup."""
    if "cache" in timing:
        return timing["cache"]
    return timing.get("read", float("nan")) + timing.get("reduce", 0.0)


def series_header(body: bytes) -> dict[str, Any]:
    (h,) = struct.unpack_from("<I", body, 0)
    return json.loads(body[4 : 4 + h])


class Recorder:
    """What the readers saw: (wall start, ms, kind) per request, server timings, SSE events, errors."""

    def __init__(self, n: int) -> None:
        self.requests: list[tuple[float, float, str]] = []
        self.timing: list[tuple[float, str, dict[str, float]]] = []
        self.events: list[list[float]] = [[] for _ in range(n)]
        self.errors: list[tuple[float, str, str]] = []
        self.ready = 0
        self.bytes: dict[str, int] = {}
        self.bytes_sum: dict[str, int] = {}

    def error(self, kind: str, msg: str) -> None:
        self.errors.append((time.time(), kind, msg[:300]))


class LiteResponse:
    """What :func:`timed` reads of an answer (the names httpx uses)."""

    def __init__(self, status_code: int, headers: dict[str, str], content: bytes) -> None:
        self.status_code, self.headers, self.content = status_code, headers, content

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", "replace")


class LiteStream(LiteResponse):
    """An answer whose body is read as it comes: :meth:`aiter_lines`, or :meth:`aread` at once."""

    def __init__(self, rd: asyncio.StreamReader, status_code: int, headers: dict[str, str]) -> None:
        super().__init__(status_code, headers, b"")
        self.rd = rd

    async def aread(self) -> bytes:
        self.content = await LiteClient._body(self.rd, self.headers)
        return self.content

    async def aiter_lines(self) -> AsyncIterator[str]:
        chunked = self.headers.get("transfer-encoding", "").lower() == "chunked"
        buf = b""
        while data := await LiteClient._chunk(self.rd) if chunked else await self.rd.read(1 << 16):
            buf += data
            *done, buf = buf.split(b"\n")
            for line in done:
                yield line.rstrip(b"\r").decode("utf-8", "replace")


class LiteClient:
    """The simulated browser's HTTP/1.1: one kept-alive connection, GET only, plain asyncio streams.

    The readers stand for browsers on other machines; their CPU on this machine is an artefact of
    the benchmark, and httpx spends ~1 ms of it per request (as much as kobo-serve).  This client
    parses only what the server sends (status line, headers, a Content-Length or chunked body) and
    costs a fraction of that, so more of what training loses is the server's doing.
    ``--reader-http httpx`` uses httpx instead.
    """

    def __init__(self, origin: str, headers: dict[str, str], timeout: float = 120.0) -> None:
        host_port = origin.split("://", 1)[1].rstrip("/")
        self.host, _, port = host_port.rpartition(":")
        self.port = int(port)
        extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        self.head = f"Host: {host_port}\r\n{extra}Accept: */*\r\n".encode()
        self.timeout = timeout
        self.conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def _open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection(self.host, self.port, limit=1 << 22)

    @staticmethod
    async def _head(rd: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
        raw = await rd.readuntil(b"\r\n\r\n")
        lines = raw[:-4].decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers = {}
        for line in lines[1:]:
            k, _, v = line.partition(":")
            headers[k.strip().lower()] = v.strip()
        return status, headers

    @staticmethod
    async def _chunk(rd: asyncio.StreamReader) -> bytes:
        size = int((await rd.readuntil(b"\r\n"))[:-2].split(b";", 1)[0], 16)
        data = await rd.readexactly(size + 2)
        return data[:-2]

    def _request(self, wr: asyncio.StreamWriter, path: str) -> None:
        wr.write(b"GET " + path.encode() + b" HTTP/1.1\r\n" + self.head + b"\r\n")

    @classmethod
    async def _body(cls, rd: asyncio.StreamReader, headers: dict[str, str]) -> bytes:
        if headers.get("transfer-encoding", "").lower() != "chunked":
            return await rd.readexactly(int(headers.get("content-length", "0")))
        parts = []
        while chunk := await cls._chunk(rd):
            parts.append(chunk)
        await rd.readuntil(b"\r\n")  # the end of the (empty) trailer
        return b"".join(parts)

    async def _get(self, path: str) -> LiteResponse:
        for attempt in (0, 1):  # a kept-alive connection the server closed meanwhile: once more on a new one
            if self.conn is None:
                self.conn = await self._open()
            rd, wr = self.conn
            try:
                self._request(wr, path)
                status, headers = await self._head(rd)
            except (ConnectionError, asyncio.IncompleteReadError):
                self.close()
                if attempt:
                    raise
                continue
            body = await self._body(rd, headers)
            if headers.get("connection", "").lower() == "close":
                self.close()
            return LiteResponse(status, headers, body)
        raise ConnectionError("unreachable")

    async def get(self, path: str) -> LiteResponse:
        return await asyncio.wait_for(self._get(path), self.timeout)

    @contextlib.asynccontextmanager
    async def stream(self, method: str, path: str) -> AsyncIterator[LiteStream]:
        """``method`` ``path`` on a connection of its own, its body read as it comes (SSE), as httpx's."""
        assert method == "GET", method
        rd, wr = await self._open()
        try:
            self._request(wr, path)
            status, headers = await self._head(rd)
            yield LiteStream(rd, status, headers)
        finally:
            wr.close()

    def close(self) -> None:
        if self.conn is not None:
            self.conn[1].close()
            self.conn = None

    async def __aenter__(self) -> LiteClient:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        self.close()


async def timed(cl: Any, rec: Recorder, kind: str, url: str) -> Any:
    w = time.time()
    t0 = time.perf_counter()
    try:
        r = await cl.get(url)
    except Exception as exc:
        rec.error(kind, f"{type(exc).__name__}: {exc}")
        return None
    ms = (time.perf_counter() - t0) * 1e3
    if r.status_code != 200:
        rec.error(kind, f"HTTP {r.status_code}: {r.text[:200]}")
        return None
    rec.requests.append((w, ms, kind))
    rec.bytes[kind] = len(r.content)
    rec.bytes_sum[kind] = rec.bytes_sum.get(kind, 0) + len(r.content)
    if "server-timing" in r.headers:
        rec.timing.append((w, kind, timing_of(r.headers["server-timing"])))
    return r


async def sse(cl: Any, rec: Recorder, idx: int, live: str, opened: asyncio.Event, stop: asyncio.Event) -> None:
    try:
        async with cl.stream("GET", f"/api/events?runs=default/{live}") as r:
            if r.status_code != 200:
                await r.aread()
                rec.error("sse", f"HTTP {r.status_code}: {r.text[:200]}")
                return
            opened.set()
            async for line in r.aiter_lines():
                if line.startswith("event: run"):
                    rec.events[idx].append(time.time())
        if not stop.is_set():
            rec.error("sse", "the event stream ended")
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        if not stop.is_set():
            rec.error("sse", f"{type(exc).__name__}: {exc}")


async def reader(
    idx: int,
    origin: str,
    token: str,
    live: str,
    rec: Recorder,
    stop: asyncio.Event,
    think: tuple[float, float],
    big_every: int,
    max_loops: int | None = None,
    period: float | None = None,
    http: str = "lite",
) -> None:
    """One page: the live stream open, and the run list / summary / tail / 1M chart polled in a loop.

    ``period``: instead of a ``think`` pause after each loop, start a loop every ``period`` s
    (+-20 %; at once if the last one took longer), so that a fast server gets no more requests.
    """
    import httpx

    rng = random.Random(idx)
    base = f"/api/runs/default/{live}"
    big = f"/api/runs/default/{BIG_RUN}/series?metric=loss&width=1000"
    auth = {"authorization": f"Bearer {token}"}
    client: Any = (
        LiteClient(origin, auth)
        if http == "lite"
        else httpx.AsyncClient(base_url=origin, headers=auth, timeout=httpx.Timeout(120.0))
    )
    async with client as cl:
        opened = asyncio.Event()
        stream = asyncio.create_task(sse(cl, rec, idx, live, opened, stop))
        try:
            await asyncio.sleep(rng.uniform(0, think[1]))
            n: int | None = None
            first_big = rng.randrange(big_every)
            loops = 0
            while not stop.is_set() and (max_loops is None or loops < max_loops):
                began = time.perf_counter()
                await timed(cl, rec, "runs", "/api/runs")
                await timed(cl, rec, "summary", base)
                if n is None:
                    r = await timed(cl, rec, "chart", base + "/series?metric=m0&width=1000")
                else:
                    r = await timed(cl, rec, "tail", base + f"/series?metric=m0&start={n}&width={PAGE_WIDTH}")
                if r is not None:
                    n = series_header(r.content)["committed"]
                if loops % big_every == first_big % big_every:
                    await timed(cl, rec, "big", big)
                if loops == 0:
                    try:
                        await asyncio.wait_for(opened.wait(), 30)
                    except asyncio.TimeoutError:
                        rec.error("sse", "the event stream did not open within 30 s")
                    rec.ready += 1
                loops += 1
                if period is None:
                    pause = rng.uniform(*think)
                else:
                    pause = max(0.0, began + period * rng.uniform(0.8, 1.2) - time.perf_counter())
                try:
                    await asyncio.wait_for(stop.wait(), pause)
                except asyncio.TimeoutError:
                    pass
        finally:
            stream.cancel()
            try:
                await stream
            except (asyncio.CancelledError, Exception):
                pass


async def api_stats(origin: str, token: str) -> dict[str, Any]:
    import httpx

    async with httpx.AsyncClient(base_url=origin, headers={"authorization": f"Bearer {token}"}, timeout=60) as cl:
        r = await cl.get("/api/stats")
        r.raise_for_status()
        return r.json()


# ---------------------------------------------------------------- phases


class Pinned:
    """``pinned``: the training script and the daemon on CPU 0, the server and the readers on CPU 1.

    Nothing then competes with training for CPU time; what is left of a slowdown
    is interference through the files (locks, page cache, I/O).  Undone on exit.
    """

    def __init__(
        self, enabled: bool, writer_pid: int, daemon_pid: int | None, server_pid: int, readers_pid: int | None = None
    ) -> None:
        self.enabled = enabled
        self.train = [writer_pid, daemon_pid]
        self.serve = [server_pid, readers_pid or os.getpid()]

    def __enter__(self) -> Pinned:
        if self.enabled:
            for pid in self.train:
                pin(pid, {ALL_CPUS[0]})
            for pid in self.serve:
                pin(pid, {ALL_CPUS[1]})
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.enabled:
            for pid in self.train + self.serve:
                pin(pid, ALL_CPUS)


class Phase:
    """Per-phase CPU of the server, daemon and this process, and the server's RSS samples in it."""

    def __init__(
        self, server_pid: int, daemon_pid: int | None, rss: c.RssSampler, readers_pid: int | None = None
    ) -> None:
        self.pids = {"server": server_pid, "daemon": daemon_pid}
        if readers_pid is not None:
            self.pids["readers"] = readers_pid
        self.rss = rss

    def __enter__(self) -> Phase:
        self.t0 = time.perf_counter()
        self.cpu0 = {k: cpu_s(p) for k, p in self.pids.items()}
        self.own0 = own_cpu_s()
        self.rss_i0 = len(self.rss.samples)
        self.m0 = machine_ticks()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.t1 = time.perf_counter()
        self.cpu1 = {k: cpu_s(p) for k, p in self.pids.items()}
        self.own1 = own_cpu_s()
        self.m1 = machine_ticks()

    def result(self) -> dict[str, Any]:
        wall = self.t1 - self.t0
        out: dict[str, Any] = {"wall_s": wall}
        for k in self.pids:
            a, b = self.cpu0[k], self.cpu1[k]
            out[f"{k}_cpu_s"] = None if a is None or b is None else b - a
        if "readers" not in self.pids:
            out["readers_cpu_s"] = self.own1 - self.own0
        samples = self.rss.samples[self.rss_i0 :]
        out["server_rss_peak_mb"] = max(samples, default=0) / 1024
        out["machine_pct"] = machine_share(self.m0, self.m1)
        d = [b - a for a, b in zip(self.m0, self.m1)]
        idle = d[STAT_FIELDS.index("idle")] + d[STAT_FIELDS.index("iowait")] + d[STAT_FIELDS.index("steal")]
        out["machine_busy_cpu_s"] = (sum(d) - idle) / CLK_TCK
        return out


def alone_phase(
    env: c.IsolatedDaemon, server: ServerProcess, rss: c.RssSampler, run_id: str, duration: float, pinned: bool = False
) -> dict[str, Any]:
    w = Writer(run_id, env.base_dir, duration)
    try:
        with Pinned(pinned, w.proc.pid, env.pid(), server.proc.pid), Phase(server.proc.pid, env.pid(), rss) as ph:
            w.go()
            res = w.result(duration + 120)
        w.wait()
    finally:
        w.kill()
    back = read_back(w.path, res["calls"])
    out = {"writer": res, "read_back": back, "values_s": back["values"] / res["elapsed_s"], **ph.result()}
    out["writer_cpu_s"] = res["cpu_s"]
    out["values_per_writer_cpu_s"] = back["values"] / res["cpu_s"] if res["cpu_s"] else None
    out["others_cpu_s"] = others_cpu(out)
    return out


def others_cpu(ph: dict[str, Any]) -> float:
    """CPU seconds the machine spent on anything but the server, daemon, training script and this process."""
    ours = sum(ph.get(k) or 0.0 for k in ("server_cpu_s", "daemon_cpu_s", "readers_cpu_s", "writer_cpu_s"))
    return ph["machine_busy_cpu_s"] - ours


class LoadGenerator:
    """The readers in a process of their own (``--role load``), at ``nice`` (19: the lowest priority).

    Started before the phase; prints ``ready`` once every reader has its stream open and
    has made its first loop; records from ``go`` to ``stop`` (stdin) and then prints what
    it saw as JSON.  Its CPU time is its own (``/proc``), not the server's or training's.
    """

    def __init__(
        self,
        origin: str,
        token: str,
        live: str,
        n_readers: int,
        nice: int,
        period: float | None = None,
        idle: bool = True,
        http: str = "lite",
    ) -> None:
        cfg = {
            "http": http,
            "origin": origin,
            "token": token,
            "live": live,
            "readers": n_readers,
            "nice": nice,
            "idle": idle,
            "think": THINK_S,
            "big_every": BIG_EVERY,
            "period": period,
        }
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--role", "load", json.dumps(cfg)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
            cwd=os.path.dirname(os.path.abspath(__file__)),
        )
        self.pid = self.proc.pid
        t0 = time.perf_counter()
        line = self._readline(150)
        if not line.startswith("ready"):
            self.kill()
            raise RuntimeError(f"the load generator did not get ready: {line!r}")
        self.ramp_s = time.perf_counter() - t0

    def _readline(self, timeout: float) -> str:
        out: list[str] = []
        t = threading.Thread(target=lambda: out.append(self.proc.stdout.readline()), daemon=True)  # type: ignore[union-attr]
        t.start()
        t.join(timeout)
        return out[0] if out else ""

    def say(self, word: str) -> None:
        self.proc.stdin.write(word + "\n")  # type: ignore[union-attr]
        self.proc.stdin.flush()  # type: ignore[union-attr]

    def finish(self) -> dict[str, Any]:
        self.say("stop")
        line = self._readline(120)
        try:
            return json.loads(line)
        finally:
            self.kill()

    def kill(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def load_role(cfg: dict[str, Any]) -> None:
    """``--role load``: the readers of :func:`reader`, driven by ``go``/``stop`` lines on stdin."""
    from kohakuboard.viewer.serve import yield_cpu

    yield_cpu(cfg["nice"], cfg.get("idle", False))
    n = cfg["readers"]
    rec = Recorder(n)
    out: dict[str, Any] = {}

    async def run() -> None:
        loop = asyncio.get_running_loop()
        go, done, stop = asyncio.Event(), asyncio.Event(), asyncio.Event()

        def commands() -> None:
            for line in sys.stdin:
                word = line.strip()
                if word == "go":
                    loop.call_soon_threadsafe(go.set)
                elif word == "stop":
                    loop.call_soon_threadsafe(go.set)
                    loop.call_soon_threadsafe(done.set)
                    return
            loop.call_soon_threadsafe(done.set)

        threading.Thread(target=commands, daemon=True).start()
        tasks = [
            asyncio.create_task(
                reader(
                    i,
                    cfg["origin"],
                    cfg["token"],
                    cfg["live"],
                    rec,
                    stop,
                    tuple(cfg["think"]),
                    cfg["big_every"],
                    period=cfg.get("period"),
                    http=cfg.get("http", "lite"),
                )
            )
            for i in range(n)
        ]
        try:
            deadline = time.perf_counter() + 120
            while rec.ready < n and time.perf_counter() < deadline and not all(t.done() for t in tasks):
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.5)  # every reader into its loop
            print(
                "ready" if rec.ready == n else f"only {rec.ready}/{n} readers connected: {rec.errors[:3]}", flush=True
            )
            await go.wait()
            out["go"], out["cpu_go"] = time.time(), own_cpu_s()
            await done.wait()
            out["stop"], out["cpu_stop"] = time.time(), own_cpu_s()
        finally:
            stop.set()
            await asyncio.gather(*tasks, return_exceptions=True)

    asyncio.run(run())
    print(
        json.dumps(
            {
                **out,
                "requests": rec.requests,
                "timing": rec.timing,
                "events": rec.events,
                "errors": rec.errors,
                "bytes": rec.bytes,
                "bytes_sum": rec.bytes_sum,
            }
        ),
        flush=True,
    )


# ---------------------------------------------------------------- the static baseline


def capture_tail(origin: str, token: str, run_id: str, directory: str, rows: int) -> int:
    """Rewrite the static server's tail answer with ``rows`` rows (as long as kobo-serve's tails were)."""
    import httpx

    base = f"/api/runs/default/{run_id}"
    with httpx.Client(base_url=origin, headers={"authorization": f"Bearer {token}"}, timeout=120) as cl:
        committed = series_header(cl.get(base + "/series?metric=m0&width=1000").content)["committed"]
        r = cl.get(base + f"/series?metric=m0&start={max(0, committed - rows)}&width={PAGE_WIDTH}")
    assert r.status_code == 200, r.text[:200]
    with open(os.path.join(directory, "tail"), "wb") as f:
        f.write(r.headers["content-type"].encode() + b"\n" + r.content)
    return len(r.content)


def capture_canned(origin: str, token: str, run_id: str, directory: str) -> dict[str, int]:
    """What the static server answers: kobo-serve's own answers to each request kind, for a finished run
    like the live ones (32 metrics; the tail as long as a live tail under load: 60,000 rows)."""
    import httpx

    os.makedirs(directory, exist_ok=True)
    base = f"/api/runs/default/{run_id}"
    with httpx.Client(base_url=origin, headers={"authorization": f"Bearer {token}"}, timeout=120) as cl:
        chart = cl.get(base + "/series?metric=m0&width=1000")
        committed = series_header(chart.content)["committed"]
        got = {
            "runs": cl.get("/api/runs"),
            "summary": cl.get(base),
            "chart": chart,
            "tail": cl.get(base + f"/series?metric=m0&start={max(0, committed - 60_000)}&width={PAGE_WIDTH}"),
            "big": cl.get(f"/api/runs/default/{BIG_RUN}/series?metric=loss&width=1000"),
        }
        event = ""
        with cl.stream("GET", f"/api/events?runs=default/{run_id}") as r:
            block: list[str] = []
            for line in r.iter_lines():
                block.append(line)
                if line == "" and any(ln.startswith("event: run") for ln in block):
                    event = "\n".join(block) + "\n"
                    break
                if line == "":
                    block = []
    sizes = {}
    for kind, r in got.items():
        assert r.status_code == 200, (kind, r.status_code, r.text[:200])
        with open(os.path.join(directory, kind), "wb") as f:
            f.write(r.headers["content-type"].encode() + b"\n" + r.content)
        sizes[kind] = len(r.content)
    with open(os.path.join(directory, "event"), "w") as f:
        f.write(event)
    sizes["event"] = len(event)
    return sizes


def static_role(cfg: dict[str, Any]) -> None:
    """``--role static``: the cheapest HTTP server that gives the readers the same answers (recorded from
    kobo-serve by :func:`capture_canned`): one asyncio stream per connection, a path prefix picks the bytes."""
    from kohakuboard.viewer.serve import yield_cpu

    yield_cpu(cfg["nice"], cfg.get("idle", False))
    canned: dict[str, bytes] = {}
    for kind in KINDS:
        with open(os.path.join(cfg["dir"], kind), "rb") as f:
            ctype, _, body = f.read().partition(b"\n")
        canned[kind] = (
            b"HTTP/1.1 200 OK\r\ncontent-type: "
            + ctype
            + b"\r\ncontent-length: "
            + str(len(body)).encode()
            + b"\r\ncache-control: no-store\r\n\r\n"
            + body
        )
    with open(os.path.join(cfg["dir"], "event"), "rb") as f:
        event = f.read()
    chunk = f"{len(event):x}\r\n".encode() + event + b"\r\n"
    sse_head = (
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-store\r\n"
        b"transfer-encoding: chunked\r\n\r\n" + b"d\r\nretry: 1000\n\n\r\n"
    )

    def kind_of(path: bytes) -> str:
        if path == b"/api/runs" or path.startswith(b"/api/runs?"):
            return "runs"
        if b"/" + BIG_RUN.encode() + b"/" in path:
            return "big"
        if b"&start=" in path:
            return "tail"
        if b"/series?" in path:
            return "chart"
        return "summary"

    async def handle(rd: asyncio.StreamReader, wr: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await rd.readuntil(b"\r\n\r\n")
                path = head.split(b" ", 2)[1]
                if path.startswith(b"/api/events"):
                    wr.write(sse_head)
                    while True:  # a live run's state changes every poll (0.25 s)
                        await wr.drain()
                        await asyncio.sleep(0.25)
                        wr.write(chunk)
                wr.write(canned[kind_of(path)])
                await wr.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
            pass
        finally:
            wr.close()

    async def main_() -> None:
        srv = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = srv.sockets[0].getsockname()[1]
        print(f"static baseline server at http://127.0.0.1:{port}/", flush=True)
        async with srv:
            await srv.serve_forever()

    asyncio.run(main_())


def loaded_phase(
    env: c.IsolatedDaemon,
    server: ServerProcess,
    rss: c.RssSampler,
    token: str,
    run_id: str,
    duration: float,
    n_readers: int,
    pinned: bool = False,
    reader_nice: int = 19,
    reader_idle: bool = True,
    reader_http: str = "lite",
    kobo: bool = True,
    period: float | None = None,
) -> dict[str, Any]:
    """The training script with ``n_readers`` readers (a :class:`LoadGenerator`) on ``server``:
    kobo-serve (``kobo``) or the static baseline."""
    w = Writer(run_id, env.base_dir, duration)
    lg: LoadGenerator | None = None
    try:
        lg = LoadGenerator(server.origin, token, run_id, n_readers, reader_nice, period, reader_idle, reader_http)
        stats0 = asyncio.run(api_stats(server.origin, token)) if kobo else {"polls": 0}
        t_stats0 = time.perf_counter()
        with (
            Pinned(pinned, w.proc.pid, env.pid(), server.proc.pid, lg.pid),
            Phase(server.proc.pid, env.pid(), rss, lg.pid) as ph,
        ):
            lg.say("go")
            w.go()
            res = w.result(duration + 120)
        stats1 = asyncio.run(api_stats(server.origin, token)) if kobo else {"polls": 0}
        t_stats1 = time.perf_counter()
        seen = lg.finish()
        w.wait()
    finally:
        w.kill()
        if lg is not None:
            lg.kill()
    back = read_back(w.path, res["calls"])
    t0, t1 = res["t0"], res["t_flushed"]
    window = [(ms, kind) for (ws, ms, kind) in seen["requests"] if t0 <= ws <= t1]
    lat = {k: sorted(ms for ms, kind in window if kind == k) for k in KINDS}
    timing = {
        k: [tm for ws, kind, tm in seen["timing"] if kind == k and t0 <= ws <= t1] for k in ("chart", "tail", "big")
    }
    events = [len([e for e in ev if t0 <= e <= t1]) for ev in seen["events"]]
    polls = stats1["polls"] - stats0["polls"]
    out = {
        "writer": res,
        "read_back": back,
        "values_s": back["values"] / res["elapsed_s"],
        **ph.result(),
        "writer_cpu_s": res["cpu_s"],
        "window_s": t1 - t0,
        "ramp_s": lg.ramp_s,
        "values_per_writer_cpu_s": back["values"] / res["cpu_s"] if res["cpu_s"] else None,
        "lat_ms": {k: v for k, v in lat.items()},
        "p50_ms": {k: c.percentile(v, 50) for k, v in lat.items()},
        "p99_ms": {k: c.percentile(v, 99) for k, v in lat.items()},
        "requests": {k: len(v) for k, v in lat.items()},
        "requests_per_s": {k: len(v) / (t1 - t0) for k, v in lat.items()},
        "server_timing_median_ms": {
            k: {
                **{f: c.median(t.get(f, float("nan")) for t in v) for f in ("read", "reduce")},
                "in_server": c.median(in_server(t) for t in v),
                "cached_pct": 100 * sum("cache" in t for t in v) / len(v),
            }
            for k, v in timing.items()
            if v
        },
        "bytes": seen["bytes"],
        "bytes_sum": seen["bytes_sum"],
        "mean_bytes": {
            k: seen["bytes_sum"].get(k, 0) / max(1, sum(1 for *_, kind in seen["requests"] if kind == k)) for k in KINDS
        },
        "sse_events": events,
        "sse_events_total": sum(len(ev) for ev in seen["events"]),
        "errors": len(seen["errors"]),
        "error_samples": seen["errors"][:10],
        "stats0": stats0,
        "stats1": stats1,
        "polls": polls,
        "polls_s": t_stats1 - t_stats0,
        "polls_50_independent": polls * n_readers,
    }
    out["others_cpu_s"] = others_cpu(out)
    served = sum(len(v) for v in lat.values())
    out["requests_total"] = served
    out["server_cpu_ms_per_request"] = 1e3 * out["server_cpu_s"] / served if served else None
    out["readers_cpu_ms_per_request"] = 1e3 * out["readers_cpu_s"] / served if served else None
    return out


def single_reader(server: ServerProcess, token: str, live: str, loops: int) -> dict[str, Any]:
    """The baseline: one reader alone (no training script), every loop with the 1M-point chart."""
    rec = Recorder(1)

    async def run() -> None:
        stop = asyncio.Event()
        await reader(0, server.origin, token, live, rec, stop, SINGLE_THINK_S, 1, max_loops=loops)

    cpu0 = cpu_s(server.proc.pid)
    t0 = time.perf_counter()
    asyncio.run(run())
    wall = time.perf_counter() - t0
    cpu1 = cpu_s(server.proc.pid)
    lat = {k: sorted(ms for _, ms, kind in rec.requests if kind == k) for k in KINDS}
    big_timing = [tm for _, kind, tm in rec.timing if kind == "big"]
    return {
        "lat_ms": lat,
        "p50_ms": {k: c.percentile(v, 50) for k, v in lat.items()},
        "p99_ms": {k: c.percentile(v, 99) for k, v in lat.items()},
        "requests": {k: len(v) for k, v in lat.items()},
        "errors": len(rec.errors),
        "error_samples": rec.errors[:10],
        "server_timing_big_median_ms": {
            "in_server": c.median(in_server(t) for t in big_timing) if big_timing else float("nan"),
            "cached_pct": 100 * sum("cache" in t for t in big_timing) / max(1, len(big_timing)),
        },
        "server_cpu_s": None if cpu0 is None or cpu1 is None else cpu1 - cpu0,
        "wall_s": wall,
        "server_cpu_ms_per_request": None
        if cpu0 is None or cpu1 is None
        else 1e3 * (cpu1 - cpu0) / max(1, sum(len(v) for v in lat.values())),
    }


# ---------------------------------------------------------------- report


def fmt_machine(pct: dict[str, float]) -> str:
    return (
        f"busy {pct['busy']:.0f} % (user {pct['user'] + pct['nice']:.0f}, system {pct['system']:.0f}, "
        f"softirq {pct['softirq']:.0f}), idle {pct['idle']:.0f} %, iowait {pct['iowait']:.0f} %, "
        f"steal {pct['steal']:.0f} %"
    )


def build_records(res: dict[str, Any], n_readers: int) -> list[dict[str, Any]]:
    m = c.metric
    med = c.median
    loaded, alone, single = res["loaded"], res["alone"], res["single"]
    static = res.get("static") or []
    recs = []
    for kind, label in (("runs", "GET /api/runs"), ("big", "1M-point chart /series?width=1000")):
        for q in (50, 99):
            key = f"p{q}_ms"
            sv = single[key][kind]
            st = f"; static server, same load: {med(p[key][kind] for p in static):.0f} ms" if static else ""
            recs.append(
                m(
                    f"serve_{kind}_p{q}_ms",
                    f"{label} p{q}, {n_readers} readers + training script",
                    unit="ms",
                    target=None,
                    op="<=",
                    values=[p[key][kind] for p in loaded],
                    baseline=f"1 reader, no training script: {sv:.1f} ms{st}",
                    baseline_values={
                        "single_reader_ms": sv,
                        "single_requests": single["requests"][kind],
                        "static_ms": [p[key][kind] for p in static],
                    },
                    extra={
                        "requests_in_window": [p["requests"][kind] for p in loaded],
                        "requests_per_s": [p["requests_per_s"][kind] for p in loaded],
                    },
                )
            )
    for kind in ("summary", "tail"):
        sv50, sv99 = single["p50_ms"][kind], single["p99_ms"][kind]
        recs.append(
            m(
                f"serve_{kind}_p50_ms",
                f"{KIND_NAMES[kind]} p50 (p99 in extra), {n_readers} readers",
                unit="ms",
                target=None,
                op="<=",
                values=[p["p50_ms"][kind] for p in loaded],
                baseline=f"1 reader: p50 {sv50:.1f} ms, p99 {sv99:.1f} ms; under load p99 "
                f"{med(p['p99_ms'][kind] for p in loaded):.0f} ms",
                baseline_values={"single_p50_ms": sv50, "single_p99_ms": sv99},
                extra={
                    "p99_ms": [p["p99_ms"][kind] for p in loaded],
                    "requests_per_s": [p["requests_per_s"][kind] for p in loaded],
                },
            )
        )
    big_t = [p["server_timing_median_ms"].get("big", {}) for p in loaded]
    recs.append(
        m(
            "serve_big_server_ms",
            "1M-point chart: time in the server's worker (read + reduce, or the answer cache; Server-Timing), loaded",
            unit="ms",
            target=None,
            op="<=",
            values=[t.get("in_server", float("nan")) for t in big_t],
            baseline="1 reader: {:.1f} ms".format(single["server_timing_big_median_ms"]["in_server"]),
            extra={"per_repeat": big_t, "single": single["server_timing_big_median_ms"]},
            note="client p50 minus this = waiting (server event loop, worker threads, this process's loop)",
        )
    )
    ev = [med(p["sse_events"]) for p in loaded]
    recs.append(
        m(
            "serve_sse_events",
            "SSE run events per reader during the write (median reader)",
            unit="events",
            target=None,
            op=">=",
            values=ev,
            baseline="; ".join(
                f"min {min(p['sse_events'])} max {max(p['sse_events'])} in {p['window_s']:.1f} s" for p in loaded
            ),
            extra={"per_reader": [p["sse_events"] for p in loaded], "window_s": [p["window_s"] for p in loaded]},
        )
    )
    recs.append(
        m(
            "serve_errors",
            f"errors (exceptions, non-200) across {n_readers} readers",
            unit="errors",
            target=0.0,
            op="<=",
            values=[float(p["errors"]) for p in loaded],
            baseline=f"1 reader: {single['errors']}",
            extra={"samples": [p["error_samples"] for p in loaded]},
        )
    )
    recs.append(
        m(
            "serve_writer_loaded_values_s",
            f"training script durable values/s, {n_readers} readers",
            unit="values/s",
            target=None,
            op=">=",
            values=[p["values_s"] for p in loaded],
            baseline=f"no readers {med(a['values_s'] for a in alone) / 1e6:.2f} M values/s "
            f"[{min(a['values_s'] for a in alone) / 1e6:.2f} .. {max(a['values_s'] for a in alone) / 1e6:.2f}]",
            baseline_values={"alone_values_s": [a["values_s"] for a in alone]},
            extra={
                "writer_cpu_s": [p["writer_cpu_s"] for p in loaded],
                "alone_writer_cpu_s": [a["writer_cpu_s"] for a in alone],
                "complete": [p["read_back"]["complete"] for p in loaded + alone],
            },
        )
    )
    ratios = [round(100 * p["values_s"] / a["values_s"], 1) for p, a in zip(loaded, alone)]
    recs.append(
        m(
            "serve_writer_ratio_pct",
            "training script: values/s with readers / without (per repeat)",
            unit="%",
            target=95.0,
            op=">=",
            values=ratios,
            baseline=f"ratio of medians {100 * med(p['values_s'] for p in loaded) / med(a['values_s'] for a in alone):.0f} %",
            note="100 % = the readers did not slow training",
        )
    )
    if static:
        sr = [round(100 * p["values_s"] / a["values_s"], 1) for p, a in zip(static, alone)]
        recs.append(
            m(
                "serve_writer_static_ratio_pct",
                "same readers on a static server (canned answers): values/s / without readers",
                unit="%",
                target=None,
                op=">=",
                values=sr,
                baseline=f"static server CPU {med(100 * p['server_cpu_s'] / p['wall_s'] for p in static):.1f} % "
                f"of a core, readers {med(100 * p['readers_cpu_s'] / p['wall_s'] for p in static):.0f} %",
                note="what the readers themselves (and any HTTP server at all) cost training on this machine",
            )
        )
        vs = [round(100 * p["values_s"] / q["values_s"], 1) for p, q in zip(loaded, static)]
        recs.append(
            m(
                "serve_writer_vs_static_pct",
                "kobo-serve's own cost: values/s with readers on kobo-serve / "
                "with the same readers on the static server (per repeat)",
                unit="%",
                target=95.0,
                op=">=",
                values=vs,
                baseline=f"alone-to-alone spread (noise): "
                f"{100 * min(a['values_s'] for a in alone) / max(a['values_s'] for a in alone):.0f} % of the best",
                note="100 % = kobo-serve costs training no more than a server that does no work",
            )
        )
    eff_l = [p["values_per_writer_cpu_s"] for p in loaded if p["values_per_writer_cpu_s"]]
    eff_a = [a["values_per_writer_cpu_s"] for a in alone if a["values_per_writer_cpu_s"]]
    recs.append(
        m(
            "serve_writer_per_cpu",
            f"training script values per CPU-second of its own, {n_readers} readers",
            unit="values/s",
            target=None,
            op=">=",
            values=eff_l,
            baseline=f"no readers {med(eff_a) / 1e6:.2f} M [{min(eff_a) / 1e6:.2f} .. {max(eff_a) / 1e6:.2f}]; "
            f"its CPU {med(100 * p['writer_cpu_s'] / p['wall_s'] for p in loaded):.0f} % of a core with "
            f"readers, {med(100 * a['writer_cpu_s'] / a['wall_s'] for a in alone):.0f} % without; client "
            f"queue peak {med(p['writer']['peak_queue'] for p in loaded):,.0f} with, "
            f"{med(a['writer']['peak_queue'] for a in alone):,.0f} without",
            baseline_values={"alone": eff_a},
            extra={
                "peak_queue": [p["writer"]["peak_queue"] for p in loaded],
                "alone_peak_queue": [a["writer"]["peak_queue"] for a in alone],
            },
            note="same values per CPU-second and an empty queue with readers: training lost CPU time, "
            "it was not blocked by the daemon or by locks",
        )
    )
    lp, ap = res.get("loaded_pinned") or [], res.get("alone_pinned") or []
    if lp and ap:
        recs.append(
            m(
                "serve_writer_pinned_values_s",
                f"same, pinned (training + daemon: CPU 0; server + readers: CPU 1), {n_readers} readers",
                unit="values/s",
                target=None,
                op=">=",
                values=[p["values_s"] for p in lp],
                baseline=f"pinned, no readers {med(a['values_s'] for a in ap) / 1e6:.2f} M values/s "
                f"[{min(a['values_s'] for a in ap) / 1e6:.2f} .. {max(a['values_s'] for a in ap) / 1e6:.2f}]",
                baseline_values={"alone_values_s": [a["values_s"] for a in ap]},
                extra={
                    "p50_ms": [p["p50_ms"] for p in lp],
                    "p99_ms": [p["p99_ms"] for p in lp],
                    "errors": [p["errors"] for p in lp],
                    "sse_events_median": [med(p["sse_events"]) for p in lp],
                    "server_cpu_pct": [100 * p["server_cpu_s"] / p["wall_s"] for p in lp],
                    "machine_pct": [p["machine_pct"] for p in lp],
                    "alone_machine_pct": [a["machine_pct"] for a in ap],
                },
            )
        )
        pr = [round(100 * p["values_s"] / a["values_s"], 1) for p, a in zip(lp, ap)]
        recs.append(
            m(
                "serve_writer_pinned_ratio_pct",
                "pinned: values/s with readers / without (per repeat)",
                unit="%",
                target=95.0,
                op=">=",
                values=pr,
                baseline=f"ratio of medians {100 * med(p['values_s'] for p in lp) / med(a['values_s'] for a in ap):.0f} %",
                note="with no CPU shared, what is left is interference through files/locks/I/O",
            )
        )
    recs.append(
        m(
            "serve_rss_peak_mb",
            "kobo-serve peak VmRSS (whole benchmark)",
            unit="MB",
            target=None,
            op="<=",
            values=[res["rss_peak_mb"]],
            baseline=f"after start {res['rss_start_mb']:.0f} MB; after the single reader "
            f"{res['rss_after_single_mb']:.0f} MB",
            baseline_values={"start_mb": res["rss_start_mb"]},
            extra={
                "loaded_phase_peaks_mb": [p["server_rss_peak_mb"] for p in loaded],
                "at_peak_kb": res.get("rss_at_peak"),
            },
        )
    )
    if static:
        recs.append(
            m(
                "serve_cpu_ms_per_request",
                f"kobo-serve CPU per request, {n_readers} readers (ms)",
                unit="ms",
                target=None,
                op="<=",
                values=[p["server_cpu_ms_per_request"] for p in loaded],
                baseline=f"static server {med(p['server_cpu_ms_per_request'] for p in static):.2f} ms; "
                f"readers {med(p['readers_cpu_ms_per_request'] for p in loaded):.2f} ms per request; "
                f"requests/s {med(p['requests_total'] / p['window_s'] for p in loaded):.0f} (kobo-serve), "
                f"{med(p['requests_total'] / p['window_s'] for p in static):.0f} (static)",
                extra={
                    "static": [p["server_cpu_ms_per_request"] for p in static],
                    "readers_loaded": [p["readers_cpu_ms_per_request"] for p in loaded],
                    "requests_per_s": [p["requests_total"] / p["window_s"] for p in loaded],
                    "static_requests_per_s": [p["requests_total"] / p["window_s"] for p in static],
                },
            )
        )
    cpu = [100 * p["server_cpu_s"] / p["wall_s"] for p in loaded]
    recs.append(
        m(
            "serve_cpu_pct",
            f"kobo-serve CPU (% of one core), {n_readers} readers",
            unit="%",
            target=None,
            op="<=",
            values=[round(v, 1) for v in cpu],
            baseline=f"no readers {med(100 * a['server_cpu_s'] / a['wall_s'] for a in alone):.1f} %; "
            f"1 reader {100 * (single['server_cpu_s'] or 0) / single['wall_s']:.0f} %",
            extra={
                "daemon_cpu_pct": [
                    100 * p["daemon_cpu_s"] / p["wall_s"] for p in loaded if p["daemon_cpu_s"] is not None
                ],
                "alone_daemon_cpu_pct": [
                    100 * a["daemon_cpu_s"] / a["wall_s"] for a in alone if a["daemon_cpu_s"] is not None
                ],
                "readers_cpu_pct": [100 * p["readers_cpu_s"] / p["wall_s"] for p in loaded],
                "writer_cpu_pct": [100 * p["writer_cpu_s"] / p["wall_s"] for p in loaded],
                "alone_writer_cpu_pct": [100 * a["writer_cpu_s"] / a["wall_s"] for a in alone],
                "machine_pct": [p["machine_pct"] for p in loaded],
                "alone_machine_pct": [a["machine_pct"] for a in alone],
                "others_cpu_pct": [100 * p["others_cpu_s"] / p["wall_s"] for p in loaded],
                "alone_others_cpu_pct": [100 * a["others_cpu_s"] / a["wall_s"] for a in alone],
                "server_cpu_ms_per_request": [p["server_cpu_ms_per_request"] for p in loaded],
                "single_server_cpu_ms_per_request": single["server_cpu_ms_per_request"],
            },
        )
    )
    recs.append(
        m(
            "serve_others_cpu_pct",
            "CPU used by other processes on the machine (% of one core), loaded phases",
            unit="%",
            target=None,
            op="<=",
            values=[round(100 * p["others_cpu_s"] / p["wall_s"], 1) for p in loaded],
            baseline=f"no-reader phases {med(100 * a['others_cpu_s'] / a['wall_s'] for a in alone):.0f} %",
            note="anything but kobo-serve, the daemon, the training script and the readers: noise",
        )
    )
    recs.append(
        m(
            "serve_polls",
            f"live poller reads (/api/stats polls) while {n_readers} streams were open",
            unit="polls",
            target=None,
            op="<=",
            values=[float(p["polls"]) for p in loaded],
            baseline="one poller per stream: "
            + "; ".join(
                f"{p['polls_50_independent']:,} ({n_readers} x), {n_readers * p['polls_s'] / 0.25:,.0f} at 0.25 s"
                for p in loaded
            ),
            extra={
                "seconds": [p["polls_s"] for p in loaded],
                "poll_interval_s": [p["polls_s"] / p["polls"] if p["polls"] else None for p in loaded],
                "stats_at_start": [p["stats0"] for p in loaded],
            },
        )
    )
    return recs


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--role":  # the benchmark's own helper processes
        {"load": load_role, "static": static_role}[sys.argv[2]](json.loads(sys.argv[3]))
        return
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="2 repeats of 4 s, 40 single-reader loops")
    p.add_argument("--repeats", type=int, default=None, help="repeats of the alone/loaded pair (default 5, --quick 2)")
    p.add_argument(
        "--duration", type=float, default=None, help="seconds the training script logs (default 8, --quick 4)"
    )
    p.add_argument("--readers", type=int, default=50, help="concurrent readers (default 50)")
    p.add_argument("--single", type=int, default=None, help="loops of the single reader (default 150, --quick 40)")
    p.add_argument("--out", default=None, help="also write the metric records (JSON list) here")
    p.add_argument("--json", default=os.path.join(c.RESULTS_DIR, "serve.json"), help="where to write the results")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (runs, daemon log, accounts) for inspection")
    p.add_argument(
        "--wait-idle",
        type=float,
        default=0,
        metavar="SECONDS",
        help="first wait up to SECONDS for the 1-min load average to fall below 0.7",
    )
    p.add_argument(
        "--reader-nice",
        type=int,
        default=19,
        metavar="N",
        help="niceness of the load generator (the 50 readers' process; default 19, the lowest priority: "
        "the simulated browsers, which in real use run on other machines, take as little CPU from "
        "training as the scheduler allows)",
    )
    p.add_argument(
        "--server-nice",
        type=int,
        default=10,
        metavar="N",
        help="kobo-serve --nice (default 10, its default); the static baseline server runs at the same",
    )
    p.add_argument(
        "--server-sched-idle",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="kobo-serve --sched-idle (its default) or --no-sched-idle; the static baseline server the same",
    )
    p.add_argument(
        "--reader-http",
        choices=("lite", "httpx"),
        default="lite",
        help="the readers' HTTP client: lite (default; plain asyncio streams, a fraction of httpx's CPU per "
        "request, see LiteClient) or httpx",
    )
    p.add_argument(
        "--reader-sched-idle",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the load generator under SCHED_IDLE too (default): like browsers on other machines, the "
        "simulated readers get only CPU time that training does not want",
    )
    p.add_argument(
        "--pinned",
        action="store_true",
        help="also the pinned pair (training script + daemon on CPU 0, server + readers on CPU 1); "
        "about doubles the time",
    )
    args = p.parse_args()
    if len(ALL_CPUS) < 2:
        args.pinned = False
    repeats = args.repeats or (2 if args.quick else 5)
    duration = args.duration or (4.0 if args.quick else 8.0)
    single_loops = args.single or (40 if args.quick else 150)
    from run_all import machine_info, print_report, wait_idle

    if args.wait_idle:
        wait_idle(args.wait_idle)
    started = time.time()
    loads: dict[str, float] = {"start": c.load_average()[0]}
    res: dict[str, Any] = {"alone": [], "loaded": [], "static": []}
    server: ServerProcess | None = None
    static: ServerProcess | None = None
    rss: c.RssSampler | None = None
    with c.IsolatedDaemon(keep=args.keep) as env:
        try:
            env.start()
            res["writes"] = write_runs(env.base_dir)
            cfg = os.path.join(env.dir, "serve-config")
            password = secrets.token_urlsafe(18)
            t0 = time.perf_counter()
            subprocess.run(
                serve_cmd("--config-dir", cfg, "user", "add", "bench", "--password-stdin"),
                input=password + "\n",
                text=True,
                capture_output=True,
                check=True,
                timeout=60,
            )
            out = subprocess.run(
                serve_cmd("--config-dir", cfg, "token", "create", "bench", "--label", "bench_serve"),
                text=True,
                capture_output=True,
                check=True,
                timeout=60,
            )
            token = out.stdout.strip().splitlines()[0]
            t1 = time.perf_counter()
            server = ServerProcess(
                serve_cmd(
                    "--data-dir",
                    env.base_dir,
                    "--config-dir",
                    cfg,
                    "--port",
                    "0",
                    "--nice",
                    str(args.server_nice),
                    "--sched-idle" if args.server_sched_idle else "--no-sched-idle",
                ),
                "kobo-serve",
            )
            res["server_start_s"] = time.perf_counter() - t1
            c.log(
                f"kobo-serve at {server.origin} (pid {server.proc.pid}, started in {res['server_start_s']:.2f} s; "
                f"user + token {t1 - t0:.2f} s)"
            )
            rss = c.RssSampler(server.proc.pid, 0.05)
            rss.__enter__()
            time.sleep(0.2)
            res["rss_start_mb"] = rss.peak_mb
            import httpx

            with httpx.Client(base_url=server.origin, timeout=120) as cl:
                r = cl.get("/api/runs")
                assert r.status_code == 401, f"no credentials: {r.status_code}"
                hdr = {"authorization": f"Bearer {token}"}
                r = cl.get("/api/runs", headers=hdr)
                assert r.status_code == 200 and r.json()["total"] == 7, r.text[:300]
                t = time.perf_counter()
                r = cl.get(f"/api/runs/default/{BIG_RUN}/series?metric=loss&width=1000", headers=hdr)
                res["big_cold_ms"] = (time.perf_counter() - t) * 1e3
                assert r.status_code == 200 and series_header(r.content)["total"] == N_POINTS
                res["big_cold_timing"] = timing_of(r.headers.get("server-timing"))
            c.log(
                f"1M-point chart, first request (reads the series): {res['big_cold_ms']:.0f} ms "
                f"{res['big_cold_timing']}"
            )

            # the static baseline answers what kobo-serve answered for a finished run like the live ones
            w = Writer("canned", env.base_dir, 3.0)
            w.go()
            w.result(120)
            w.wait()
            res["canned_bytes"] = capture_canned(server.origin, token, "canned", os.path.join(env.dir, "canned"))
            canned = os.path.join(env.dir, "canned")
            tail_bytes_per_row = res["canned_bytes"]["tail"] / 60_000
            c.log(f"static baseline answers: {res['canned_bytes']} bytes")

            last_live = ""
            period: float | None = None
            tail_kobo = 0.0
            for i in range(repeats):
                # the static phase follows its kobo-serve phase: it gets the same request rate
                order = ["alone", "loaded", "static"] if i % 2 == 0 else ["loaded", "static", "alone"]
                if args.pinned:
                    order += ["alone_pinned", "loaded_pinned"] if i % 2 == 0 else ["loaded_pinned", "alone_pinned"]
                for which in order:
                    run_id = f"live{i}-{which.replace('_', '-')}"
                    pinned = which.endswith("_pinned")
                    tag = f"repeat {i + 1}/{repeats}{', pinned' if pinned else ''}"
                    loads[run_id] = os.getloadavg()[0]
                    if which.startswith("alone"):
                        ph = alone_phase(env, server, rss, run_id, duration, pinned)
                        c.log(
                            f"{tag}, no readers: {ph['values_s'] / 1e6:.2f} M values/s "
                            f"({ph['read_back']['values']:,} values in {ph['writer']['elapsed_s']:.2f} s, flush "
                            f"{ph['writer']['flush_s']:.2f} s, client queue peak {ph['writer']['peak_queue']:,}, "
                            f"{ph['values_per_writer_cpu_s'] / 1e6:.2f} M values per writer CPU-s); CPU s: writer {ph['writer_cpu_s']:.1f}, daemon "
                            f"{ph['daemon_cpu_s']:.1f}, server {ph['server_cpu_s']:.2f}, other processes {ph['others_cpu_s']:.1f}; machine "
                            f"{fmt_machine(ph['machine_pct'])}"
                        )
                    elif which == "static":
                        # the same request rate and tails as long as in the kobo-serve phase before it
                        tail_rows = int(tail_kobo / tail_bytes_per_row) if tail_kobo else 60_000
                        tail_b = capture_tail(server.origin, token, "canned", canned, tail_rows)
                        static = ServerProcess(
                            [
                                sys.executable,
                                os.path.abspath(__file__),
                                "--role",
                                "static",
                                json.dumps({"dir": canned, "nice": args.server_nice, "idle": args.server_sched_idle}),
                            ],
                            "static-server",
                        )
                        try:
                            ph = loaded_phase(
                                env,
                                static,
                                rss,
                                token,
                                run_id,
                                duration,
                                args.readers,
                                reader_nice=args.reader_nice,
                                reader_idle=args.reader_sched_idle,
                                reader_http=args.reader_http,
                                kobo=False,
                                period=period,
                            )
                        finally:
                            static.stop()
                            static = None
                        ph["period_s"], ph["tail_bytes"] = period, tail_b
                        c.log(
                            f"{tag}, {args.readers} readers on the static server: {ph['values_s'] / 1e6:.2f} M values/s; "
                            f"p50/p99 ms: "
                            + ", ".join(
                                f"{k} {ph['p50_ms'][k]:.0f}/{ph['p99_ms'][k]:.0f}" for k in KINDS if ph["requests"][k]
                            )
                            + f"; {ph['requests_total']} requests; CPU s: static server {ph['server_cpu_s']:.2f}, readers "
                            f"{ph['readers_cpu_s']:.1f}, writer {ph['writer_cpu_s']:.1f}, daemon {ph['daemon_cpu_s']:.1f}, "
                            f"other processes {ph['others_cpu_s']:.1f}; errors {ph['errors']}"
                        )
                    else:
                        ph = loaded_phase(
                            env,
                            server,
                            rss,
                            token,
                            run_id,
                            duration,
                            args.readers,
                            pinned,
                            reader_nice=args.reader_nice,
                            reader_idle=args.reader_sched_idle,
                            reader_http=args.reader_http,
                        )
                        last_live = run_id
                        if not pinned and ph["requests"]["runs"]:  # one run-list request per loop
                            period = args.readers * ph["window_s"] / ph["requests"]["runs"]
                            tail_kobo = ph["mean_bytes"]["tail"]
                        c.log(
                            f"{tag}, {args.readers} readers: {ph['values_s'] / 1e6:.2f} M values/s "
                            f"({ph['read_back']['values']:,} values in {ph['writer']['elapsed_s']:.2f} s, flush "
                            f"{ph['writer']['flush_s']:.2f} s, client queue peak {ph['writer']['peak_queue']:,}, "
                            f"{ph['values_per_writer_cpu_s'] / 1e6:.2f} M values per writer CPU-s); readers connected in {ph['ramp_s']:.1f} s"
                        )
                        c.log(
                            "    p50/p99 ms: "
                            + ", ".join(
                                f"{k} {ph['p50_ms'][k]:.0f}/{ph['p99_ms'][k]:.0f} ({ph['requests_per_s'][k]:.1f}/s)"
                                for k in KINDS
                                if ph["requests"][k]
                            )
                            + f"; Server-Timing medians: "
                            f"{ph['server_timing_median_ms']}"
                        )
                        c.log(
                            f"    SSE events/reader {c.median(ph['sse_events']):.0f} [{min(ph['sse_events'])} .. "
                            f"{max(ph['sse_events'])}], errors {ph['errors']}, polls {ph['polls']} in "
                            f"{ph['polls_s']:.1f} s (stats {ph['stats0']}), server RSS peak "
                            f"{ph['server_rss_peak_mb']:.0f} MB; CPU s: server {ph['server_cpu_s']:.1f}, writer "
                            f"{ph['writer_cpu_s']:.1f}, daemon {ph['daemon_cpu_s']:.1f}, readers "
                            f"{ph['readers_cpu_s']:.1f}, other processes {ph['others_cpu_s']:.1f} in {ph['wall_s']:.1f} s "
                            f"(server {ph['server_cpu_ms_per_request']:.1f} ms CPU per request); machine "
                            f"{fmt_machine(ph['machine_pct'])}"
                        )
                        if ph["errors"]:
                            c.log(f"    !! errors: {ph['error_samples'][:3]}")
                    ph.pop("lat_ms", None)  # the percentiles are kept; the raw lists would bloat the JSON
                    res.setdefault(which, []).append(ph)
            loads["single"] = os.getloadavg()[0]
            res["single"] = single_reader(server, token, last_live, single_loops)
            s = res["single"]
            res["rss_after_single_mb"] = rss.samples[-1] / 1024 if rss.samples else float("nan")
            s.pop("lat_ms")
            c.log(
                "1 reader, no training script, p50/p99 ms: "
                + ", ".join(
                    f"{k} {s['p50_ms'][k]:.1f}/{s['p99_ms'][k]:.1f} (n={s['requests'][k]})"
                    for k in KINDS
                    if s["requests"][k]
                )
                + f"; 1M chart in the server {s['server_timing_big_median_ms']}; errors {s['errors']}"
            )
        finally:
            if rss is not None:
                rss.__exit__(None, None, None)
                res["rss_peak_mb"] = rss.peak_mb
                res["rss_at_peak"] = rss.at_peak
            if static is not None:
                static.stop()
            if server is not None:
                server.stop()
                res["server_log_lines"] = len(server.lines)
                res["server_log_tail"] = [ln.rstrip() for ln in server.lines[-5:]]
                res["server_exit"] = server.proc.returncode
                errs = [ln.rstrip() for ln in server.lines if "Traceback" in ln or " 500 " in ln or "ERROR" in ln]
                res["server_log_errors"] = errs[:20]
                if errs:
                    c.log(f"!! the server logged {len(errs)} error lines, e.g. {errs[:3]}")

    recs = build_records(res, args.readers)
    text = print_report(recs)
    result = {
        "generated_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python", *sys.argv]),
        "repeats": repeats,
        "duration_s": duration,
        "readers": args.readers,
        "quick": args.quick,
        "machine": machine_info(),
        "loadavg_1min_before": loads,
        "loadavg_at_end": os.getloadavg(),
        "total_s": round(time.time() - started, 1),
        "table_markdown": text,
        "detail": res,
        "metrics": recs,
    }
    c.write_results(args.json, result, args.out, recs)


if __name__ == "__main__":
    main()
