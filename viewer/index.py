"""The viewer's index of run folders under one base directory.

Names taken from URLs never reach the file system unchecked: a project or run
id must look like a name (:func:`check_name`), is looked up here among the
folders that exist, and the folder's real path must lie inside the base
directory's real path (an rsynced folder may hold a symlink out of it).

Listing is cheap when warm: a project folder is re-listed only when its mtime
changes (a run copied in), and a run's summary line is recomputed only when
``metadata.json`` or ``data/metadata.db`` (or its ``-wal``) changed, so 10,000
runs cost 10,000 ``stat`` calls per listing, not 10,000 database opens.
"""

from __future__ import annotations

import collections
import concurrent.futures
import math
import os
import re
import sqlite3
import stat
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from typing import Any

from ..storage import format as fmt
from ..storage.reader import reported_status

NAME_RE = re.compile(r"^[A-Za-z0-9_.@+=-]+$")


class NotFound(Exception):
    """A project, run, metric or item that is not there (HTTP 404)."""


class BadName(ValueError):
    """A name from a URL that cannot be a project or run id (HTTP 400/404)."""


def check_name(kind: str, name: str) -> str:
    if not name or name in (".", "..") or len(name) > 255 or not NAME_RE.match(name):
        raise BadName(f"invalid {kind} name {name!r}: use letters, digits and _ . @ + = -")
    return name


def _stat_key(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size)


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


@dataclass
class RunEntry:
    """One run of the index: what the run list shows."""

    project: str
    run_id: str
    path: str
    key: tuple[Any, ...] = ()
    info: dict[str, Any] = field(default_factory=dict)
    read_at: float = 0.0  # time.monotonic() when ``info`` was read


def _regular(path: str) -> None:
    """OSError unless ``path`` is a regular file (a FIFO or a device in a run folder would block a read forever)."""
    if not stat.S_ISREG(os.stat(path).st_mode):
        raise OSError(f"{os.path.basename(path)} is not a regular file")


def _db_facts(path: str) -> dict[str, Any]:
    """Last step, ranks, drops and last commit time from ``data/metadata.db``, read-only."""
    db_path = os.path.join(path, fmt.METADATA_DB)
    facts: dict[str, Any] = {
        "last_step": None,
        "last_global_step": None,
        "num_ranks": 0,
        "dropped_calls": 0,
        "dropped_values": 0,
        "last_commit": None,
    }
    if not os.path.exists(db_path):
        return facts
    _regular(db_path)
    # immutable=1 when nobody writes the file (no -wal): nothing is created in the run.
    live = os.path.exists(db_path + "-wal")
    uri = f"file:{urllib.parse.quote(db_path)}?mode=ro" + ("" if live else "&immutable=1")
    db = sqlite3.connect(uri, uri=True)
    try:
        try:
            row = db.execute(
                "SELECT max(last_step), max(last_global_step), max(last_wall), count(DISTINCT rank) FROM steps"
            ).fetchone()
            facts.update(last_step=row[0], last_global_step=row[1], last_commit=row[2], num_ranks=row[3] or 0)
        except sqlite3.OperationalError as exc:
            if "no such table" not in str(exc):
                raise
        try:
            row = db.execute(
                "SELECT sum(dropped_calls), sum(dropped_values), count(DISTINCT rank) FROM clients"
            ).fetchone()
            facts.update(dropped_calls=int(row[0] or 0), dropped_values=int(row[1] or 0))
            facts["num_ranks"] = max(facts["num_ranks"], int(row[2] or 0))
        except sqlite3.OperationalError as exc:
            if "no such" not in str(exc):
                raise
    finally:
        db.close()
    return facts


def _run_info(entry: RunEntry) -> dict[str, Any]:
    info = _unreadable((entry.project, entry.run_id), None)
    try:
        _regular(os.path.join(entry.path, fmt.METADATA_JSON))
        meta = fmt.read_json(os.path.join(entry.path, fmt.METADATA_JSON))
    except (OSError, ValueError) as exc:
        info["error"] = f"cannot read metadata.json: {exc}"
        return info
    info.update(
        name=str(meta.get("name") or entry.run_id),
        annotation=meta.get("annotation") if isinstance(meta.get("annotation"), str) else None,
        status=str(meta.get("status") or "?"),
        stored_status=str(meta.get("status") or "?"),
        created_at=_num(meta.get("created_at")),
        finished_at=_num(meta.get("finished_at")),
        world_size=meta.get("world_size") if isinstance(meta.get("world_size"), int) else None,
        config=meta.get("config") if isinstance(meta.get("config"), dict) else {},
    )
    try:
        info.update(_db_facts(entry.path))
    except (sqlite3.Error, OSError) as exc:
        info["error"] = f"cannot read {fmt.METADATA_DB}: {exc}"
    created, end = info["created_at"], info["finished_at"] or _num(info["last_commit"])
    if created is not None and end is not None:
        info["duration"] = max(0.0, end - created)
    return info


def _unreadable(name: tuple[str, str], error: str | None) -> dict[str, Any]:
    """The summary line of a run that could not be read (yet); with ``error`` None, the defaults a read fills in."""
    return {
        "project": name[0],
        "run_id": name[1],
        "name": name[1],
        "annotation": None,
        "status": "?",
        "created_at": None,
        "finished_at": None,
        "duration": None,
        "last_step": None,
        "last_global_step": None,
        "num_ranks": 0,
        "world_size": None,
        "dropped_calls": 0,
        "dropped_values": 0,
        "last_commit": None,
        "config": {},
        "error": error,
    }


INFO_WAIT_S = 2.0  # how long a listing waits for the next of the summary lines it has to read again
# A live run's line (and its summary, viewer/app.py) asked for BUSY_PER_S times a second or more
# (many pages following it) is read again at most every BUSY_MAX_AGE_S, however often it commits:
# a run written at full speed commits ~40 times a second, and each read costs CPU that training on
# the same machine would rather have.  Asked for less often, it is always the latest (see busy()).
BUSY_PER_S = 10
BUSY_MAX_AGE_S = 0.1
LIVE_COMMIT_S = 120.0


def busy(asks: dict[Any, collections.deque[float]], key: Any, now: float) -> bool:
    """Count one ask for ``key`` (at ``now``) in ``asks``; whether it has been asked for
    :data:`BUSY_PER_S` times within the last second."""
    asked = asks.get(key)
    if asked is None:
        asked = asks[key] = collections.deque(maxlen=BUSY_PER_S)
    asked.append(now)
    return len(asked) == asked.maxlen and now - asked[0] < 1.0


def shown_status(path: str, stored: str, last_commit: float | None) -> str:
    """The status the viewer shows: a stored ``running`` becomes ``running?`` when nobody writes the run.

    Somebody writes it when a daemon on this machine holds its writer lock
    (:func:`~kohakuboard.storage.reader.writer_alive`) or, for a run on a
    shared file system written from another node, when it committed within
    the last :data:`LIVE_COMMIT_S` seconds.
    """
    if stored != fmt.STATUS_RUNNING:
        return stored
    if last_commit is not None and time.time() - last_commit < LIVE_COMMIT_S:
        return stored
    return reported_status(path, stored)


def config_text(config: Any, prefix: str = "") -> list[str]:
    """``key=value`` lines of a (nested) config, for the run filter."""
    out = []
    if isinstance(config, dict):
        for k, v in config.items():
            out += config_text(v, f"{prefix}{k}." if isinstance(v, dict) else f"{prefix}{k}")
    elif isinstance(config, list):
        out.append(f"{prefix.rstrip('.')}={config}")
    else:
        out.append(f"{prefix.rstrip('.')}={config}")
    return out


class RunIndex:
    """Every ``{project}/{run_id}`` folder under ``base_dir``, with cached summary lines."""

    def __init__(self, base_dir: str) -> None:
        self.base_dir = os.path.abspath(base_dir)
        self.real_base = os.path.realpath(self.base_dir)
        self._lock = threading.Lock()
        self._projects: dict[str, tuple[int, list[str]]] = {}  # project -> (dir mtime_ns, run ids)
        self._runs: dict[tuple[str, str], RunEntry] = {}
        self._asks: dict[
            tuple[str, str], collections.deque[float]
        ] = {}  # live runs: when their line was last asked for
        # summary lines being read: (project, run_id, key) -> future; read by their own threads, outside
        # the lock, so a run whose files hang (a stale network mount) delays nobody but itself
        # (at most one read per run at a time: a hung one does not pile up threads)
        self._reading: dict[tuple[str, str], tuple[tuple[Any, ...], concurrent.futures.Future[dict[str, Any]]]] = {}
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="kobo-index")
        self._finished = threading.Condition()  # notified, and _reads_done counted, as each read ends
        self._reads_done = 0

    def _one_read_done(self, _: Any) -> None:
        with self._finished:
            self._reads_done += 1
            self._finished.notify_all()

    def _wait_while_progressing(self, futures: list[concurrent.futures.Future[Any]]) -> None:
        """Wait for ``futures`` as long as reads keep finishing: at least one every :data:`INFO_WAIT_S`.

        A cold listing of 10,000 runs takes seconds and is waited for; when no read has finished
        for INFO_WAIT_S the ones left are hung (a stale network mount) and the listing goes on
        without them.  The pool reads in order, so the futures are checked from the front: O(n).
        """
        rest = collections.deque(futures)
        with self._finished:
            while True:
                while rest and rest[0].done():
                    rest.popleft()
                if not rest:
                    return
                before = self._reads_done
                self._finished.wait(INFO_WAIT_S)
                if self._reads_done == before:  # nothing finished for INFO_WAIT_S
                    return

    def _inside(self, path: str) -> bool:
        real = os.path.realpath(path)
        return real == self.real_base or real.startswith(self.real_base + os.sep)

    def _project_runs(self, project: str) -> list[str]:
        pdir = os.path.join(self.base_dir, project)
        try:
            mtime = os.stat(pdir).st_mtime_ns
        except OSError:
            return []
        cached = self._projects.get(project)
        if cached is not None and cached[0] == mtime:
            return cached[1]
        try:
            names = sorted(n for n in os.listdir(pdir) if NAME_RE.match(n) and n not in (".", ".."))
        except OSError:
            names = []
        # A folder whose real path leaves the base (an rsynced symlink) is not a run of this viewer:
        # not listed, not resolved, not read.
        runs = [
            n
            for n in names
            if self._inside(os.path.join(pdir, n))
            and (
                os.path.isfile(os.path.join(pdir, n, fmt.METADATA_JSON))
                or os.path.isdir(os.path.join(pdir, n, fmt.DATA_DIR))
            )
        ]
        self._projects[project] = (mtime, runs)
        return runs

    def projects(self) -> list[str]:
        try:
            names = sorted(os.listdir(self.base_dir))
        except OSError:
            return []
        return [
            n
            for n in names
            if NAME_RE.match(n)
            and n not in (".", "..")
            and os.path.isdir(os.path.join(self.base_dir, n))
            and self._inside(os.path.join(self.base_dir, n))
        ]

    def key(self, project: str, run_id: str) -> tuple[Any, ...]:
        """What changes whenever anything read from a run's metadata changes: its metadata files' stat
        (metadata.json, and metadata.db with its write-ahead log, where every commit lands)."""
        path = os.path.join(self.base_dir, project, run_id)
        return (
            _stat_key(os.path.join(path, fmt.METADATA_JSON)),
            _stat_key(os.path.join(path, fmt.METADATA_DB)),
            _stat_key(os.path.join(path, fmt.METADATA_DB) + "-wal"),
        )

    def _infos(self, names: list[tuple[str, str]]) -> dict[tuple[str, str], dict[str, Any]]:
        """The summary lines of ``names``: cached ones at once, changed ones read in the index's
        threads for as long as one of them finishes every :data:`INFO_WAIT_S`; a run still being
        read when none has for that long is shown with an error for now (its read goes on, and a
        later listing takes its result)."""
        with self._lock:
            out: dict[tuple[str, str], dict[str, Any]] = {}
            todo: dict[tuple[str, str], tuple[tuple[Any, ...], concurrent.futures.Future[dict[str, Any]]]] = {}
            now = time.monotonic()
            for name in names:
                key = self.key(*name)
                entry = self._runs.get(name)
                if entry is not None and (self._recent_enough(name, entry, now) or entry.key == key):
                    out[name] = entry.info
                    continue
                reading = self._reading.get(name)
                if reading is None or (reading[0] != key and reading[1].done()):
                    fresh = RunEntry(name[0], name[1], os.path.join(self.base_dir, *name), key)
                    reading = self._reading[name] = (key, self._pool.submit(_run_info, fresh))
                    reading[1].add_done_callback(self._one_read_done)
                todo[name] = reading
        if todo:
            self._wait_while_progressing([f for _, f in todo.values()])
        with self._lock:
            for name, (key, fut) in todo.items():
                if not fut.done():
                    out[name] = _unreadable(
                        name, f"reading its files took over {INFO_WAIT_S:g} s (a hung file system?)"
                    )
                    continue
                if self._reading.get(name) == (key, fut):
                    del self._reading[name]
                try:
                    info = fut.result()
                except Exception as exc:  # whatever a broken run raises stays with that run
                    info = _unreadable(name, f"cannot read: {exc}")
                self._runs[name] = RunEntry(
                    name[0], name[1], os.path.join(self.base_dir, *name), key, info, time.monotonic()
                )
                out[name] = info
        return out

    def _recent_enough(self, name: tuple[str, str], entry: RunEntry, now: float) -> bool:
        """Whether a live run's line, read less than :data:`BUSY_MAX_AGE_S` ago, may stand for its
        files even if they changed: only while it is asked for :data:`BUSY_PER_S` times a second or
        more (many pages following it; it commits up to ~40 times a second).  Counts this ask.
        Called with the lock held."""
        if entry.info.get("stored_status") != fmt.STATUS_RUNNING:
            return False
        return busy(self._asks, name, now) and now - entry.read_at < BUSY_MAX_AGE_S

    def runs(self) -> list[dict[str, Any]]:
        """Every run's summary line, newest first."""
        with self._lock:
            names = [(project, run_id) for project in self.projects() for run_id in self._project_runs(project)]
            for gone in set(self._runs) - set(names):
                del self._runs[gone]
                self._asks.pop(gone, None)
            listed = set(names)
            for gone in [n for n, (_, f) in self._reading.items() if n not in listed and f.done()]:
                del self._reading[gone]
        infos = self._infos(names)
        out = []
        for project, run_id in names:
            info = infos[(project, run_id)]
            if info.get("stored_status") == fmt.STATUS_RUNNING:  # may go stale with no file changing
                info = dict(
                    info,
                    status=shown_status(
                        os.path.join(self.base_dir, project, run_id), fmt.STATUS_RUNNING, info.get("last_commit")
                    ),
                )
            out.append(info)
        out.sort(key=lambda r: (r["created_at"] or 0.0, r["project"], r["run_id"]), reverse=True)
        return out

    def resolve(self, project: str, run_id: str) -> str:
        """The run folder of ``project/run_id``; :class:`NotFound` if there is none (or it escapes the base)."""
        check_name("project", project)
        check_name("run", run_id)
        with self._lock:
            if project not in self.projects():
                raise NotFound(f"no project {project!r} under {self.base_dir}")
            runs = self._project_runs(project)
            if run_id not in runs:
                # a run whose folder carries an annotation suffix is still found by its bare id
                match = [r for r in runs if r.startswith(run_id + "_")]
                if len(match) != 1:
                    raise NotFound(f"no run {run_id!r} in project {project!r}")
                run_id = match[0]
        path = os.path.join(self.base_dir, project, run_id)
        if not self._inside(path):
            raise NotFound(f"run {project}/{run_id} resolves outside {self.base_dir}")
        for name in (fmt.METADATA_JSON, fmt.METADATA_DB):  # a FIFO there would hang whoever opens it
            if os.path.lexists(os.path.join(path, name)):
                _regular(os.path.join(path, name))
        return path

    def info(self, project: str, run_id: str) -> dict[str, Any]:
        """One run's summary line (cached like the listing's)."""
        self.resolve(project, run_id)
        return self._infos([(project, run_id)])[(project, run_id)]

    def signature(self) -> tuple[Any, ...]:
        """Changes when a run appears, disappears or changes status (for the live run list)."""
        return tuple((r["project"], r["run_id"], r["status"], r["last_step"], r["error"]) for r in self.runs())


def filter_runs(runs: list[dict[str, Any]], q: str, regex: bool) -> list[dict[str, Any]]:
    """Runs whose name, run id, project, annotation or ``key=value`` config lines match ``q``.

    Plain text matches case-insensitively as a substring; ``regex`` compiles
    ``q`` (a bad pattern raises ``re.error``).
    """
    if not q:
        return runs
    if regex:
        pat = re.compile(q)
        match = lambda s: pat.search(s) is not None  # noqa: E731
    else:
        needle = q.lower()
        match = lambda s: needle in s.lower()  # noqa: E731
    out = []
    for r in runs:
        texts = [
            r["name"],
            r["run_id"],
            r["project"],
            f"{r['project']}/{r['run_id']}",
            r.get("annotation") or "",
            r["status"],
            *config_text(r.get("config") or {}),
        ]
        if any(match(t) for t in texts):
            out.append(r)
    return out
