"""The on-disk format of a run folder, shared by the writer and the readers.

::

    {base_dir}/{project}/{run_id}/
      metadata.json        name, config, project, run_id, created_at, finished_at,
                           status (running/finished/crashed), format_version,
                           world_size (of a distributed launch, from rank 0)
      data/metrics/scalars.db
                           KohakuVault ColumnVault, one column per (rank, metric)
      data/metadata.db     SQLite: steps, clients, events, media, tables, tensors,
                           kde rows, format version
      data/histograms/exact_i32.db, compact_u8.db
                           KohakuVault ColumnVault, one ``bytes`` column per
                           (rank, histogram); a row is one packed histogram
      data/tensors/tensors.db
                           KohakuVault KVault: TensorLog arrays and KDE grids
      media/<sha256>.<ext> content-addressed media files (identical bytes stored once)
      logs/output.log      captured stdout/stderr
      logs/writer.log      daemon events for this run

Scalars.  Each point is one 32-byte record ``SCALAR_RECORD`` (step, global_step,
wall time, value), appended as a ``vec:u8:32`` row, so a point is written
atomically: there is no moment where its step exists without its value.  A
metric's column is named ``"{rank}/{name}"`` so the rank of every point is
known without spending bytes on it.

Why one ColumnVault file per run and not one per metric: measured with
kohakuvault 1.1 (see ``bench/`` and the project's notes), every open vault costs
5 file descriptors and up to ~8.7 MB of page cache; 1,000 metrics as 1,000 files
means 5,000 descriptors and gigabytes of RSS in the daemon, as columns of one
file 9 descriptors and ~45 MB.  Appends are per column anyway, so nothing is
lost by sharing the file.  64 KiB blocks instead of the 1 MiB default keep a
fresh run at ~300 KB instead of ~4 MB.

Steps.  The ``steps`` table maps every ``log()`` call's step to its global
step, as ranges: a row covers steps ``first_step..last_step`` whose global step
goes from ``first_global_step`` to ``last_global_step`` by a constant 0 or 1 per
step (so ``board.step(); board.log(...)`` loops are one row).

Rich values.  Every logged media item, table, tensor and KDE is one row in its
SQLite table (``media``, ``tables``, ``tensors``, ``kde``) with rank, step,
global step and wall time; large payloads live outside SQLite (media files,
the tensors KVault), so the database stays small.  A table's media cells are
stored as media rows and referenced from the table's JSON as
``{"$media": <media row id>}``.  A histogram row (a fixed-size ``vec:u8:{size}``
record, see ``HISTOGRAM_SIZE_SEP``; a ``bytes`` row in runs written before) is
``HISTOGRAM_HEADER`` (step, global_step, wall, num_bins, nan, posinf, neginf,
total, scale) followed by ``num_bins + 1`` float64 edges and ``num_bins``
counts (int32 for exact, uint8 for compact: multiply by ``scale``).

Commits.  A batch is written in two phases: first the appends to the
ColumnVault files (scalars, histograms), media files, tensor payloads and
``logs/output.log``; then ONE SQLite transaction in ``metadata.db`` that
records the batch's rows (steps, media, tables, tensors, KDEs), the clients'
sequence numbers and, in the ``committed`` table, the length of every column
and of ``output.log`` after the batch.  That transaction is the commit point:
rows beyond a column's committed length (``committed.file`` is the vault's path
relative to the run folder, ``committed.name`` the column; ``logs/output.log``
with name ``""`` is a byte length) belong to a batch whose writer died before
committing.  Readers ignore them and the next writer removes them; the clients
re-send that batch, so nothing is lost or doubled.  ``client_seqs`` holds, per
client, the committed sequence numbers as closed ranges ``lo..hi`` (usually one
row): the daemon's ledger drops a re-sent message whose numbers are already
there (``daemon/ledger.py`` decides and hands them to each commit; the writer
stores them as given).
``clients.dropped_calls``/``dropped_values`` count the ``log()`` calls (and their
values) the client's drop policy discarded when the daemon could not keep up,
``dropped_lines`` the captured output lines (``output.log`` has a line saying
how many were dropped where they were).

Durability (power loss, not only a crash).  The rule: every file a commit
names is synced before the commit that names it.  Between phase A and phase B
the writer fsyncs each file phase A wrote (a ColumnVault or the tensors KVault:
its database file and its ``-wal``, where kohakuvault's appends are, since it
commits with ``synchronous=NORMAL``; ``logs/output.log``; a media file before
it is renamed into place) and each directory that gained an entry (a new media
file, a new store, a new WAL, the run folder itself); only then is phase B's
transaction committed, and ``metadata.db`` runs with ``synchronous=FULL``, so
the commit point is on the disk when ``COMMIT`` returns, before any client is
told that its data is durable.  A power loss can therefore lose only batches
that were never acknowledged (the clients re-send them); whatever a commit
names is on the disk.  ``metadata.json`` is replaced atomically (fsync of the
new file, rename, fsync of the folder).  ``kobo-daemon`` with
``KOBO_DAEMON_DURABILITY=process`` skips every fsync (and commits with
``synchronous=NORMAL``): data then survives any crash of any process, not a
power loss.  Tested in ``tests/storage/test_durability.py`` by recording the
order of syncs and commits.

Write-ahead logs.  SQLite never shrinks a WAL file and the KVault checkpoints
only when closed, so a histogram or tensor store whose ``-wal`` has grown past
``WAL_KEEP_BYTES`` is closed after the commit (checkpointed, its WAL removed)
and reopened on its next write; ``metadata.db`` checkpoints every 256 pages
and keeps its WAL at most ~1 MiB.

Compatibility: ``FORMAT_VERSION`` is written to ``metadata.json`` and to the
``meta`` table.  A reader refuses a folder whose major version is newer.
Version 2 stores histogram rows as fixed-size records (a reader of version 1
would misread its extra per-size columns, so it refuses it); a version-1 run
resumed by a newer writer stays version 1 and keeps its ``bytes`` columns.

Run folders.  A writer creates a run only in a folder that does not exist, is
empty, or already is a run (:func:`run_folder_problem`), never beside other
files, and only at a path of at most ``protocol.runpath.MAX_RUN_PATH_BYTES`` (SQLite's limit).
Media names of the form ``{name}#{digits}`` are table cells
(:func:`is_table_cell`); the item rule refuses them for media a user logs.
"""

from __future__ import annotations

import json
import os
from typing import Any

from ..protocol.atomic import write_atomic

FORMAT_VERSION = 2  # 2: fixed-size histogram records (HISTOGRAM_SIZE_SEP); readers read 1 and 2

METADATA_JSON = "metadata.json"
DATA_DIR = "data"
METRICS_DIR = os.path.join(DATA_DIR, "metrics")
SCALARS_DB = os.path.join(METRICS_DIR, "scalars.db")
METADATA_DB = os.path.join(DATA_DIR, "metadata.db")
HISTOGRAMS_DIR = os.path.join(DATA_DIR, "histograms")
TENSORS_DIR = os.path.join(DATA_DIR, "tensors")
MEDIA_DIR = "media"
LOGS_DIR = "logs"
OUTPUT_LOG = os.path.join(LOGS_DIR, "output.log")
WRITER_LOG = os.path.join(LOGS_DIR, "writer.log")
WRITER_LOCK = os.path.join(DATA_DIR, ".writer.lock")
HISTOGRAM_FILES = {
    "exact": os.path.join(HISTOGRAMS_DIR, "exact_i32.db"),
    "compact": os.path.join(HISTOGRAMS_DIR, "compact_u8.db"),
}
HISTOGRAM_COUNT_DTYPES = {"exact": "<i4", "compact": "u1"}
HISTOGRAM_HEADER = "<qqdqqqqqd"  # struct format
TENSORS_DB = os.path.join(TENSORS_DIR, "tensors.db")
KVAULT_CACHE_KB = 8192

VAULT_BLOCK_BYTES = 64 << 10
# A histogram or tensor store whose write-ahead log grows past this is closed
# after the commit (checkpointed, its WAL removed) and reopened when next
# written: see RunWriter._compact_journals.
WAL_KEEP_BYTES = 1 << 20

STATUS_RUNNING = "running"
STATUS_FINISHED = "finished"
STATUS_CRASHED = "crashed"  # a client ended by an uncaught exception, or died (SIGKILL, OOM)
STATUS_INTERRUPTED = "interrupted"  # a client ended by KeyboardInterrupt (Ctrl-C), none crashed
STATUSES = (STATUS_RUNNING, STATUS_FINISHED, STATUS_CRASHED, STATUS_INTERRUPTED)
# Never stored: what readers report for a run whose metadata.json says "running"
# while nothing holds its writer lock (WRITER_LOCK), i.e. no daemon writes it:
# its clients and daemon are gone (or it was copied while running).
STATUS_STALE = "running?"
STDERR_MARK = "[stderr] "  # in front of every captured stderr line of logs/output.log

SCALAR_RECORD_FIELDS = [
    ("step", "<i8"),
    ("global_step", "<i8"),
    ("wall", "<f8"),
    ("value", "<f8"),
]
SCALAR_RECORD_SIZE = 32
SCALAR_COLUMN_DTYPE = f"vec:u8:{SCALAR_RECORD_SIZE}"

SCHEMA_SQL = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS steps (
    rank INTEGER NOT NULL,
    first_step INTEGER NOT NULL,
    last_step INTEGER NOT NULL,
    first_global_step INTEGER NOT NULL,
    last_global_step INTEGER NOT NULL,
    first_wall REAL NOT NULL,
    last_wall REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS steps_by_rank ON steps(rank, first_step);
CREATE TABLE IF NOT EXISTS clients (
    client TEXT PRIMARY KEY,
    rank INTEGER NOT NULL,
    pid INTEGER NOT NULL,
    host TEXT NOT NULL,
    opened_at REAL NOT NULL,
    closed_at REAL,
    status TEXT NOT NULL,
    durable_seq INTEGER NOT NULL DEFAULT 0,
    dropped_calls INTEGER NOT NULL DEFAULT 0,
    dropped_values INTEGER NOT NULL DEFAULT 0,
    dropped_lines INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS media (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL,
    rank INTEGER NOT NULL,
    step INTEGER NOT NULL,
    global_step INTEGER NOT NULL,
    wall REAL NOT NULL,
    media_type TEXT NOT NULL,
    hash TEXT NOT NULL,
    ext TEXT NOT NULL,
    size INTEGER NOT NULL,
    width INTEGER,
    height INTEGER,
    caption TEXT NOT NULL DEFAULT '',
    source TEXT
);
CREATE INDEX IF NOT EXISTS media_by_name ON media(name, rank, step);
CREATE TABLE IF NOT EXISTS tables (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL,
    rank INTEGER NOT NULL,
    step INTEGER NOT NULL,
    global_step INTEGER NOT NULL,
    wall REAL NOT NULL,
    columns TEXT NOT NULL,
    rows TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS tables_by_name ON tables(name, rank, step);
CREATE TABLE IF NOT EXISTS tensors (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL,
    rank INTEGER NOT NULL,
    step INTEGER NOT NULL,
    global_step INTEGER NOT NULL,
    wall REAL NOT NULL,
    key TEXT NOT NULL,
    dtype TEXT NOT NULL,
    shape TEXT NOT NULL,
    namespace TEXT,
    metadata TEXT NOT NULL,
    source_dtype TEXT
);
CREATE INDEX IF NOT EXISTS tensors_by_name ON tensors(name, rank, step);
CREATE TABLE IF NOT EXISTS kde (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL,
    rank INTEGER NOT NULL,
    step INTEGER NOT NULL,
    global_step INTEGER NOT NULL,
    wall REAL NOT NULL,
    key TEXT NOT NULL,
    grid_size INTEGER NOT NULL,
    bandwidth REAL,
    count INTEGER
);
CREATE INDEX IF NOT EXISTS kde_by_name ON kde(name, rank, step);
CREATE TABLE IF NOT EXISTS committed (
    file TEXT NOT NULL,
    name TEXT NOT NULL,
    length INTEGER NOT NULL,
    PRIMARY KEY (file, name)
);
CREATE TABLE IF NOT EXISTS client_seqs (
    client TEXT NOT NULL,
    lo INTEGER NOT NULL,
    hi INTEGER NOT NULL,
    PRIMARY KEY (client, lo)
);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    wall REAL NOT NULL,
    kind TEXT NOT NULL,
    detail TEXT NOT NULL
);
"""


def scalar_record_dtype() -> Any:
    """The numpy structured dtype of one scalar point (imports numpy)."""
    import numpy as np

    return np.dtype(SCALAR_RECORD_FIELDS)


def column_name(rank: int, metric: str) -> str:
    """Column holding ``metric`` as logged by ``rank``."""
    return f"{rank}/{metric}"


# Histogram rows are fixed-size records (``vec:u8:{size}``): kohakuvault 1.1 keeps a
# variable-size ``bytes`` column at ~1.5x its data on disk, a fixed-size one at ~1.01x.
# A (rank, histogram)'s rows go to column ``"{rank}/{name}"``; a row of another size
# than that column's (another number of bins) goes to ``"{rank}/{name}\x1f{size}"``
# (names cannot hold control characters).  Runs written before hold one ``bytes``
# column per (rank, histogram), which writers keep appending to.
HISTOGRAM_SIZE_SEP = "\x1f"


def histogram_dtype(size: int) -> str:
    return f"vec:u8:{size}"


def split_histogram_column(column: str) -> tuple[int, str]:
    """``(rank, histogram name)`` of a histogram column, whatever its record size."""
    rank, name = split_column_name(column)
    return rank, name.split(HISTOGRAM_SIZE_SEP, 1)[0]


def split_column_name(column: str) -> tuple[int, str]:
    """Inverse of :func:`column_name`; raises ``ValueError`` for a foreign column."""
    rank, _, metric = column.partition("/")
    return int(rank), metric


def histogram_record_problem(rec: bytes, count_size: int) -> str:
    """Why ``rec`` cannot be parsed as a histogram row with ``count_size``-byte counts, or ''."""
    import struct

    head = struct.calcsize(HISTOGRAM_HEADER)
    if len(rec) < head:
        return f"{len(rec)} bytes, shorter than the {head}-byte header"
    n = struct.unpack_from(HISTOGRAM_HEADER, rec)[3]
    body = len(rec) - head
    want = 8 * (n + 1) + count_size * n if n else 0
    if n < 0 or (body != want if n else body % 8):
        return f"header says {n} bins, which need {max(want, 0)} bytes of edges and counts; the record has {len(rec) - head}"
    return ""


def is_table_cell(media_name: str) -> bool:
    """Whether a media row's name is a table's cell (``{table}#{k}``): such names are
    refused for media a user logs (``protocol.items.check_media``)."""
    table, sep, k = media_name.rpartition("#")
    return bool(sep and table and k.isascii() and k.isdigit())


def write_json_atomic(path: str, obj: Any) -> None:
    """Write JSON to ``path`` via a temp file and rename: readers never see half a file.

    Mode 0644 like the run's other files; the data and the new name are synced.
    """
    text = json.dumps(obj, indent=2, sort_keys=False, allow_nan=False) + "\n"
    write_atomic(path, text, mode=0o644, fsync=True, sync_dir=True)


def read_json(path: str) -> dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        obj = json.load(f)
    if not isinstance(obj, dict):
        raise ValueError(f"{path} does not hold a JSON object")
    return obj


# ------------------------------------------------------------ run folders

# What a writer creates in a new run folder before metadata.json exists: a
# folder holding only these (empty) directories and the lock is a run whose
# creation was cut short, not somebody else's files.
_SKELETON = {DATA_DIR: {"metrics", ".writer.lock"}, LOGS_DIR: set()}


def is_run_folder(path: str) -> bool:
    """Whether ``path`` holds a KohakuBoard run (of any format version)."""
    if os.path.exists(os.path.join(path, METADATA_DB)):
        return True
    try:
        meta = read_json(os.path.join(path, METADATA_JSON))
    except (OSError, ValueError):
        return False
    return "format_version" in meta or "run_id" in meta


def _only_skeleton(path: str, entries: list[str]) -> bool:
    if not set(entries) <= set(_SKELETON):
        return False
    for top in entries:
        sub = os.path.join(path, top)
        if not os.path.isdir(sub) or os.path.islink(sub):
            return False
        for name in os.listdir(sub):
            child = os.path.join(sub, name)
            if name not in _SKELETON[top]:
                return False
            if name == ".writer.lock":
                if not os.path.isfile(child) or os.path.getsize(child):
                    return False
            elif not os.path.isdir(child) or os.listdir(child):
                return False
    return True


def run_folder_problem(path: str) -> str | None:
    """Why a run must not be created at ``path``; None when it may.

    A run is created only in a folder that does not exist, is empty, or
    already is a run (see :func:`is_run_folder`; a newer format version is
    refused separately): never beside somebody else's files.
    """
    try:
        entries = os.listdir(path)
    except FileNotFoundError:
        return None
    except NotADirectoryError:
        return "it is a file, not a folder"
    except OSError as exc:
        return f"it cannot be listed ({exc.strerror or exc})"
    if not entries or is_run_folder(path) or _only_skeleton(path, entries):
        return None
    shown = ", ".join(sorted(entries)[:5]) + (f" and {len(entries) - 5} more" if len(entries) > 5 else "")
    return (
        f"the folder already exists, holds other files ({shown}) and is not a KohakuBoard run; "
        "use a new run_id, an empty folder, or another base_dir"
    )


def makedirs(path: str, mode: int = 0o777, leaf_mode: int | None = None) -> list[str]:
    """``os.makedirs(path, mode, exist_ok=True)`` without recursion (a path may have thousands of parts);
    ``path`` itself is made with ``leaf_mode`` when given.  Returns the directories it created,
    outermost first (the modes are as the umask left them)."""
    missing = []
    path = p = os.path.abspath(path)
    while not os.path.isdir(p):
        missing.append(p)
        parent = os.path.dirname(p)
        if parent == p:
            break
        p = parent
    created = []
    for d in reversed(missing):
        try:
            os.mkdir(d, leaf_mode if leaf_mode is not None and d == path else mode)
            created.append(d)
        except FileExistsError:
            if not os.path.isdir(d):
                raise
    return created
