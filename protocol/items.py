"""What a log item must be to be stored: one rule per value kind, checked twice.

A rich value (media, table, histogram, tensor, KDE) travels as one wire item
``[name, kind, meta, refs]`` plus blobs (see
:class:`~kohakuboard.protocol.messages.LogMessage`).  :func:`check_item` is the
whole validity rule of an item.  The client runs it on every item it encoded,
in ``log()``, so a value that cannot be stored raises there, naming its key;
the daemon runs it again on everything it receives (the socket is a trust
boundary) before any byte of the item is written.  An item that passes is one
the writer can store and a reader can read back: if the daemon fails to store
a valid item, that is a bug.

The rules, kind by kind (``ValueError`` otherwise, :class:`InvalidItem`):

* every array: a numeric dtype (bool, int, uint, float, complex; no objects),
  at most :data:`MAX_DIMS` dimensions, its blob exactly ``size * itemsize``
  bytes, at most :data:`MAX_BLOB_BYTES`.
* media: a name not ending in ``#<digits>`` (those name the cells of a table);
  ``caption`` a string; raw pixels ``(H, W, C)`` uint8 with ``C`` in 1, 3, 4,
  ``H, W >= 1`` and at most :data:`MAX_IMAGE_PIXELS` pixels; or encoded bytes
  (non-empty) with an alphanumeric ``ext`` of at most 8 characters,
  ``media_type`` image, video or audio, ``source`` a string or absent.
* table: ``columns`` a list of strings; ``rows`` lists of one cell per column;
  a cell is None, a bool, a 64-bit int, a float, a string, a list or string-keyed
  map of those (at most :data:`MAX_DEPTH` deep), or ``{"$media": k}`` naming
  entry ``k`` of ``media``, each a valid media item.
* histogram: ``precision`` exact or compact.  Raw values: 1-D real numbers,
  ``num_bins`` an integer in 1..:data:`MAX_BINS`.  Binned: finite float64 edges
  in non-decreasing order, one more edge than counts (or both empty), at most
  :data:`MAX_BINS` counts; counts whole numbers >= 0, each at most
  :data:`EXACT_COUNT_MAX` (int32) for exact and :data:`COMPACT_COUNT_MAX` (2**53)
  for compact, their sum (with the nan/posinf/neginf counts, integers >= 0)
  within int64.
* tensor: one array (any shape, 0-d included); ``namespace`` a string or None;
  ``metadata`` a string-keyed map; ``source_dtype`` a string.
* kde: raw values (1-D real numbers, ``grid_size`` 2..:data:`MAX_GRID`,
  ``bandwidth`` None or a finite number > 0), or precomputed ``grid`` and
  ``density`` of equal length (1..:data:`MAX_KDE_POINTS`), the grid finite.

numpy is imported when an item is checked, not when this module is imported
(the client imports it on its first rich value).
"""

from __future__ import annotations

import math
import re
from typing import Any

MAX_BLOB_BYTES = 256 << 20
MAX_DIMS = 32
MAX_IMAGE_PIXELS = 1 << 28
IMAGE_CHANNELS = (1, 3, 4)
MAX_BINS = 100_000
EXACT_COUNT_MAX = 2**31 - 1
COMPACT_COUNT_MAX = 2**53
MAX_GRID = 65536
MAX_KDE_POINTS = 1 << 20
MAX_DEPTH = 100
MEDIA_TYPES = ("image", "video", "audio")
PRECISIONS = ("exact", "compact")
_INT64_MAX = 2**63 - 1
_CELL_NAME = re.compile(r"#[0-9]+\Z")


class InvalidItem(ValueError):
    """An item that breaks its kind's rule (the message says which part and why)."""


def item_array(meta: Any, blobs: list[Any], refs: Any = None) -> Any:
    """The numpy array ``meta`` (``{"dtype", "shape", "ref"}``) describes, checked; no copy."""
    import numpy as np

    if type(meta) is not dict:
        raise InvalidItem("an array must be described by a map of dtype, shape and ref")
    spec = meta.get("dtype")
    try:
        if type(spec) is not str or len(spec) > 16:
            raise TypeError
        dtype = np.dtype(spec)
    except (TypeError, ValueError, SyntaxError):
        raise InvalidItem(f"unknown array dtype {spec!r:.40}") from None
    if dtype.kind not in "biufc" or dtype.hasobject or dtype.fields is not None or dtype.subdtype is not None:
        raise InvalidItem(f"unsupported array dtype {dtype}")
    shape = meta.get("shape")
    if type(shape) is not list or len(shape) > MAX_DIMS or any(type(x) is not int or x < 0 for x in shape):
        raise InvalidItem(f"array shape must be a list of at most {MAX_DIMS} integers >= 0, got {shape!r:.60}")
    ref = meta.get("ref")
    if type(ref) is not int or not 0 <= ref < len(blobs) or (refs is not None and ref not in refs):
        raise InvalidItem(f"array blob reference {ref!r:.20} is not one of the item's")
    n = math.prod(shape)
    raw = blobs[ref]
    if n * dtype.itemsize > MAX_BLOB_BYTES:
        raise InvalidItem(
            f"array of {n * dtype.itemsize} bytes is over the {MAX_BLOB_BYTES >> 20} MiB limit of one value"
        )
    if len(raw) != n * dtype.itemsize:
        raise InvalidItem(f"array blob has {len(raw)} bytes, expected {n * dtype.itemsize} for {dtype} {tuple(shape)}")
    return np.frombuffer(raw, dtype=dtype).reshape(shape) if n else np.zeros(shape, dtype)


def _text(value: Any, what: str) -> None:
    """A string that msgpack and JSON can carry (no lone surrogate)."""
    if type(value) is not str:
        raise InvalidItem(f"{what} must be a string, got {type(value).__name__}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidItem(f"{what} {value[:40]!r} is not valid Unicode (lone surrogate)") from None


def _real(arr: Any, what: str) -> Any:
    if arr.dtype.kind not in "biuf":
        raise InvalidItem(f"{what} must be real numbers, not {arr.dtype}")
    return arr


def _raw(blobs: list[Any], refs: Any, ref: Any) -> Any:
    if type(ref) is not int or not 0 <= ref < len(blobs) or (refs is not None and ref not in refs):
        raise InvalidItem(f"blob reference {ref!r:.20} is not one of the item's")
    return blobs[ref]


def check_media(name: str, meta: Any, blobs: list[Any], refs: Any = None, *, cell: bool = False) -> None:
    if not cell and _CELL_NAME.search(name):
        raise InvalidItem(
            f"media name {name!r} ends in '#<number>', which names a cell of table "
            f"{name[: name.rindex('#')]!r}; use another name (e.g. {name.replace('#', '_')!r})"
        )
    if type(meta) is not dict:
        raise InvalidItem("media meta must be a map")
    _text(meta.get("caption", ""), "media caption")
    encoding = meta.get("encoding")
    if encoding == "raw":
        px = item_array(meta, blobs, refs)
        if px.dtype.str != "|u1" or px.ndim != 3 or px.shape[2] not in IMAGE_CHANNELS:
            raise InvalidItem(f"raw image must be (H, W, C) uint8 with C in 1, 3, 4, got {px.dtype} {px.shape}")
        h, w = px.shape[:2]
        if h == 0 or w == 0 or h * w > MAX_IMAGE_PIXELS:
            raise InvalidItem(f"image of {h}x{w} pixels is empty or over the {MAX_IMAGE_PIXELS} pixel limit")
        return
    if encoding != "file":
        raise InvalidItem(f"media encoding must be 'raw' or 'file', got {encoding!r:.40}")
    data = _raw(blobs, refs, meta.get("ref"))
    if not len(data):
        raise InvalidItem("media bytes are empty")
    if len(data) > MAX_BLOB_BYTES:
        raise InvalidItem(f"media of {len(data)} bytes is over the {MAX_BLOB_BYTES >> 20} MiB limit")
    ext = meta.get("ext")
    if type(ext) is not str or not ext.isascii() or not ext.isalnum() or not 1 <= len(ext) <= 8:
        raise InvalidItem(f"media extension must be 1-8 letters or digits, got {ext!r:.40}")
    if meta.get("media_type") not in MEDIA_TYPES:
        raise InvalidItem(f"media_type must be one of {', '.join(MEDIA_TYPES)}, got {meta.get('media_type')!r:.40}")
    if meta.get("source") is not None:
        _text(meta.get("source"), "media source")


def _check_cell(value: Any, where: str, n_media: int | None, depth: int = 0) -> None:
    """A table cell (``n_media`` cells of media it may name) or, with None, tensor metadata."""
    t = type(value)
    if value is None or t is bool:
        return
    if t is str:
        _text(value, where)
        return
    if t is int:
        if not -(2**63) <= value <= _INT64_MAX:
            raise InvalidItem(f"{where} is an integer beyond 64 bits")
        return
    if t is float:
        return
    if depth >= MAX_DEPTH:
        raise InvalidItem(f"{where} nests deeper than {MAX_DEPTH} levels")
    if t is list:
        for i, v in enumerate(value):
            _check_cell(v, f"{where}[{i}]", n_media, depth + 1)
        return
    if t is dict:
        if depth == 0 and n_media is not None and "$media" in value:
            k = value["$media"]
            if len(value) != 1 or type(k) is not int or not 0 <= k < n_media:
                raise InvalidItem(f"{where} names media {k!r:.20}, which the table does not hold")
            return
        for k, v in value.items():
            if type(k) is not str:
                raise InvalidItem(f"{where} has a key that is not a string")
            _text(k, f"{where} key")
            _check_cell(v, f"{where}[{k!r:.40}]", n_media, depth + 1)
        return
    raise InvalidItem(f"{where} is a {t.__name__}, which a table cannot hold")


def check_table(name: str, meta: Any, blobs: list[Any], refs: Any = None) -> None:
    if type(meta) is not dict:
        raise InvalidItem("table meta must be a map")
    columns, rows, media = meta.get("columns"), meta.get("rows"), meta.get("media", [])
    if type(columns) is not list:
        raise InvalidItem("table columns must be a list of strings")
    for c in columns:
        _text(c, "table column name")
    if type(rows) is not list or type(media) is not list:
        raise InvalidItem("table rows and media must be lists")
    for k, mm in enumerate(media):
        try:
            check_media(f"{name}#{k}", mm, blobs, refs, cell=True)
        except InvalidItem as exc:
            raise InvalidItem(f"media cell {k}: {exc}") from None
    for i, row in enumerate(rows):
        if type(row) is not list or len(row) != len(columns):
            raise InvalidItem(f"table row {i} does not have one cell per column ({len(columns)})")
        for col, cell in zip(columns, row):
            _check_cell(cell, f"row {i}, column {col!r:.40}", len(media))


def _count_field(meta: dict[str, Any], key: str) -> int:
    v = meta.get(key, 0)
    if type(v) is not int or not 0 <= v <= _INT64_MAX:
        raise InvalidItem(f"histogram {key} count must be an integer >= 0, got {v!r:.40}")
    return v


def check_histogram(name: str, meta: Any, blobs: list[Any], refs: Any = None) -> None:
    import numpy as np

    if type(meta) is not dict:
        raise InvalidItem("histogram meta must be a map")
    precision = meta.get("precision", "exact")
    if precision not in PRECISIONS:
        raise InvalidItem(f"histogram precision must be 'exact' or 'compact', got {precision!r:.40}")
    outside = sum(_count_field(meta, k) for k in ("nan", "posinf", "neginf"))
    if not meta.get("binned"):
        num_bins = meta.get("num_bins", 64)
        if type(num_bins) is not int or not 1 <= num_bins <= MAX_BINS:
            raise InvalidItem(f"num_bins must be an integer in 1..{MAX_BINS}, got {num_bins!r:.40}")
        _real(item_array(meta.get("values"), blobs, refs), "histogram values")
        return
    edges = _real(item_array(meta.get("edges"), blobs, refs), "histogram bin edges").reshape(-1)
    counts = _real(item_array(meta.get("counts"), blobs, refs), "histogram counts").reshape(-1)
    if counts.size > MAX_BINS:
        raise InvalidItem(f"histogram has {counts.size} bins (limit {MAX_BINS})")
    if counts.size == 0 and edges.size:
        raise InvalidItem(f"histogram has {edges.size} bin edge(s) but no counts (an empty histogram has neither)")
    if counts.size and edges.size != counts.size + 1:
        raise InvalidItem(f"histogram has {edges.size} bin edges for {counts.size} counts (need counts + 1)")
    if edges.size:
        e = edges.astype(np.float64)
        if not np.all(np.isfinite(e)):
            raise InvalidItem("histogram bin edges must be finite")
        if np.any(e[1:] < e[:-1]):
            raise InvalidItem("histogram bin edges must be in increasing order")
    if counts.size:
        c = counts.astype(np.float64) if counts.dtype.kind == "f" else counts
        if c.dtype.kind == "f":
            if not np.all(np.isfinite(c)):
                raise InvalidItem("histogram counts must be finite")
            frac = np.flatnonzero(c != np.floor(c))
            if frac.size:
                raise InvalidItem(
                    f"histogram counts must be whole numbers; count {int(frac[0])} is {float(c[frac[0]])!r}"
                )
        if c.min() < 0:
            raise InvalidItem(f"histogram counts must be >= 0; count {int(np.argmin(c))} is {float(c.min())!r}")
        limit = EXACT_COUNT_MAX if precision == "exact" else COMPACT_COUNT_MAX
        if c.max() > limit:
            hint = " (int32); precision='compact' stores up to 2**53" if precision == "exact" else ""
            raise InvalidItem(
                f"histogram count {float(c.max()):.6g} (bin {int(np.argmax(c))}) is over {limit}, the largest a "
                f"{precision} histogram stores{hint}"
            )
        total = float(np.sum(c, dtype=np.float64)) + outside
        if total >= 2.0**63:
            raise InvalidItem(f"histogram counts sum to {total:.6g}, beyond what a histogram stores")


def check_tensor(name: str, meta: Any, blobs: list[Any], refs: Any = None) -> None:
    if type(meta) is not dict:
        raise InvalidItem("tensor meta must be a map")
    item_array(meta.get("array"), blobs, refs)
    if meta.get("namespace") is not None:
        _text(meta.get("namespace"), "tensor namespace")
    md = meta.get("metadata") or {}
    if type(md) is not dict:
        raise InvalidItem("tensor metadata must be a map")
    _check_cell(md, "tensor metadata", None)
    _text(meta.get("source_dtype", ""), "tensor source_dtype")


def check_kde(name: str, meta: Any, blobs: list[Any], refs: Any = None) -> None:
    import numpy as np

    if type(meta) is not dict:
        raise InvalidItem("KDE meta must be a map")
    if meta.get("precomputed"):
        grid = _real(item_array(meta.get("grid"), blobs, refs), "KDE grid").reshape(-1)
        density = _real(item_array(meta.get("density"), blobs, refs), "KDE density").reshape(-1)
        if grid.size != density.size:
            raise InvalidItem(f"KDE grid has {grid.size} points but density has {density.size}")
        if not 1 <= grid.size <= MAX_KDE_POINTS:
            raise InvalidItem(f"KDE grid must have 1..{MAX_KDE_POINTS} points, got {grid.size}")
        if not np.all(np.isfinite(grid.astype(np.float64))):
            raise InvalidItem("KDE grid points must be finite")
        return
    size = meta.get("grid_size", 256)
    if type(size) is not int or not 2 <= size <= MAX_GRID:
        raise InvalidItem(f"grid_size must be an integer in 2..{MAX_GRID}, got {size!r:.40}")
    bw = meta.get("bandwidth")
    if bw is not None and (type(bw) not in (int, float) or not math.isfinite(bw) or bw <= 0):
        raise InvalidItem(f"bandwidth must be None or a finite number > 0, got {bw!r:.40}")
    _real(item_array(meta.get("values"), blobs, refs), "KDE values")


CHECKS = {
    "media": check_media,
    "table": check_table,
    "histogram": check_histogram,
    "tensor": check_tensor,
    "kde": check_kde,
}


def check_call_size(items: list[Any], blobs: list[Any]) -> None:
    """Raise :class:`InvalidItem` if one ``log()`` call's items exceed what one message may carry
    (the limits :mod:`.codec` enforces when the daemon decodes it): frames, bytes, header size."""
    import msgpack

    from . import codec

    if len(blobs) + 1 > codec.MAX_FRAMES:
        raise InvalidItem(
            f"the call carries {len(blobs)} arrays or files, more than the {codec.MAX_FRAMES - 1} "
            "one log() call may carry; split them over several calls"
        )
    total = sum(len(b) for b in blobs)
    if total > codec.MAX_MESSAGE_BYTES - codec.MAX_HEADER_BYTES:
        raise InvalidItem(
            f"the call carries {total} bytes, more than one log() call may carry "
            f"({(codec.MAX_MESSAGE_BYTES - codec.MAX_HEADER_BYTES) >> 20} MiB); split it over several calls"
        )
    header = len(msgpack.packb(items, use_bin_type=True))
    if header > codec.MAX_HEADER_BYTES - (64 << 10):
        raise InvalidItem(
            f"the call's tables, captions and metadata take {header} bytes, more than the "
            f"{codec.MAX_HEADER_BYTES >> 20} MiB one log() call may carry; split them over several calls"
        )


def check_item(item: Any, blobs: list[Any]) -> None:
    """Raise :class:`InvalidItem` unless ``item`` (``[name, kind, meta, refs]``) may be stored."""
    if type(item) is not list or len(item) != 4:
        raise InvalidItem("a log item must be [name, kind, meta, refs]")
    name, kind, meta, refs = item
    if type(name) is not str or not name or any(ord(c) < 32 for c in name):
        raise InvalidItem(f"item name {name!r:.40} must be a non-empty string without control characters")
    check = CHECKS.get(kind) if type(kind) is str else None
    if check is None:
        raise InvalidItem(f"unknown item kind {kind!r:.40}")
    if type(refs) is not list:
        raise InvalidItem("item refs must be a list")
    check(name, meta, blobs, set(refs))
