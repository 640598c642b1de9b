"""The one writer of a run folder (format: :mod:`.format`).

A :class:`RunWriter` owns exactly one run: its ColumnVault file of scalars, its
SQLite metadata database, ``metadata.json`` and ``logs/``.  It is not
thread-safe; the daemon drives each writer from one dedicated thread.  A
``fcntl.flock`` on ``data/.writer.lock`` makes sure no second writer (another
daemon on this node or elsewhere on a shared filesystem) appends to the same
files: kohakuvault itself does nothing to prevent two writers.

Writing is staged so that neither a storage fault nor a crash loses or
duplicates a point:

* :meth:`RunWriter.stage` turns a batch of log messages into per-column record
  arrays (pure, cannot fail on the disk), dropping messages whose sequence
  numbers this run already has (a client re-sending what a dead daemon never
  acknowledged).
* :meth:`RunWriter.commit` phase A appends them column by column (and writes
  media files, tensor payloads, captured output), removing each from the
  staging list only after its append has committed; phase B is ONE SQLite
  transaction with the batch's rows, the clients' sequence numbers and the
  committed length of every column touched (format: "Commits").  If the disk
  fills up half way, the staged rest stays, the error is raised, and the next
  ``commit`` carries on where it stopped.
* If the process dies between the phases, the next writer to open the run
  removes the rows past the committed lengths (:meth:`RunWriter._recover`); the
  client re-sends that batch because it was never acknowledged.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import socket
import sqlite3
import struct
import time
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
from kohakuvault import ColumnVault

from ..protocol.errors import FormatVersionError, StorageError
from ..protocol.items import InvalidItem, check_item, item_array
from ..protocol.messages import DropReport, LogBatch, LogMessage, OutputMessage
from . import format as fmt
from .seqranges import SeqRanges

_REC = fmt.scalar_record_dtype()


class RunWriter:
    """Create or resume the run folder at ``path`` and hold it open for writing.

    Raises :class:`StorageError` when the folder cannot be created or written
    (read-only, permission, another writer holds it) and
    :class:`FormatVersionError` for a folder written by a newer format.
    """

    def __init__(
        self,
        path: str,
        *,
        on_event: Callable[[str], None] | None = None,
        now: Callable[[], float] = time.time,
        durable: bool = True,
    ) -> None:
        self.path = os.path.abspath(path)
        self.durable = durable
        self._now = now
        self._on_event = on_event
        self._staged: list[tuple[str, np.ndarray]] = []
        self._staged_calls: dict[int, list[tuple[Any, Any, Any]]] = {}
        self._last_range: dict[int, tuple[int, int, int, int, int, float, float]] = {}
        # Sequence numbers per client: committed (in metadata.db) and seen
        # (committed plus staged); clients touched since the last commit.
        self._committed: dict[str, SeqRanges] = {}
        self._seen: dict[str, SeqRanges] = {}
        self._touched: set[str] = set()
        self._staged_drops: dict[str, list[int]] = {}
        self.duplicates = 0
        self._parked: dict[str, list[tuple[int, float, Any]]] = {}
        self.parked_bytes = 0
        self.release_parked = False
        # Columns appended to since the last commit: (file, column) -> column.
        self._dirty_columns: dict[tuple[str, str], Any] = {}
        self._output_size: int | None = None
        self._staged_output: list[str] = []
        # Files (relative to the run) written since the last commit, to be synced
        # before the commit that names them (format: "Durability"), and
        # directories that gained an entry.
        self._unsynced: set[str] = set()
        self._unsynced_dirs: set[str] = set()
        # Rich values: (description, operation) pairs, each done exactly once and
        # removed only after it succeeded (see the module docstring).  File
        # operations run in phase A, SQL ones inside phase B's transaction.
        self._ops: list[tuple[str, Callable[[], None]]] = []
        self._sql_ops: list[tuple[str, Callable[[], None]]] = []
        self._hist_vaults: dict[str, Any] = {}
        self._hist_columns: dict[tuple[str, str, int], tuple[str, Any, bool]] = {}
        self._hist_dtypes: dict[str, dict[str, str]] = {}  # precision -> column -> dtype
        self._kv: Any = None
        self._scalar_bytes = 0  # appended to the scalar vault since it was opened
        self._in_compact = False
        self.items_written = 0
        self._columns: dict[str, Any] = {}
        self._writer_log: Any = None
        self._lock_fd: int | None = None
        self.points_written = 0
        problem = fmt.run_folder_problem(self.path)
        if problem is not None:
            raise StorageError(f"refusing to create a run in {self.path}: {problem}")
        try:
            for sub in (fmt.METRICS_DIR, fmt.LOGS_DIR):
                for new_dir in fmt.makedirs(os.path.join(self.path, sub)):
                    self._unsynced_dirs.add(os.path.dirname(new_dir))  # its name is an entry there
            self._lock_fd = os.open(os.path.join(self.path, fmt.WRITER_LOCK), os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise StorageError(f"cannot create run folder {self.path}: {exc.strerror or exc}") from exc
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(self._lock_fd)
            self._lock_fd = None
            raise StorageError(f"run folder {self.path} is already being written by another process") from exc
        try:
            self._meta_path = os.path.join(self.path, fmt.METADATA_JSON)
            self.metadata: dict[str, Any] = {}
            if os.path.exists(self._meta_path):
                self.metadata = fmt.read_json(self._meta_path)
                version = int(self.metadata.get("format_version", 1))
                if version > fmt.FORMAT_VERSION:
                    raise FormatVersionError(
                        f"run folder {self.path} has format version {version}; this "
                        f"KohakuBoard writes version {fmt.FORMAT_VERSION}. Upgrade kohakuboard."
                    )
            self._open_files()
            self._recover()
        except BaseException:
            self.close()
            raise

    # ---------------------------------------------------------------- setup

    def _open_files(self) -> None:
        try:
            self._writer_log = open(os.path.join(self.path, fmt.WRITER_LOG), "a", buffering=1, encoding="utf-8")
            self._db = sqlite3.connect(
                os.path.join(self.path, fmt.METADATA_DB), isolation_level=None, check_same_thread=False
            )
            self._db.execute("PRAGMA journal_mode=WAL")
            # FULL: the commit point itself reaches the disk before COMMIT returns
            # (NORMAL would leave it to the next checkpoint); format: "Durability".
            self._db.execute(f"PRAGMA synchronous={'FULL' if self.durable else 'NORMAL'}")
            # Small page cache: the daemon holds one connection per open run, and
            # this database only gets appends and a few lookups.
            self._db.execute("PRAGMA cache_size=-512")
            # A small WAL: checkpoint every 256 pages (1 MiB) and cut the file back to
            # 256 KiB after each checkpoint (SQLite otherwise keeps its largest size).
            self._db.execute("PRAGMA wal_autocheckpoint=256")
            self._db.execute("PRAGMA journal_size_limit=262144")
            self._db.executescript(fmt.SCHEMA_SQL)
            have = {row[1] for row in self._db.execute("PRAGMA table_info(clients)")}
            for column in ("dropped_calls", "dropped_values", "dropped_lines"):
                if column not in have:  # a run written before drop counters existed
                    self._db.execute(f"ALTER TABLE clients ADD COLUMN {column} INTEGER NOT NULL DEFAULT 0")
            self._db.execute(
                "INSERT OR IGNORE INTO meta(key, value) VALUES ('format_version', ?)",
                (str(fmt.FORMAT_VERSION),),
            )
            self._vault = ColumnVault(os.path.join(self.path, fmt.SCALARS_DB), block_bytes=fmt.VAULT_BLOCK_BYTES)
            self._unsynced_dirs.update(("", fmt.DATA_DIR, fmt.METRICS_DIR, fmt.LOGS_DIR))
        except sqlite3.Error as exc:
            raise StorageError(f"cannot open {fmt.METADATA_DB} in {self.path}: {exc}") from exc
        except OSError as exc:
            raise StorageError(f"cannot open files in {self.path}: {exc.strerror or exc}") from exc
        except Exception as exc:  # kohakuvault raises its own error types
            raise StorageError(f"cannot open {fmt.SCALARS_DB} in {self.path}: {exc}") from exc

    def _vault_files(self) -> list[tuple[str, Any]]:
        """(path relative to the run, open vault) of every ColumnVault file that exists."""
        out = [(fmt.SCALARS_DB, self._scalar_vault())]
        for precision, rel in fmt.HISTOGRAM_FILES.items():
            if os.path.exists(os.path.join(self.path, rel)):
                out.append((rel, self._hist_vault(precision)))
        return out

    def _recover(self) -> None:
        """Make the files agree with the last commit point; load the clients' sequence numbers.

        Rows past a column's committed length (and bytes past output.log's) were
        written by a daemon that died before committing their batch: the
        clients never got that batch acknowledged and send it again, so the rows
        are removed here rather than stored twice.
        """
        try:
            flag = self._db.execute("SELECT value FROM meta WHERE key='commit_lengths'").fetchone()
            committed = {(f, n): int(ln) for f, n, ln in self._db.execute("SELECT file, name, length FROM committed")}
            out_path = os.path.join(self.path, fmt.OUTPUT_LOG)
            out_size = os.path.getsize(out_path) if os.path.exists(out_path) else 0
            if flag is None:
                # A new run, or one written before commit points existed: what is
                # there now is committed.
                rows = [
                    (rel, name, int(n)) for rel, vault in self._vault_files() for name, _, n in vault.list_columns()
                ]
                rows.append((fmt.OUTPUT_LOG, "", out_size))
                self._db.execute("BEGIN")
                self._db.executemany("INSERT OR REPLACE INTO committed(file, name, length) VALUES (?,?,?)", rows)
                self._db.execute("INSERT OR REPLACE INTO meta(key, value) VALUES ('commit_lengths', '1')")
                self._db.execute("COMMIT")
            else:
                for rel, vault in self._vault_files():
                    for name, dtype, n in vault.list_columns():
                        keep = committed.get((rel, name), 0)
                        if n > keep:
                            col = vault.ensure(name, dtype)
                            del col[keep:]
                            self.event(
                                "recovered",
                                f"removed {n - keep} uncommitted row(s) of {rel}:{name} (re-sent by the client)",
                            )
                keep = committed.get((fmt.OUTPUT_LOG, ""), 0)
                if out_size > keep:
                    os.truncate(out_path, keep)
                    self.event("recovered", f"removed {out_size - keep} uncommitted byte(s) of {fmt.OUTPUT_LOG}")
            for client, lo, hi in self._db.execute("SELECT client, lo, hi FROM client_seqs ORDER BY client, lo"):
                self._committed.setdefault(client, SeqRanges()).add(int(lo), int(hi))
        except sqlite3.Error as exc:
            raise StorageError(f"cannot read the commit point of {self.path}: {exc}") from exc
        except OSError as exc:
            raise StorageError(f"cannot recover {self.path}: {exc.strerror or exc}") from exc
        self._seen = {c: r.copy() for c, r in self._committed.items()}

    def durable_prefix(self, client: str) -> int:
        """Highest n such that every message 1..n of ``client`` is committed."""
        r = self._committed.get(client)
        return r.prefix() if r is not None else 0

    def reopen_logs(self) -> None:
        """Reopen ``logs/writer.log`` (SIGHUP, after log rotation)."""
        old = self._writer_log
        self._writer_log = open(os.path.join(self.path, fmt.WRITER_LOG), "a", buffering=1, encoding="utf-8")
        if old is not None:
            old.close()

    # ------------------------------------------------------------ run level

    def attach(
        self,
        *,
        client: str,
        rank: int,
        pid: int,
        host: str,
        name: str,
        project: str,
        run_id: str,
        config: dict[str, Any],
        world_size: int | None = None,
        annotation: str = "",
    ) -> dict[str, Any]:
        """Register a client; create ``metadata.json`` or resume the run.

        Only rank 0 sets the run's ``name``, ``config`` and ``world_size``: a
        rank that opens a distributed run first creates it with an empty config
        and the run id as its name, and rank 0 fills them in when it attaches.
        Returns ``created`` (bool), ``last_step`` (-1 if none) and
        ``last_global_step`` for the client's rank, and for a resumed run
        ``kinds`` (see :meth:`kinds`).  A non-empty ``annotation`` (the part of
        the folder name after ``{run_id}_``) is recorded when the run has none.
        """
        now = self._now()
        created = not self.metadata
        if created:
            self.metadata = {
                "name": (name or run_id) if rank == 0 else run_id,
                "project": project,
                "run_id": run_id,
                "config": config if rank == 0 else {},
                "created_at": now,
                "finished_at": None,
                "status": fmt.STATUS_RUNNING,
                "format_version": fmt.FORMAT_VERSION,
                "host": host or socket.gethostname(),
            }
        else:
            self.metadata["status"] = fmt.STATUS_RUNNING
            self.metadata["finished_at"] = None
            if config and rank == 0:
                merged = dict(self.metadata.get("config") or {})
                merged.update(config)
                self.metadata["config"] = merged
            if name and rank == 0 and self.metadata.get("name") in (None, "", run_id):
                self.metadata["name"] = name
        if rank == 0 and world_size:
            self.metadata["world_size"] = int(world_size)
        if annotation and not self.metadata.get("annotation"):
            self.metadata["annotation"] = annotation
        self._write_metadata()
        with self._sql():
            self._db.execute(
                "INSERT INTO clients(client, rank, pid, host, opened_at, status) VALUES (?,?,?,?,?,?) "
                "ON CONFLICT(client) DO UPDATE SET pid=excluded.pid, status=excluded.status, closed_at=NULL",
                (client, rank, pid, host, now, "attached"),
            )
            row = self._db.execute(
                "SELECT last_step, last_global_step FROM steps WHERE rank=? ORDER BY last_step DESC LIMIT 1", (rank,)
            ).fetchone()
        self.event("open" if created else "resume", f"client {client} rank {rank} pid {pid} on {host}")
        return {
            "created": created,
            "last_step": int(row[0]) if row else -1,
            "last_global_step": int(row[1]) if row else 0,
            "kinds": {} if created else self.kinds(),
            "name": str(self.metadata.get("name") or ""),
        }

    def kinds(self) -> dict[str, str]:
        """Every name this run holds, with its kind: scalar, media, table, histogram, tensor or kde.

        What is written so far (any rank); clients use it to refuse a second
        kind under one name.  Table cells (``name#k`` media rows) are left out.
        """
        out: dict[str, str] = {}
        try:
            for rel, vault in self._vault_files():
                kind = "scalar" if rel == fmt.SCALARS_DB else "histogram"
                split = fmt.split_column_name if kind == "scalar" else fmt.split_histogram_column
                for col, _, n in vault.list_columns():
                    if n:
                        try:
                            out.setdefault(split(col)[1], kind)
                        except ValueError:
                            pass
            for kind, table in (("media", "media"), ("table", "tables"), ("tensor", "tensors"), ("kde", "kde")):
                for (name,) in self._db.execute(f"SELECT DISTINCT name FROM {table}"):
                    if kind != "media" or not fmt.is_table_cell(name):
                        out.setdefault(name, kind)
        except (sqlite3.Error, OSError):
            pass  # a hint for clients, never worth failing an open for
        except Exception:  # kohakuvault's own errors
            pass
        return out

    def last_step(self, rank: int = 0) -> tuple[int, int]:
        """``(step, global_step)`` of the latest committed call of ``rank`` (``(0, 0)`` without one)."""
        try:
            row = self._db.execute(
                "SELECT last_step, last_global_step FROM steps WHERE rank=? ORDER BY last_step DESC LIMIT 1", (rank,)
            ).fetchone()
        except sqlite3.Error:
            row = None
        return (int(row[0]), int(row[1])) if row else (0, 0)

    def detach(self, client: str, status: str) -> None:
        """Record that a client finished (or crashed)."""
        with self._sql():
            self._db.execute("UPDATE clients SET status=?, closed_at=? WHERE client=?", (status, self._now(), client))
        self.event("client_" + status, f"client {client}")

    def set_status(self, status: str) -> None:
        """Mark the whole run running/finished/crashed in ``metadata.json``."""
        if status not in fmt.STATUSES:
            raise ValueError(f"unknown run status {status!r}")
        self.metadata["status"] = status
        self.metadata["finished_at"] = None if status == fmt.STATUS_RUNNING else self._now()
        self._write_metadata()
        self.event("status", status)

    def _write_metadata(self) -> None:
        try:
            fmt.write_json_atomic(self._meta_path, self.metadata)
        except OSError as exc:
            raise StorageError(f"cannot write {self._meta_path}: {exc.strerror or exc}") from exc

    def event(self, kind: str, detail: str) -> None:
        """Append a run event to the events table and ``logs/writer.log``."""
        now = self._now()
        line = f"{time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(now))} {kind}: {detail}"
        try:
            if self._writer_log is not None:
                self._writer_log.write(line + "\n")
            with self._sql():
                self._db.execute("INSERT INTO events(wall, kind, detail) VALUES (?,?,?)", (now, kind, detail))
        except (OSError, StorageError):
            pass  # an event is never worth failing a write for; the daemon log has it too
        if self._on_event is not None:
            self._on_event(f"{self.path}: {line}")

    # ------------------------------------------------------------- scalars

    def stage(
        self,
        batch: Iterable[LogMessage | LogBatch | OutputMessage | DropReport],
        prepared: dict[int, Any] | None = None,
    ) -> None:
        """Turn log messages into per-column record arrays, ready to commit.

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
        seen = self._seen
        touched = self._touched
        calls = self._staged_calls  # rank -> [(steps, global_steps, walls)] in call order
        # segment: (rank, names, order, steps, global_steps, walls, values[n, k])
        segments: list[tuple[int, tuple[str, ...], Any, Any, Any, Any, Any]] = []
        groups: dict[tuple[int, tuple[str, ...]], list[Any]] = {}
        pos = 0
        for msg in self._in_sequence(batch):
            pre = prepared.pop(id(msg), None) if prepared else None
            env = msg.env
            r = seen.get(env.client)
            if r is None:
                r = seen[env.client] = SeqRanges()
            if type(msg) is LogBatch:
                n = msg.count
                if n == 0:
                    continue
                seqs = np.frombuffer(msg.seqs, dtype="<i8")
                steps = np.frombuffer(msg.steps, dtype="<i8")
                gsteps = np.frombuffer(msg.global_steps, dtype="<i8")
                walls = np.frombuffer(msg.walls, dtype="<f8")
                values = np.frombuffer(msg.values, dtype="<f8").reshape(n, len(msg.names))
                lo, hi = int(seqs.min()), int(seqs.max())
                if r.overlaps(lo, hi):  # a re-send: keep only calls this run does not have
                    keep = np.fromiter((s not in r for s in seqs.tolist()), dtype=bool, count=n)
                    self.duplicates += n - int(keep.sum())
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
                _add_seqs(r, seqs)
                touched.add(env.client)
                segments.append((env.rank, tuple(msg.names), np.arange(pos, pos + n), steps, gsteps, walls, values))
                calls.setdefault(env.rank, []).append((steps, gsteps, walls))
                pos += n
                continue
            seq = env.seq
            if type(msg) is OutputMessage:
                if not self._claim(env.client, r, seq, seq):
                    continue
                if msg.text:
                    self._staged_output.append(msg.text)
                continue
            if type(msg) is DropReport:
                if not self._claim(env.client, r, msg.first_seq, seq):
                    continue
                d = self._staged_drops.setdefault(env.client, [0, 0, 0])
                d[0] += msg.calls
                d[1] += msg.values
                if msg.lines:
                    d[2] += msg.lines
                    self._staged_output.append(
                        f"[kohakuboard: {msg.lines} line(s) of output dropped here: the queue was full "
                        f"(queue_policy='drop')]\n"
                    )
                continue
            if not self._claim(env.client, r, seq, seq):
                continue
            calls.setdefault(env.rank, []).append((env.step, env.global_step, env.wall))
            if msg.items:
                self._stage_items(msg, _prepared_result(pre))
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
        parts: dict[tuple[int, str], list[tuple[Any, Any, Any, Any, Any]]] = {}
        for rank, names, order, steps, gsteps, walls, values in segments:
            for j, name in enumerate(names):
                parts.setdefault((rank, name), []).append((order, steps, gsteps, walls, values[:, j]))
        for (rank, name), chunks in parts.items():
            if len(chunks) == 1:
                _, steps, gsteps, walls, vals = chunks[0]
                rec = np.empty(len(steps), dtype=_REC)
                rec["step"], rec["global_step"], rec["wall"], rec["value"] = steps, gsteps, walls, vals
            else:  # the metric came in several chunks (batches, groups): keep call order
                total = sum(len(c[0]) for c in chunks)
                rec = np.empty(total, dtype=_REC)
                at = 0
                for order, steps, gsteps, walls, vals in chunks:
                    n = len(order)
                    view = rec[at : at + n]
                    view["step"], view["global_step"], view["wall"], view["value"] = steps, gsteps, walls, vals
                    at += n
                ix = np.concatenate([c[0] for c in chunks])
                if np.any(ix[1:] < ix[:-1]):  # single calls grouped apart from batches: re-sort
                    rec = rec[np.argsort(ix, kind="stable")]
            self._staged.append((fmt.column_name(rank, name), rec))

    def _claim(self, client: str, r: SeqRanges, first: int, last: int) -> bool:
        """Record seqs ``first..last`` of ``client`` as staged; False (a duplicate) if the run has them."""
        if r.covers(first, last):
            self.duplicates += 1
            return False
        r.add(first, last)
        self._touched.add(client)
        return True

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
                r = self._seen.get(c)
                end = r.highest() if r is not None else 0
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
                    self.event(
                        "gap", f"client {c}: stored messages from seq {waiting[0][0]} on without the ones before them"
                    )
        return out

    @property
    def parked(self) -> int:
        """Clients with messages held back for a re-send (see :meth:`_in_sequence`)."""
        return len(self._parked)

    @property
    def staged_points(self) -> int:
        return sum(len(a) for _, a in self._staged)

    def commit(self) -> dict[str, int]:
        """Write everything staged; return ``{client: durable prefix}`` for the clients touched.

        Phase A: output text, column appends, file operations; phase B: one
        SQLite transaction that makes the batch durable (module docstring).
        On a storage error the part not yet written stays staged and
        :class:`StorageError` is raised; calling ``commit`` again resumes.
        """
        if self._staged_output:
            self._write_output()
        while self._staged:
            colname, rec = self._staged[0]
            try:
                col = self._columns.get(colname)
                if col is None:
                    col = self._columns[colname] = self._scalar_vault().ensure(colname, fmt.SCALAR_COLUMN_DTYPE)
                col.append_array(rec.view(np.uint8).reshape(-1, fmt.SCALAR_RECORD_SIZE))
            except Exception as exc:
                raise _storage_error(self.path, f"append to metric column {colname!r}", exc) from exc
            self._scalar_bytes += rec.nbytes
            self._dirty_columns[(fmt.SCALARS_DB, colname)] = col
            self._unsynced.add(fmt.SCALARS_DB)
            self._staged.pop(0)
            self.points_written += len(rec)
        while self._ops:
            what, op = self._ops[0]
            try:
                op()
            except StorageError:
                raise
            except Exception as exc:
                raise _storage_error(self.path, what, exc) from exc
            self._ops.pop(0)
        touched = self._touched
        if not (touched or self._staged_calls or self._sql_ops or self._dirty_columns or self._output_size is not None):
            return {}
        self._sync_written()
        last_range = dict(self._last_range)
        try:
            with self._sql():
                self._db.execute("BEGIN")
                try:
                    for what, op in self._sql_ops:
                        # A savepoint per item: a value the database cannot take (a
                        # client bug or hostile input) is skipped with an event
                        # instead of failing the batch again and again.  Disk and
                        # lock problems (OperationalError) fail the commit: retried.
                        self._db.execute("SAVEPOINT item")
                        try:
                            op()
                        except sqlite3.OperationalError:
                            raise
                        except Exception as exc:
                            self._db.execute("ROLLBACK TO item")
                            self.event("rejected_item", f"{what}: {exc!r}")
                        self._db.execute("RELEASE item")
                    for rank, parts in self._staged_calls.items():
                        self._write_step_ranges(rank, parts)
                    seq_rows = []
                    for client in touched:
                        r = self._seen[client]
                        self._db.execute("DELETE FROM client_seqs WHERE client=?", (client,))
                        seq_rows.extend((client, lo, hi) for lo, hi in r.ranges())
                    self._db.executemany("INSERT INTO client_seqs(client, lo, hi) VALUES (?,?,?)", seq_rows)
                    self._db.executemany(
                        "UPDATE clients SET durable_seq=? WHERE client=?",
                        [(self._seen[client].prefix(), client) for client in touched],
                    )
                    if self._staged_drops:
                        self._db.executemany(
                            "UPDATE clients SET dropped_calls=dropped_calls+?, dropped_values=dropped_values+?, "
                            "dropped_lines=dropped_lines+? WHERE client=?",
                            [(c, v, n, client) for client, (c, v, n) in self._staged_drops.items()],
                        )
                    lengths = [(rel, name, len(col)) for (rel, name), col in self._dirty_columns.items()]
                    if self._output_size is not None:
                        lengths.append((fmt.OUTPUT_LOG, "", self._output_size))
                    self._db.executemany("INSERT OR REPLACE INTO committed(file, name, length) VALUES (?,?,?)", lengths)
                    self._db.execute("COMMIT")
                except BaseException:
                    # A failed COMMIT (disk full) has rolled back already: a second
                    # ROLLBACK would raise and hide the real error.
                    if self._db.in_transaction:
                        try:
                            self._db.execute("ROLLBACK")
                        except sqlite3.Error:
                            pass
                    raise
        except BaseException:
            self._last_range = last_range  # the rows it described were rolled back
            raise
        self.items_written += len(self._sql_ops)
        self._sql_ops = []
        self._staged_calls = {}
        self._staged_drops = {}
        self._dirty_columns = {}
        self._output_size = None
        out = {}
        for client in touched:
            r = self._seen[client]
            self._committed[client] = r.copy()
            out[client] = r.prefix()
        self._touched = set()
        self._compact_journals()
        return out

    def _sync_written(self) -> None:
        """fsync every file phase A wrote, and every directory that gained an entry,
        before the transaction that names them (format: "Durability")."""
        if not self.durable:
            self._unsynced.clear()
            self._unsynced_dirs.clear()
            return
        while self._unsynced:
            rel = next(iter(self._unsynced))
            path = os.path.join(self.path, rel)
            try:
                _fsync(path)
                if rel != fmt.OUTPUT_LOG and not rel.startswith(fmt.MEDIA_DIR):
                    _fsync(path + "-wal", missing_ok=True)  # a vault's appends live in its WAL
            except OSError as exc:
                raise _storage_error(self.path, f"sync {rel}", exc) from exc
            self._unsynced.discard(rel)
        while self._unsynced_dirs:
            rel = next(iter(self._unsynced_dirs))
            try:
                _fsync(os.path.join(self.path, rel))
            except OSError as exc:
                raise _storage_error(self.path, f"sync the directory {rel or '.'}", exc) from exc
            self._unsynced_dirs.discard(rel)

    def _compact_journals(self) -> None:
        """Keep the histogram and tensor stores' write-ahead logs small.

        SQLite reuses a WAL after a checkpoint but never shrinks its file, and the
        KVault checkpoints only when closed: 12.5 MiB of tensors left a 31 MiB WAL
        beside the store until the daemon stopped (issue 9).  A store whose WAL
        has grown past ``fmt.WAL_KEEP_BYTES`` is closed after the commit (closing
        checkpoints it and removes the WAL) and reopened on its next write.
        """
        stores: list[tuple[str, Callable[[], None]]] = []
        if self._kv is not None:
            stores.append((fmt.TENSORS_DB, self._close_kvault))
        for precision in list(self._hist_vaults):
            stores.append((fmt.HISTOGRAM_FILES[precision], lambda p=precision: self._close_hist_vault(p)))
        for rel, close in stores:
            try:
                wal = os.path.getsize(os.path.join(self.path, rel) + "-wal")
            except OSError:
                continue
            if wal > fmt.WAL_KEEP_BYTES:
                close()
        if self._scalar_bytes >= _SCALAR_REOPEN_BYTES:
            self._in_compact = True
            try:
                self._reopen_scalars()
            finally:
                self._in_compact = False

    def _reopen_scalars(self) -> None:
        """Close and reopen the scalar vault after ``_SCALAR_REOPEN_BYTES`` of appends.

        kohakuvault keeps the pages a connection wrote in its own memory (not
        configurable in 1.1): ~7 MB per run per million records, ~17 MB per run
        at its plateau, which took a daemon with 8 runs ingesting to ~210 MB.
        Reopening (~0.4 ms) and returning the freed heap to the system bounds
        it to a few MB per open run (README "Performance").
        """
        self._scalar_bytes = 0
        vault, self._vault = self._vault, None
        self._columns.clear()
        try:
            vault.checkpoint()
            vault.close()
        except Exception:
            pass  # committed data is in the WAL either way; the next open recovers it
        _trim_heap()
        self._scalar_vault()  # a failure here is the next write's (its error is raised there)

    def _scalar_vault(self) -> Any:
        """The open scalar vault; reopened here if :meth:`_reopen_scalars` could not."""
        if self._vault is None:
            try:
                self._vault = ColumnVault(os.path.join(self.path, fmt.SCALARS_DB), block_bytes=fmt.VAULT_BLOCK_BYTES)
            except Exception as exc:
                if self._in_compact:
                    return None
                raise _storage_error(self.path, f"reopen {fmt.SCALARS_DB}", exc) from exc
        return self._vault

    def _close_kvault(self) -> None:
        kv, self._kv = self._kv, None
        try:
            kv.close()
        except Exception:
            pass  # committed data is in the WAL either way; the next open recovers it

    def _close_hist_vault(self, precision: str) -> None:
        vault = self._hist_vaults.pop(precision)
        for key in [k for k in self._hist_columns if k[0] == precision]:
            del self._hist_columns[key]
        self._hist_dtypes.pop(precision, None)
        try:
            vault.close()
        except Exception:
            pass

    def _write_output(self) -> None:
        path = os.path.join(self.path, fmt.OUTPUT_LOG)
        data = "".join(self._staged_output).encode("utf-8", errors="replace")
        try:
            with open(path, "ab") as f:
                start = f.tell()
                try:
                    f.write(data)
                    f.flush()
                    if self.durable:
                        os.fsync(f.fileno())
                except OSError:
                    f.truncate(start)  # no half-written text that a retry would repeat
                    raise
                self._output_size = f.tell()
        except OSError as exc:
            raise _storage_error(self.path, "write logs/output.log", exc) from exc
        self._staged_output = []

    def _write_step_ranges(self, rank: int, parts: list[tuple[Any, Any, Any]]) -> None:
        """Record the batch's calls in the steps table as ranges (inside a transaction).

        A row covers consecutive steps whose global step moves by a constant 0
        or 1 per call, which is what training loops do: a whole
        ``board.step(); board.log(...)`` run is one row.  Every scalar point
        carries its own step, global step and wall time, so the table only needs
        to map steps to global steps (also for calls that logged no scalar);
        measured, one row per call cost 22 bytes and a fifth of the daemon's CPU.
        """
        steps = np.concatenate([np.atleast_1d(np.asarray(p[0], dtype=np.int64)) for p in parts])
        gsteps = np.concatenate([np.atleast_1d(np.asarray(p[1], dtype=np.int64)) for p in parts])
        walls = np.concatenate([np.atleast_1d(np.asarray(p[2], dtype=np.float64)) for p in parts])
        last = self._last_range.get(rank)
        for s0, s1, g0, g1, w0, w1 in _step_ranges(steps, gsteps, walls):
            if last is not None and _extends(last, s0, s1, g0, g1):
                rowid, ls0, _, lg0, _, lw0, _ = last
                self._db.execute(
                    "UPDATE steps SET last_step=?, last_global_step=?, last_wall=? WHERE rowid=?",
                    (s1, g1, w1, rowid),
                )
                last = (rowid, ls0, s1, lg0, g1, lw0, w1)
            else:
                cur = self._db.execute(
                    "INSERT INTO steps(rank, first_step, last_step, first_global_step, last_global_step, "
                    "first_wall, last_wall) VALUES (?,?,?,?,?,?,?)",
                    (rank, s0, s1, g0, g1, w0, w1),
                )
                last = (int(cur.lastrowid), s0, s1, g0, g1, w0, w1)
        if last is not None:
            self._last_range[rank] = last

    # ---------------------------------------------------------- rich values

    def _stage_items(self, msg: LogMessage, prepared: list[tuple[str, Any]] | None = None) -> None:
        """Queue the writes of a message's rich values.  Their CPU work (PNG,
        binning, KDE) is ``prepared``, done by :func:`prepare_items` on the
        daemon's compute pool, or done here when not given.  A malformed item is
        logged and skipped: one bad value must not block the run."""
        env = msg.env
        if prepared is None:
            prepared = prepare_items(msg)
        for item, (outcome, value) in zip(msg.items, prepared):
            name, kind = item[0], item[1]
            if outcome == "invalid":  # a hostile or buggy client's item: nothing of it is written
                self.event("rejected_item", f"{kind} {name!r:.80} at step {env.step}: {value}")
                continue
            if outcome == "bug":  # a valid item the daemon cannot prepare: a bug, said loudly
                self.event("rejected_item", f"BUG: valid {kind} {name!r} at step {env.step} failed: {value!r}")
                continue
            for op in _ITEM_OPS[kind](self, env, name, item[2], value):
                if len(op) == 3:
                    self._sql_ops.append(op[:2])
                else:
                    self._ops.append(op)

    def _media_ops(self, name: str, value: tuple[Any, ...]) -> list[tuple[str, Callable[[], None]]]:
        data, ext, digest = value[0], value[1], value[5]
        return [(f"write media {name!r}", lambda: self._write_blob(digest, ext, data))]

    def _write_blob(self, digest: str, ext: str, data: bytes) -> None:
        path = os.path.join(self.path, fmt.MEDIA_DIR, f"{digest}.{ext}")
        if os.path.exists(path):
            return  # content-addressed: identical bytes are stored once
        if not os.path.isdir(os.path.dirname(path)):
            fmt.makedirs(os.path.dirname(path))
            self._unsynced_dirs.add("")  # media/ itself is new
        tmp = f"{path}.tmp-{os.getpid()}"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                if self.durable:
                    os.fsync(f.fileno())
            os.replace(tmp, path)
            self._unsynced_dirs.add(fmt.MEDIA_DIR)  # the new name is synced before the commit
        except BaseException:
            try:
                os.unlink(tmp)  # no half-written temporary left behind (disk full)
            except OSError:
                pass
            raise

    def _insert_media(self, row: dict[str, Any]) -> int:
        cur = self._db.execute(
            "INSERT INTO media(name, rank, step, global_step, wall, media_type, hash, ext, size, width, height, caption, source) "
            "VALUES (:name, :rank, :step, :global_step, :wall, :media_type, :hash, :ext, :size, :width, :height, :caption, :source)",
            row,
        )
        return int(cur.lastrowid)

    @staticmethod
    def _sql_op(what: str, fn: Callable[[], None]) -> tuple[str, Callable[[], None], bool]:
        """An item's SQL rows: run inside the commit's transaction (phase B)."""
        return what, fn, True

    def _ops_media(
        self, env: Any, name: str, meta: dict[str, Any], value: tuple[Any, ...]
    ) -> list[tuple[str, Callable[[], None]]]:
        row = _media_row(env, name, meta, value)
        return self._media_ops(name, value) + [
            self._sql_op(f"record media {name!r}", lambda: self._insert_media(row) and None)
        ]

    def _ops_table(
        self, env: Any, name: str, meta: dict[str, Any], value: list[tuple[Any, ...]]
    ) -> list[tuple[str, Callable[[], None]]]:
        columns = [str(c) for c in meta["columns"]]
        rows = meta["rows"]
        media_meta = meta.get("media") or []
        ops: list[tuple[str, Callable[[], None]]] = []
        media_rows = []
        for k, (mm, mv) in enumerate(zip(media_meta, value)):
            media_rows.append(_media_row(env, f"{name}#{k}", mm, mv))
            ops.extend(self._media_ops(f"{name}#{k}", mv))

        def insert() -> None:
            ids = [self._insert_media(row) for row in media_rows]
            resolved = [
                [{"$media": ids[c["$media"]]} if isinstance(c, dict) and "$media" in c else c for c in r] for r in rows
            ]
            self._db.execute(
                "INSERT INTO tables(name, rank, step, global_step, wall, columns, rows) VALUES (?,?,?,?,?,?,?)",
                (name, env.rank, env.step, env.global_step, env.wall, json.dumps(columns), json.dumps(resolved)),
            )

        return ops + [self._sql_op(f"record table {name!r}", insert)]

    def _ops_histogram(
        self, env: Any, name: str, meta: dict[str, Any], value: tuple[str, bytes]
    ) -> list[tuple[str, Callable[[], None]]]:
        precision, record = value
        base = fmt.column_name(env.rank, name)

        def append() -> None:
            colname, col, fixed = self._hist_column(precision, base, len(record))
            if fixed:
                col.append_array(np.frombuffer(record, np.uint8).reshape(1, -1))
            else:  # a run written before fixed-size records: its bytes column
                col.append(record)
            self._dirty_columns[(fmt.HISTOGRAM_FILES[precision], colname)] = col
            self._unsynced.add(fmt.HISTOGRAM_FILES[precision])

        return [(f"append histogram {name!r}", append)]

    def _hist_vault(self, precision: str) -> Any:
        vault = self._hist_vaults.get(precision)
        if vault is None:
            fmt.makedirs(os.path.join(self.path, fmt.HISTOGRAMS_DIR))
            vault = self._hist_vaults[precision] = ColumnVault(
                os.path.join(self.path, fmt.HISTOGRAM_FILES[precision]), block_bytes=fmt.VAULT_BLOCK_BYTES
            )
            self._unsynced_dirs.update((fmt.DATA_DIR, fmt.HISTOGRAMS_DIR))  # the file and its WAL may be new
        return vault

    def _hist_column(self, precision: str, base: str, size: int) -> tuple[str, Any, bool]:
        """``(column name, column, fixed-size?)`` for a ``size``-byte histogram row of ``base``
        (format: ``HISTOGRAM_SIZE_SEP``)."""
        got = self._hist_columns.get((precision, base, size))
        if got is not None:
            return got
        vault = self._hist_vault(precision)
        dtypes = self._hist_dtypes.get(precision)
        if dtypes is None:
            dtypes = self._hist_dtypes[precision] = {n: d for n, d, _ in vault.list_columns()}
        want = fmt.histogram_dtype(size)
        have = dtypes.get(base)
        if have == "bytes":
            colname, dtype = base, "bytes"
        elif have is None or have == want:
            colname, dtype = base, want
        else:
            colname, dtype = f"{base}{fmt.HISTOGRAM_SIZE_SEP}{size}", want
        if dtype != "bytes" and colname not in dtypes:
            self._require_format(2)  # a version-1 reader would misread fixed-size rows
        col = vault.ensure(colname, dtype)
        dtypes[colname] = dtype
        got = self._hist_columns[(precision, base, size)] = (colname, col, dtype != "bytes")
        return got

    def _require_format(self, version: int) -> None:
        """Raise the run's format version to ``version`` (a run created by an older writer)."""
        if int(self.metadata.get("format_version", 1)) >= version:
            return
        try:
            self._db.execute("INSERT OR REPLACE INTO meta(key, value) VALUES ('format_version', ?)", (str(version),))
        except sqlite3.Error as exc:
            raise _storage_error(self.path, "record the format version", exc) from exc
        self.metadata["format_version"] = version
        self._write_metadata()

    def _kvault(self) -> Any:
        if self._kv is None:
            from kohakuvault import KVault

            fmt.makedirs(os.path.join(self.path, fmt.TENSORS_DIR))
            self._kv = KVault(os.path.join(self.path, fmt.TENSORS_DB), cache_kb=fmt.KVAULT_CACHE_KB)
            self._unsynced_dirs.update((fmt.DATA_DIR, fmt.TENSORS_DIR))  # the file and its WAL may be new
        return self._kv

    def _put_payload(self, key: str, data: bytes) -> None:
        self._kvault().put(key, data)
        self._unsynced.add(fmt.TENSORS_DB)

    def _ops_tensor(
        self, env: Any, name: str, meta: dict[str, Any], value: tuple[Any, ...]
    ) -> list[tuple[str, Callable[[], None]]]:
        dtype, shape, data = value
        key = f"tensor/{env.client}/{env.seq}/{name}"

        def insert() -> None:
            self._db.execute(
                "INSERT INTO tensors(name, rank, step, global_step, wall, key, dtype, shape, namespace, metadata, source_dtype) "
                "VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                (
                    name,
                    env.rank,
                    env.step,
                    env.global_step,
                    env.wall,
                    key,
                    dtype,
                    json.dumps(shape),
                    meta.get("namespace"),
                    json.dumps(meta.get("metadata") or {}),
                    str(meta.get("source_dtype") or ""),
                ),
            )

        return [
            (f"store tensor {name!r}", lambda: self._put_payload(key, data)),
            self._sql_op(f"record tensor {name!r}", insert),
        ]

    def _ops_kde(
        self, env: Any, name: str, meta: dict[str, Any], value: tuple[Any, ...]
    ) -> list[tuple[str, Callable[[], None]]]:
        grid_size, bandwidth, count, data = value
        key = f"kde/{env.client}/{env.seq}/{name}"

        def insert() -> None:
            self._db.execute(
                "INSERT INTO kde(name, rank, step, global_step, wall, key, grid_size, bandwidth, count) VALUES (?,?,?,?,?,?,?,?,?)",
                (name, env.rank, env.step, env.global_step, env.wall, key, grid_size, bandwidth, count),
            )

        return [
            (f"store KDE {name!r}", lambda: self._put_payload(key, data)),
            self._sql_op(f"record KDE {name!r}", insert),
        ]

    # -------------------------------------------------------------- output

    # ---------------------------------------------------------------- close

    def _sql(self) -> _SqlGuard:
        return _SqlGuard(self.path)

    def checkpoint(self) -> None:
        """Fold the WAL files back into the main files (cheap when idle)."""
        try:
            self._vault.checkpoint()
            self._db.execute("PRAGMA wal_checkpoint(PASSIVE)")
        except Exception:
            pass

    def close(self) -> None:
        """Close every file and release the writer lock.  Idempotent."""
        for attr in ("_vault", "_db", "_writer_log"):
            obj = self.__dict__.pop(attr, None)
            if obj is not None:
                try:
                    if attr == "_vault":
                        obj.checkpoint()
                    obj.close()
                except Exception:
                    pass
        self._columns.clear()
        for obj in [*self.__dict__.get("_hist_vaults", {}).values(), self.__dict__.get("_kv")]:
            if obj is not None:
                try:
                    obj.close()
                except Exception:
                    pass
        self.__dict__.get("_hist_vaults", {}).clear()
        self.__dict__.get("_hist_columns", {}).clear()
        self._kv = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None


_SCALAR_REOPEN_BYTES = 1 << 20
_libc: Any = None


def _trim_heap() -> None:
    """Give freed heap memory back to the system (glibc ``malloc_trim``; elsewhere nothing)."""
    global _libc
    if _libc is None:
        try:
            import ctypes

            _libc = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _libc = False
    if _libc:
        _libc(0)


_PARK_SECONDS = 10.0
_PARK_BYTES = 32 << 20


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


def _add_seqs(r: SeqRanges, seqs: np.ndarray) -> None:
    """Add a batch's sequence numbers (normally consecutive: one range)."""
    first, last = int(seqs[0]), int(seqs[-1])
    if last - first == len(seqs) - 1 and (len(seqs) < 3 or bool(np.all(np.diff(seqs) == 1))):
        r.add(first, last)
    else:
        for s in seqs.tolist():
            r.add(s, s)


def _step_ranges(
    steps: np.ndarray, gsteps: np.ndarray, walls: np.ndarray
) -> list[tuple[int, int, int, int, float, float]]:
    """Split calls into maximal runs of step +1 with a constant global-step delta of 0 or 1."""
    n = len(steps)
    if n == 0:
        return []
    ds, dg = np.diff(steps), np.diff(gsteps)
    link = (ds == 1) & ((dg == 0) | (dg == 1))
    if n > 2:
        # within a range the global-step delta may not change
        link[1:] &= ~(link[:-1] & (dg[1:] != dg[:-1]))
    starts = np.flatnonzero(np.r_[True, ~link])
    ends = np.r_[starts[1:] - 1, n - 1]
    return list(
        zip(
            steps[starts].tolist(),
            steps[ends].tolist(),
            gsteps[starts].tolist(),
            gsteps[ends].tolist(),
            walls[starts].tolist(),
            walls[ends].tolist(),
        )
    )


def _extends(last: tuple[int, int, int, int, int, float, float], s0: int, s1: int, g0: int, g1: int) -> bool:
    """Whether range (s0..s1, g0..g1) continues the previous row ``last`` with the same slope."""
    _, ls0, ls1, lg0, lg1, _, _ = last
    if s0 != ls1 + 1 or g0 - lg1 not in (0, 1):
        return False
    k = g0 - lg1
    if ls1 > ls0 and (lg1 - lg0) != k * (ls1 - ls0):
        return False
    return s1 == s0 or (g1 - g0) == k * (s1 - s0)


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


# ------------------------------------------------------ rich values: CPU work
#
# Pure functions of one item (no RunWriter state): the daemon runs them on its
# compute pool as messages arrive (daemon/runs.py), the run's writer thread only
# queues the writes of their results, in message order.


def _compute_media(env: Any, name: str, meta: dict[str, Any], blobs: _BlobView) -> tuple[Any, ...]:
    """``(data, ext, media_type, width, height, sha256 hex)`` of a media value."""
    from ..daemon import compute

    if meta.get("encoding") == "raw":
        pixels = blobs.array(meta)
        data: Any = compute.encode_png(pixels)
        ext, media_type = "png", "image"
        height, width = int(pixels.shape[0]), int(pixels.shape[1])
    else:
        data = blobs.raw(meta["ref"])
        ext = str(meta.get("ext") or "bin")
        media_type = str(meta.get("media_type") or "image")
        size = compute.image_size(data) if media_type == "image" else None
        width, height = size if size else (None, None)
    if not ext.isalnum() or len(ext) > 8:
        raise ValueError(f"bad media extension {ext!r}")
    return data, ext, media_type, width, height, hashlib.sha256(data).hexdigest()


def _media_row(env: Any, name: str, meta: dict[str, Any], value: tuple[Any, ...]) -> dict[str, Any]:
    data, ext, media_type, width, height, digest = value
    return {
        "name": name,
        "rank": env.rank,
        "step": env.step,
        "global_step": env.global_step,
        "wall": env.wall,
        "media_type": media_type,
        "hash": digest,
        "ext": ext,
        "size": len(data),
        "width": width,
        "height": height,
        "caption": str(meta.get("caption") or ""),
        "source": meta.get("source"),
    }


def _compute_table(env: Any, name: str, meta: dict[str, Any], blobs: _BlobView) -> list[tuple[Any, ...]]:
    columns = meta["columns"]
    for r in meta["rows"]:
        if not isinstance(r, list) or len(r) != len(columns):
            raise ValueError("table row does not match its columns")
    return [_compute_media(env, f"{name}#{k}", mm, blobs) for k, mm in enumerate(meta.get("media") or [])]


def _compute_histogram(env: Any, name: str, meta: dict[str, Any], blobs: _BlobView) -> tuple[str, bytes]:
    """``(precision, record)``: the histogram's fixed-size row (format.HISTOGRAM_HEADER)."""
    from ..daemon import compute

    precision = meta.get("precision", "exact")
    if precision not in fmt.HISTOGRAM_FILES:
        raise ValueError(f"unknown histogram precision {precision!r}")
    if meta.get("binned"):
        edges = blobs.array(meta["edges"]).astype(np.float64)
        counts = np.rint(blobs.array(meta["counts"])).astype(np.int64)
        nan, posinf, neginf = (int(meta.get(k, 0)) for k in ("nan", "posinf", "neginf"))
        total = int(counts.sum())
    else:
        h = compute.bin_histogram(blobs.array(meta["values"]), int(meta.get("num_bins", 64)))
        edges, counts = h["edges"], h["counts"]
        nan, posinf, neginf, total = h["nan"], h["posinf"], h["neginf"], h["total"]
    scale = 1.0
    if precision == "compact":
        packed, scale = compute.compact_counts(counts)
    else:
        if counts.size and counts.max() > np.iinfo(np.int32).max:
            raise ValueError("histogram count over int32 range; use fewer values per histogram")
        packed = counts.astype("<i4")
    record = (
        struct.pack(
            fmt.HISTOGRAM_HEADER, env.step, env.global_step, env.wall, len(counts), nan, posinf, neginf, total, scale
        )
        + edges.astype("<f8").tobytes()
        + packed.tobytes()
    )
    return precision, record


def _compute_tensor(env: Any, name: str, meta: dict[str, Any], blobs: _BlobView) -> tuple[Any, ...]:
    """``(dtype, shape, payload)``; the payload is the received buffer itself, not a copy."""
    arr = blobs.array(meta["array"])  # validates dtype, shape and size
    data = memoryview(np.ascontiguousarray(arr)).cast("B") if arr.size else b""
    return arr.dtype.str, list(arr.shape), data


def _compute_kde(env: Any, name: str, meta: dict[str, Any], blobs: _BlobView) -> tuple[Any, ...]:
    """``(grid_size, bandwidth, count, payload)``."""
    from ..daemon import compute

    if meta.get("precomputed"):
        grid = blobs.array(meta["grid"]).astype("<f8")
        density = blobs.array(meta["density"]).astype("<f8")
        if grid.shape != density.shape:
            raise ValueError("KDE grid and density differ in length")
        bandwidth, count = None, None
    else:
        bw = meta.get("bandwidth")
        k = compute.kde(blobs.array(meta["values"]), int(meta.get("grid_size", 256)), float(bw) if bw else None)
        grid, density = k["grid"].astype("<f8"), k["density"].astype("<f8")
        bandwidth, count = float(k["bandwidth"]), int(k["count"])
    return len(grid), bandwidth, count, grid.tobytes() + density.tobytes()


_ITEM_COMPUTE: dict[str, Callable[..., Any]] = {
    "media": _compute_media,
    "table": _compute_table,
    "histogram": _compute_histogram,
    "tensor": _compute_tensor,
    "kde": _compute_kde,
}

_ITEM_OPS: dict[str, Callable[..., list[tuple[str, Callable[[], None]]]]] = {
    "media": RunWriter._ops_media,
    "table": RunWriter._ops_table,
    "histogram": RunWriter._ops_histogram,
    "tensor": RunWriter._ops_tensor,
    "kde": RunWriter._ops_kde,
}


def _prepared_result(pre: Any) -> list[tuple[str, Any]] | None:
    """The result of a ``(msg, future)`` entry of :meth:`RunWriter.stage`'s ``prepared``,
    or None (the writer then does the work itself): none given, or the pool
    was shut down before it ran."""
    if pre is None:
        return None
    try:
        return pre[1].result()
    except Exception:  # cancelled (pool shut down), or out of memory in a worker
        return None


def prepare_items(msg: LogMessage) -> list[tuple[str, Any]]:
    """The CPU work of a message's rich values, one ``(outcome, value)`` per item.

    ``("ok", value)`` for :meth:`RunWriter._stage_items`; ``("invalid", why)``
    for an item the protocol's rule refuses (protocol.items, applied again in
    the daemon); ``("bug", exc)`` for a valid item that failed.  Thread-safe:
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
            out.append(("ok", _ITEM_COMPUTE[kind](msg.env, name, meta, _BlobView(msg.blobs, refs))))
        except Exception as exc:
            out.append(("bug", exc))
    return out


class _SqlGuard:
    """Translate sqlite3 errors into :class:`StorageError` naming the run."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __enter__(self) -> None:
        return None

    def __exit__(self, et: Any, exc: Any, tb: Any) -> bool:
        if exc is not None and isinstance(exc, sqlite3.Error):
            raise _storage_error(self.path, "write data/metadata.db", exc) from exc
        return False


def _fsync(path: str, missing_ok: bool = False) -> None:
    """fsync the file or directory at ``path`` (its inode: what any process wrote to it)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        if missing_ok:
            return
        raise
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _storage_error(path: str, what: str, exc: BaseException) -> StorageError:
    text = str(exc)
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC or "full" in text.lower():
        return StorageError(f"disk full: cannot {what} in {path}: {text}")
    if (
        isinstance(exc, OSError)
        and exc.errno in (errno.EACCES, errno.EROFS, errno.EPERM)
        or "readonly" in text.lower()
        or "read-only" in text.lower()
    ):
        return StorageError(f"run folder not writable: cannot {what} in {path}: {text}")
    return StorageError(f"cannot {what} in {path}: {text}")
