"""The one writer of a run folder (format: :mod:`.format`).

A :class:`RunWriter` owns exactly one run: its ColumnVault file of scalars, its
SQLite metadata database, ``metadata.json`` and ``logs/``.  It is not
thread-safe; the daemon drives each writer from one dedicated thread.  A
``fcntl.flock`` on ``data/.writer.lock`` makes sure no second writer (another
daemon on this node or elsewhere on a shared filesystem) appends to the same
files: kohakuvault itself does nothing to prevent two writers.

Writing is staged so that neither a storage fault nor a crash loses or
duplicates a point:

* The ``stage_*`` methods take plain data (per-column arrays, the calls' steps,
  output text, prepared rich values: :mod:`.rich`) and only keep it in memory
  (pure, cannot fail on the disk).  The daemon turns what clients send into
  these calls (``daemon/ingest.py``), after its ledger (``daemon/ledger.py``)
  dropped the re-sent ones; the writer knows nothing of the wire, of clients'
  sequence numbers or of acknowledgements.
* :meth:`RunWriter.commit` phase A appends them column by column (and writes
  media files, tensor payloads, captured output), removing each from the
  staging list only after its append has committed; phase B is ONE SQLite
  transaction with the batch's rows, the caller's delivery marks (opaque
  ``(key, lo, hi)`` ranges: the daemon's record of which calls the batch
  holds) and the committed length of every column touched (format: "Commits").  If the disk
  fills up half way, the staged rest stays, the error is raised, and the next
  ``commit`` carries on where it stopped.
* If the process dies between the phases, the next writer to open the run
  removes the rows past the committed lengths (:meth:`RunWriter._recover`); the
  client re-sends that batch because it was never acknowledged.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import os
import socket
import sqlite3
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from kohakuvault import ColumnVault

from ..protocol.errors import FormatVersionError, StorageError
from . import format as fmt
from .rich import RichStaging

_REC = fmt.scalar_record_dtype()


class RunWriter(RichStaging):
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
        self._staged_drops: dict[str, list[int]] = {}
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
        self._sql_ops: list[tuple[str, Callable[[], object]]] = []  # what each returns is ignored
        self._hist_vaults: dict[str, Any] = {}
        self._hist_columns: dict[tuple[str, str, int], tuple[str, Any, bool]] = {}
        self._hist_dtypes: dict[str, dict[str, str]] = {}  # precision -> column -> dtype
        self._kv: Any = None
        self._scalar_bytes = 0  # appended to the scalar vault since it was opened
        self._in_compact = False
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
            self._vault: ColumnVault | None = ColumnVault(
                os.path.join(self.path, fmt.SCALARS_DB), block_bytes=fmt.VAULT_BLOCK_BYTES
            )
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
        except sqlite3.Error as exc:
            raise StorageError(f"cannot read the commit point of {self.path}: {exc}") from exc
        except OSError as exc:
            raise StorageError(f"cannot recover {self.path}: {exc.strerror or exc}") from exc

    def delivery_marks(self) -> list[tuple[str, int, int]]:
        """The delivery marks committed so far (``(key, lo, hi)``, see :meth:`commit`), for the
        daemon's ledger to load when it opens the run."""
        with self._sql():
            rows = self._db.execute("SELECT client, lo, hi FROM client_seqs ORDER BY client, lo").fetchall()
        return [(str(c), int(lo), int(hi)) for c, lo, hi in rows]

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

    # ------------------------------------------------------------- staging
    #
    # Plain calls, made on the writer's thread by the daemon (daemon/ingest.py
    # translates what clients send into them); nothing reaches the disk before
    # commit().

    def stage_calls(self, rank: int, steps: Any, global_steps: Any, walls: Any) -> None:
        """Record calls of ``rank`` (one, or arrays of several) in the steps table with the next commit."""
        self._staged_calls.setdefault(rank, []).append((steps, global_steps, walls))

    def stage_scalars(self, segments: Iterable[tuple[int, tuple[str, ...], Any, Any, Any, Any, Any]]) -> None:
        """Stage scalar points, given as segments ``(rank, names, order, steps, global_steps, walls,
        values[n, len(names)])`` of n calls each; ``order`` (n call positions) sorts the points of a
        metric that come in several segments.  Each metric becomes one record array."""
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

    def stage_output(self, text: str) -> None:
        """Append captured output text to ``logs/output.log`` with the next commit."""
        self._staged_output.append(text)

    def stage_drops(self, client: str, calls: int, values: int, lines: int) -> None:
        """Add to ``client``'s counts of calls, values and output lines it dropped (queue full)."""
        d = self._staged_drops.setdefault(client, [0, 0, 0])
        d[0] += calls
        d[1] += values
        d[2] += lines

    def commit(self, marks: Mapping[str, tuple[Sequence[tuple[int, int]], int]] | None = None) -> None:
        """Write everything staged, with the caller's delivery ``marks``.

        ``marks`` maps a client id to ``(ranges, prefix)``: every range of call
        numbers of that client the run holds once this commit is done, and
        their contiguous prefix.  They replace the client's rows of
        ``client_seqs`` and its ``clients.durable_seq`` in phase B's
        transaction, so the data and the record of it become durable together;
        the writer does not interpret them (the daemon's ledger does:
        ``daemon/ledger.py``).

        Phase A: output text, column appends, file operations; phase B: one
        SQLite transaction that makes the batch durable (module docstring).
        On a storage error the part not yet written stays staged and
        :class:`StorageError` is raised; calling ``commit`` again (with the
        marks again) resumes.
        """
        marks = marks or {}
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
        if not (marks or self._staged_calls or self._sql_ops or self._dirty_columns or self._output_size is not None):
            return
        self._sync_written()
        last_range = dict(self._last_range)
        try:
            with self._sql():
                self._db.execute("BEGIN")
                try:
                    for what, sql_op in self._sql_ops:
                        # A savepoint per item: a value the database cannot take (a
                        # client bug or hostile input) is skipped with an event
                        # instead of failing the batch again and again.  Disk and
                        # lock problems (OperationalError) fail the commit: retried.
                        self._db.execute("SAVEPOINT item")
                        try:
                            sql_op()
                        except sqlite3.OperationalError:
                            raise
                        except Exception as exc:
                            self._db.execute("ROLLBACK TO item")
                            self.event("rejected_item", f"{what}: {exc!r}")
                        self._db.execute("RELEASE item")
                    for rank, parts in self._staged_calls.items():
                        self._write_step_ranges(rank, parts)
                    seq_rows: list[tuple[str, int, int]] = []
                    for client, (ranges, _) in marks.items():
                        self._db.execute("DELETE FROM client_seqs WHERE client=?", (client,))
                        seq_rows.extend((client, int(lo), int(hi)) for lo, hi in ranges)
                    self._db.executemany("INSERT INTO client_seqs(client, lo, hi) VALUES (?,?,?)", seq_rows)
                    self._db.executemany(
                        "UPDATE clients SET durable_seq=? WHERE client=?",
                        [(int(prefix), client) for client, (_, prefix) in marks.items()],
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
        self._sql_ops = []
        self._staged_calls = {}
        self._staged_drops = {}
        self._dirty_columns = {}
        self._output_size = None
        self._compact_journals()

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
            stores.append((fmt.HISTOGRAM_FILES[precision], functools.partial(self._close_hist_vault, precision)))
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
        if vault is not None:  # None: the last reopen failed (the next write reopens)
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
                assert cur.lastrowid is not None  # the row just inserted
                last = (cur.lastrowid, s0, s1, g0, g1, w0, w1)
        if last is not None:
            self._last_range[rank] = last

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

    # -------------------------------------------------------------- output

    # ---------------------------------------------------------------- close

    def _sql(self) -> _SqlGuard:
        return _SqlGuard(self.path)

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


class _SqlGuard:
    """Translate sqlite3 errors into :class:`StorageError` naming the run."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __enter__(self) -> None:
        return None

    def __exit__(self, et: Any, exc: Any, tb: Any) -> None:
        if exc is not None and isinstance(exc, sqlite3.Error):
            raise _storage_error(self.path, "write data/metadata.db", exc) from exc


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
