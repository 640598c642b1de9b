"""Rich-value staging: what a prepared media file, table, histogram, tensor or KDE becomes in a run folder.

The daemon prepares each rich value a client sends (``daemon/ingest.py``, on its
compute pool) into the plain values of this module, with the pure helpers
below: a :class:`MediaValue` (an encoded file and its hash), a histogram's
fixed-size record, a tensor's or a KDE's payload.  They use
:mod:`.values` for the CPU work (PNG encoding, image sizes, compact counts,
KDE) and hold no state, so any thread may call them.

:class:`RichStaging`, part of :class:`~.writer.RunWriter`, turns each prepared
value into operations done exactly once by ``RunWriter.commit``: file
operations in phase A (a content-addressed ``media/<sha256>.<ext>`` written
through a temporary name, a histogram record appended to
``data/histograms/{exact_i32,compact_u8}.db``, tensor and KDE payloads put in
the KVault ``data/tensors/tensors.db``) and rows inside phase B's transaction
(``media``, ``tables``, ``tensors``, ``kde``).  Format: :mod:`.format`.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import struct
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
from kohakuvault import ColumnVault

from ..protocol.atomic import write_atomic
from . import format as fmt
from . import values


class Call(NamedTuple):
    """The call a value was logged by: its client and that client's number for the call
    (they name tensor and KDE payloads), its rank, step, global step and wall time."""

    client: str
    seq: int
    rank: int
    step: int
    global_step: int
    wall: float


class MediaValue(NamedTuple):
    """An encoded media file: ``data`` (bytes or a buffer), its extension, type, size in pixels and SHA-256."""

    data: Any
    ext: str
    media_type: str
    width: int | None
    height: int | None
    digest: str


# ------------------------------------------------------------ preparing values
#
# Pure functions (no run state): the daemon's compute pool runs them as values
# arrive; the run's writer thread only queues the writes of their results.


def media_from_pixels(pixels: np.ndarray) -> MediaValue:
    """An ``(H, W, C)`` uint8 image, encoded as PNG (:func:`.values.encode_png`)."""
    data = values.encode_png(pixels)
    return _media(data, "png", "image", int(pixels.shape[1]), int(pixels.shape[0]))


def media_from_file(data: Any, ext: str, media_type: str) -> MediaValue:
    """An already encoded file (an image's size is read from its header)."""
    size = values.image_size(data) if media_type == "image" else None
    width, height = size if size else (None, None)
    return _media(data, ext, media_type, width, height)


def _media(data: Any, ext: str, media_type: str, width: int | None, height: int | None) -> MediaValue:
    if not ext.isalnum() or len(ext) > 8:
        raise ValueError(f"bad media extension {ext!r}")
    return MediaValue(data, ext, media_type, width, height, hashlib.sha256(data).hexdigest())


def histogram_record(
    precision: str,
    step: int,
    global_step: int,
    wall: float,
    edges: np.ndarray,
    counts: np.ndarray,
    nan: int,
    posinf: int,
    neginf: int,
    total: int,
) -> bytes:
    """A histogram's fixed-size row (``format.HISTOGRAM_HEADER``, then edges and counts)."""
    if precision not in fmt.HISTOGRAM_FILES:
        raise ValueError(f"unknown histogram precision {precision!r}")
    scale = 1.0
    if precision == "compact":
        packed, scale = values.compact_counts(counts)
    else:
        if counts.size and counts.max() > np.iinfo(np.int32).max:
            raise ValueError("histogram count over int32 range; use fewer values per histogram")
        packed = counts.astype("<i4")
    return (
        struct.pack(fmt.HISTOGRAM_HEADER, step, global_step, wall, len(counts), nan, posinf, neginf, total, scale)
        + edges.astype("<f8").tobytes()
        + packed.tobytes()
    )


def tensor_payload(arr: np.ndarray) -> tuple[str, list[int], Any]:
    """``(dtype, shape, payload)``; the payload is the array's own buffer when it is contiguous, not a copy."""
    data = np.ascontiguousarray(arr).data.cast("B") if arr.size else b""
    return arr.dtype.str, list(arr.shape), data


def kde_payload(
    grid: np.ndarray, density: np.ndarray, bandwidth: float | None, count: int | None
) -> tuple[int, float | None, int | None, bytes]:
    """``(grid_size, bandwidth, count, payload)`` of a density on a grid (``None``: precomputed, unknown)."""
    grid, density = grid.astype("<f8"), density.astype("<f8")
    if grid.shape != density.shape:
        raise ValueError("KDE grid and density differ in length")
    return len(grid), bandwidth, count, grid.tobytes() + density.tobytes()


def kde_from_values(samples: np.ndarray, grid_size: int, bandwidth: float | None) -> tuple[Any, ...]:
    """:func:`kde_payload` of the density of raw samples (:func:`.values.kde`)."""
    k = values.kde(samples, grid_size, bandwidth)
    return kde_payload(k["grid"], k["density"], float(k["bandwidth"]), int(k["count"]))


# --------------------------------------------------------------------- staging


class RichStaging:
    """The rich-value half of :class:`~.writer.RunWriter` (which owns the state used here)."""

    path: str
    durable: bool
    metadata: dict[str, Any]
    _db: sqlite3.Connection
    _ops: list[tuple[str, Callable[[], None]]]
    _sql_ops: list[tuple[str, Callable[[], object]]]  # what each returns is ignored
    _unsynced: set[str]
    _unsynced_dirs: set[str]
    _dirty_columns: dict[tuple[str, str], Any]
    _hist_vaults: dict[str, Any]
    _hist_columns: dict[tuple[str, str, int], tuple[str, Any, bool]]
    _hist_dtypes: dict[str, dict[str, str]]
    _kv: Any
    _require_format: Callable[[int], None]

    def stage_media(self, call: Call, name: str, value: MediaValue, caption: str = "", source: Any = None) -> None:
        """Queue a media file and its ``media`` row."""
        row = _media_row(call, name, value, caption, source)
        self._stage_file(name, value)
        self._sql_ops.append((f"record media {name!r}", lambda: self._insert_media(row)))

    def stage_table(
        self,
        call: Call,
        name: str,
        columns: list[str],
        rows: list[list[Any]],
        media: list[tuple[MediaValue, str, Any]],
    ) -> None:
        """Queue a table: its media cells (``{name}#{k}``, ``(value, caption, source)`` each, referred to
        by ``{"$media": k}`` in ``rows``) and its ``tables`` row."""
        media_rows = []
        for k, (value, caption, source) in enumerate(media):
            media_rows.append(_media_row(call, f"{name}#{k}", value, caption, source))
            self._stage_file(f"{name}#{k}", value)

        def insert() -> None:
            ids = [self._insert_media(row) for row in media_rows]
            resolved = [
                [{"$media": ids[c["$media"]]} if isinstance(c, dict) and "$media" in c else c for c in r] for r in rows
            ]
            self._db.execute(
                "INSERT INTO tables(name, rank, step, global_step, wall, columns, rows) VALUES (?,?,?,?,?,?,?)",
                (name, call.rank, call.step, call.global_step, call.wall, json.dumps(columns), json.dumps(resolved)),
            )

        self._sql_ops.append((f"record table {name!r}", insert))

    def stage_histogram(self, call: Call, name: str, precision: str, record: bytes) -> None:
        """Queue a histogram record (:func:`histogram_record`) for the column of ``call.rank``/``name``."""
        base = fmt.column_name(call.rank, name)

        def append() -> None:
            colname, col, fixed = self._hist_column(precision, base, len(record))
            if fixed:
                col.append_array(np.frombuffer(record, np.uint8).reshape(1, -1))
            else:  # a run written before fixed-size records: its bytes column
                col.append(record)
            self._dirty_columns[(fmt.HISTOGRAM_FILES[precision], colname)] = col
            self._unsynced.add(fmt.HISTOGRAM_FILES[precision])

        self._ops.append((f"append histogram {name!r}", append))

    def stage_tensor(
        self,
        call: Call,
        name: str,
        value: tuple[str, list[int], Any],
        namespace: Any = None,
        metadata: dict[str, Any] | None = None,
        source_dtype: str = "",
    ) -> None:
        """Queue a tensor (:func:`tensor_payload`) and its ``tensors`` row."""
        dtype, shape, data = value
        key = f"tensor/{call.client}/{call.seq}/{name}"

        def insert() -> None:
            self._db.execute(
                "INSERT INTO tensors(name, rank, step, global_step, wall, key, dtype, shape, namespace, metadata, source_dtype) "
                "VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                (
                    name,
                    call.rank,
                    call.step,
                    call.global_step,
                    call.wall,
                    key,
                    dtype,
                    json.dumps(shape),
                    namespace,
                    json.dumps(metadata or {}),
                    source_dtype,
                ),
            )

        self._ops.append((f"store tensor {name!r}", lambda: self._put_payload(key, data)))
        self._sql_ops.append((f"record tensor {name!r}", insert))

    def stage_kde(self, call: Call, name: str, value: tuple[Any, ...]) -> None:
        """Queue a KDE (:func:`kde_payload`) and its ``kde`` row."""
        grid_size, bandwidth, count, data = value
        key = f"kde/{call.client}/{call.seq}/{name}"

        def insert() -> None:
            self._db.execute(
                "INSERT INTO kde(name, rank, step, global_step, wall, key, grid_size, bandwidth, count) VALUES (?,?,?,?,?,?,?,?,?)",
                (name, call.rank, call.step, call.global_step, call.wall, key, grid_size, bandwidth, count),
            )

        self._ops.append((f"store KDE {name!r}", lambda: self._put_payload(key, data)))
        self._sql_ops.append((f"record KDE {name!r}", insert))

    # ------------------------------------------------------------ the files

    def _stage_file(self, name: str, value: MediaValue) -> None:
        self._ops.append((f"write media {name!r}", lambda: self._write_blob(value.digest, value.ext, value.data)))

    def _write_blob(self, digest: str, ext: str, data: Any) -> None:
        path = os.path.join(self.path, fmt.MEDIA_DIR, f"{digest}.{ext}")
        if os.path.exists(path):
            return  # content-addressed: identical bytes are stored once
        if not os.path.isdir(os.path.dirname(path)):
            fmt.makedirs(os.path.dirname(path))
            self._unsynced_dirs.add("")  # media/ itself is new
        # no half-written temporary is left behind (disk full)
        write_atomic(path, data, mode=None, fsync=self.durable)
        self._unsynced_dirs.add(fmt.MEDIA_DIR)  # the new name is synced before the commit

    def _insert_media(self, row: dict[str, Any]) -> int:
        cur = self._db.execute(
            "INSERT INTO media(name, rank, step, global_step, wall, media_type, hash, ext, size, width, height, caption, source) "
            "VALUES (:name, :rank, :step, :global_step, :wall, :media_type, :hash, :ext, :size, :width, :height, :caption, :source)",
            row,
        )
        assert cur.lastrowid is not None  # the row just inserted
        return cur.lastrowid

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

    def _kvault(self) -> Any:
        if self._kv is None:
            from kohakuvault import KVault

            fmt.makedirs(os.path.join(self.path, fmt.TENSORS_DIR))
            self._kv = KVault(os.path.join(self.path, fmt.TENSORS_DB), cache_kb=fmt.KVAULT_CACHE_KB)
            self._unsynced_dirs.update((fmt.DATA_DIR, fmt.TENSORS_DIR))  # the file and its WAL may be new
        return self._kv

    def _put_payload(self, key: str, data: Any) -> None:
        self._kvault().put(key, data)
        self._unsynced.add(fmt.TENSORS_DB)


def _media_row(call: Call, name: str, value: MediaValue, caption: str, source: Any) -> dict[str, Any]:
    return {
        "name": name,
        "rank": call.rank,
        "step": call.step,
        "global_step": call.global_step,
        "wall": call.wall,
        "media_type": value.media_type,
        "hash": value.digest,
        "ext": value.ext,
        "size": len(value.data),
        "width": value.width,
        "height": value.height,
        "caption": caption,
        "source": source,
    }
