"""The rich value types users log: Media, Table, Histogram, TensorLog, KernelDensity.

Constructors only remember what they were given (and check cheap parameters);
the data is converted and copied when ``board.log()`` is called, so that an
error names the key it was logged under, and so that what is stored is what the
data held at the call.  Each type turns itself into one wire item
``[name, kind, meta, refs]`` plus binary blobs (see
:class:`kohakuboard.protocol.messages.LogMessage`).  The client does no PNG
encoding, no binning of raw values and no density estimation: the daemon does
that work, off its event loop.
"""

from __future__ import annotations

import os
from typing import Any

_MEDIA_TYPES = ("image", "video", "audio", "auto")
_PRECISIONS = ("exact", "compact")
MAX_BLOB_BYTES = 256 << 20


def _refuse_unknown(cls_name: str, unknown: dict[str, Any], known: tuple[str, ...], extra: str = "") -> None:
    """Raise ``TypeError`` naming the first unknown keyword argument (and the closest known one)."""
    if not unknown:
        return
    import difflib

    key = next(iter(unknown))
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    hint = f"did you mean {close[0]!r}?" if close else f"it takes {', '.join(known)}"
    raise TypeError(f"{cls_name}() got an unknown keyword argument {key!r} ({hint}){extra}")


def _array_blob(arr: Any, blobs: list[Any]) -> dict[str, Any]:
    """Append a C-contiguous array's buffer to ``blobs``; return its dtype/shape meta."""
    if arr.nbytes > MAX_BLOB_BYTES:
        raise ValueError(f"array of {arr.nbytes} bytes is over the {MAX_BLOB_BYTES >> 20} MiB limit of one value")
    blobs.append(memoryview(arr.reshape(-1).view("u1")) if arr.size else b"")
    return {"dtype": arr.dtype.str, "shape": list(arr.shape), "ref": len(blobs) - 1}


class Media:
    """An image, video or audio clip.

    ``Media(data, caption="", media_type="image"|"video"|"audio"|"auto")``.
    Images: numpy arrays (HWC, CHW or grayscale; uint8, or float in [0, 1],
    clipped), PIL images, torch tensors (any device, bf16), a file path or
    encoded bytes.  Video and audio: a file path or bytes.  Files are read when
    logged.
    """

    __slots__ = ("data", "caption", "media_type")

    def __init__(self, data: Any, caption: str | None = "", media_type: str = "auto", **unknown: Any) -> None:
        _refuse_unknown("Media", unknown, ("data", "caption", "media_type"))
        if caption is None:
            caption = ""
        if media_type not in _MEDIA_TYPES:
            raise ValueError(f"media_type must be one of {', '.join(_MEDIA_TYPES)}, got {media_type!r}")
        if not isinstance(caption, str):
            raise TypeError(f"caption must be a string, got {type(caption).__name__}")
        self.data = data
        self.caption = caption
        self.media_type = media_type

    def __repr__(self) -> str:
        return f"Media({type(self.data).__name__}, media_type={self.media_type!r}, caption={self.caption!r})"

    def _encode(self, blobs: list[Any]) -> dict[str, Any]:
        from ._convert import image_to_hwc_uint8, media_type_from_path, sniff_media

        data = self.data
        meta: dict[str, Any] = {"caption": self.caption}
        if isinstance(data, (str, os.PathLike)):
            path = os.fspath(data)
            if not os.path.isfile(path):
                raise FileNotFoundError(f"media file {path!r} does not exist")
            kind, ext = media_type_from_path(path)
            with open(path, "rb") as f:
                raw = f.read(MAX_BLOB_BYTES + 1)
            if len(raw) > MAX_BLOB_BYTES:
                raise ValueError(f"media file {path!r} is over the {MAX_BLOB_BYTES >> 20} MiB limit")
            if not raw:
                raise ValueError(f"media file {path!r} is empty (0 bytes): nothing to log")
            meta.update(encoding="file", ext=ext, source=os.path.basename(path))
        elif isinstance(data, (bytes, bytearray, memoryview)):
            raw = bytes(data)
            if not raw:
                raise ValueError("media bytes are empty")
            kind, ext = sniff_media(raw)
            meta.update(encoding="file", ext=ext)
        else:
            if self.media_type not in ("image", "auto"):
                raise TypeError(f"{self.media_type} must be given as a file path or bytes, not {type(data).__name__}")
            hwc = image_to_hwc_uint8(data)
            meta.update(encoding="raw", **_array_blob(hwc, blobs))
            meta["media_type"] = "image"
            return meta
        if self.media_type != "auto" and kind != self.media_type:
            raise ValueError(f"media_type={self.media_type!r} but the data is {kind} ({ext})")
        blobs.append(raw)
        meta["ref"] = len(blobs) - 1
        meta["media_type"] = kind
        return meta


class Table:
    """Rows of cells: ``Table(list_of_dicts)`` or ``Table(columns=[...], rows=[[...], ...])``.

    With dicts, columns are the union of keys in order of first appearance and a
    missing key is None.  Cells may be numbers, strings, bools, None, numpy
    scalars or :class:`Media`.
    """

    __slots__ = ("columns", "rows")

    def __init__(self, data: Any = None, *, columns: Any = None, rows: Any = None, **unknown: Any) -> None:
        _refuse_unknown("Table", unknown, ("data", "columns", "rows"))
        if data is not None and (columns is not None or rows is not None):
            raise TypeError("pass either a list of dicts or columns= and rows=, not both")
        if data is not None:
            if isinstance(data, dict):
                raise TypeError("Table(dict) is ambiguous: pass a list of dicts, or columns= and rows=")
            data = list(data)
            cols: dict[str, None] = {}
            for i, row in enumerate(data):
                if not isinstance(row, dict):
                    raise TypeError(f"Table row {i} is a {type(row).__name__}, expected a dict")
                for k in row:
                    cols.setdefault(str(k), None)
            self.columns = list(cols)
            self.rows = [[row.get(c) for c in self.columns] for row in data]
        else:
            self.columns = [str(c) for c in (columns or [])]
            self.rows = [list(r) for r in (rows or [])]
            for i, r in enumerate(self.rows):
                if len(r) != len(self.columns):
                    raise ValueError(f"Table row {i} has {len(r)} cells for {len(self.columns)} columns")

    def __repr__(self) -> str:
        return f"Table({len(self.rows)} rows x {len(self.columns)} columns)"

    def _encode(self, blobs: list[Any]) -> dict[str, Any]:
        from ._values import to_config

        media: list[dict[str, Any]] = []
        out_rows = []
        for i, row in enumerate(self.rows):
            out = []
            for col, cell in zip(self.columns, row):
                if isinstance(cell, Media):
                    try:
                        media.append(cell._encode(blobs))
                    except (TypeError, ValueError, OSError) as exc:
                        raise type(exc)(f"row {i}, column {col!r}: {exc}") from None
                    out.append({"$media": len(media) - 1})
                else:
                    out.append(to_config(cell, f"row {i}, column {col!r}"))
            out_rows.append(out)
        return {"columns": self.columns, "rows": out_rows, "media": media}


class Histogram:
    """A distribution: ``Histogram(values, num_bins=64, precision="exact"|"compact")``.

    Or precomputed: ``Histogram(bins=edges, counts=counts)`` (``len(bins) ==
    len(counts) + 1``).  Raw values are binned by the daemon over their full
    finite range; NaN and +-inf are counted apart.  ``compute_bins()`` bins in
    this process instead (smaller messages; the daemon's algorithm, so the
    same edges and counts) and returns ``self``.
    ``precision="compact"`` stores uint8 counts (~75 % smaller, ~1 % error).
    """

    __slots__ = ("values", "num_bins", "precision", "bins", "counts", "_stats")

    def __init__(
        self,
        values: Any = None,
        num_bins: int = 64,
        precision: str = "exact",
        *,
        bins: Any = None,
        counts: Any = None,
        **unknown: Any,
    ) -> None:
        _refuse_unknown("Histogram", unknown, ("values", "num_bins", "precision", "bins", "counts"))
        if precision not in _PRECISIONS:
            raise ValueError(f"precision must be 'exact' or 'compact', got {precision!r}")
        if isinstance(num_bins, bool) or not isinstance(num_bins, int) or not 1 <= num_bins <= 100_000:
            raise ValueError(f"num_bins must be an integer in 1..100000, got {num_bins!r}")
        if (bins is None) != (counts is None):
            raise TypeError("pass both bins= and counts=, or raw values")
        if values is not None and bins is not None:
            raise TypeError("pass raw values or bins=/counts=, not both")
        self.values = values
        self.num_bins = num_bins
        self.precision = precision
        self.bins = bins
        self.counts = counts
        self._stats: dict[str, int] = {}

    def _no_values(self) -> None:
        if self.values is None and self.bins is None:
            raise TypeError("Histogram(None) has no values (a gradient before backward()?)")

    def compute_bins(self) -> Histogram:
        """Bin the raw values now, in this process; return ``self``.

        The daemon's own binning (``protocol.binning.bin_histogram``): the same
        edges and counts as when the daemon bins them.
        """
        self._no_values()
        if self.bins is None:
            from ._convert import _as_array

            arr, _ = _as_array(self.values if self.values is not None else [])
            self._bin(arr)
        return self

    def _bin(self, arr: Any) -> None:
        from ..protocol.binning import bin_histogram

        if arr.dtype.kind not in "biuf":
            raise TypeError(f"histogram values must be numbers, not {arr.dtype}")
        h = bin_histogram(arr.reshape(-1), self.num_bins)
        self._stats = {"nan": h["nan"], "posinf": h["posinf"], "neginf": h["neginf"]}
        self.bins, self.counts = h["edges"], h["counts"]
        self.values = None

    def __repr__(self) -> str:
        state = "binned" if self.bins is not None else "raw"
        return f"Histogram({state}, num_bins={self.num_bins}, precision={self.precision!r})"

    def _encode(self, blobs: list[Any]) -> dict[str, Any]:
        import numpy as np

        from ._convert import to_numpy

        self._no_values()
        meta: dict[str, Any] = {"precision": self.precision, "num_bins": self.num_bins}
        if self.bins is not None:
            edges = to_numpy(self.bins).astype(np.float64).reshape(-1)
            counts = to_numpy(self.counts).reshape(-1)
            if counts.dtype.kind not in "biuf":
                raise TypeError(f"histogram counts must be numbers, not {counts.dtype}")
            # edges, counts and their agreement: protocol.items.check_histogram
            meta["binned"] = True
            meta.update(self._stats)
            meta["edges"] = _array_blob(np.ascontiguousarray(edges), blobs)
            meta["counts"] = _array_blob(np.ascontiguousarray(counts.astype(np.float64)), blobs)
            return meta
        arr = to_numpy(self.values if self.values is not None else [])
        if arr.dtype.kind not in "biuf":
            raise TypeError(f"histogram values must be numbers, not {arr.dtype}")
        if arr.dtype.kind != "f" or arr.dtype.itemsize > 8:
            arr = arr.astype(np.float64)
        meta["binned"] = False
        meta["values"] = _array_blob(np.ascontiguousarray(arr.reshape(-1)), blobs)
        return meta


class TensorLog:
    """A whole array, stored once and read back bit-exact with its dtype and shape.

    ``TensorLog(tensor, namespace=None, metadata=None, precision=None)``;
    ``precision`` ("float16", "float32", ...) casts before storing.
    """

    __slots__ = ("tensor", "namespace", "metadata", "precision")

    def __init__(
        self,
        tensor: Any,
        namespace: str | None = None,
        metadata: dict[str, Any] | None = None,
        precision: str | None = None,
        **unknown: Any,
    ) -> None:
        _refuse_unknown("TensorLog", unknown, ("tensor", "namespace", "metadata", "precision"))
        if namespace is not None and not isinstance(namespace, str):
            raise TypeError("namespace must be a string")
        if metadata is not None and not isinstance(metadata, dict):
            raise TypeError("metadata must be a dict")
        self.tensor = tensor
        self.namespace = namespace
        self.metadata = metadata
        self.precision = precision

    def __repr__(self) -> str:
        return f"TensorLog({type(self.tensor).__name__}, namespace={self.namespace!r})"

    def _encode(self, blobs: list[Any]) -> dict[str, Any]:
        import numpy as np

        from ._convert import to_numpy
        from ._values import to_config

        if self.tensor is None:
            raise TypeError("TensorLog(None) has no tensor")
        source_dtype = str(getattr(self.tensor, "dtype", ""))
        arr = to_numpy(self.tensor)
        if arr.dtype.kind not in "biufc":
            raise TypeError(f"TensorLog needs a numeric array, not {arr.dtype}")
        if self.precision is not None:
            try:
                arr = arr.astype(np.dtype(self.precision))
            except TypeError:
                raise ValueError(f"unknown precision {self.precision!r} (use a numpy dtype name)") from None
        if not arr.flags.c_contiguous:
            arr = np.array(arr, order="C")  # (np.ascontiguousarray would make a 0-d array 1-d)
        meta = _array_blob(arr, blobs)
        return {
            "array": meta,
            "namespace": self.namespace,
            "metadata": to_config(self.metadata or {}, "metadata"),
            "source_dtype": source_dtype,
        }


class KernelDensity:
    """A kernel density estimate.

    ``KernelDensity(values=..., grid_size=256, bandwidth=None)`` (the daemon
    estimates it with a Gaussian kernel over the full finite range of the
    values; ``raw_values=`` and ``num_points=`` are aliases of ``values=`` and
    ``grid_size=``; ``bandwidth`` None, ``"auto"`` or ``"scott"`` is Scott's
    rule; ``kernel`` may only be ``"gaussian"``), or precomputed
    ``KernelDensity(grid=..., density=...)``.  Other keyword arguments of
    KohakuBoard's ``KernelDensity`` (``range_min``, ``percentile_min``, ...)
    raise ``TypeError``.
    """

    __slots__ = ("values", "grid_size", "bandwidth", "grid", "density")

    def __init__(
        self,
        values: Any = None,
        grid_size: int | None = None,
        bandwidth: float | None = None,
        *,
        grid: Any = None,
        density: Any = None,
        raw_values: Any = None,
        num_points: int | None = None,
        kernel: str = "gaussian",
        **unknown: Any,
    ) -> None:
        _refuse_unknown(
            "KernelDensity",
            unknown,
            ("values", "grid_size", "bandwidth", "grid", "density", "raw_values", "num_points", "kernel"),
            "; the daemon estimates the density over the full finite range of the values",
        )
        if kernel != "gaussian":
            raise ValueError(f"kernel must be 'gaussian' (the only kernel the daemon computes), got {kernel!r}")
        if isinstance(bandwidth, str) and bandwidth.lower() in ("auto", "scott"):
            bandwidth = None
        if values is not None and raw_values is not None:
            raise TypeError("pass values= or raw_values=, not both")
        if grid_size is not None and num_points is not None and grid_size != num_points:
            raise TypeError("pass grid_size= or num_points=, not both")
        values = values if values is not None else raw_values
        size = grid_size if grid_size is not None else (num_points if num_points is not None else 256)
        if (grid is None) != (density is None):
            raise TypeError("pass both grid= and density=, or raw values")
        if values is None and grid is None:
            raise TypeError("KernelDensity needs values= (or raw_values=) or grid= and density=")
        if values is not None and grid is not None:
            raise TypeError("pass raw values or grid=/density=, not both")
        if isinstance(size, bool) or not isinstance(size, int) or not 2 <= size <= 65536:
            raise ValueError(f"grid_size must be an integer in 2..65536, got {size!r}")
        if bandwidth is not None and not (isinstance(bandwidth, (int, float)) and bandwidth > 0):
            raise ValueError(f"bandwidth must be a positive number, got {bandwidth!r}")
        self.values = values
        self.grid_size = size
        self.bandwidth = bandwidth
        self.grid = grid
        self.density = density

    def __repr__(self) -> str:
        return f"KernelDensity({'grid' if self.grid is not None else 'raw'}, grid_size={self.grid_size})"

    def _encode(self, blobs: list[Any]) -> dict[str, Any]:
        import numpy as np

        from ._convert import to_numpy

        if self.grid is not None:
            grid = to_numpy(self.grid).astype(np.float64).reshape(-1)
            density = to_numpy(self.density).astype(np.float64).reshape(-1)
            return {"precomputed": True, "grid": _array_blob(grid, blobs), "density": _array_blob(density, blobs)}
        arr = to_numpy(self.values)
        if arr.dtype.kind not in "biuf":
            raise TypeError(f"KDE values must be numbers, not {arr.dtype}")
        if arr.dtype.kind != "f":
            arr = arr.astype(np.float64)
        return {
            "precomputed": False,
            "grid_size": self.grid_size,
            "bandwidth": self.bandwidth,
            "values": _array_blob(np.ascontiguousarray(arr.reshape(-1)), blobs),
        }


RICH_KINDS: dict[type, str] = {
    Media: "media",
    Table: "table",
    Histogram: "histogram",
    TensorLog: "tensor",
    KernelDensity: "kde",
}
