"""Read-only access to run folders (format: :mod:`.format`).

:class:`RunReader` never imports the writer and never writes: the metrics file
is opened ``read_only`` and SQLite with ``mode=ro``, so it is safe on a run the
daemon is still appending to (it sees a consistent prefix) and on a copied or
read-only folder.
"""

from __future__ import annotations

import difflib
import os
import sqlite3
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
        version = self.metadata.get("format_version", 1)
        if not isinstance(version, int) or version > fmt.FORMAT_VERSION:
            raise FormatVersionError(
                f"run {self.path} has format version {version}; this KohakuBoard reads up to "
                f"version {fmt.FORMAT_VERSION}. Upgrade kohakuboard to read it."
            )
        self._vault: Any = None
        self._columns: dict[str, tuple[str, int]] | None = None
        self._db: sqlite3.Connection | None = None

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
        if self._columns is None or refresh:
            vault = self._open_vault()
            cols: dict[str, tuple[str, int]] = {}
            if vault is not None:
                for name, dtype, length in vault.list_columns():
                    cols[name] = (dtype, length)
            self._columns = cols
        return self._columns

    def _sql(self) -> sqlite3.Connection | None:
        if self._db is None:
            path = os.path.join(self.path, fmt.METADATA_DB)
            if not os.path.exists(path):
                return None
            self._db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False)
        return self._db

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
        vault = self._open_vault()
        col = fmt.column_name(rank, name)
        if vault is None or col not in self._column_table(refresh=col not in (self._columns or {})):
            known = self.list_metrics(rank)
            close = difflib.get_close_matches(name, known, n=3)
            hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
            raise KeyError(f"no metric {name!r} from rank {rank} in run {self.run_id}{hint}")
        raw = vault.ensure(col, fmt.SCALAR_COLUMN_DTYPE).read_array()
        return np.asarray(raw).view(_REC).reshape(-1)

    def series_by_rank(self, name: str) -> dict[int, np.ndarray]:
        """``{rank: series}`` for every rank that logged ``name``."""
        ranks = self.ranks(name)
        if not ranks:
            raise KeyError(f"no metric {name!r} in run {self.run_id}")
        return {r: self.series(name, r) for r in ranks}

    def num_points(self, name: str, rank: int = 0) -> int:
        entry = self._column_table(refresh=True).get(fmt.column_name(rank, name))
        return entry[1] if entry else 0

    # ----------------------------------------------------------- rich values

    def _rows(self, table: str, name: str | None, rank: int | None, start: int | None, end: int | None) -> list[dict[str, Any]]:
        db = self._sql()
        if db is None:
            return []
        has = db.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name=?", (table,)).fetchone()
        if not has:
            return []
        where, args = [], []
        for cond, value in (("name = ?", name), ("rank = ?", rank), ("step >= ?", start), ("step <= ?", end)):
            if value is not None:
                where.append(cond)
                args.append(value)
        sql = f"SELECT * FROM {table}" + (f" WHERE {' AND '.join(where)}" if where else "") + " ORDER BY step, id"
        cur = db.execute(sql, args)
        cols = [d[0] for d in cur.description]
        return [dict(zip(cols, row)) for row in cur.fetchall()]

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
        for precision, rel in fmt.HISTOGRAM_FILES.items():
            vault = self._hist_vault(precision)
            if vault is not None:
                for col, _, _ in vault.list_columns():
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
        db = self._sql()
        if db is None or not ids:
            return {}
        out = {}
        for chunk in range(0, len(ids), 500):
            part = ids[chunk : chunk + 500]
            cur = db.execute(f"SELECT * FROM media WHERE id IN ({','.join('?' * len(part))})", part)
            cols = [d[0] for d in cur.description]
            for row in cur.fetchall():
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
            path = os.path.join(self.path, fmt.HISTOGRAM_FILES[precision])
            if not os.path.exists(path):
                return None
            from kohakuvault import ColumnVault

            cache[precision] = ColumnVault(path, read_only=True)
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
            for rec in vault.ensure(col, "bytes").read(0, None):
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
        """One row per ``log()`` call: step, global_step, wall."""
        db = self._sql()
        dtype = np.dtype([("step", "<i8"), ("global_step", "<i8"), ("wall", "<f8")])
        if db is None:
            return np.empty(0, dtype=dtype)
        rows = db.execute(
            "SELECT step, global_step, wall FROM steps WHERE rank=? ORDER BY step", (rank,)
        ).fetchall()
        return np.array(rows, dtype=dtype) if rows else np.empty(0, dtype=dtype)

    def events(self) -> list[dict[str, Any]]:
        """Run events (opened, resumed, client finished or crashed, errors)."""
        db = self._sql()
        if db is None:
            return []
        return [
            {"wall": w, "kind": k, "detail": d}
            for w, k, d in db.execute("SELECT wall, kind, detail FROM events ORDER BY id")
        ]

    def clients(self) -> list[dict[str, Any]]:
        """Every client (process) that attached to the run."""
        db = self._sql()
        if db is None:
            return []
        cols = ("client", "rank", "pid", "host", "opened_at", "closed_at", "status", "durable_seq")
        return [dict(zip(cols, row)) for row in db.execute(f"SELECT {', '.join(cols)} FROM clients ORDER BY opened_at")]

    def summary(self) -> dict[str, Any]:
        """Metadata plus, per metric (rank 0), its point count, step range and last value."""
        metrics = {}
        for r, name in sorted(self._metric_columns(), key=lambda x: (x[1], x[0])):
            if r != 0 and name in metrics:
                continue
            s = self.series(name, r)
            if len(s) == 0:
                metrics[name] = {"points": 0, "rank": r}
                continue
            metrics[name] = {
                "rank": r,
                "points": int(len(s)),
                "first_step": int(s["step"].min()),
                "last_step": int(s["step"].max()),
                "last_value": float(s["value"][-1]),
            }
        return {
            "path": self.path,
            "project": self.project,
            "run_id": self.run_id,
            "name": self.name,
            "status": self.status,
            "created_at": self.metadata.get("created_at"),
            "finished_at": self.metadata.get("finished_at"),
            "config": self.config,
            "ranks": self.ranks(),
            "metrics": metrics,
            "items": self.list_items(),
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


def list_runs(base_dir: str | os.PathLike[str] = "./kohakuboard") -> list[RunInfo]:
    """Every run folder ``{base_dir}/{project}/{run_id}``, oldest first; unreadable ones skipped."""
    base = os.path.abspath(os.fspath(base_dir))
    runs = []
    try:
        projects = sorted(os.listdir(base))
    except OSError:
        return []
    for project in projects:
        pdir = os.path.join(base, project)
        if not os.path.isdir(pdir):
            continue
        for run_id in sorted(os.listdir(pdir)):
            path = os.path.join(pdir, run_id)
            try:
                meta = fmt.read_json(os.path.join(path, fmt.METADATA_JSON))
            except (OSError, ValueError):
                continue
            runs.append(
                RunInfo(
                    path=path,
                    project=project,
                    run_id=run_id,
                    name=str(meta.get("name") or run_id),
                    status=str(meta.get("status", "?")),
                    created_at=meta.get("created_at"),
                    finished_at=meta.get("finished_at"),
                )
            )
    runs.sort(key=lambda r: (r.created_at or 0.0, r.project, r.run_id))
    return runs


def find_run(spec: str | os.PathLike[str], base_dir: str | os.PathLike[str] = "./kohakuboard") -> str:
    """Resolve a run folder path, ``project/run_id`` or a bare run id to a path.

    Raises :class:`RunNotFound` when nothing (or more than one run) matches.
    """
    spec = os.fspath(spec)
    if os.path.isfile(os.path.join(spec, fmt.METADATA_JSON)):
        return os.path.abspath(spec)
    base = os.path.abspath(os.fspath(base_dir))
    candidate = os.path.join(base, spec)
    if os.path.isfile(os.path.join(candidate, fmt.METADATA_JSON)):
        return candidate
    matches = [r.path for r in list_runs(base) if r.run_id == spec or r.name == spec]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise RunNotFound(f"no run {spec!r} under {base} (give a path, project/run_id or run id)")
    raise RunNotFound(f"{spec!r} matches {len(matches)} runs under {base}: " + ", ".join(matches))
