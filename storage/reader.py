"""Read-only access to run folders (format: :mod:`.format`).

:class:`RunReader` never imports the writer and never writes: the metrics file
is opened ``read_only`` and SQLite with ``mode=ro``, so it is safe on a run the
daemon is still appending to (it sees a consistent prefix) and on a copied or
read-only folder.

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
import os
import sqlite3
import urllib.parse
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..protocol.errors import FormatVersionError, RunNotFound, StorageError
from . import format as fmt

_REC = fmt.scalar_record_dtype()


@dataclass(frozen=True)
class RunInfo:
    """One line of ``kobo list``."""

    path: str
    project: str
    run_id: str
    name: str
    status: str
    created_at: float | None
    finished_at: float | None


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
        self._vault: Any = None
        self._columns: dict[str, tuple[str, int]] | None = None
        self._db: sqlite3.Connection | None = None
        # Committed lengths: (file, column) -> rows, or None when the run has no
        # commit points (older format, or no metadata.db): read everything.
        self._committed: dict[tuple[str, str], int] | None = None
        self._commit_loaded = False
        self._committed_files: set[str] = set()

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
        return str(self.metadata.get("status", fmt.STATUS_RUNNING))

    @property
    def config(self) -> dict[str, Any]:
        return dict(self.metadata.get("config") or {})

    # --------------------------------------------------------------- opening

    def _open_vault(self) -> Any:
        if self._vault is None:
            path = os.path.join(self.path, fmt.SCALARS_DB)
            if not os.path.exists(path):
                return None
            from kohakuvault import ColumnVault

            try:
                self._vault = ColumnVault(path, read_only=True)
            except Exception as exc:
                raise StorageError(f"cannot open {path}: {exc}") from exc
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
                for name, dtype, length in vault.list_columns():
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
            return None
        _, rows = self._select("SELECT length FROM committed WHERE file = ? AND name = ?", (file, column))
        if not rows:
            committed.pop((file, column), None)
            return 0
        committed[(file, column)] = n = int(rows[0][0])
        return n

    def _read_column(self, vault: Any, file: str, column: str, as_array: bool) -> Any:
        """Every committed row of ``column``: its committed length is read first, then the rows."""
        committed = self._committed_length(file, column)
        col = vault[column]
        n = len(col) if committed is None else min(committed, len(col))
        if as_array:
            return col.read_array(0, n)
        return col.read(0, n) if n else []

    def _sql(self) -> sqlite3.Connection | None:
        if self._db is None:
            path = os.path.join(self.path, fmt.METADATA_DB)
            if not os.path.exists(path):
                return None
            # Quote the path: '?', '#' or '%' in a folder name would otherwise end the URI.
            uri = f"file:{urllib.parse.quote(path)}?mode=ro"
            try:
                db = sqlite3.connect(uri, uri=True, check_same_thread=False)
            except sqlite3.Error as exc:
                raise StorageError(f"cannot open {path} read-only: {exc}") from exc
            try:
                row = db.execute("SELECT value FROM meta WHERE key = 'format_version'").fetchone()
            except sqlite3.OperationalError as exc:
                if "no such table" not in str(exc):  # else: the daemon is creating it right now
                    db.close()
                    raise StorageError(f"cannot read {path}: {exc}") from exc
                row = None
            except sqlite3.DatabaseError as exc:
                db.close()
                raise StorageError(f"cannot read {path}: {exc}") from exc
            if row is not None:  # the meta table carries the version too: refuse a newer one
                try:
                    version: Any = int(row[0])
                except (TypeError, ValueError):
                    version = row[0]
                try:
                    _check_version(version, self.path)
                except FormatVersionError:
                    db.close()
                    raise
            self._db = db
        return self._db

    def _select(self, sql: str, args: tuple[Any, ...] | list[Any] = ()) -> tuple[list[str], list[tuple[Any, ...]]]:
        """Run a query on metadata.db; no database or table yet (a run just starting) is no rows."""
        db = self._sql()
        if db is None:
            return [], []
        try:
            cur = db.execute(sql, args)
            return [d[0] for d in cur.description], cur.fetchall()
        except sqlite3.OperationalError as exc:
            if "no such table" in str(exc):
                return [], []
            raise StorageError(f"cannot read {os.path.join(self.path, fmt.METADATA_DB)}: {exc}") from exc

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

    def series(self, name: str, rank: int = 0) -> np.ndarray:
        """Every point of metric ``name`` from ``rank``, in logging order.

        Returns a structured array with fields ``step``, ``global_step``,
        ``wall`` (seconds since the epoch) and ``value``.  Raises ``KeyError``
        naming the metric (and close names) if it was never logged.
        """
        col = fmt.column_name(rank, name)
        entry = (self._columns or {}).get(col) or self._column_table(refresh=True).get(col)
        if entry is None or entry[0] != fmt.SCALAR_COLUMN_DTYPE:
            raise KeyError(self._missing(name, rank))
        # One read_array call (a single numpy buffer), then a zero-copy reinterpretation.
        raw = self._read_column(self._vault, fmt.SCALARS_DB, col, as_array=True)
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
        """How many points ``rank`` has logged for ``name`` so far (0 if none), without reading them."""
        entry = self._column_table(refresh=True).get(fmt.column_name(rank, name))
        return entry[1] if entry and entry[0] == fmt.SCALAR_COLUMN_DTYPE else 0

    # ----------------------------------------------------------- rich values

    def _rows(self, table: str, name: str | None, rank: int | None, start: int | None, end: int | None) -> list[dict[str, Any]]:
        where, args = [], []
        for cond, value in (("name = ?", name), ("rank = ?", rank), ("step >= ?", start), ("step <= ?", end)):
            if value is not None:
                where.append(cond)
                args.append(value)
        sql = f"SELECT * FROM {table}" + (f" WHERE {' AND '.join(where)}" if where else "") + " ORDER BY step, id"
        cols, rows = self._select(sql, args)
        return [dict(zip(cols, row)) for row in rows]

    def list_items(self) -> dict[str, list[str]]:
        """Names of every non-scalar series, by kind: media, table, histogram, tensor, kde."""
        out: dict[str, list[str]] = {}
        db = self._sql()
        for kind, table in (("media", "media"), ("table", "tables"), ("tensor", "tensors"), ("kde", "kde")):
            names = sorted({r["name"] for r in self._rows(table, None, None, None, None)}) if db else []
            if kind == "media":
                names = [n for n in names if "#" not in n]  # table cells are listed with their table
            out[kind] = names
        hist = set()
        self._commit_table(refresh=True)
        for precision, rel in fmt.HISTOGRAM_FILES.items():
            vault = self._hist_vault(precision)
            if vault is not None:
                for col, _, length in vault.list_columns():
                    if self._visible(rel, col, length):
                        hist.add(fmt.split_column_name(col)[1])
        out["histogram"] = sorted(hist)
        return out

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

    def tables(self, name: str, rank: int = 0, start: int | None = None, end: int | None = None) -> list[dict[str, Any]]:
        """Logged tables of ``name``: step, global_step, wall, columns, rows.

        Media cells are resolved to their media row (a dict with ``path``).
        """
        import json

        out = []
        for r in self._rows("tables", name, rank, start, end):
            rows = json.loads(r["rows"])
            ids = [c["$media"] for row in rows for c in row if isinstance(c, dict) and "$media" in c]
            media = self._media_by_id(ids)
            rows = [[media.get(c["$media"], c) if isinstance(c, dict) and "$media" in c else c for c in row] for row in rows]
            out.append({"step": r["step"], "global_step": r["global_step"], "wall": r["wall"],
                        "columns": json.loads(r["columns"]), "rows": rows})
        return out

    def _hist_vault(self, precision: str) -> Any:
        cache = self.__dict__.setdefault("_hist_vaults", {})
        if precision not in cache:
            rel = fmt.HISTOGRAM_FILES[precision]
            path = os.path.join(self.path, rel)
            if not os.path.exists(path) or not self._has_commits(rel):
                return None
            from kohakuvault import ColumnVault

            try:
                cache[precision] = ColumnVault(path, read_only=True)
            except Exception as exc:
                raise StorageError(f"cannot open {path}: {exc}") from exc
        return cache[precision]

    def histograms(self, name: str, rank: int = 0, start: int | None = None, end: int | None = None) -> list[dict[str, Any]]:
        """Histograms of ``name``: step, global_step, wall, edges, counts, nan, posinf, neginf, total, precision.

        Compact histograms' counts are restored to approximate float counts.
        """
        import struct

        out = []
        col = fmt.column_name(rank, name)
        header = struct.calcsize(fmt.HISTOGRAM_HEADER)
        for precision in fmt.HISTOGRAM_FILES:
            vault = self._hist_vault(precision)
            if vault is None or col not in {c for c, _, _ in vault.list_columns()}:
                continue
            cdtype = np.dtype(fmt.HISTOGRAM_COUNT_DTYPES[precision])
            for rec in self._read_column(vault, fmt.HISTOGRAM_FILES[precision], col, as_array=False):
                step, gstep, wall, n, nan, posinf, neginf, total, scale = struct.unpack_from(fmt.HISTOGRAM_HEADER, rec)
                if (start is not None and step < start) or (end is not None and step > end):
                    continue
                n_edges = n + 1 if n else 0
                edges = np.frombuffer(rec, dtype="<f8", count=n_edges, offset=header)
                counts = np.frombuffer(rec, dtype=cdtype, count=n, offset=header + 8 * n_edges)
                out.append({
                    "step": step, "global_step": gstep, "wall": wall, "edges": edges,
                    "counts": counts.astype(np.int64) if precision == "exact" else counts * scale,
                    "nan": nan, "posinf": posinf, "neginf": neginf, "total": total, "precision": precision,
                })
        out.sort(key=lambda h: h["step"])
        return out

    def _kv(self) -> Any:
        if self.__dict__.get("_kvault") is None:
            path = os.path.join(self.path, fmt.TENSORS_DB)
            if not os.path.exists(path):
                return None
            from kohakuvault import KVault

            self._kvault = KVault(path, read_only=True, cache_kb=fmt.KVAULT_CACHE_KB)
        return self._kvault

    def tensors(self, name: str, rank: int = 0, start: int | None = None, end: int | None = None) -> list[dict[str, Any]]:
        """Logged tensors of ``name``: step, global_step, wall, array (exact dtype and shape), namespace, metadata."""
        import json

        out = []
        for r in self._rows("tensors", name, rank, start, end):
            raw = self._kv().get(r["key"])
            arr = np.frombuffer(raw, dtype=np.dtype(r["dtype"])).reshape(json.loads(r["shape"]))
            out.append({"step": r["step"], "global_step": r["global_step"], "wall": r["wall"], "array": arr,
                        "namespace": r["namespace"], "metadata": json.loads(r["metadata"]),
                        "source_dtype": r["source_dtype"]})
        return out

    def kde(self, name: str, rank: int = 0, start: int | None = None, end: int | None = None) -> list[dict[str, Any]]:
        """Kernel density estimates of ``name``: step, global_step, wall, grid, density, bandwidth, count."""
        out = []
        for r in self._rows("kde", name, rank, start, end):
            raw = np.frombuffer(self._kv().get(r["key"]), dtype="<f8")
            n = r["grid_size"]
            out.append({"step": r["step"], "global_step": r["global_step"], "wall": r["wall"],
                        "grid": raw[:n], "density": raw[n : 2 * n], "bandwidth": r["bandwidth"], "count": r["count"]})
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
        try:
            _, rows = self._select(f"SELECT {', '.join(cols)}, dropped_calls, dropped_values FROM clients ORDER BY opened_at")
            cols = (*cols, "dropped_calls", "dropped_values")
        except StorageError:  # a run written before drop counters existed
            _, rows = self._select(f"SELECT {', '.join(cols)} FROM clients ORDER BY opened_at")
        return [dict(zip(cols, row)) for row in rows]

    def dropped(self) -> dict[str, int]:
        """log() calls (and their values) the clients' drop policy discarded, summed over clients."""
        clients = self.clients()
        return {
            "calls": sum(int(c.get("dropped_calls") or 0) for c in clients),
            "values": sum(int(c.get("dropped_values") or 0) for c in clients),
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
                "points_by_rank": {rk: int(len(s)) if rk == r else lengths.get(fmt.column_name(rk, name), 0) for rk in ranks},
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

    # ----------------------------------------------------------------- close

    def close(self) -> None:
        for obj in [*self.__dict__.pop("_hist_vaults", {}).values(), self.__dict__.pop("_kvault", None)]:
            if obj is not None:
                try:
                    obj.close()
                except Exception:
                    pass
        if self._vault is not None:
            try:
                self._vault.close()
            except Exception:
                pass
            self._vault = None
        if self._db is not None:
            self._db.close()
            self._db = None

    def __enter__(self) -> "RunReader":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<RunReader {self.project}/{self.run_id} {self.status}>"


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


def _read_info(path: str, project: str, run_id: str) -> RunInfo | None:
    try:
        meta = fmt.read_json(os.path.join(path, fmt.METADATA_JSON))
    except (OSError, ValueError):  # missing, unreadable, half-copied or not an object
        return None
    return RunInfo(
        path=path,
        project=project,
        run_id=run_id,
        name=str(meta.get("name") or run_id),
        status=str(meta.get("status") or "?"),
        created_at=_timestamp(meta.get("created_at")),
        finished_at=_timestamp(meta.get("finished_at")),
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
    Raises :class:`RunNotFound` when nothing matches or a bare id or name is
    ambiguous (the message lists the candidates as ``project/run_id``).
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
    for key in ("run_id", "name"):
        matches = [r for r in runs if getattr(r, key) == spec]
        if len(matches) == 1:
            return matches[0].path
        if len(matches) > 1:
            listed = ", ".join(f"{r.project}/{r.run_id}" for r in matches)
            raise RunNotFound(
                f"{spec!r} is ambiguous: it matches {len(matches)} runs under {base} ({listed}); "
                "give project/run_id"
            )
    raise RunNotFound(f"no run {spec!r} under {base} (give a path, project/run_id or run id)")
