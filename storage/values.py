"""The CPU work behind stored rich values: PNG encoding, image sizes, compact counts, KDE.

Pure functions of numpy arrays and bytes, safe to call from worker threads
(no global state is changed): the daemon runs them on its compute pool for the
values clients send raw (see :mod:`kohakuboard.client._convert`; the client
does none of this work).  Histogram binning, which the training process may do
too (``Histogram.compute_bins()``), is :mod:`kohakuboard.protocol.binning`.
Pillow is imported only where it is used.

Hostile or degenerate input (NaN, +-inf, values near the float64 limits,
all-equal samples, huge arrays) never crashes or silently drops data: non-finite
values are counted apart, and degenerate ranges are widened just enough to stay
representable.
"""

from __future__ import annotations

import io
import math
import struct
import warnings
import zlib
from collections.abc import Iterator
from typing import Any

import numpy as np

from ..protocol.binning import check_numeric, finite_range

# --------------------------------------------------------------------- images

PNG_COMPRESS_LEVEL = 1
PNG_STRATEGY = zlib.Z_RLE
_PNG_MODES = {1: "L", 3: "RGB", 4: "RGBA"}
_PNG_COLOR_TYPES = {1: 0, 3: 2, 4: 6}  # greyscale, truecolour, truecolour with alpha
_SIZE_FORMATS = ("PNG", "JPEG", "GIF", "WEBP", "BMP", "AVIF", "TIFF")
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(data, zlib.crc32(kind)))


def encode_png(hwc: np.ndarray) -> bytes:
    """Encode an ``(H, W, C)`` uint8 array (C = 1 -> L, 3 -> RGB, 4 -> RGBA) as PNG.

    Deterministic: the same pixels always give byte-identical output (no
    timestamps or metadata), so content hashing dedups repeated images.  A 2-D
    array is taken as grayscale.

    The PNG is written here rather than by Pillow: every row gets the "Sub"
    filter (each byte minus the byte of the pixel to its left, one numpy
    subtraction for the whole image) and the filtered rows go through zlib at
    level 1 with the run-length strategy (``Z_RLE``), in one ``zlib.compress``
    call that releases the GIL, so several images encode at once on the
    daemon's compute pool.  Pillow tries all five filters per row and holds
    the GIL in between.  Chosen by measurement (``bench/bench_png.py``, README
    "Rich values"), 256x256 RGB against Pillow's level 1: photographs ~2.9x
    faster for output 3-9 % larger, a rendered scene 4.5x faster and 12 %
    smaller, uniform noise 6.5x faster at the same size; a flat chart 2.9x
    faster but twice the size (9 KiB against 5: the run-length strategy finds
    no long matches; still small).  Pillow's default level 6 is 0.4x the speed
    of level 1 for output 8-13 % smaller.
    """
    arr = np.asarray(hwc)
    if arr.dtype != np.uint8:
        raise TypeError(f"encode_png needs uint8 pixels, got {arr.dtype}")
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[2] not in _PNG_MODES:
        raise ValueError(f"encode_png needs an (H, W, C) array with C in 1, 3, 4; got shape {arr.shape}")
    h, w, c = arr.shape
    if h == 0 or w == 0:
        raise ValueError(f"cannot encode an empty {h}x{w} image")
    if h > 0x7FFFFFFF or w > 0x7FFFFFFF:
        raise ValueError(f"image of {h}x{w} is too large for a PNG")
    x = arr.reshape(h, w * c)  # a view when the pixels are contiguous; numpy copies otherwise
    raw = np.empty((h, w * c + 1), np.uint8)
    raw[:, 0] = 1  # filter type 1: Sub
    raw[:, 1 : c + 1] = x[:, :c]
    np.subtract(x[:, c:], x[:, :-c], out=raw[:, c + 1 :])  # uint8 arithmetic wraps mod 256, as PNG wants
    z = zlib.compressobj(PNG_COMPRESS_LEVEL, zlib.DEFLATED, 15, 8, PNG_STRATEGY)
    idat = z.compress(raw.data) + z.flush()
    header = struct.pack(">IIBBBBB", w, h, 8, _PNG_COLOR_TYPES[c], 0, 0, 0)
    return b"".join((_PNG_SIGNATURE, _png_chunk(b"IHDR", header), _png_chunk(b"IDAT", idat), _png_chunk(b"IEND", b"")))


def encode_png_pillow(hwc: np.ndarray, level: int = 1) -> bytes:
    """Pillow's PNG encoder (the one :func:`encode_png` replaced): the benchmarks' baseline."""
    from PIL import Image

    arr = np.ascontiguousarray(hwc)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    mode = _PNG_MODES[arr.shape[2]]
    im = Image.frombuffer(mode, (arr.shape[1], arr.shape[0]), arr, "raw", mode, 0, 1)
    out = io.BytesIO()
    im.save(out, format="PNG", compress_level=level, optimize=False)
    return out.getvalue()


def image_size(data: bytes) -> tuple[int, int] | None:
    """``(width, height)`` of an encoded image, or None if PIL cannot identify it.

    Only the header is parsed (PIL opens lazily); only the formats the client
    can send (PNG, JPEG, GIF, WebP, BMP, AVIF, TIFF) are tried, so no exotic
    parser sees hostile bytes.  Images beyond PIL's decompression-bomb limit
    (about 179 Mpx) give None.
    """
    from PIL import Image

    Image.init()
    formats = [f for f in _SIZE_FORMATS if f in Image.OPEN]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(bytes(data)), formats=formats) as im:
                w, h = im.size
    except Exception:  # UnidentifiedImageError, truncated headers, DecompressionBombError, ...
        return None
    if w <= 0 or h <= 0:
        return None
    return int(w), int(h)


# ----------------------------------------------------------------- histograms


def compact_counts(counts: np.ndarray) -> tuple[np.ndarray, float]:
    """Scale histogram counts to uint8 (max -> 255); return ``(u8, scale)``.

    ``restore_counts(u8, scale)`` gives ``u8 * scale``, within ``scale / 2`` of
    each count (about 0.2 % of the largest count).  Rounded, except that a
    nonzero count never becomes 0 (it stays >= 1).  All-zero or empty counts
    give ``scale == 1.0``.  Raises ``ValueError`` for negative or non-finite
    counts.
    """
    c = np.asarray(counts).reshape(-1)
    if c.dtype.kind not in "biuf":
        raise TypeError(f"counts must be numbers, not {c.dtype}")
    if c.size == 0:
        return np.zeros(0, np.uint8), 1.0
    c = c.astype(np.float64)
    if not np.all(np.isfinite(c)) or c.min() < 0:
        raise ValueError("histogram counts must be finite and >= 0")
    peak = float(c.max())
    if peak == 0:
        return np.zeros(c.size, np.uint8), 1.0
    scale = peak / 255.0
    u8 = np.clip(np.rint(c * (255.0 / peak)), 0, 255).astype(np.uint8)
    u8[(u8 == 0) & (c > 0)] = 1
    return u8, scale


def restore_counts(u8: np.ndarray, scale: float) -> np.ndarray:
    """Approximate counts from :func:`compact_counts` output: ``u8 * scale`` as float64."""
    return np.asarray(u8).reshape(-1).astype(np.float64) * float(scale)


# ------------------------------------------------------------------------ KDE

MAX_GRID = 65536
_MAX_FINE = 1 << 19  # fine binning grid points, at most
_FINE_PER_BW = 8  # fine grid spacing <= bandwidth / 8
_KERNEL_SIGMAS = 4.0
_KDE_CHUNK = 1 << 16
_MIN_SPAN = 2.0**-33  # in units where max|x| is in [0.5, 1): keeps 65536 grid points distinct


def _chunks(a: np.ndarray, exp: int, finite_only: bool) -> Iterator[np.ndarray]:
    """float64 chunks of ``a``, scaled by ``2**-exp`` (exact), non-finite values removed."""
    for i in range(0, a.size, _KDE_CHUNK):
        c = a[i : i + _KDE_CHUNK].astype(np.float64)
        if finite_only:
            c = c[np.isfinite(c)]
        if c.size:
            yield np.ldexp(c, -exp, out=c)


def _convolve(x: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """``x`` convolved with a symmetric odd-length ``kernel``, same length as ``x``."""
    m, half = x.size, kernel.size // 2
    if m * kernel.size <= 4_000_000:
        full = np.convolve(x, kernel)
    else:
        n = m + kernel.size - 1
        nfft = 1 << (n - 1).bit_length()
        full = np.fft.irfft(np.fft.rfft(x, nfft) * np.fft.rfft(kernel, nfft), nfft)[:n]
        np.maximum(full, 0.0, out=full)  # FFT round-off can dip below zero
    return full[half : half + m]


def kde(values: np.ndarray, grid_size: int = 256, bandwidth: float | None = None) -> dict[str, Any]:
    """Gaussian kernel density estimate of ``values`` on ``grid_size`` even points.

    Returns ``{"grid": float64[grid_size], "density": float64[grid_size],
    "bandwidth": float, "count": int, "dropped": int}``.  ``bandwidth`` defaults
    to Scott's rule ``1.06 * std * n ** (-1/5)`` (population std); when all
    values are equal (std 0, or one value) it is 1/6, so the grid spans
    ``v +- 0.5`` like :func:`bin_histogram`.  The grid spans ``[min - 3 bw,
    max + 3 bw]``; the density integrates to ~1 over it by the trapezoid rule
    (the kernel tails beyond 3 bw of the extremes are cut off).  NaN and +-inf
    are left out and counted in ``dropped``; ``count`` is the number of finite
    values used.  No finite value -> empty grid and density (``bandwidth`` is
    the one given, else 0.0).

    Method (as in statsmodels/KDEpy "FFT KDE"): samples are linearly binned on
    a fine grid (spacing <= bw / 8, at most 2**19 points) that contains the
    output grid, then convolved with a sampled Gaussian cut at 4 bw (directly,
    or by FFT when large).  Memory is O(fine grid + 256 Ki values), never
    samples x grid (peak ~3 MB).  1,000,000 float32 samples, measured: ~10 ms
    at grid_size 256, ~18 ms at 65536, ~19 ms for float64 with NaNs.  If a few far outliers
    make the grid spacing wider than the bandwidth, point values would miss
    the narrow peaks entirely, so each density value is then the mean density
    over its grid cell (keeping the mass visible and the integral near 1).
    A bandwidth too small for distinct grid points is raised to the smallest
    that is; near the float64 limits the grid stops at +-max float64 (and a
    bandwidth is at most that), so every finite input gets a finite result.

    Raises ``ValueError`` unless ``2 <= grid_size <= 65536`` and ``bandwidth``
    is None or a finite number > 0; ``TypeError`` for non-numeric values.
    """
    if isinstance(grid_size, bool) or not isinstance(grid_size, (int, np.integer)) or not 2 <= grid_size <= MAX_GRID:
        raise ValueError(f"grid_size must be an integer in 2..{MAX_GRID}, got {grid_size!r}")
    g = int(grid_size)
    if bandwidth is not None:
        if isinstance(bandwidth, bool) or not isinstance(bandwidth, (int, float, np.integer, np.floating)):
            raise ValueError(f"bandwidth must be a positive number, got {bandwidth!r}")
        bandwidth = float(bandwidth)
        if not (math.isfinite(bandwidth) and bandwidth > 0):
            raise ValueError(f"bandwidth must be a finite number > 0, got {bandwidth!r}")
    a = check_numeric(np.asarray(values).reshape(-1), "KDE")
    lo, hi, nan, posinf, neginf = finite_range(a)
    dropped = nan + posinf + neginf
    n = a.size - dropped
    if n == 0:
        return {
            "grid": np.zeros(0, np.float64),
            "density": np.zeros(0, np.float64),
            "bandwidth": bandwidth if bandwidth is not None else 0.0,
            "count": 0,
            "dropped": dropped,
        }
    finite_only = dropped > 0

    # Work in units where max|x| is in [0.5, 1): exact (power of two), and no
    # overflow in squares or spans whatever the magnitude of the data.
    amax = max(abs(lo), abs(hi))
    exp = int(np.frexp(amax)[1]) if amax > 0 else 0
    lo_s, hi_s = math.ldexp(lo, -exp), math.ldexp(hi, -exp)

    if bandwidth is None:
        mean, m2, k = 0.0, 0.0, 0
        for c in _chunks(a, exp, finite_only):  # Chan et al. pairwise mean/variance
            cm = float(c.mean())
            d = c - cm
            cm2 = float(d @ d)
            tot = k + c.size
            delta = cm - mean
            mean += delta * c.size / tot
            m2 += cm2 + delta * delta * k * c.size / tot
            k = tot
        std = math.sqrt(max(m2, 0.0) / n)
        bw = 1.06 * std * n**-0.2 if std > 0 else math.ldexp(1.0 / 6.0, -exp)
    else:
        try:
            bw = math.ldexp(bandwidth, -exp)
        except OverflowError:  # a bandwidth beyond any grid of these values: capped below
            bw = math.inf
    # The largest float64 in these units: the grid (and a given bandwidth) are
    # kept within it, so values near the float64 limits still get a finite grid.
    fmax = float(np.finfo(np.float64).max)
    limit = math.ldexp(fmax, -exp) if exp > 4 else fmax / 16
    bw = min(bw, limit)
    if (hi_s - lo_s) + 6 * bw < _MIN_SPAN:
        bw = (_MIN_SPAN - (hi_s - lo_s)) / 6

    start = max(lo_s - 3 * bw, -limit)
    stop = min(hi_s + 3 * bw, limit)
    step_out = (stop - start) / (g - 1)
    k_fine = max(1, min(math.ceil(step_out / (bw / _FINE_PER_BW)), max(1, _MAX_FINE // (g - 1))))
    m = (g - 1) * k_fine + 1
    step = step_out / k_fine

    binned = np.zeros(m, np.float64)
    for c in _chunks(a, exp, finite_only):  # linear binning
        pos = c - start
        pos /= step
        idx = np.floor(pos).astype(np.intp)
        np.clip(idx, 0, m - 2, out=idx)
        pos -= idx
        np.clip(pos, 0.0, 1.0, out=pos)
        binned += np.bincount(idx + 1, weights=pos, minlength=m)
        np.subtract(1.0, pos, out=pos)
        binned += np.bincount(idx, weights=pos, minlength=m)

    half = min(math.ceil(_KERNEL_SIGMAS * bw / step), m - 1)
    kernel = np.exp(-0.5 * ((np.arange(-half, half + 1) * step) / bw) ** 2)
    kernel /= kernel.sum()  # mass-preserving even when the fine grid is coarse
    fine = _convolve(binned, kernel)
    fine /= n * step

    if k_fine == 1:
        dens = fine
    elif step_out <= bw:
        dens = fine[::k_fine].copy()
    else:  # mean over each output cell
        cs = np.concatenate(([0.0], np.cumsum(fine)))
        centres = np.arange(g) * k_fine
        lo_i = np.clip(centres - k_fine // 2, 0, m - 1)
        hi_i = np.clip(centres + k_fine // 2, 0, m - 1) + 1
        dens = (cs[hi_i] - cs[lo_i]) / (hi_i - lo_i)
    np.maximum(dens, 0.0, out=dens)

    with np.errstate(over="ignore", under="ignore"):
        grid = np.ldexp(np.linspace(start, stop, g), exp)
        density = np.ldexp(dens, -exp)
        bw_out = float(np.ldexp(bw, exp))
    return {"grid": grid, "density": density, "bandwidth": bw_out, "count": int(n), "dropped": int(dropped)}
