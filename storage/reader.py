"""Read-only access to run folders (format: :mod:`.format`).

:class:`RunReader` never imports the writer, never creates a file in the run
folder and needs no write access to it (see :class:`ReadOnlyFile`), so it is
safe on a run the daemon is still appending to (it sees a consistent prefix),
on a finished run (nothing in its folder is touched) and on a run it cannot
write: another user's, a read-only mount, a copy.

Commit points (format: "Commits"): when ``metadata.db`` records committed
lengths (meta ``commit_lengths`` = ``'1'``), only the first ``committed.length``
rows of a column are read and a column without a ``committed`` row is not
there yet; rows past that belong to a batch that is not committed (being
written right now, or left by a writer that died before committing it).  Runs
written before commit points existed are read whole.
"""

from __future__ import annotations

import difflib
import math
import operator
import os
import shutil
import sqlite3
import tempfile
import threading
import urllib.parse
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from ..protocol.endpoint import lock_held
from ..protocol.errors import FormatVersionError, KoboError, RunNotFound, StorageError
from . import format as fmt

_REC = fmt.scalar_record_dtype()
_T = TypeVar("_T")


@dataclass(frozen=True)
class RunInfo:
    """One line of ``kobo list``.

    ``run_id`` is the folder name; ``id`` is the run id recorded in
    ``metadata.json`` (the folder name without the ``_{annotation}`` a run
    created with ``annotation=`` carries), ``annotation`` that note or None.
    """

    path: str
    project: str
    run_id: str
    name: str
    status: str
    created_at: float | None
    finished_at: float | None
    id: str = ""  # default: run_id
    annotation: str | None = None

    def __post_init__(self) -> None:
        if not self.id:
            object.__setattr__(self, "id", self.run_id)


# ------------------------------------------------ opening a run's files without writing
#
# Every database of a run (metadata.db, the ColumnVault files, the tensors KVault)
# is SQLite in WAL mode.  Opened the usual way, even read-only, SQLite creates a
# ``-wal`` and a ``-shm`` beside such a file when they are missing, and fails with
# "attempt to write a readonly database" when it cannot (another user's run, a
# read-only mount).  A cleanly closed writer removes both, so every finished run
# is in that state.  ReadOnlyFile opens each file the way that writes nothing.

_WAL_HEADER_BYTES = 32  # a -wal no longer than its header holds no frames (no commits)
_COPY_ATTEMPTS = 5


def _stat_key(path: str) -> tuple[int, int, int, int] | None:
    """Identity, size and modification time of ``path``; None if it does not exist."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def wal_has_frames(path: str) -> bool:
    """Whether the ``-wal`` beside the database ``path`` holds frames: commits the file itself lacks."""
    try:
        return os.path.getsize(path + "-wal") > _WAL_HEADER_BYTES
    except OSError:
        return False


def _sqlite_uri(path: str, immutable: bool) -> str:
    # Quoted: '?', '#' or '%' in a folder name would otherwise end the URI.
    return f"file:{urllib.parse.quote(path)}?mode=ro" + ("&immutable=1" if immutable else "")


class _NeedsCopy(Exception):
    """This file cannot be opened in place without writing: read a private copy of it."""


def _open_sql(path: str, immutable: bool) -> sqlite3.Connection:
    db = sqlite3.connect(_sqlite_uri(path, immutable), uri=True, check_same_thread=False, isolation_level=None)
    try:
        db.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()  # open the file now, so it fails here
    except BaseException:
        db.close()
        raise
    return db


def _open_columns(path: str, immutable: bool) -> Any:
    if immutable:
        return _ColumnFile(path)  # kohakuvault's ColumnVault takes no SQLite URI: it cannot open immutable
    from kohakuvault import ColumnVault

    return ColumnVault(path, read_only=True)


def _open_kv(path: str, immutable: bool) -> Any:
    from kohakuvault import KVault

    # KVault passes a URI on to SQLite (measured with kohakuvault 1.1), so it opens immutable itself.
    return KVault(_sqlite_uri(path, True) if immutable else path, read_only=True, cache_kb=fmt.KVAULT_CACHE_KB)


class ReadOnlyFile:
    """One SQLite file of a run, opened without creating a file in the run folder or needing to write it.

    ``kind``: ``"sql"`` (``metadata.db``; :attr:`handle` is a ``sqlite3.Connection``),
    ``"columns"`` (a ColumnVault file: ``list_columns()``, ``handle[name]`` with ``len``,
    ``dtype``, ``read_array(start, count)``, ``read(start, count)``) or ``"kv"`` (the tensors
    KVault: ``get(key)``).  Read through :meth:`read`, which sees every commit made before
    the call.  How the file is open (:attr:`mode`) is decided when it is opened:

    * ``"immutable"``: its ``-wal`` is missing or holds no frames, so the file alone holds
      every commit.  SQLite opens it with ``immutable=1``: no ``-wal`` or ``-shm`` is
      created and no lock taken.  A writer that has the file open always has a ``-wal``
      (SQLite creates it as the writer opens the database and removes it only when the
      last connection closes cleanly), but one may open it after this check, and an
      immutable reader would neither see what it writes nor notice the file changing
      under it.  So every :meth:`read` compares the file's and the ``-wal``'s identity,
      size and modification time before and after reading; on any change the file is
      reopened (through its ``-wal`` now, if that has frames) and read again.
    * ``"shared"``: the ``-wal`` holds frames and the ``-shm`` exists (a daemon is writing
      the run, or one was killed): opened read-only in place like any SQLite reader, which
      sees new commits on every read.  SQLite uses the ``-shm`` for that: a reader that may
      write it (the run's owner) updates it, one that may not (another user, a read-only
      folder) reads it without writing.
    * ``"copy"``: the ``-wal`` holds frames but there is no ``-shm`` (SQLite would create
      one: a copy of a killed run that left it out), opening in place failed, or the file
      is a ColumnVault in a format this reader does not read itself: the file and its
      ``-wal`` are copied to a private temporary folder and the copy is read.  The copy is
      taken again when the originals change, and removed by :meth:`close`.
    """

    def __init__(self, path: str, kind: str) -> None:
        if kind not in _OPENERS:
            raise ValueError(f"kind must be one of {', '.join(_OPENERS)}, got {kind!r}")
        self.path = path
        self.kind = kind
        self.mode = ""
        self.handle: Any = None
        self._seen: tuple[Any, Any] = (None, None)  # stat keys of the file and its -wal when opened
        self._remove_tmp: Any = None
        self._lock = threading.RLock()
        self._open()

    def _keys(self) -> tuple[Any, Any]:
        return _stat_key(self.path), _stat_key(self.path + "-wal")

    def _open(self) -> None:
        opener = _OPENERS[self.kind]
        keys = self._keys()
        failed: BaseException | None = None
        if not wal_has_frames(self.path):
            try:
                self.handle, self.mode, self._seen = opener(self.path, True), "immutable", keys
                return
            except _NeedsCopy:
                pass
        elif os.path.exists(self.path + "-shm"):  # else SQLite would create it, or fail to
            try:
                self.handle, self.mode = opener(self.path, False), "shared"
                return
            except Exception as exc:  # kohakuvault raises its own types and RuntimeError
                failed = exc
        try:
            self._open_copy(opener)
        except Exception as exc:
            if failed is not None:
                raise failed from exc
            raise

    def _open_copy(self, opener: Callable[[str, bool], Any]) -> None:
        tmp = tempfile.mkdtemp(prefix="kobo-read-")
        remove = weakref.finalize(self, shutil.rmtree, tmp, True)
        try:
            target = os.path.join(tmp, os.path.basename(self.path))
            for _ in range(_COPY_ATTEMPTS):
                keys = self._keys()
                if keys[0] is None:
                    raise FileNotFoundError(f"{self.path} does not exist")
                for suffix in ("-wal", "-shm", ""):
                    if os.path.exists(target + suffix):
                        os.unlink(target + suffix)
                try:
                    shutil.copyfile(self.path, target)
                    if keys[1] is not None:
                        shutil.copyfile(self.path + "-wal", target + "-wal")
                except FileNotFoundError:
                    continue  # the -wal went away: its writer closed
                if self._keys() == keys:  # neither changed while copied: a consistent copy
                    break
            else:
                raise StorageError(f"{self.path} kept changing while it was copied to be read")
            handle = opener(target, False)
        except BaseException:
            remove()
            raise
        self.handle, self.mode, self._seen, self._remove_tmp = handle, "copy", keys, remove

    def _drop_copy(self) -> None:
        if self._remove_tmp is not None:
            self._remove_tmp()
        self._remove_tmp = None

    def _changed(self) -> bool:
        return self.mode != "shared" and self._keys() != self._seen

    def _reopen(self) -> None:
        self._close_handle()
        self._drop_copy()
        self._open()

    def read(self, fn: Callable[[Any], _T]) -> _T:
        """``fn(handle)``, reading what is committed now (see the class: reopened when needed)."""
        with self._lock:
            for _ in range(_COPY_ATTEMPTS):
                if self.handle is None or self._changed():
                    self._reopen()
                try:
                    out = fn(self.handle)
                except Exception:
                    if self.mode == "immutable" and self._changed():
                        continue  # a writer changed the file under this read: read again
                    raise
                if self.mode == "immutable" and self._changed():
                    continue
                return out
            raise StorageError(f"{self.path} kept changing while it was read")

    def list_columns(self) -> list[tuple[str, str, int]]:
        """A ColumnVault's ``(name, dtype, length)`` of every column."""
        return self.read(lambda v: v.list_columns())

    def get(self, key: str) -> Any:
        """A KVault's value of ``key`` (None if it has none)."""
        return self.read(lambda kv: kv.get(key))

    def _close_handle(self) -> None:
        handle, self.handle = self.handle, None
        if handle is not None:
            try:
                handle.close()
            except Exception:
                pass

    def close(self) -> None:
        """Close the file (and remove a private copy).  Idempotent."""
        with self._lock:
            self._close_handle()
            self._drop_copy()

    def __repr__(self) -> str:
        return f"<ReadOnlyFile {self.path} {self.kind} {self.mode or 'closed'}>"


class _ColumnFile:
    """A ColumnVault file read with Python's sqlite3, opened ``immutable=1``.

    kohakuvault's ColumnVault refuses SQLite URIs, so it cannot open a file without
    creating its ``-wal`` and ``-shm``.  This reads kohakuvault's column format 1
    (``kvault_col_format.version`` 1): ``kvault_col_columns`` (name, dtype, element
    size, length), ``kvault_col_blocks`` (a column's blocks: first row, row count) and
    ``kvault_col_data`` (a block's ``payload``, its rows back to back, and for
    variable-size columns ``offsets``, the u64 offset of each row in the payload and
    of its end).  Any other format raises :class:`_NeedsCopy`.  Offers the part of
    ColumnVault's API the readers use.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._db = _open_sql(path, immutable=True)
        try:
            tables = {r[0] for r in self._db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            self._empty = not tables  # created a moment ago: no column yet
            if not self._empty:
                version = None
                if "kvault_col_format" in tables:
                    row = self._db.execute("SELECT version FROM kvault_col_format WHERE singleton = 1").fetchone()
                    version = row[0] if row else None
                if version != 1 or not {"kvault_col_columns", "kvault_col_blocks", "kvault_col_data"} <= tables:
                    raise _NeedsCopy(f"{path}: ColumnVault format {version!r}, this reader reads format 1")
        except BaseException:
            self._db.close()
            raise

    def list_columns(self) -> list[tuple[str, str, int]]:
        if self._empty:
            return []
        rows = self._db.execute("SELECT name, dtype, length FROM kvault_col_columns ORDER BY col_id")
        return [(name, dtype, int(length)) for name, dtype, length in rows]

    def __getitem__(self, name: str) -> _ColumnFileColumn:
        row = None
        if not self._empty:
            row = self._db.execute(
                "SELECT col_id, dtype, elem_size, length FROM kvault_col_columns WHERE name = ?", (name,)
            ).fetchone()
        if row is None:
            from kohakuvault import NotFound

            raise NotFound(name)
        return _ColumnFileColumn(self, name, *row)

    def close(self) -> None:
        self._db.close()


class _ColumnFileColumn:
    def __init__(self, vault: _ColumnFile, name: str, col_id: int, dtype: str, elem_size: int, length: int) -> None:
        from kohakuvault.column_codec import ColumnCodec

        self._vault, self.name, self._id, self.dtype = vault, name, col_id, dtype
        self._size, self._length = int(elem_size), int(length)
        self._codec = ColumnCodec(dtype)

    def __len__(self) -> int:
        return self._length

    def _read(self, start: int, count: int | None) -> tuple[bytes, bytes | None]:
        """Rows ``[start, start + count)``: their bytes and, for a variable-size column, their offsets."""
        n = self._length - start if count is None else count
        if start < 0 or n < 0 or start + n > self._length:
            raise IndexError("column index out of range")
        end = start + n
        parts: list[bytes] = []
        offsets = [np.zeros(1, dtype="<u8")]
        pos, base = start, 0
        if n:
            blocks = self._vault._db.execute(
                "SELECT b.first_row, b.row_count, d.payload, d.offsets FROM kvault_col_blocks b "
                "JOIN kvault_col_data d ON d.block_id = b.block_id "
                "WHERE b.col_id = ?1 AND b.row_count > 0 AND b.first_row < ?3 AND b.first_row >= "
                "(SELECT COALESCE(MAX(first_row), 0) FROM kvault_col_blocks "
                "WHERE col_id = ?1 AND row_count > 0 AND first_row <= ?2) ORDER BY b.first_row",
                (self._id, start, end),
            )
            for first, rows, payload, offs in blocks:
                if first > pos:
                    break  # a gap: reported below
                lo, hi = pos - first, min(end, first + rows) - first
                if hi <= lo:
                    continue
                if self._size:
                    piece = payload[lo * self._size : hi * self._size]
                    if len(piece) != (hi - lo) * self._size:
                        raise StorageError(f"{self._vault.path}: column {self.name!r}: block at row {first} is short")
                else:
                    if offs is None or len(offs) < 8 * (hi + 1):
                        raise StorageError(
                            f"{self._vault.path}: column {self.name!r}: block at row {first} has no offsets"
                        )
                    o = np.frombuffer(offs, dtype="<u8", count=hi + 1)
                    a, b = int(o[lo]), int(o[hi])
                    if b > len(payload) or np.any(np.diff(o[lo:].astype(np.int64)) < 0):
                        raise StorageError(
                            f"{self._vault.path}: column {self.name!r}: block at row {first} "
                            "has offsets outside its data"
                        )
                    piece = payload[a:b]
                    offsets.append(o[lo + 1 : hi + 1] - a + base)
                    base += b - a
                parts.append(piece)
                pos = first + hi
                if pos >= end:
                    break
        if pos < end:
            raise StorageError(f"{self._vault.path}: column {self.name!r}: rows {pos}..{end - 1} are in no block")
        data = b"".join(parts)
        return data, None if self._size else np.concatenate(offsets).astype("<u8").tobytes()

    def read_array(self, start: int = 0, count: int | None = None) -> np.ndarray:
        """Rows as a read-only numpy array (like ColumnVault's ``read_array``)."""
        return self._codec.array(self._read(start, count)[0])

    def read(self, start: int = 0, count: int | None = None) -> list[Any]:
        data, offsets = self._read(start, count)
        if offsets is None:
            return self._codec.unpack_fixed(data)
        return self._codec.unpack_variable(data, offsets)


def _hist_of(column: str) -> tuple[int, str] | None:
    try:
        return fmt.split_histogram_column(column)
    except ValueError:
        return None


_OPENERS: dict[str, Callable[[str, bool], Any]] = {"sql": _open_sql, "columns": _open_columns, "kv": _open_kv}


class RunReader:
    """Open the run folder at ``path`` read-only.

    Raises :class:`RunNotFound` if there is no run there and
    :class:`FormatVersionError` if it was written by a newer, incompatible
    KohakuBoard.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.path.abspath(os.fspath(path))
        meta_path = os.path.join(self.path, fmt.METADATA_JSON)
        if not os.path.isfile(meta_path):
            raise RunNotFound(f"no KohakuBoard run at {self.path} (metadata.json missing)")
        try:
            self.metadata: dict[str, Any] = fmt.read_json(meta_path)
        except (OSError, ValueError) as exc:
            raise StorageError(f"cannot read {meta_path}: {exc}") from exc
        _check_version(self.metadata.get("format_version", 1), self.path)
        # The run's databases, opened on first use without writing (see ReadOnlyFile).
        self._files: dict[str, ReadOnlyFile] = {}
        self._vault: ReadOnlyFile | None = None
        self._columns: dict[str, tuple[str, int]] | None = None
        self._db: ReadOnlyFile | None = None
        # Committed lengths: (file, column) -> rows, or None when the run has no
        # commit points (older format, or no metadata.db): read everything.
        self._committed: dict[tuple[str, str], int] | None = None
        self._commit_loaded = False
        self._committed_files: set[str] = set()
        # Items a read met that cannot be read back (a record a buggy or older
        # writer left malformed): skipped, the rest is read.  Each entry:
        # {"kind", "name", "rank", "step", "reason"}.
        self.skipped: list[dict[str, Any]] = []

    # ------------------------------------------------------------- metadata

    @property
    def name(self) -> str:
        return str(self.metadata.get("name") or self.run_id)

    @property
    def run_id(self) -> str:
        return str(self.metadata.get("run_id") or os.path.basename(self.path))

    @property
    def project(self) -> str:
        return str(self.metadata.get("project") or os.path.basename(os.path.dirname(self.path)))

    @property
    def status(self) -> str:
        """``metadata.json``'s status, or ``"running?"`` (:data:`~kohakuboard.storage.format.STATUS_STALE`)
        when it says running but no daemon holds the run open (see :func:`writer_alive`)."""
        return reported_status(self.path, self.metadata.get("status", fmt.STATUS_RUNNING))

    @property
    def config(self) -> dict[str, Any]:
        return dict(self.metadata.get("config") or {})

    # --------------------------------------------------------------- opening

    def _file(self, rel: str, kind: str) -> ReadOnlyFile | None:
        """The database ``rel`` opened without writing (kept open), or None while it does not exist."""
        f = self._files.get(rel)
        if f is None:
            path = os.path.join(self.path, rel)
            if not os.path.exists(path):
                return None
            try:
                f = ReadOnlyFile(path, kind)
            except KoboError:
                raise
            except Exception as exc:  # sqlite3 and kohakuvault errors, OSError
                raise StorageError(f"cannot open {path} read-only: {exc}") from exc
            self._files[rel] = f
        return f

    def _open_vault(self) -> ReadOnlyFile | None:
        if self._vault is None:
            self._vault = self._file(fmt.SCALARS_DB, "columns")
        return self._vault

    def _column_table(self, refresh: bool = False) -> dict[str, tuple[str, int]]:
        """Scalar file columns: name -> (dtype, committed row count); uncommitted columns left out."""
        if self._columns is None or refresh:
            # Commit points first, then the columns: a writer appends before it
            # commits, so the vault is never behind what was committed before.
            committed = self._commit_table(refresh=True)
            vault = self._open_vault() if committed is None or fmt.SCALARS_DB in self._committed_files else None
            cols: dict[str, tuple[str, int]] = {}
            if vault is not None:
                for name, dtype, length in self._guarded(vault, vault.list_columns):
                    visible = self._visible(fmt.SCALARS_DB, name, length)
                    if visible is not None:
                        cols[name] = (dtype, visible)
            self._columns = cols
        return self._columns

    def _commit_table(self, refresh: bool = False) -> dict[tuple[str, str], int] | None:
        """The ``committed`` table (one query, cached until ``refresh``); None: no commit points."""
        if not self._commit_loaded or refresh:
            self._committed = self._load_commit_table()
            self._commit_loaded = True
        return self._committed

    def _load_commit_table(self) -> dict[tuple[str, str], int] | None:
        _, flag = self._select("SELECT value FROM meta WHERE key = 'commit_lengths'")
        if not flag or flag[0][0] != "1":
            return None
        _, rows = self._select("SELECT file, name, length FROM committed")
        self._committed_files = {f for f, _, _ in rows}
        return {(f, n): int(ln) for f, n, ln in rows}

    def _has_commits(self, file: str) -> bool:
        """Whether anything of ``file`` is committed (always, for runs without commit points).

        A vault file nothing was committed to is not opened: the writer may be
        creating it right now (or died doing so), and then it cannot be read yet.
        """
        if self._commit_table() is None:
            return True
        if file not in self._committed_files:
            self._commit_table(refresh=True)  # committed since the table was read?
        return self._committed is None or file in self._committed_files

    def _visible(self, file: str, column: str, length: int) -> int | None:
        """Rows of ``column`` (``length`` in the file) a reader may see; None: not committed at all."""
        committed = self._committed
        if committed is None:
            return length
        n = committed.get((file, column))
        return None if n is None else min(n, length)

    def _committed_length(self, file: str, column: str) -> int | None:
        """The current committed length of one column (a primary-key lookup): 0 if it has
        none yet, None when the run has no commit points (read everything)."""
        committed = self._commit_table()
        if committed is None:
            committed = self._commit_table(refresh=True)  # a run that was just being created?
            if committed is None:
                return None
        _, rows = self._select("SELECT length FROM committed WHERE file = ? AND name = ?", (file, column))
        if not rows:
            committed.pop((file, column), None)
            return 0
        committed[(file, column)] = n = int(rows[0][0])
        return n

    def _read_column(
        self, vault: ReadOnlyFile, file: str, column: str, as_array: bool, start: int = 0, end: int | None = None
    ) -> Any:
        """Committed rows ``[start, end)`` of ``column`` (clamped to its committed length): the
        committed length is read first, then the rows."""
        committed = self._committed_length(file, column)

        def read(v: Any) -> Any:
            col = v[column]
            n = len(col) if committed is None else min(committed, len(col))
            lo = min(start, n)
            hi = n if end is None else max(lo, min(end, n))
            if as_array:
                return col.read_array(lo, hi - lo)
            return col.read(lo, hi - lo) if hi > lo else []

        return self._guarded(vault, lambda: vault.read(read))

    def _guarded(self, f: ReadOnlyFile, call: Callable[[], _T]) -> _T:
        """``call()``, with what the database raises (kohakuvault and sqlite3 errors) as StorageError."""
        try:
            return call()
        except KoboError:
            raise
        except Exception as exc:
            raise StorageError(f"cannot read {f.path}: {exc}") from exc

    def _sql(self) -> ReadOnlyFile | None:
        if self._db is None:
            db = self._file(fmt.METADATA_DB, "sql")
            if db is None:
                return None
            try:
                row = db.read(lambda c: c.execute("SELECT value FROM meta WHERE key = 'format_version'").fetchone())
            except sqlite3.OperationalError as exc:
                if "no such table" not in str(exc):  # else: the daemon is creating it right now
                    raise StorageError(f"cannot read {db.path}: {exc}") from exc
                row = None
            except sqlite3.DatabaseError as exc:
                raise StorageError(f"cannot read {db.path}: {exc}") from exc
            if row is not None:  # the meta table carries the version too: refuse a newer one
                try:
                    version: Any = int(row[0])
                except (TypeError, ValueError):
                    version = row[0]
                _check_version(version, self.path)
            self._db = db
        return self._db

    def _select(self, sql: str, args: tuple[Any, ...] | list[Any] = ()) -> tuple[list[str], list[tuple[Any, ...]]]:
        """Run a query on metadata.db; no database or table yet (a run just starting) is no rows."""
        db = self._sql()
        if db is None:
            return [], []

        def query(c: sqlite3.Connection) -> tuple[list[str], list[tuple[Any, ...]]]:
            cur = c.execute(sql, args)
            return [d[0] for d in cur.description], cur.fetchall()

        try:
            return db.read(query)
        except sqlite3.OperationalError as exc:
            if "no such table" in str(exc):
                return [], []
            raise StorageError(f"cannot read {db.path}: {exc}") from exc
        except sqlite3.DatabaseError as exc:
            raise StorageError(f"cannot read {db.path}: {exc}") from exc

    # --------------------------------------------------------------- scalars

    def _metric_columns(self) -> list[tuple[int, str]]:
        out = []
        for col, (dtype, _) in self._column_table(refresh=True).items():
            if dtype != fmt.SCALAR_COLUMN_DTYPE:
                continue
            try:
                out.append(fmt.split_column_name(col))
            except ValueError:
                continue
        return out

    def list_metrics(self, rank: int | None = 0) -> list[str]:
        """Sorted metric names logged by ``rank`` (``None``: by any rank)."""
        return sorted({name for r, name in self._metric_columns() if rank is None or r == rank})

    def ranks(self, metric: str | None = None) -> list[int]:
        """Sorted ranks that wrote ``metric`` (or any metric)."""
        return sorted({r for r, name in self._metric_columns() if metric is None or name == metric})

    def series(self, name: str, rank: int = 0, start: int = 0, end: int | None = None) -> np.ndarray:
        """The points of metric ``name`` from ``rank``, in logging order: every committed
        point, or with ``start``/``end`` only the points (rows) ``start`` to ``end - 1``.

        Returns a read-only structured array with fields ``step``, ``global_step``,
        ``wall`` (seconds since the epoch) and ``value``.  ``start`` and ``end`` are
        row positions (not steps) and are clamped to the committed points, so
        ``series(name, start=n)`` reads only the points committed after the first
        ``n`` (a live tail) and is empty when there are none yet.  Raises
        ``ValueError`` naming the parameter when ``start`` or ``end`` is not an
        integer, is negative, or ``end < start``; ``KeyError`` naming the metric
        (and close names) if it was never logged.
        """
        start = _row_position("start", start)
        if end is not None:
            end = _row_position("end", end)
            if end < start:
                raise ValueError(f"end must not be before start: start={start}, end={end}")
        col = fmt.column_name(rank, name)
        entry = (self._columns or {}).get(col) or self._column_table(refresh=True).get(col)
        if entry is None or entry[0] != fmt.SCALAR_COLUMN_DTYPE or self._vault is None:
            raise KeyError(self._missing(name, rank))
        # One read_array call (a single numpy buffer), then a zero-copy reinterpretation.
        raw = self._read_column(self._vault, fmt.SCALARS_DB, col, True, start, end)
        return raw.view(_REC).reshape(-1)

    def _missing(self, name: str, rank: int | None) -> str:
        where = "" if rank is None else f" from rank {rank}"
        msg = f"no metric {name!r}{where} in run {self.project}/{self.run_id}"
        other_ranks = self.ranks(name)
        if rank is not None and other_ranks:
            return f"{msg}; it was logged by rank(s) {', '.join(map(str, other_ranks))}"
        close = difflib.get_close_matches(name, self.list_metrics(rank=None), n=3, cutoff=0.5)
        if close:
            return f"{msg}; did you mean {', '.join(map(repr, close))}?"
        return msg

    def series_by_rank(self, name: str) -> dict[int, np.ndarray]:
        """``{rank: series}`` for every rank that logged ``name``."""
        ranks = self.ranks(name)
        if not ranks:
            raise KeyError(self._missing(name, None))
        return {r: self.series(name, r) for r in ranks}

    def num_points(self, name: str, rank: int = 0) -> int:
        """How many points ``rank`` has committed for ``name`` so far (0 if none), without reading them.

        Cheap enough to poll: the column's committed length and its row count, two
        primary-key lookups (and a ``stat`` of the files).
        """
        col = fmt.column_name(rank, name)
        committed = self._committed_length(fmt.SCALARS_DB, col)
        if committed == 0:
            return 0
        vault = self._open_vault()
        if vault is None:
            return 0

        def count(v: Any) -> int:
            from kohakuvault import NotFound

            try:
                c = v[col]
            except NotFound:
                return 0
            if c.dtype != fmt.SCALAR_COLUMN_DTYPE:
                return 0
            return len(c) if committed is None else min(committed, len(c))

        return self._guarded(vault, lambda: vault.read(count))

    # ----------------------------------------------------------- rich values

    def _rows(
        self, table: str, name: str | None, rank: int | None, start: int | None, end: int | None
    ) -> list[dict[str, Any]]:
        where, args = [], []
        for cond, value in (("name = ?", name), ("rank = ?", rank), ("step >= ?", start), ("step <= ?", end)):
            if value is not None:
                where.append(cond)
                args.append(value)
        sql = f"SELECT * FROM {table}" + (f" WHERE {' AND '.join(where)}" if where else "") + " ORDER BY step, id"
        cols, rows = self._select(sql, args)
        return [dict(zip(cols, row)) for row in rows]

    def list_items(self) -> dict[str, list[str]]:
        """Names of every non-scalar series, by kind: media, table, tensor, kde, histogram (see :meth:`item_counts`)."""
        return {kind: sorted(names) for kind, names in self.item_counts().items()}

    def media(self, name: str, rank: int = 0, start: int | None = None, end: int | None = None) -> list[dict[str, Any]]:
        """Media rows of ``name`` (steps ``start..end``), each with ``path`` to its file.

        Keys: step, global_step, wall, media_type, caption, hash, ext, size,
        width, height, path.  Read the content with :meth:`media_bytes`.
        """
        rows = self._rows("media", name, rank, start, end)
        for r in rows:
            r["path"] = os.path.join(self.path, fmt.MEDIA_DIR, f"{r['hash']}.{r['ext']}")
        return rows

    @staticmethod
    def media_bytes(row: dict[str, Any]) -> bytes:
        with open(row["path"], "rb") as f:
            return f.read()

    def _media_by_id(self, ids: list[int]) -> dict[int, dict[str, Any]]:
        if not ids:
            return {}
        out = {}
        for chunk in range(0, len(ids), 500):
            part = ids[chunk : chunk + 500]
            cols, rows = self._select(f"SELECT * FROM media WHERE id IN ({','.join('?' * len(part))})", part)
            for row in rows:
                r = dict(zip(cols, row))
                r["path"] = os.path.join(self.path, fmt.MEDIA_DIR, f"{r['hash']}.{r['ext']}")
                out[r["id"]] = r
        return out

    def tables(
        self, name: str, rank: int = 0, start: int | None = None, end: int | None = None
    ) -> list[dict[str, Any]]:
        """Logged tables of ``name``: step, global_step, wall, columns, rows.

        Media cells are resolved to their media row (a dict with ``path``).
        """
        import json

        out = []
        for r in self._rows("tables", name, rank, start, end):
            try:
                rows, columns = json.loads(r["rows"]), json.loads(r["columns"])
                if not (
                    isinstance(rows, list) and isinstance(columns, list) and all(isinstance(x, list) for x in rows)
                ):
                    raise ValueError("rows and columns are not lists")
            except (TypeError, ValueError) as exc:
                self._skip("table", name, rank, r["step"], f"its JSON does not parse as a table: {exc}")
                continue
            ids = [c["$media"] for row in rows for c in row if isinstance(c, dict) and type(c.get("$media")) is int]
            media = self._media_by_id(ids)
            rows = [
                [media.get(c["$media"], c) if isinstance(c, dict) and type(c.get("$media")) is int else c for c in row]
                for row in rows
            ]
            out.append(
                {
                    "step": r["step"],
                    "global_step": r["global_step"],
                    "wall": r["wall"],
                    "columns": columns,
                    "rows": rows,
                }
            )
        return out

    def _hist_vault(self, precision: str) -> ReadOnlyFile | None:
        rel = fmt.HISTOGRAM_FILES[precision]
        if rel not in self._files and (not os.path.exists(os.path.join(self.path, rel)) or not self._has_commits(rel)):
            return None
        return self._file(rel, "columns")

    def histograms(
        self, name: str, rank: int = 0, start: int | None = None, end: int | None = None
    ) -> list[dict[str, Any]]:
        """Histograms of ``name``: step, global_step, wall, edges, counts, nan, posinf, neginf, total, precision.

        Compact histograms' counts are restored to approximate float counts.
        """
        import struct

        out = []
        header = struct.calcsize(fmt.HISTOGRAM_HEADER)
        for precision in fmt.HISTOGRAM_FILES:
            vault = self._hist_vault(precision)
            if vault is None:
                continue
            cols = [c for c, _, _ in self._guarded(vault, vault.list_columns) if _hist_of(c) == (rank, name)]
            cdtype = np.dtype(fmt.HISTOGRAM_COUNT_DTYPES[precision])
            for col, row, rec in (
                (c, i, x)
                for c in cols
                for i, x in enumerate(self._read_column(vault, fmt.HISTOGRAM_FILES[precision], c, as_array=False))
            ):
                why = fmt.histogram_record_problem(rec, cdtype.itemsize)
                if why:
                    self._skip(
                        "histogram",
                        name,
                        rank,
                        None,
                        f"{fmt.HISTOGRAM_FILES[precision]} column {col!r} row {row}: {why}",
                    )
                    continue
                step, gstep, wall, n, nan, posinf, neginf, total, scale = struct.unpack_from(fmt.HISTOGRAM_HEADER, rec)
                if (start is not None and step < start) or (end is not None and step > end):
                    continue
                n_edges = n + 1 if n else 0
                edges = np.frombuffer(rec, dtype="<f8", count=n_edges, offset=header)
                counts = np.frombuffer(rec, dtype=cdtype, count=n, offset=header + 8 * n_edges)
                out.append(
                    {
                        "step": step,
                        "global_step": gstep,
                        "wall": wall,
                        "edges": edges,
                        "counts": counts.astype(np.int64) if precision == "exact" else counts * scale,
                        "nan": nan,
                        "posinf": posinf,
                        "neginf": neginf,
                        "total": total,
                        "precision": precision,
                    }
                )
        out.sort(key=lambda h: h["step"])
        return out

    def _skip(self, kind: str, name: str, rank: int, step: int | None, reason: str) -> None:
        entry = {"kind": kind, "name": name, "rank": rank, "step": step, "reason": reason}
        if entry not in self.skipped:
            self.skipped.append(entry)

    def _kv(self) -> ReadOnlyFile | None:
        return self._file(fmt.TENSORS_DB, "kv")

    def _payloads(self, rows: list[dict[str, Any]]) -> list[bytes]:
        """The tensors KVault's value of each row's ``key`` (one read); StorageError if one is missing."""
        if not rows:
            return []
        kv = self._kv()
        if kv is None:
            raise StorageError(f"cannot read {os.path.join(self.path, fmt.TENSORS_DB)}: the file is missing")
        values = self._guarded(kv, lambda: kv.read(lambda v: [v.get(r["key"]) for r in rows]))
        for r, value in zip(rows, values):
            if value is None:
                raise StorageError(
                    f"cannot read {kv.path}: no data for {r['name']!r} step {r['step']} (key {r['key']!r})"
                )
        return values

    def tensors(
        self, name: str, rank: int = 0, start: int | None = None, end: int | None = None
    ) -> list[dict[str, Any]]:
        """Logged tensors of ``name``: step, global_step, wall, array (exact dtype and shape), namespace, metadata."""
        import json

        out = []
        rows = self._rows("tensors", name, rank, start, end)
        for r, raw in zip(rows, self._payloads(rows)):
            try:
                arr = np.frombuffer(raw, dtype=np.dtype(r["dtype"])).reshape(json.loads(r["shape"]))
            except (TypeError, ValueError) as exc:
                self._skip(
                    "tensor",
                    name,
                    rank,
                    r["step"],
                    f"payload {r['key']!r} does not match dtype {r['dtype']} and shape {r['shape']}: {exc}",
                )
                continue
            out.append(
                {
                    "step": r["step"],
                    "global_step": r["global_step"],
                    "wall": r["wall"],
                    "array": arr,
                    "namespace": r["namespace"],
                    "metadata": json.loads(r["metadata"]),
                    "source_dtype": r["source_dtype"],
                }
            )
        return out

    def kde(self, name: str, rank: int = 0, start: int | None = None, end: int | None = None) -> list[dict[str, Any]]:
        """Kernel density estimates of ``name``: step, global_step, wall, grid, density, bandwidth, count."""
        out = []
        rows = self._rows("kde", name, rank, start, end)
        for r, payload in zip(rows, self._payloads(rows)):
            n = r["grid_size"]
            if len(payload) != 16 * n:
                self._skip(
                    "kde",
                    name,
                    rank,
                    r["step"],
                    f"payload {r['key']!r} has {len(payload)} bytes, not {16 * n} for {n} grid points",
                )
                continue
            raw = np.frombuffer(payload, dtype="<f8")
            out.append(
                {
                    "step": r["step"],
                    "global_step": r["global_step"],
                    "wall": r["wall"],
                    "grid": raw[:n],
                    "density": raw[n : 2 * n],
                    "bandwidth": r["bandwidth"],
                    "count": r["count"],
                }
            )
        return out

    # ---------------------------------------------------------------- tables

    def steps(self, rank: int = 0) -> np.ndarray:
        """Every step ``rank`` logged at, with its global step: fields step, global_step.

        Expanded from the range rows of the ``steps`` table (see the format);
        a step logged twice (``auto_step=False``) appears once.
        """
        dtype = np.dtype([("step", "<i8"), ("global_step", "<i8")])
        _, rows = self._select(
            "SELECT first_step, last_step, first_global_step, last_global_step FROM steps "
            "WHERE rank=? ORDER BY first_step, rowid",
            (rank,),
        )
        parts = []
        for s0, s1, g0, g1 in rows:
            n = s1 - s0 + 1
            out = np.empty(n, dtype=dtype)
            out["step"] = np.arange(s0, s1 + 1)
            out["global_step"] = g0 + (np.arange(n) if g1 != g0 else 0)
            parts.append(out)
        if not parts:
            return np.empty(0, dtype=dtype)
        allsteps = np.concatenate(parts)
        _, first = np.unique(allsteps["step"], return_index=True)
        return allsteps[first]

    def events(self) -> list[dict[str, Any]]:
        """Run events (opened, resumed, client finished or crashed, errors), oldest first.

        Each is ``{"id", "wall", "kind", "detail"}``; a run without metadata.db yet has none.
        """
        _, rows = self._select("SELECT id, wall, kind, detail FROM events ORDER BY id")
        return [{"id": i, "wall": w, "kind": k, "detail": d} for i, w, k, d in rows]

    def clients(self) -> list[dict[str, Any]]:
        """Every client (process) that attached to the run."""
        cols = ("client", "rank", "pid", "host", "opened_at", "closed_at", "status", "durable_seq")
        for extra in (("dropped_calls", "dropped_values", "dropped_lines"), ("dropped_calls", "dropped_values"), ()):
            try:  # runs written before (some) drop counters existed lack their columns
                _, rows = self._select(f"SELECT {', '.join((*cols, *extra))} FROM clients ORDER BY opened_at")
            except StorageError:
                if not extra:
                    raise
                continue
            return [dict(zip((*cols, *extra), row)) for row in rows]
        return []  # pragma: no cover

    def dropped(self) -> dict[str, int]:
        """log() calls (and their values) and captured output lines the drop policy discarded, over all clients."""
        clients = self.clients()
        return {
            "calls": sum(int(c.get("dropped_calls") or 0) for c in clients),
            "values": sum(int(c.get("dropped_values") or 0) for c in clients),
            "lines": sum(int(c.get("dropped_lines") or 0) for c in clients),
        }

    def summary(self) -> dict[str, Any]:
        """Metadata plus, per metric, its point count, step range and last value.

        A metric's numbers are those of its lowest rank (rank 0 where rank 0
        logged it); ``ranks`` lists every rank that logged it and
        ``points_by_rank`` how many points each of them has.  ``first_step``
        / ``last_step`` are the smallest and largest step; a metric with no
        points yet has ``points == 0`` and no step or value keys.
        """
        metrics: dict[str, dict[str, Any]] = {}
        by_name: dict[str, list[int]] = {}
        for r, name in sorted(self._metric_columns(), key=lambda x: (x[1], x[0])):
            by_name.setdefault(name, []).append(r)
        lengths = {col: int(n) for col, (_, n) in self._column_table().items()}
        for name, ranks in by_name.items():
            r = ranks[0]
            s = self.series(name, r)
            entry: dict[str, Any] = {
                "rank": r,
                "ranks": ranks,
                "points": int(len(s)),
                "points_by_rank": {
                    rk: int(len(s)) if rk == r else lengths.get(fmt.column_name(rk, name), 0) for rk in ranks
                },
            }
            if len(s):
                entry.update(
                    first_step=int(s["step"].min()),
                    last_step=int(s["step"].max()),
                    last_value=float(s["value"][-1]),
                )
            metrics[name] = entry
        all_ranks = self.ranks()
        return {
            "metadata": dict(self.metadata),
            "num_ranks": len(all_ranks),
            "path": self.path,
            "project": self.project,
            "run_id": self.run_id,
            "name": self.name,
            "status": self.status,
            "created_at": self.metadata.get("created_at"),
            "finished_at": self.metadata.get("finished_at"),
            "config": self.config,
            "ranks": all_ranks,
            "metrics": metrics,
            "items": self.list_items(),
            "dropped": self.dropped(),
        }

    # ------------------------------------------------------- for the viewer

    def commit_state(self) -> dict[str, Any]:
        """What changes whenever the run commits (cheap: a few primary-key queries).

        ``lengths``: committed rows per scalar column (``"{rank}/{metric}"``);
        ``files``: committed lengths of every other file/column as
        ``"{file}:{column}"``; ``items``: the largest row id of each rich-value
        table and of ``events``.  A run without commit points reports its
        scalar columns' full lengths.
        """
        committed = self._commit_table(refresh=True)
        lengths: dict[str, int] = {}
        files: dict[str, int] = {}
        if committed is None:
            lengths = {
                col: n
                for col, (dtype, n) in self._column_table(refresh=True).items()
                if dtype == fmt.SCALAR_COLUMN_DTYPE
            }
        else:
            for (file, col), n in committed.items():
                if file == fmt.SCALARS_DB:
                    lengths[col] = n
                else:
                    files[f"{file}:{col}"] = n
        items: dict[str, int] = {}
        for table in ("media", "tables", "tensors", "kde", "events"):
            _, rows = self._select(f"SELECT max(id) FROM {table}")
            items[table] = int(rows[0][0] or 0) if rows else 0
        return {"lengths": lengths, "files": files, "items": items}

    def metric_overview(self) -> list[dict[str, Any]]:
        """Every metric with its ranks, committed points per rank and its lowest rank's last point.

        Reads one row per (rank, metric), not whole series: cheap for a run list
        or a page header even with hundreds of long metrics.  Each entry:
        ``name``, ``rank`` (lowest), ``ranks``, ``points`` (of the lowest rank),
        ``points_by_rank`` and, when there are points, ``last_step``,
        ``last_global_step``, ``last_value`` (NaN and infinities as logged).
        """
        lengths = {
            col: n for col, (dtype, n) in self._column_table(refresh=True).items() if dtype == fmt.SCALAR_COLUMN_DTYPE
        }
        by_name: dict[str, dict[int, int]] = {}
        for col, n in lengths.items():
            try:
                rank, name = fmt.split_column_name(col)
            except ValueError:
                continue
            by_name.setdefault(name, {})[rank] = n
        out: list[dict[str, Any]] = []
        wanted: dict[str, int] = {}  # column -> committed length, of each metric's lowest rank
        for name in sorted(by_name):
            per_rank = dict(sorted(by_name[name].items()))
            rank = next(iter(per_rank))
            n = per_rank[rank]
            out.append({"name": name, "rank": rank, "ranks": list(per_rank), "points": n, "points_by_rank": per_rank})
            if n:
                wanted[fmt.column_name(rank, name)] = n
        last = self._last_rows(wanted)
        for entry in out:
            row = last.get(fmt.column_name(entry["rank"], entry["name"]))
            if row is not None:
                entry.update(
                    last_step=int(row["step"]), last_global_step=int(row["global_step"]), last_value=float(row["value"])
                )
        return out

    def _last_rows(self, lengths: dict[str, int]) -> dict[str, Any]:
        """Row ``n - 1`` of each scalar column in ``lengths`` (column -> committed length ``n``,
        just read from the commit table): one read of the vault for all of them."""
        vault = self._vault if lengths else None
        if vault is None:
            return {}

        def read(v: Any) -> dict[str, Any]:
            from kohakuvault import NotFound

            rows = {}
            for col, n in lengths.items():
                try:
                    c = v[col]
                except NotFound:
                    continue
                if 0 < n <= len(c):
                    rows[col] = c.read_array(n - 1, 1).view(_REC).reshape(-1)[0]
            return rows

        return self._guarded(vault, lambda: vault.read(read))

    def item_counts(self) -> dict[str, dict[str, dict[int, int]]]:
        """Rows per name and rank of each rich kind: ``{kind: {name: {rank: rows}}}``.

        Kinds: media, table, tensor, kde, histogram.  Table cells (media rows
        named ``table#...``) are counted with their table, not as media.
        """
        out: dict[str, dict[str, dict[int, int]]] = {}
        for kind, table in (("media", "media"), ("table", "tables"), ("tensor", "tensors"), ("kde", "kde")):
            _, rows = self._select(f"SELECT name, rank, count(*) FROM {table} GROUP BY name, rank ORDER BY name, rank")
            names: dict[str, dict[int, int]] = {}
            for name, rank, count in rows:
                if not (kind == "media" and fmt.is_table_cell(name)):
                    names.setdefault(name, {})[int(rank)] = int(count)
            out[kind] = names
        hist: dict[str, dict[int, int]] = {}
        self._commit_table(refresh=True)
        for precision, rel in fmt.HISTOGRAM_FILES.items():
            vault = self._hist_vault(precision)
            if vault is None:
                continue
            for col, _, length in vault.list_columns():
                n = self._visible(rel, col, length)
                if n:
                    rank, name = fmt.split_histogram_column(col)
                    per = hist.setdefault(name, {})
                    per[rank] = per.get(rank, 0) + n
        out["histogram"] = {n: dict(sorted(hist[n].items())) for n in sorted(hist)}
        return out

    def media_file(self, sha256: str, ext: str) -> dict[str, Any] | None:
        """The media row (with ``path``) whose content is ``{sha256}.{ext}``, or None if the run holds none."""
        cols, rows = self._select("SELECT * FROM media WHERE hash = ? AND ext = ? LIMIT 1", (sha256, ext))
        if not rows:
            return None
        r = dict(zip(cols, rows[0]))
        r["path"] = os.path.join(self.path, fmt.MEDIA_DIR, f"{r['hash']}.{r['ext']}")
        return r

    def output_size(self) -> int:
        """Committed bytes of ``logs/output.log`` (the file's size for runs without commit points)."""
        path = os.path.join(self.path, fmt.OUTPUT_LOG)
        try:
            size = os.path.getsize(path)
        except OSError:
            return 0
        committed = self._commit_table(refresh=True)
        if committed is None:
            return size
        return min(size, committed.get((fmt.OUTPUT_LOG, ""), 0))

    def read_output_bytes(self, offset: int, limit: int) -> bytes:
        """At most ``limit`` bytes of the committed captured output from byte ``offset``."""
        end = min(self.output_size(), offset + limit)
        if end <= offset:
            return b""
        with open(os.path.join(self.path, fmt.OUTPUT_LOG), "rb") as f:
            f.seek(offset)
            return f.read(end - offset)

    def read_output(self, offset: int = 0, limit: int | None = None, *, strip_ansi: bool = False) -> str:
        """Like :meth:`read_output_bytes` (default: all of it), decoded (invalid UTF-8 replaced).

        Lines the run wrote to stderr start with ``[stderr] `` (after a ``[rank N] ``
        prefix in distributed runs).  ``strip_ansi`` removes ANSI escape
        sequences (colours, cursor movement) as :func:`strip_ansi` does.
        """
        text = self.read_output_bytes(offset, self.output_size() if limit is None else limit).decode(
            "utf-8", errors="replace"
        )
        return _strip_ansi(text) if strip_ansi else text

    # ----------------------------------------------------------------- close

    def close(self) -> None:
        """Close every file (removing private copies, see :class:`ReadOnlyFile`).  Idempotent;
        the reader opens them again if used afterwards."""
        files, self._files = self._files, {}
        self._vault = self._db = None
        for f in files.values():
            f.close()

    def __enter__(self) -> RunReader:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<RunReader {self.project}/{self.run_id} {self.status}>"


def _row_position(param: str, value: Any) -> int:
    """``value`` as a row position (an integer >= 0), or ValueError naming ``param``."""
    if isinstance(value, bool):
        raise ValueError(f"{param} must be an integer row position >= 0, got {value!r}")
    try:
        value = operator.index(value)
    except TypeError:
        raise ValueError(f"{param} must be an integer row position >= 0, got {value!r}") from None
    if value < 0:
        raise ValueError(f"{param} must be an integer row position >= 0, got {value}")
    return value


def _check_version(version: Any, where: str) -> None:
    """Raise :class:`FormatVersionError` unless ``version`` is one this reader understands."""
    if isinstance(version, bool) or not isinstance(version, int) or version > fmt.FORMAT_VERSION:
        raise FormatVersionError(
            f"run {where} has format version {version!r}; this KohakuBoard reads format versions "
            f"up to {fmt.FORMAT_VERSION}. Upgrade kohakuboard to read it."
        )


def _timestamp(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


_ANSI = None


def strip_ansi(text: str) -> str:
    """``text`` without ANSI escape sequences: SGR colours, cursor and erase (CSI), OSC titles/links."""
    return _strip_ansi(text)


def _strip_ansi(text: str) -> str:
    global _ANSI
    if _ANSI is None:
        import re

        _ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)|\x1b[@-Z\\-_]")
    return _ANSI.sub("", text)


def writer_alive(path: str | os.PathLike[str]) -> bool:
    """True when a daemon on this machine holds the run folder at ``path`` open for writing.

    A daemon's writer keeps an exclusive ``flock`` on ``data/.writer.lock`` as
    long as the run is open (it stays open while a client is attached); the
    kernel drops it when the daemon exits or dies.  Only opens the file
    read-only, never creates it.  A writer on another machine (a run read over
    a network file system) is not seen.
    """
    return lock_held(os.path.join(os.fspath(path), fmt.WRITER_LOCK))


def reported_status(path: str | os.PathLike[str], stored: Any) -> str:
    """The status to show for a run whose ``metadata.json`` holds ``stored``.

    ``"running"`` is only reported while a daemon holds the run open; otherwise
    it is ``"running?"`` (:data:`~kohakuboard.storage.format.STATUS_STALE`): its
    clients and daemon are gone without marking it (the daemon was killed
    too, the machine went down) or it is a copy of a run taken while it ran.
    """
    status = str(stored) if stored else "?"
    if status == fmt.STATUS_RUNNING and not writer_alive(path):
        return fmt.STATUS_STALE
    return status


def _read_info(path: str, project: str, run_id: str) -> RunInfo | None:
    try:
        meta = fmt.read_json(os.path.join(path, fmt.METADATA_JSON))
    except (OSError, ValueError):  # missing, unreadable, half-copied or not an object
        return None
    rid = meta.get("run_id")
    note = meta.get("annotation")
    return RunInfo(
        path=path,
        project=project,
        run_id=run_id,
        name=str(meta.get("name") or run_id),
        status=reported_status(path, meta.get("status")),
        created_at=_timestamp(meta.get("created_at")),
        finished_at=_timestamp(meta.get("finished_at")),
        id=rid if isinstance(rid, str) and rid else run_id,
        annotation=note if isinstance(note, str) and note else None,
    )


def _listdir(path: str) -> list[str]:
    try:
        return sorted(os.listdir(path))
    except OSError:
        return []


def list_runs(base_dir: str | os.PathLike[str] = "./kohakuboard") -> list[RunInfo]:
    """Every run folder ``{base_dir}/{project}/{run_id}``, oldest first.

    Folders without a readable ``metadata.json`` are skipped, never fatal; a
    missing ``base_dir`` has no runs.
    """
    base = os.path.abspath(os.fspath(base_dir))
    runs = []
    for project in _listdir(base):
        pdir = os.path.join(base, project)
        if not os.path.isdir(pdir):
            continue
        for run_id in _listdir(pdir):
            info = _read_info(os.path.join(pdir, run_id), project, run_id)
            if info is not None:
                runs.append(info)
    runs.sort(key=lambda r: (r.created_at is not None, r.created_at or 0.0, r.project, r.run_id))
    return runs


def find_run(spec: str | os.PathLike[str], base_dir: str | os.PathLike[str] = "./kohakuboard") -> str:
    """Resolve ``spec`` to the absolute path of a run folder.

    ``spec`` is tried as: a run folder path; ``project/run_id`` under
    ``base_dir``; a bare run id (unique across projects); a run name (unique).
    A run created with ``annotation=`` lives in ``{run_id}_{annotation}`` and is
    found by its folder name and by its bare run id alike (also as
    ``project/run_id``).  Raises :class:`RunNotFound` when nothing matches or a
    bare id or name is ambiguous (the message lists the candidates as
    ``project/run_id``).
    """
    spec = os.fspath(spec)
    if not spec:
        raise RunNotFound("empty run name: give a path, project/run_id or run id")
    if os.path.isfile(os.path.join(spec, fmt.METADATA_JSON)):
        return os.path.abspath(spec)
    base = os.path.abspath(os.fspath(base_dir))
    candidate = os.path.join(base, spec)
    if os.path.isfile(os.path.join(candidate, fmt.METADATA_JSON)):
        return os.path.abspath(candidate)
    runs = list_runs(base)
    project, sep, rid = spec.partition("/")
    if sep and rid and "/" not in rid:
        matches = [r for r in runs if r.project == project and r.id == rid]
        if len(matches) == 1:
            return matches[0].path
    for key in ("run_id", "id", "name"):
        matches = [r for r in runs if getattr(r, key) == spec]
        if len(matches) == 1:
            return matches[0].path
        if len(matches) > 1:
            listed = ", ".join(f"{r.project}/{r.run_id}" for r in matches)
            raise RunNotFound(
                f"{spec!r} is ambiguous: it matches {len(matches)} runs under {base} ({listed}); give project/run_id"
            )
    raise RunNotFound(f"no run {spec!r} under {base} (give a path, project/run_id or run id)")
