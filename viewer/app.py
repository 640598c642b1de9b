"""The viewer's web app: a Starlette application over one folder of runs.

Routes and their responses are documented in ``docs/viewer-api.md``.  Every
read of a run (SQLite, KohakuVault, media files, numpy work) runs in a worker
thread (:mod:`.reads`: a few at a time per run), so a slow request or a run whose
files hang never stalls the others or the live stream.  The app never opens a run for writing.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import json
import math
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, Response, StreamingResponse
from starlette.routing import Route

from ..protocol.errors import KoboError
from ..storage import format as fmt
from ..storage.export import csv_header, csv_lines
from ..storage.reader import RunReader
from . import index as run_index
from . import reduce as R
from .auth import AuthMiddleware
from .index import BadName, NotFound, RunIndex, filter_runs, shown_status
from .live import LiveHub
from .readers import ReaderPool
from .reads import RunReads

STATIC_DIR = os.path.join(os.path.dirname(__file__), "static")
HISTOGRAM_FILES = set(fmt.HISTOGRAM_FILES.values())
HASH_RE = re.compile(r"^([0-9a-f]{64})\.([a-z0-9]{1,10})$")
X_KINDS = ("step", "global_step", "wall", "relative")
MAX_WIDTH = 10_000
SERIES_CACHE_BYTES = 256 << 20
MEDIA_TYPES = {
    "png": "image/png",
    "jpg": "image/jpeg",
    "jpeg": "image/jpeg",
    "gif": "image/gif",
    "webp": "image/webp",
    "bmp": "image/bmp",
    "svg": "image/svg+xml",
    "mp4": "video/mp4",
    "webm": "video/webm",
    "ogv": "video/ogg",
    "mov": "video/quicktime",
    "avi": "video/x-msvideo",
    "mkv": "video/x-matroska",
    "wav": "audio/wav",
    "mp3": "audio/mpeg",
    "ogg": "audio/ogg",
    "flac": "audio/flac",
    "m4a": "audio/mp4",
    "aac": "audio/aac",
    "opus": "audio/opus",
}


CSV_CHUNK_ROWS = 20_000


class ApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def chart_group(metric: str) -> str:
    """The group a metric's chart is shown in: the prefix before the first ``/``, or ``general``."""
    i = metric.find("/")
    return metric[:i] if i > 0 else "general"


def frame(part: bytes) -> bytes:
    """One part of a framed answer (``first-charts``): its length (u32, little-endian), then its bytes."""
    return len(part).to_bytes(4, "little") + part


def _bad(message: str) -> ApiError:
    return ApiError(400, message)


def _json(obj: Any, status: int = 200) -> Response:
    return _json_response(_json_bytes(obj), status)


def _json_response(body: bytes, status: int = 200) -> Response:
    """A JSON body (from :func:`_json_bytes`, or joined from pieces of it), never cached."""
    return Response(body, status_code=status, media_type="application/json", headers={"cache-control": "no-store"})


def _json_bytes(obj: Any) -> bytes:
    """``obj`` encoded as :func:`_json` sends it."""
    return json.dumps(_finite(obj), ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()


def _finite(obj: Any) -> Any:
    """``obj`` as strict JSON: NaN and infinities become null, numpy scalars and arrays plain values."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    if isinstance(obj, np.ndarray):
        if obj.dtype.kind == "f":
            return [v if math.isfinite(v) else None for v in obj.tolist()]
        return obj.tolist()
    if isinstance(obj, np.generic):
        return _finite(obj.item())
    if isinstance(obj, bytes):
        return obj.decode("utf-8", errors="replace")
    return obj


def _int(request: Request, name: str, default: int | None, lo: int | None = None, hi: int | None = None) -> int | None:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise _bad(f"parameter {name!r} must be an integer, got {raw!r}") from None
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise _bad(f"parameter {name!r} must be in [{lo}, {hi}], got {value}")
    return value


def _float(request: Request, name: str) -> float | None:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return None
    try:
        value = float(raw)
    except ValueError:
        raise _bad(f"parameter {name!r} must be a number, got {raw!r}") from None
    if not math.isfinite(value):
        raise _bad(f"parameter {name!r} must be finite, got {raw!r}")
    return value


def _required(request: Request, name: str) -> str:
    value = request.query_params.get(name)
    if not value:
        raise _bad(f"parameter {name!r} is required")
    return value


class StaticCache:
    """The front end's files, read into memory once: served from a dict, never from a path in a URL.

    A name is either a key of the dict (a file that was under ``static/`` at
    start-up) or a 404, so no URL can reach outside the folder.  Each answer
    carries an ETag (sha256 of the bytes) and ``no-cache`` (revalidate: an
    upgraded package is picked up at once; unchanged files cost a 304).
    """

    TYPES = {
        ".js": "text/javascript; charset=utf-8",
        ".css": "text/css; charset=utf-8",
        ".html": "text/html; charset=utf-8",
        ".txt": "text/plain; charset=utf-8",
        ".png": "image/png",
        ".svg": "image/svg+xml",
    }

    def __init__(self, root: str) -> None:
        import hashlib

        self.files: dict[str, tuple[bytes, str, str]] = {}
        self._pages: dict[tuple[str, str | None], bytes] = {}  # (page, mode) -> its bytes with the mode written in
        for dirpath, _, names in os.walk(root):
            for name in names:
                full = os.path.join(dirpath, name)
                rel = os.path.relpath(full, root).replace(os.sep, "/")
                ext = os.path.splitext(name)[1].lower()
                if ext not in self.TYPES:  # LICENSE, VERSION, refresh_uplot.py stay in the package only
                    continue
                with open(full, "rb") as f:
                    data = f.read()
                self.files[rel] = (data, self.TYPES[ext], '"' + hashlib.sha256(data).hexdigest()[:32] + '"')

    def page(self, name: str, mode: str | None = None) -> Response:
        """An HTML page (index.html, login.html) from memory, never cached (it names the other files).

        ``mode`` ("open" or "serve") is written into the page's ``<html data-kobo>`` so its scripts know
        at once which server they are under (outside the inline script: its CSP hash is unchanged)."""
        data, ctype, _ = self.files[name]
        if mode is not None:
            page = self._pages.get((name, mode))
            if page is None:
                page = self._pages[(name, mode)] = data.replace(b"<html ", f'<html data-kobo="{mode}" '.encode(), 1)
            data = page
        return Response(data, media_type=ctype, headers={"cache-control": "no-store"})

    def response(self, name: str, if_none_match: str) -> Response:
        hit = self.files.get(name)
        if hit is None:
            return _json({"error": f"no static file {name!r}"}, 404)
        data, ctype, etag = hit
        headers = {"etag": etag, "cache-control": "no-cache"}
        if etag in [t.strip() for t in if_none_match.split(",")]:
            return Response(status_code=304, headers=headers)
        return Response(data, media_type=ctype, headers=headers)


class ResponseCache:
    """Small LRU of encoded chart answers (a reduced series is ~100 KB whatever its length)."""

    def __init__(self, max_items: int = 512, max_body: int = 1 << 20) -> None:
        self.max_items = max_items
        self.max_body = max_body
        self._items: collections.OrderedDict[Any, bytes] = collections.OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Any) -> bytes | None:
        with self._lock:
            hit = self._items.get(key)
            if hit is not None:
                self._items.move_to_end(key)
            return hit

    def put(self, key: Any, body: bytes) -> None:
        if len(body) > self.max_body:
            return
        with self._lock:
            self._items[key] = body
            self._items.move_to_end(key)
            while len(self._items) > self.max_items:
                self._items.popitem(last=False)


class SeriesCache:
    """Decoded series by (run path, metric, rank, committed length): zooming costs only the reduction."""

    def __init__(self, max_bytes: int = SERIES_CACHE_BYTES) -> None:
        self.max_bytes = max_bytes
        self._items: collections.OrderedDict[tuple[Any, ...], np.ndarray] = collections.OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: tuple[Any, ...], load: Callable[[int], np.ndarray]) -> np.ndarray:
        """The series ``key`` = (run path, metric, rank, committed length n).

        ``load(m)`` reads rows ``[m, n)``.  Committed rows never change, so a live run's
        series grows from its shorter cached length by reading only the new rows: a hundred
        pages following one run cost one small read per commit.
        """
        with self._lock:
            hit = self._items.get(key)
            if hit is not None:
                self._items.move_to_end(key)
                return hit
            shorter = max(
                (k for k in self._items if k[:3] == key[:3] and k[3] < key[3]), key=lambda k: k[3], default=None
            )
            prefix = self._items[shorter] if shorter is not None else None
        value = load(0) if prefix is None else _concat_rows([prefix, load(len(prefix))])
        with self._lock:
            if key not in self._items and value.nbytes <= self.max_bytes // 4:
                # an older length of the same series is useless now
                for old in [k for k in self._items if k[:3] == key[:3]]:
                    self._bytes -= self._items.pop(old).nbytes
                self._items[key] = value
                self._bytes += value.nbytes
                while self._bytes > self.max_bytes and self._items:
                    _, dropped = self._items.popitem(last=False)
                    self._bytes -= dropped.nbytes
        return value


class TailCache:
    """The recent rows of the series that pages follow live, as they were read: (run path, metric, rank) ->
    rows ``[start, end)`` in chunks.

    Every page following a run asks, after each commit, for the rows since the last it has;
    those ranges overlap, so the new rows are read from disk once (by the first page to ask)
    and every tail is cut from memory.  Bounded: at most ``max_rows`` rows per series (the
    oldest chunks go) and ``max_bytes`` in all (the least recently used series go).
    """

    def __init__(self, max_rows: int = 4_000_000, max_bytes: int = 256 << 20) -> None:
        self.max_rows = max_rows
        self.max_bytes = max_bytes
        self._items: collections.OrderedDict[tuple[Any, ...], list[Any]] = collections.OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, series: tuple[Any, ...], start: int, n: int, load: Callable[[int, int], np.ndarray]) -> np.ndarray:
        """Rows ``[start, n)``; ``load(a, b)`` reads rows ``[a, b)`` from the run."""
        with self._lock:
            e = self._items.get(series)
            end: int | None = e[1] if e is not None and e[0] <= start <= e[1] else None  # None: not held
        if end is None:
            rows = load(start, n)
            with self._lock:
                old = self._items.pop(series, None)
                if old is not None:
                    self._bytes -= sum(c.nbytes for c in old[2])
                self._items[series] = [start, n, [rows]]
                self._bytes += rows.nbytes
                self._trim()
            return rows
        if end < n:
            new = load(end, n)
            with self._lock:
                e = self._items.get(series)
                if e is not None and e[1] == end:  # nobody appended these rows meanwhile
                    e[2].append(new)
                    e[1] = n
                    self._bytes += new.nbytes
                    if len(e[2]) > 64:  # keep the list short: one array for the older chunks
                        merged = _concat_rows(e[2][:-1])
                        e[2] = [merged, e[2][-1]]
                    self._trim()
        with self._lock:
            e = self._items.get(series)
            if e is None or not e[0] <= start or e[1] < n:  # trimmed or replaced meanwhile
                e = None
            else:
                self._items.move_to_end(series)
                parts, pos = [e[2][0][:0]], e[0]  # an empty range is an empty array of the rows' dtype
                for c in e[2]:
                    lo, hi = max(start, pos), min(n, pos + len(c))
                    if lo < hi:
                        parts.append(c[lo - pos : hi - pos])
                    pos += len(c)
        if e is None:
            return load(start, n)
        return _concat_rows(parts)

    def _trim(self) -> None:
        for e in self._items.values():
            while len(e[2]) > 1 and e[1] - e[0] - len(e[2][0]) >= self.max_rows:
                gone = e[2].pop(0)
                e[0] += len(gone)
                self._bytes -= gone.nbytes
        while self._bytes > self.max_bytes and len(self._items) > 1:
            _, gone = self._items.popitem(last=False)
            self._bytes -= sum(c.nbytes for c in gone[2])


def _concat_rows(parts: list[np.ndarray]) -> np.ndarray:
    """``np.concatenate`` of 1-D arrays of one structured dtype (a copy of one, too), as a copy of their bytes.

    numpy copies a structured dtype field by field, element by element (~10 ns per row);
    the same rows as raw bytes are one ``memcpy`` (~13x faster for a page's tail).
    """
    if not all(p.flags.c_contiguous for p in parts):
        return np.concatenate(parts)
    dtype = parts[0].dtype
    return np.concatenate([p.view(np.uint8) for p in parts]).view(dtype)


class EncodedLines:
    """The run list's lines as JSON, each encoded once while the index keeps the same line.

    The index hands out the same dict for a run until its files change, so a page polling
    the list of thousands of runs costs a join of cached bytes, not an encoding of them all.
    """

    def __init__(self, max_items: int = 20_000) -> None:
        self.max_items = max_items
        self._items: collections.OrderedDict[int, tuple[dict[str, Any], bytes]] = collections.OrderedDict()
        self._lock = threading.Lock()

    def encoded(self, line: dict[str, Any]) -> bytes:
        if line.get("stored_status") == fmt.STATUS_RUNNING:
            return _json_bytes(line)  # a copy made for this listing (its status may go stale): not kept
        with self._lock:
            hit = self._items.get(id(line))
            if hit is not None and hit[0] is line:
                self._items.move_to_end(id(line))
                return hit[1]
        body = _json_bytes(line)
        with self._lock:
            self._items[id(line)] = (line, body)  # the dict is held: its id is not reused meanwhile
            while len(self._items) > self.max_items:
                self._items.popitem(last=False)
        return body


class Viewer:
    """State shared by the routes: the folder, its run index, the series cache."""

    def __init__(self, base_dir: str) -> None:
        self.index = RunIndex(base_dir)
        self.cache = SeriesCache()
        self.tails = TailCache()
        self.responses = ResponseCache()
        self.readers = ReaderPool()
        # run path -> (stamp, summary without its time-dependent fields): pages polling a run
        # read it once per change
        self.summaries: collections.OrderedDict[str, tuple[Any, dict[str, Any], bytes, float]] = (
            collections.OrderedDict()
        )
        # run path -> when its summary was last asked for (see index.busy)
        self._summary_asks: dict[str, collections.deque[float]] = {}
        self._summaries_lock = threading.Lock()
        self._summary_reads: dict[str, tuple[Any, concurrent.futures.Future[tuple[dict[str, Any], bytes]]]] = {}

    # ------------------------------------------------------------ helpers

    @contextlib.contextmanager
    def open(self, project: str, run_id: str) -> Iterator[RunReader]:
        """A reader of the run for one request (kept open for the next: see :mod:`.readers`)."""
        path = self.index.resolve(project, run_id)
        try:
            lent = self.readers.borrow(path)
        except KoboError as exc:
            raise ApiError(500, f"run {project}/{run_id} cannot be read: {exc}") from exc
        with lent as reader:
            yield reader

    def length(self, reader: RunReader, metric: str, rank: int) -> int:
        """Committed points of ``metric`` from ``rank``; :class:`NotFound` (naming close names) if none."""
        n = reader.num_points(metric, rank)
        if n == 0 and rank not in reader.ranks(metric):
            raise NotFound(_missing_metric(reader, metric, rank))
        return n

    def series(self, reader: RunReader, metric: str, rank: int, n: int | None = None) -> np.ndarray:
        """Every committed point (the first ``n``), decoded once per committed length."""
        if n is None:
            n = self.length(reader, metric, rank)
        return self.cache.get(
            (reader.path, metric, rank, n), lambda m: _concat_rows([reader.series(metric, rank, m, n)])
        )

    # ------------------------------------------------------------- views

    def run_summary(self, project: str, run_id: str) -> dict[str, Any]:
        """The run page's summary, read again only when the run's metadata files changed."""
        base, _, now = self._summary_parts(project, run_id)
        return {**base, **now}

    def run_summary_json(self, project: str, run_id: str) -> bytes:
        """:meth:`run_summary` as the JSON body: the unchanged part encoded once per change."""
        _, encoded, now = self._summary_parts(project, run_id)
        return encoded[:-1] + b"," + _json_bytes(now)[1:]

    def _summary_parts(self, project: str, run_id: str) -> tuple[dict[str, Any], bytes, dict[str, Any]]:
        """(summary read from the files, it as JSON, the fields that change with time)."""
        facts = self.index.info(project, run_id)
        path = self.index.resolve(project, run_id)
        stamp = self.index.key(project, run_id)
        t = time.monotonic()
        with self._summaries_lock:
            # under many pages' demand a live run's summary (~2 ms of CPU for 32 metrics) is read
            # at most every index.BUSY_MAX_AGE_S; the page itself refreshes it every 1.5 s
            busy = run_index.busy(self._summary_asks, path, t)
            hit = self.summaries.get(path)
            if hit is not None and (
                hit[0] == stamp
                or (busy and t - hit[3] < run_index.BUSY_MAX_AGE_S and hit[1]["stored_status"] == fmt.STATUS_RUNNING)
            ):
                self.summaries.move_to_end(path)
                base, encoded = hit[1], hit[2]
            else:
                base = None
        if base is None:
            base, encoded = self._summary_once(path, stamp, project, run_id)
        now = {
            "status": shown_status(path, base["stored_status"], facts.get("last_commit")),
            "last_commit": facts.get("last_commit"),
            "duration": facts.get("duration"),
            "last_step": facts.get("last_step"),
            "num_ranks": facts.get("num_ranks"),
        }
        return base, encoded, now

    def _summary_once(
        self, path: str, stamp: tuple[Any, ...], project: str, run_id: str
    ) -> tuple[dict[str, Any], bytes]:
        """Read a run's summary once for all the requests that want it at the same time.

        The pages following a live run ask for its summary together (after the same live
        event): the first reads it, the others wait for that read and share it.
        """
        mine: tuple[Any, concurrent.futures.Future[tuple[dict[str, Any], bytes]]] = (
            stamp,
            concurrent.futures.Future(),
        )
        with self._summaries_lock:
            flight = self._summary_reads.get(path)
            if flight is None or flight[0] != stamp:
                flight = self._summary_reads[path] = mine
        if flight is not mine:
            return flight[1].result()
        try:
            base = self._read_summary(project, run_id)
            got = (base, _json_bytes(base))
        except BaseException as exc:
            flight[1].set_exception(exc)
            with self._summaries_lock:
                if self._summary_reads.get(path) is flight:
                    del self._summary_reads[path]
            raise
        with self._summaries_lock:
            self.summaries[path] = (stamp, *got, time.monotonic())
            self.summaries.move_to_end(path)
            while len(self.summaries) > 256:
                gone, _ = self.summaries.popitem(last=False)
                self._summary_asks.pop(gone, None)
            if self._summary_reads.get(path) is flight:
                del self._summary_reads[path]
        flight[1].set_result(got)
        return got

    def _read_summary(self, project: str, run_id: str) -> dict[str, Any]:
        with self.open(project, run_id) as r:
            meta = r.metadata
            metrics = r.metric_overview()
            counts = r.item_counts()
            state = r.commit_state()
            clients = r.clients()
            dropped = r.dropped()
        ranks = sorted({rk for m in metrics for rk in m["ranks"]})
        for m in metrics:
            m["points_by_rank"] = {str(k): v for k, v in m["points_by_rank"].items()}
        return {
            "project": project,
            "run_id": str(meta.get("run_id") or run_id),
            "name": str(meta.get("name") or run_id),
            "stored_status": str(meta.get("status", "?")),
            "created_at": meta.get("created_at"),
            "finished_at": meta.get("finished_at"),
            "config": meta.get("config") or {},
            "metadata": meta,
            "ranks": ranks,
            "world_size": meta.get("world_size"),
            "dropped": dropped,
            "metrics": metrics,
            "items": {
                kind: [
                    {
                        "name": n,
                        "count": sum(per.values()),
                        "ranks": list(per),
                        "counts_by_rank": {str(k): v for k, v in per.items()},
                    }
                    for n, per in names.items()
                ]
                for kind, names in counts.items()
            },
            "clients": clients,
            "version": _version(state, meta),
        }

    def first_charts(self, project: str, run_id: str, rank: int, count: int) -> list[tuple[str, int]]:
        """(metric, rank) of the first ``count`` charts of the run page, in its order.

        The order is the page's (static/charts.js): the ``general`` group first, then the
        groups by name, metrics by name inside a group; the rank is ``rank`` where the
        metric has it, else its lowest rank (as the page's rank selector does).
        """
        metrics = self.run_summary(project, run_id)["metrics"]  # the page asks for it too: read once
        names = sorted((m["name"], sorted(m["ranks"]) or [0]) for m in metrics)
        names.sort(key=lambda nm: (0 if chart_group(nm[0]) == "general" else 1, chart_group(nm[0]), nm[0]))
        return [(name, rank if rank in ranks else ranks[0]) for name, ranks in names[:count]]

    def series_body(self, project: str, run_id: str, q: dict[str, Any]) -> tuple[bytes, dict[str, str]]:
        """The binary body of one ``series`` request (see ``docs/viewer-api.md``) and its timing header.

        A reduced answer is kept by the run, the query and the committed
        lengths it was computed from, so every page asking for the same chart of
        an unchanged series gets the same bytes without a read or a reduction.
        A live tail (``start=``) reads only the new rows (and the first, for
        relative time), unless smoothing needs the points before it.
        """
        t0 = time.perf_counter()
        metric, rank = q["metric"], q["rank"]
        with self.open(project, run_id) as r:
            if rank == "band":
                ranks = r.ranks(metric)
                if not ranks:
                    raise NotFound(_missing_metric(r, metric, None))
                lengths = tuple(self.length(r, metric, rk) for rk in ranks)
            else:
                lengths = (self.length(r, metric, rank),)
            # a live tail too: the pages following a run ask for the same rows after each commit
            key = (r.path, tuple(sorted(q.items())), lengths)
            hit = self.responses.get(key)
            if hit is not None:
                return hit, {"server-timing": f"cache;dur={(time.perf_counter() - t0) * 1e3:.1f}"}
            if rank == "band":
                per_rank = [self.series(r, metric, rk, n) for rk, n in zip(ranks, lengths)]
            elif q["start"] is not None and not q["smooth"]:
                n = lengths[0]
                tail = self.tails.get(
                    (r.path, metric, rank),
                    min(q["start"], n),
                    n,
                    lambda a, b: _concat_rows([r.series(metric, rank, a, b)]),
                )
                first = np.array(r.series(metric, rank, 0, 1)) if n else tail
            else:
                s = self.series(r, metric, rank, lengths[0])
        t_read = time.perf_counter()
        if rank == "band":
            xs = [_x_of(s, q["x"]) for s in per_rank]
            ys = [s["value"] for s in per_rank]
            bx, lo, hi, used = R.band(xs, ys, q["width"], q["x0"], q["x1"])
            total = sum(len(s) for s in per_rank)
            header = {
                "n": len(bx),
                "total": total,
                "in_range": used,
                "committed": None,
                "reduced": True,
                "ranks": ranks,
                **_x_range(xs),
                "nonfinite": {},
                "marks": [],
            }
            body = R.encode(header, {"x": bx, "lo": lo, "hi": hi})
        elif q["start"] is not None and not q["smooth"]:
            body = self._tail(tail, first, q, lengths[0])
        else:
            body = self._reduce_one(s, q)
        self.responses.put(key, body)
        t_done = time.perf_counter()
        timing = f"read;dur={(t_read - t0) * 1e3:.1f}, reduce;dur={(t_done - t_read) * 1e3:.1f}"
        return body, {"server-timing": timing}

    @staticmethod
    def _tail(tail: np.ndarray, first: np.ndarray, q: dict[str, Any], n: int) -> bytes:
        """Raw points ``[start, n)`` of a series (no reduction), x as the page asked for."""
        wall0 = float(first["wall"][0]) if len(first) else 0.0
        x = tail["wall"] - wall0 if q["x"] == "relative" else tail[q["x"]].astype(np.float64)
        y = tail["value"]
        x_first = 0.0 if q["x"] == "relative" else (float(first[q["x"]][0]) if len(first) else None)
        rows = len(x)
        if q.get("tail_width") and rows > 4 * q["width"]:
            # a page far behind a fast run: its new rows reduced like a whole series (every point
            # takes part: each bucket's first, min, max and last), not megabytes of raw rows
            x, y = R.sort_by_x(x, y)
            counts, marks = R.nonfinite_marks(x, y, q["width"])
            idx = R.reduce_m4(x, y, q["width"])
            x, y = x[idx], y[idx]
        else:
            counts, marks = R.nonfinite_marks(x, y, max(1, rows))
        header = {
            "total": n,
            "committed": n,
            "x_min": x_first,
            "x_max": float(x.max()) if len(x) else x_first,
            "n": len(x),
            "in_range": rows,
            "start": n - rows,
            "reduced": len(x) < rows,
            "nonfinite": counts,
            "marks": marks,
        }
        return R.encode(header, {"x": x, "y": np.where(np.isfinite(y), y, np.nan)})

    def _reduce_one(self, s: np.ndarray, q: dict[str, Any]) -> bytes:
        total = len(s)
        x_all = _x_of(s, q["x"])
        y_all = s["value"]
        ys_all = R.ema_debiased(y_all, q["smooth"]) if q["smooth"] else None
        base = {"total": total, "committed": total, **_x_range([x_all])}
        if q["start"] is not None:  # live tail: raw points [start, committed)
            st = min(q["start"], total)
            x, y = x_all[st:], y_all[st:]
            counts, marks = R.nonfinite_marks(x, y, max(1, len(x)))
            arrays = {"x": x, "y": np.where(np.isfinite(y), y, np.nan)}
            if ys_all is not None:
                arrays["ys"] = ys_all[st:]
            return R.encode(
                {
                    **base,
                    "n": len(x),
                    "in_range": len(x),
                    "start": st,
                    "reduced": False,
                    "nonfinite": counts,
                    "marks": marks,
                },
                arrays,
            )
        if ys_all is None:
            x, y = R.sort_by_x(x_all, y_all)
            ys = None
        else:
            x, y, ys = R.sort_by_x(x_all, y_all, ys_all)
        i, j = R.window(x, q["x0"], q["x1"])
        x, y = x[i:j], y[i:j]
        if ys is not None:
            ys = ys[i:j]
        idx = R.reduce_m4(x, y, q["width"]) if len(x) else np.empty(0, dtype=np.int64)
        counts, marks = R.nonfinite_marks(x, y, q["width"]) if len(x) else ({k: 0 for k in R.NONFINITE_KINDS}, [])
        sent_y = y[idx]
        arrays = {"x": x[idx], "y": np.where(np.isfinite(sent_y), sent_y, np.nan)}
        if ys is not None:
            arrays["ys"] = ys[idx]
        header = {
            **base,
            "n": len(idx),
            "in_range": len(x),
            "reduced": len(idx) < len(x),
            "nonfinite": counts,
            "marks": marks,
        }
        return R.encode(header, arrays)

    def csv_series(self, project: str, run_id: str, metric: str, rank: str) -> list[tuple[int, np.ndarray]]:
        """(rank, every committed point) of ``metric`` for a CSV download; :class:`NotFound` first."""
        with self.open(project, run_id) as r:
            ranks = r.ranks(metric) if rank == "all" else [int(rank)]
            if not ranks or (rank != "all" and int(rank) not in r.ranks(metric)):
                raise NotFound(_missing_metric(r, metric, None if rank == "all" else int(rank)))
            return [(rk, self.series(r, metric, rk)) for rk in ranks]

    @staticmethod
    def csv_chunks(metric: str, series: list[tuple[int, np.ndarray]], rows: int = CSV_CHUNK_ROWS) -> Iterator[str]:
        """The CSV body (``kobo export``'s columns) in pieces of ``rows`` lines: a 1M-point
        download is never one 60 MB string."""
        yield csv_header()
        for rk, s in series:
            for i in range(0, len(s), rows):
                yield "".join(csv_lines(metric, rk, s[i : i + rows]))

    def media_rows(
        self, project: str, run_id: str, name: str, rank: int, start: int | None, end: int | None
    ) -> dict[str, Any]:
        with self.open(project, run_id) as r:
            rows = r.media(name, rank, start, end)
            if not rows and name not in r.list_items()["media"]:
                raise NotFound(f"no media {name!r} in run {project}/{run_id}")
            skipped = list(r.skipped)
        return {"name": name, "rows": [_media_json(project, run_id, row) for row in rows], "skipped": skipped}

    def table_rows(
        self, project: str, run_id: str, name: str, rank: int, start: int | None, end: int | None
    ) -> dict[str, Any]:
        with self.open(project, run_id) as r:
            tables = r.tables(name, rank, start, end)
            if not tables and name not in r.list_items()["table"]:
                raise NotFound(f"no table {name!r} in run {project}/{run_id}")
            skipped = list(r.skipped)
        out = []
        for t in tables:
            rows = [
                [{"$media": _media_json(project, run_id, c)} if isinstance(c, dict) and "hash" in c else c for c in row]
                for row in t["rows"]
            ]
            out.append({**t, "rows": rows})
        return {"name": name, "rows": out, "skipped": skipped}

    def histogram_rows(
        self, project: str, run_id: str, name: str, rank: int, start: int | None, end: int | None, max_rows: int = 500
    ) -> dict[str, Any]:
        with self.open(project, run_id) as r:
            hists = r.histograms(name, rank, start, end)
            if not hists and name not in r.list_items()["histogram"]:
                raise NotFound(f"no histogram {name!r} in run {project}/{run_id}")
            skipped = list(r.skipped)
        total = len(hists)
        if total > max_rows:  # evenly spaced steps, always the first and the last
            keep = np.unique(np.linspace(0, total - 1, max_rows).round().astype(int))
            hists = [hists[i] for i in keep]
        return {"name": name, "total": total, "rows": hists, "skipped": skipped}

    def kde_rows(
        self, project: str, run_id: str, name: str, rank: int, start: int | None, end: int | None
    ) -> dict[str, Any]:
        with self.open(project, run_id) as r:
            rows = r.kde(name, rank, start, end)
            if not rows and name not in r.list_items()["kde"]:
                raise NotFound(f"no kernel density {name!r} in run {project}/{run_id}")
            skipped = list(r.skipped)
        return {"name": name, "rows": rows, "skipped": skipped}

    def tensor_rows(
        self, project: str, run_id: str, name: str, rank: int, start: int | None, end: int | None
    ) -> dict[str, Any]:
        with self.open(project, run_id) as r:
            rows = r.tensors(name, rank, start, end)
            if not rows and name not in r.list_items()["tensor"]:
                raise NotFound(f"no tensor {name!r} in run {project}/{run_id}")
            skipped = list(r.skipped)
        out = []
        for t in rows:
            arr = t.pop("array")
            out.append({**t, "shape": list(arr.shape), "dtype": str(arr.dtype), **_tensor_view(arr)})
        return {"name": name, "rows": out, "skipped": skipped}

    def logs(self, project: str, run_id: str, offset: int | None, limit: int) -> dict[str, Any]:
        with self.open(project, run_id) as r:
            size = r.output_size()
            start = max(0, size - limit) if offset is None else min(offset, size)
            data = r.read_output_bytes(start, limit)
            return {
                "size": size,
                "offset": start,
                "end": start + len(data),
                "text": data.decode("utf-8", errors="replace"),
            }

    def run_events(self, project: str, run_id: str) -> dict[str, Any]:
        with self.open(project, run_id) as r:
            return {"events": r.events()}

    def media_path(self, project: str, run_id: str, filename: str) -> tuple[str, str, str]:
        m = HASH_RE.match(filename)
        if not m:
            raise NotFound(f"no media file {filename!r}: media are named <sha256>.<ext>")
        sha, ext = m.groups()
        with self.open(project, run_id) as r:
            row = r.media_file(sha, ext)
            run_path = r.path
        if row is None:
            raise NotFound(f"run {project}/{run_id} holds no media {filename}")
        path = row["path"]
        real = os.path.realpath(path)
        if not real.startswith(os.path.realpath(os.path.join(run_path, fmt.MEDIA_DIR)) + os.sep) or not real.startswith(
            self.index.real_base + os.sep
        ):
            raise NotFound(f"media {filename} of run {project}/{run_id} resolves outside the run folder")
        if not os.path.isfile(real):
            raise NotFound(f"media file {filename} of run {project}/{run_id} is missing")
        return real, sha, MEDIA_TYPES.get(ext, "application/octet-stream")

    def watch(self, key: tuple[str, str]) -> dict[str, Any]:
        """Commit state and status of one watched run (for the live stream)."""
        project, run_id = key
        facts = self.index.info(project, run_id)
        with self.open(project, run_id) as r:
            state = r.commit_state()
            meta = r.metadata
            status = shown_status(r.path, str(meta.get("status", "?")), facts.get("last_commit"))
        return {
            "run": f"{project}/{run_id}",
            "version": _version(state, meta),
            "status": status,
            "lengths": state["lengths"],
            "items": state["items"],
            "output": state["files"].get(f"{fmt.OUTPUT_LOG}:", 0),
            "histograms": {
                k.split(":", 1)[1]: n for k, n in state["files"].items() if k.split(":", 1)[0] in HISTOGRAM_FILES
            },
        }


def _missing_metric(reader: RunReader, metric: str, rank: int | None) -> str:
    try:
        reader.series(metric, 0 if rank is None else rank)
    except KeyError as exc:
        return str(exc.args[0])
    return f"no metric {metric!r} in run {reader.project}/{reader.run_id}"


def _version(state: dict[str, Any], meta: dict[str, Any]) -> str:
    total = sum(state["lengths"].values()) + sum(state["files"].values())
    items = ".".join(str(v) for v in state["items"].values())
    return f"{meta.get('status', '?')}:{len(state['lengths'])}:{total}:{items}"


def _x_of(s: np.ndarray, kind: str) -> np.ndarray:
    if kind == "relative":
        wall = s["wall"]
        return wall - wall[0] if len(wall) else wall.astype(np.float64)
    return s[kind].astype(np.float64)


def _x_range(xs: list[np.ndarray]) -> dict[str, Any]:
    lo = min((float(np.min(x)) for x in xs if len(x)), default=None)
    hi = max((float(np.max(x)) for x in xs if len(x)), default=None)
    return {"x_min": lo, "x_max": hi}


def _media_json(project: str, run_id: str, row: dict[str, Any]) -> dict[str, Any]:
    keep = ("step", "global_step", "wall", "caption", "media_type", "hash", "ext", "width", "height", "size")
    out = {k: row.get(k) for k in keep}
    out["url"] = f"/media/{project}/{run_id}/{row['hash']}.{row['ext']}"
    return out


def _tensor_view(arr: np.ndarray) -> dict[str, Any]:
    """Summary statistics of a tensor and, for small ones, a 2-D heatmap of its values."""
    if arr.dtype.kind in "biuf" and arr.size:
        a = arr.astype(np.float64, copy=False).reshape(-1)
        finite = a[np.isfinite(a)]
        stats: dict[str, int | float] = {
            "size": int(a.size),
            "nan": int(np.isnan(a).sum()),
            "posinf": int(np.isposinf(a).sum()),
            "neginf": int(np.isneginf(a).sum()),
        }
        if len(finite):
            stats.update(
                min=float(finite.min()), max=float(finite.max()), mean=float(finite.mean()), std=float(finite.std())
            )
    else:
        stats = {"size": int(arr.size)}
    heatmap = None
    if arr.dtype.kind in "biuf" and 0 < arr.size <= 65_536:
        if arr.ndim <= 1:
            plane = arr.reshape(1, -1)
        else:
            plane = arr.reshape(-1, *arr.shape[-2:])[0]
        heatmap = {
            "rows": int(plane.shape[0]),
            "cols": int(plane.shape[1]),
            "values": plane.astype(np.float64).reshape(-1),
            "sliced": arr.ndim > 2,
        }
    return {"stats": stats, "heatmap": heatmap}


# ----------------------------------------------------------------- routes


def create_app(base_dir: str, token: str | None = None, allowed_hosts: tuple[str, ...] = ()) -> Any:
    """``kobo open``'s app over ``base_dir``; ``token=None`` turns the token check off (loopback only)."""
    return AuthMiddleware(build_app(base_dir), token, allowed_hosts)


def create_team_app(
    base_dir: str,
    accounts: Any,
    allowed_hosts: tuple[str, ...] = (),
    base_url: str = "",
    https: bool = False,
    session_idle: float = 12 * 3600,
    session_max: float = 7 * 24 * 3600,
) -> Any:
    """``kobo-serve``'s app: the same viewer behind accounts, sessions and CSRF (:mod:`.team`)."""
    from .team import Sessions, TeamAuth

    return TeamAuth(
        build_app(base_dir, mode="serve"),
        accounts,
        allowed_hosts,
        base_url=base_url,
        https=https,
        sessions=Sessions(session_idle, session_max),
    )


def build_app(base_dir: str, mode: str = "open") -> Starlette:
    """The viewer's routes over ``base_dir``, without any authentication (wrap it: see above).

    ``mode``: "open" (``kobo open``) or "serve" (``kobo-serve``, whose pages ask who is logged in)."""
    viewer = Viewer(base_dir)
    run_lines = EncodedLines()
    hub = LiveHub(viewer.watch, viewer.index.signature)

    reads = RunReads()  # worker threads, a few per run: a run whose files hang keeps only its own

    async def run_blocking(fn: Callable[..., Any], *args: Any) -> Any:
        return await reads.run(fn, *args)

    def handler(fn: Callable[[Request], Any]) -> Callable[[Request], Any]:
        async def wrapped(request: Request) -> Response:
            try:
                return await fn(request)
            except ApiError as exc:
                return _json({"error": str(exc)}, exc.status)
            except NotFound as exc:
                return _json({"error": str(exc)}, 404)
            except BadName as exc:
                return _json({"error": str(exc)}, 404)
            except KoboError as exc:
                return _json({"error": f"cannot read run: {exc}"}, 500)
            except KeyError as exc:
                return _json({"error": str(exc.args[0]) if exc.args else "not found"}, 404)
            except ValueError as exc:
                return _json({"error": str(exc)}, 400)
            except OSError as exc:
                return _json({"error": f"cannot read: {exc}"}, 500)

        return wrapped

    def visible(request: Request, project: str) -> None:
        """A project the user may not see is answered exactly like one that does not exist."""
        user = request.scope.get("kobo_user")
        if user is not None and not user.may_see(project):
            raise NotFound(f"no project {project!r} under {viewer.index.base_dir}")

    def run_args(request: Request) -> tuple[str, str]:
        project, run_id = request.path_params["project"], request.path_params["run_id"]
        visible(request, project)
        return project, run_id

    def item_args(request: Request) -> tuple[Any, ...]:
        return (
            *run_args(request),
            _required(request, "name"),
            _int(request, "rank", 0, 0),
            _int(request, "start", None),
            _int(request, "end", None),
        )

    @handler
    async def index_page(request: Request) -> Response:
        return static.page("index.html", mode)

    @handler
    async def login_page(request: Request) -> Response:
        return static.page("login.html")

    @handler
    async def api_runs(request: Request) -> Response:
        q = request.query_params.get("q", "")
        regex = request.query_params.get("regex", "0") in ("1", "true", "yes")
        project = request.query_params.get("project")
        if regex:
            try:
                re.compile(q)
            except re.error as exc:
                raise _bad(f"bad regular expression {q!r}: {exc}") from None
        runs = await run_blocking(viewer.index.runs)
        user = request.scope.get("kobo_user")
        if user is not None:
            runs = [r for r in runs if user.may_see(r["project"])]
        projects: dict[str, int] = {}
        for r in runs:
            projects[r["project"]] = projects.get(r["project"], 0) + 1
        shown = filter_runs(runs, q, regex)
        if project:
            shown = [r for r in shown if r["project"] == project]
        head = _json_bytes(
            {
                "dir": viewer.index.base_dir,
                "total": len(runs),
                "projects": [{"name": n, "runs": c} for n, c in sorted(projects.items())],
            }
        )
        body = head[:-1] + b',"runs":[' + b",".join(run_lines.encoded(r) for r in shown) + b"]}"
        return _json_response(body)

    @handler
    async def api_run(request: Request) -> Response:
        body = await run_blocking(viewer.run_summary_json, *run_args(request))
        return _json_response(body)

    def series_query(request: Request, metric: bool = True) -> dict[str, Any]:
        rank_raw = request.query_params.get("rank", "0")
        rank: Any = "band" if rank_raw == "band" else _int(request, "rank", 0, 0)
        x = request.query_params.get("x", "step")
        if x not in X_KINDS:
            raise _bad(f"parameter 'x' must be one of {', '.join(X_KINDS)}, got {x!r}")
        smooth = _float(request, "smooth") or 0.0
        if not 0.0 <= smooth < 1.0:
            raise _bad(f"parameter 'smooth' must be in [0, 1), got {smooth}")
        q = {
            "metric": _required(request, "metric") if metric else None,
            "rank": rank,
            "x": x,
            "smooth": smooth,
            "width": _int(request, "width", 1000, 1, MAX_WIDTH),
            "x0": _float(request, "x0"),
            "x1": _float(request, "x1"),
            "start": _int(request, "start", None, 0),
            # a live tail is reduced to the width only when the page says its width
            "tail_width": "width" in request.query_params,
        }
        if q["x0"] is not None and q["x1"] is not None and q["x1"] < q["x0"]:
            raise _bad(f"x1 ({q['x1']}) is smaller than x0 ({q['x0']})")
        return q

    @handler
    async def api_series(request: Request) -> Response:
        q = series_query(request)
        body, headers = await run_blocking(viewer.series_body, *run_args(request), q)
        return Response(body, media_type="application/octet-stream", headers={"cache-control": "no-store", **headers})

    @handler
    async def api_first_charts(request: Request) -> Response:
        """The first ``count`` charts of a run page in one streamed answer (docs/viewer-api.md).

        Framed parts: a JSON list of the charts ({metric, rank}), then each chart's
        ``series`` body as it is ready (an empty part for one that cannot be read: the
        page then asks for it alone and shows its error).  index.html's boot script asks
        for it with the run summary, before the page's modules have loaded.
        """
        q = series_query(request, metric=False)
        if q["rank"] == "band" or any(q[k] is not None for k in ("x0", "x1", "start")):
            raise _bad("first-charts takes rank=<n>, x, smooth and width only")
        count = _int(request, "count", 4, 1, 16)
        project, run_id = run_args(request)
        charts = await run_blocking(viewer.first_charts, project, run_id, q["rank"], count)

        async def parts() -> Any:
            yield frame(json.dumps([{"metric": m, "rank": rk} for m, rk in charts]).encode())
            for metric, rank in charts:
                try:
                    body, _ = await run_blocking(
                        viewer.series_body, project, run_id, {**q, "metric": metric, "rank": rank}
                    )
                except (NotFound, KoboError, KeyError, ValueError, OSError):
                    body = b""
                yield frame(body)

        return StreamingResponse(parts(), media_type="application/octet-stream", headers={"cache-control": "no-store"})

    @handler
    async def api_series_csv(request: Request) -> Response:
        metric = _required(request, "metric")
        rank = request.query_params.get("rank", "0")
        if rank != "all":
            _int(request, "rank", 0, 0)
        series = await run_blocking(viewer.csv_series, *run_args(request), metric, rank)
        project, run_id = run_args(request)
        safe = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{run_id}_{metric}").strip("_")
        # formatted a piece at a time in a worker thread (Starlette iterates a plain iterator there)
        return StreamingResponse(
            viewer.csv_chunks(metric, series),
            media_type="text/csv; charset=utf-8",
            headers={"cache-control": "no-store", "content-disposition": f'attachment; filename="{safe}.csv"'},
        )

    def item_route(method: Callable[..., dict[str, Any]]) -> Callable[[Request], Any]:
        @handler
        async def route(request: Request) -> Response:
            return _json(await run_blocking(method, *item_args(request)))

        return route

    @handler
    async def api_histograms(request: Request) -> Response:
        max_rows = _int(request, "max_rows", 500, 2, 100_000)
        return _json(await run_blocking(viewer.histogram_rows, *item_args(request), max_rows))

    @handler
    async def api_logs(request: Request) -> Response:
        limit = _int(request, "limit", 65536, 1, 8 << 20)
        return _json(await run_blocking(viewer.logs, *run_args(request), _int(request, "offset", None, 0), limit))

    @handler
    async def api_run_events(request: Request) -> Response:
        return _json(await run_blocking(viewer.run_events, *run_args(request)))

    @handler
    async def media_file(request: Request) -> Response:
        path, sha, ctype = await run_blocking(viewer.media_path, *run_args(request), request.path_params["filename"])
        etag = f'"{sha}"'
        headers = {"etag": etag, "cache-control": "private, max-age=31536000, immutable"}
        if etag in [t.strip() for t in request.headers.get("if-none-match", "").split(",")]:
            return Response(status_code=304, headers=headers)
        return FileResponse(path, media_type=ctype, headers=headers, content_disposition_type="inline")

    @handler
    async def api_events(request: Request) -> Response:
        raw = request.query_params.get("runs", "")
        targets = []
        for item in filter(None, raw.split(",")):
            project, sep, run_id = item.partition("/")
            if not sep:
                raise _bad(f"runs must be project/run_id, got {item!r}")
            visible(request, project)
            viewer.index.resolve(project, run_id)  # 404 for an unknown run
            targets.append((project, run_id))
        return StreamingResponse(
            hub.stream(targets, request.is_disconnected),
            media_type="text/event-stream",
            headers={"cache-control": "no-store", "x-accel-buffering": "no"},
        )

    static = StaticCache(STATIC_DIR)

    async def static_file(request: Request) -> Response:
        return static.response(request.path_params["path"], request.headers.get("if-none-match", ""))

    async def healthz(request: Request) -> Response:
        return _json({"ok": True})

    async def api_stats(request: Request) -> Response:
        return _json(
            {
                **hub.stats(),
                "reads": reads.busy(),  # per run: reads in flight or waiting for one of its threads
                "readers": {
                    "opened": viewer.readers.opened,
                    "lent": viewer.readers.lent,
                    "idle": viewer.readers.idle(),
                },
            }
        )

    async def not_found(request: Request) -> Response:
        return _json({"error": f"not found: {request.url.path}"}, 404)

    base = "/api/runs/{project}/{run_id}"
    routes = [
        Route("/", index_page),
        Route("/login", login_page),
        Route("/api/runs", api_runs),
        Route(base, api_run),
        Route(base + "/series", api_series),
        Route(base + "/series.csv", api_series_csv),
        Route(base + "/first-charts", api_first_charts),
        Route(base + "/media", item_route(viewer.media_rows)),
        Route(base + "/tables", item_route(viewer.table_rows)),
        Route(base + "/histograms", api_histograms),
        Route(base + "/kde", item_route(viewer.kde_rows)),
        Route(base + "/tensors", item_route(viewer.tensor_rows)),
        Route(base + "/logs", api_logs),
        Route(base + "/run-events", api_run_events),
        Route("/api/events", api_events),
        Route("/api/stats", api_stats),
        Route("/healthz", healthz),
        Route("/media/{project}/{run_id}/{filename}", media_file),
        Route("/api/{rest:path}", not_found),
        Route("/media/{rest:path}", not_found),
        Route("/static/{path:path}", static_file),
    ]
    app = Starlette(routes=routes)
    app.state.viewer = viewer
    app.state.hub = hub
    return app
