"""Daemon-side computation: PNG encoding, image sizes, histograms, compact counts and KDE."""

from __future__ import annotations

import io
import math
import time
import tracemalloc

import numpy as np
import pytest
from PIL import Image

from kohakuboard.protocol.binning import bin_histogram
from kohakuboard.storage.values import (
    compact_counts,
    encode_png,
    image_size,
    kde,
    restore_counts,
)


def _decode(data: bytes) -> Image.Image:
    im = Image.open(io.BytesIO(data))
    im.load()
    return im


# ------------------------------------------------------------------ PNG


@pytest.mark.parametrize("channels, mode", [(1, "L"), (3, "RGB"), (4, "RGBA")])
def test_png_decodes_to_the_exact_input_pixels(channels, mode):
    """PNG bytes decode to exactly the input pixels, in the mode matching the channel count."""
    rng = np.random.default_rng(channels)
    hwc = rng.integers(0, 256, size=(17, 23, channels), dtype=np.uint8)
    im = _decode(encode_png(hwc))
    assert im.format == "PNG" and im.mode == mode and im.size == (23, 17)
    assert np.array_equal(np.asarray(im).reshape(17, 23, channels), hwc)


def test_png_bytes_are_identical_for_identical_pixels():
    """The same pixels give byte-identical PNGs, also from a non-contiguous copy, so hashing dedups."""
    rng = np.random.default_rng(0)
    hwc = rng.integers(0, 256, size=(32, 40, 3), dtype=np.uint8)
    strided = np.asfortranarray(hwc)
    assert encode_png(hwc) == encode_png(hwc.copy()) == encode_png(strided)
    other = hwc.copy()
    other[0, 0, 0] ^= 1
    assert encode_png(other) != encode_png(hwc)


def test_png_accepts_2d_grayscale_and_rejects_bad_arrays():
    """A 2-D uint8 array encodes as L; non-uint8, wrong channel counts and empty images raise."""
    assert _decode(encode_png(np.zeros((3, 4), np.uint8))).mode == "L"
    with pytest.raises(TypeError, match="uint8"):
        encode_png(np.zeros((3, 4, 3), np.float32))
    with pytest.raises(ValueError, match="C in 1, 3, 4"):
        encode_png(np.zeros((3, 4, 2), np.uint8))
    with pytest.raises(ValueError, match="empty"):
        encode_png(np.zeros((0, 4, 3), np.uint8))


def _encoded(fmt: str, size=(31, 17)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (9, 8, 7)).save(buf, fmt)
    return buf.getvalue()


def test_image_size_reads_width_and_height():
    """image_size gives (width, height) for PNG, JPEG, GIF, WebP and BMP bytes."""
    for fmt in ("PNG", "JPEG", "GIF", "WEBP", "BMP"):
        assert image_size(_encoded(fmt)) == (31, 17), fmt


def test_image_size_reads_only_the_header():
    """A PNG cut off right after its header still gives its size: pixels are not decoded."""
    data = encode_png(np.zeros((300, 200, 3), np.uint8))
    assert image_size(data[:64]) == (200, 300)


def test_image_size_is_none_for_undecodable_bytes():
    """Garbage, empty bytes and non-image media give None instead of raising."""
    assert image_size(b"") is None
    assert image_size(b"definitely not an image") is None
    assert image_size(b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 100) is None


# ------------------------------------------------------------------ histograms


def test_histogram_counts_finite_values_and_nonfinite_apart():
    """Counts sum to the number of finite values; NaN, +inf and -inf are counted separately."""
    rng = np.random.default_rng(0)
    values = rng.normal(size=10_000).astype(np.float32)
    values[:7] = np.nan
    values[7:10] = np.inf
    values[10:12] = -np.inf
    h = bin_histogram(values, 50)
    assert (h["nan"], h["posinf"], h["neginf"]) == (7, 3, 2)
    assert h["total"] == 10_000 - 12 == int(h["counts"].sum())
    assert h["counts"].dtype == np.int64 and h["counts"].shape == (50,)
    assert h["edges"].dtype == np.float64 and h["edges"].shape == (51,)


def test_histogram_edges_span_the_finite_min_and_max_exactly():
    """The first and last edges are exactly the finite min and max (no clipping); edges increase."""
    rng = np.random.default_rng(1)
    values = rng.standard_cauchy(size=5_000).astype(np.float32)  # heavy tails: no percentile clipping
    values[3] = np.nan
    h = bin_histogram(values, 64)
    finite = values[np.isfinite(values)]
    assert h["edges"][0] == float(finite.min()) and h["edges"][-1] == float(finite.max())
    assert np.all(np.diff(h["edges"]) > 0)
    assert h["counts"][0] >= 1 and h["counts"][-1] >= 1


def test_histogram_matches_numpy_on_the_finite_values():
    """The counts equal numpy.histogram of the finite values over the same float64 range."""
    rng = np.random.default_rng(2)
    values = rng.random(20_000)
    h = bin_histogram(values, 37)
    counts, edges = np.histogram(values, 37, range=(values.min(), values.max()))
    assert np.array_equal(h["counts"], counts) and np.array_equal(h["edges"], edges)


def test_fast_binning_equals_numpy_bit_for_bit():
    """bin_histogram's own uniform binning (float32 estimate, edges checked near boundaries, radix
    counting) gives np.histogram's float64 edges and counts exactly: float32, float64, integers,
    values lying on bin edges, and 1..100000 bins."""
    rng = np.random.default_rng(7)
    for trial in range(120):
        n = int(rng.integers(1, 60_000))
        bins = int(rng.integers(1, 3000)) if trial % 6 else int(rng.integers(3000, 100_001))
        kind = trial % 6
        if kind == 0:
            a = rng.standard_normal(n).astype(np.float32)
        elif kind == 1:
            a = rng.random(n)
        elif kind == 2:
            a = rng.integers(-50, 50, n).astype(np.int16)
        elif kind == 3:
            a = rng.integers(0, 7, n) / 7.0  # every value on a bin edge of 7 or 14 bins
            bins = 7 * int(rng.integers(1, 3))
        elif kind == 4:
            a = (rng.integers(0, 1 << 20, n) / (1 << 20)).astype(np.float32)
        else:
            a = 1e6 + rng.random(n) * 1e-3  # bins near the float64 resolution
        h = bin_histogram(a, bins)
        lo, hi = np.float64(a.min()), np.float64(a.max())
        if lo == hi:
            continue
        counts, edges = np.histogram(a, bins, range=(lo, hi))
        assert np.array_equal(h["edges"], edges), (trial, kind, n, bins)
        assert np.array_equal(h["counts"], counts), (trial, kind, n, bins)


def test_histogram_of_equal_values_is_one_unit_range():
    """All-equal finite values are binned in [v - 0.5, v + 0.5]."""
    h = bin_histogram(np.full(10, 3.0, np.float32), 4)
    assert h["edges"].tolist() == [2.5, 2.75, 3.0, 3.25, 3.5] and h["counts"].tolist() == [0, 0, 10, 0]


def test_histogram_without_finite_values_is_empty_but_counts_the_rest():
    """Empty or all-non-finite input gives empty edges/counts with the NaN/inf counts set."""
    h = bin_histogram(np.array([np.nan, np.inf, np.nan, -np.inf]), 10)
    assert h["edges"].size == 0 and h["counts"].size == 0
    assert (h["nan"], h["posinf"], h["neginf"], h["total"]) == (2, 1, 1, 0)
    empty = bin_histogram(np.zeros(0, np.float32), 10)
    assert empty["edges"].size == 0 and empty["total"] == 0 and empty["nan"] == 0


def test_histogram_of_integers_and_bools():
    """Integer and bool values are binned like numbers, with no non-finite counts."""
    h = bin_histogram(np.array([0, 1, 1, 2, 2, 2], np.int8), 3)
    assert h["counts"].tolist() == [1, 2, 3] and h["edges"][[0, -1]].tolist() == [0.0, 2.0]
    b = bin_histogram(np.array([True, False, True]), 2)
    assert b["counts"].tolist() == [1, 2] and b["total"] == 3


def test_histogram_survives_extreme_and_degenerate_ranges():
    """Ranges near the float64 limit and ranges too narrow for 100000 bins still count every value."""
    h = bin_histogram(np.array([-1.7e308, 0.0, 1.7e308]), 4)
    assert h["counts"].tolist() == [1, 0, 1, 1] and np.all(np.isfinite(h["edges"]))
    assert h["edges"][0] == -1.7e308 and h["edges"][-1] == 1.7e308
    narrow = bin_histogram(np.array([1.0, np.nextafter(1.0, 2.0)]), 100_000)
    assert narrow["counts"].sum() == 2 and np.all(np.diff(narrow["edges"]) > 0)
    big = bin_histogram(np.full(5, 1e20), 100_000)
    assert big["counts"].sum() == 5 and np.all(np.diff(big["edges"]) > 0)


def test_histogram_rejects_bad_bin_counts_and_non_numbers():
    """num_bins outside 1..100000 (or not an int) raises ValueError; complex values raise TypeError."""
    for bad in (0, 100_001, -1, True, 2.0):
        with pytest.raises(ValueError, match="num_bins"):
            bin_histogram(np.zeros(3), bad)
    assert bin_histogram(np.zeros(3), 100_000)["counts"].size == 100_000
    with pytest.raises(TypeError):
        bin_histogram(np.zeros(3, complex), 4)


def test_histogram_of_ten_million_float32_is_fast_and_not_copied_to_float64():
    """10M float32 values bin in well under a second with far less memory than a float64 copy (80 MB)."""
    rng = np.random.default_rng(3)
    values = rng.normal(size=10_000_000).astype(np.float32)
    values[::100_000] = np.nan
    bin_histogram(values[:1000], 64)  # warm up
    start = time.perf_counter()
    h = bin_histogram(values, 64)
    elapsed = time.perf_counter() - start
    assert h["total"] == 10_000_000 - 100 == int(h["counts"].sum()) and h["nan"] == 100
    assert elapsed < 1.0, f"{elapsed:.3f} s"
    tracemalloc.start()
    try:
        bin_histogram(values, 64)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 20e6, f"peak {peak / 1e6:.1f} MB"


def test_compact_counts_keep_shape_within_rounding():
    """uint8 counts put the max at 255, keep nonzero counts >= 1 and restore to within scale / 2."""
    counts = np.array([0, 1, 7, 1000, 123_456, 50_000], np.int64)
    u8, scale = compact_counts(counts)
    assert u8.dtype == np.uint8 and u8.max() == 255 and u8[0] == 0 and u8[1] >= 1 and u8[2] >= 1
    restored = restore_counts(u8, scale)
    assert restored.dtype == np.float64
    big = counts > scale
    assert np.all(np.abs(restored[big] - counts[big]) <= scale / 2 + 1e-9)
    assert abs(restored[4] - 123_456) < 1e-6 * 123_456


def test_compact_counts_of_small_zero_and_empty_counts():
    """Small counts round-trip to the same integers; all-zero and empty counts give scale 1."""
    u8, scale = compact_counts(np.array([0, 1, 2, 3], np.int64))
    assert np.array_equal(np.rint(restore_counts(u8, scale)), [0, 1, 2, 3])
    z, zs = compact_counts(np.zeros(4, np.int64))
    assert z.tolist() == [0, 0, 0, 0] and zs == 1.0
    e, es = compact_counts(np.zeros(0, np.int64))
    assert e.size == 0 and es == 1.0
    with pytest.raises(ValueError):
        compact_counts(np.array([1, -1]))


# ------------------------------------------------------------------ KDE


def _direct_kde(samples: np.ndarray, grid: np.ndarray, bw: float) -> np.ndarray:
    z = (grid[:, None] - samples[None, :]) / bw
    return np.exp(-0.5 * z * z).sum(axis=1) / (samples.size * bw * math.sqrt(2 * math.pi))


def test_kde_of_a_normal_sample_peaks_at_the_mean_and_integrates_to_one():
    """A normal sample's KDE peaks near its mean, follows the normal curve and integrates to ~1."""
    rng = np.random.default_rng(0)
    x = rng.normal(3.0, 2.0, size=100_000)
    k = kde(x)
    assert k["grid"].shape == k["density"].shape == (256,)
    assert k["grid"].dtype == k["density"].dtype == np.float64
    assert abs(k["grid"][np.argmax(k["density"])] - 3.0) < 0.3
    sd = math.sqrt(4.0 + k["bandwidth"] ** 2)  # a KDE of N(3, 2) estimates N(3, 2) smoothed by the kernel
    expected = np.exp(-0.5 * ((k["grid"] - 3.0) / sd) ** 2) / (sd * math.sqrt(2 * math.pi))
    assert np.max(np.abs(k["density"] - expected)) < 0.03 * expected.max()
    assert abs(np.trapezoid(k["density"], k["grid"]) - 1.0) < 1e-3
    assert k["count"] == 100_000 and k["dropped"] == 0 and np.all(k["density"] >= 0)


def test_kde_uses_scotts_rule_and_spans_three_bandwidths_past_the_data():
    """Default bandwidth is 1.06 * std * n**-0.2; the grid runs from min - 3 bw to max + 3 bw."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=5_000).astype(np.float32)
    k = kde(x, grid_size=100)
    bw = 1.06 * float(np.std(x.astype(np.float64))) * 5_000**-0.2
    assert k["bandwidth"] == pytest.approx(bw, rel=1e-9)
    assert k["grid"][0] == pytest.approx(float(x.min()) - 3 * bw, rel=1e-9)
    assert k["grid"][-1] == pytest.approx(float(x.max()) + 3 * bw, rel=1e-9)
    assert np.allclose(np.diff(k["grid"]), (k["grid"][-1] - k["grid"][0]) / 99)


def test_kde_matches_the_exact_kernel_sum():
    """The binned estimate equals the direct sum of Gaussian kernels to within 0.1 % of the peak."""
    rng = np.random.default_rng(2)
    x = np.concatenate([rng.normal(-2, 0.5, 800), rng.normal(3, 1.0, 1200)])
    for bandwidth in (None, 0.3):
        k = kde(x, grid_size=200, bandwidth=bandwidth)
        exact = _direct_kde(x, k["grid"], k["bandwidth"])
        assert np.max(np.abs(k["density"] - exact)) < 1e-3 * exact.max()
    assert kde(x, bandwidth=0.3)["bandwidth"] == 0.3


def test_kde_of_a_million_samples_is_fast_and_small():
    """1,000,000 samples take well under a second and a few MB, never a samples x grid matrix (2 GB)."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=1_000_000).astype(np.float32)
    kde(x[:1000])  # warm up
    start = time.perf_counter()
    k = kde(x)
    elapsed = time.perf_counter() - start
    assert elapsed < 0.5, f"{elapsed:.3f} s"
    assert abs(np.trapezoid(k["density"], k["grid"]) - 1.0) < 1e-3
    tracemalloc.start()
    try:
        kde(x)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 20e6, f"peak {peak / 1e6:.1f} MB"


def test_kde_drops_nan_and_inf_and_counts_them():
    """NaN and +-inf are left out of the estimate and counted in 'dropped'."""
    rng = np.random.default_rng(4)
    x = rng.normal(size=1000)
    noisy = np.concatenate([x, [np.nan, np.nan, np.inf, -np.inf]])
    k = kde(noisy)
    assert k["count"] == 1000 and k["dropped"] == 4
    clean = kde(x)
    assert np.allclose(k["density"], clean["density"]) and np.array_equal(k["grid"], clean["grid"])


def test_kde_of_nothing_is_empty():
    """Empty or all-NaN input gives an empty grid and density, with the NaNs counted."""
    for values, dropped in ((np.zeros(0), 0), (np.array([np.nan, np.inf]), 2)):
        k = kde(values)
        assert k["grid"].size == 0 and k["density"].size == 0
        assert k["count"] == 0 and k["dropped"] == dropped


def test_kde_of_equal_values_falls_back_to_a_finite_bandwidth():
    """All-equal values (std 0) and a single value give a finite bump centred on the value."""
    for values in (np.full(50, 7.0), np.array([7.0]), np.full(3, 1e20)):
        k = kde(values, grid_size=101)
        assert math.isfinite(k["bandwidth"]) and k["bandwidth"] > 0
        assert np.all(np.isfinite(k["density"])) and np.all(np.diff(k["grid"]) > 0)
        assert k["grid"][np.argmax(k["density"])] == pytest.approx(values[0], rel=1e-9)
        assert abs(np.trapezoid(k["density"], k["grid"]) - 1.0) < 0.01
    assert kde(np.full(5, 7.0), grid_size=3)["grid"].tolist() == [6.5, 7.0, 7.5]


def test_kde_keeps_the_mass_visible_with_a_far_outlier():
    """One far outlier stretches the grid, yet the density still integrates to ~1."""
    rng = np.random.default_rng(5)
    x = np.concatenate([rng.normal(size=10_000), [1e6]])
    k = kde(x)
    assert abs(np.trapezoid(k["density"], k["grid"]) - 1.0) < 0.05
    assert k["density"][:5].max() > 0  # the bulk near 0 is not lost between grid points


def test_kde_rejects_bad_grid_sizes_and_bandwidths():
    """grid_size outside 2..65536 and non-positive or non-finite bandwidths raise ValueError."""
    x = np.arange(10.0)
    for bad in (1, 65_537, True, 2.5):
        with pytest.raises(ValueError, match="grid_size"):
            kde(x, grid_size=bad)
    for bad in (0.0, -1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match="bandwidth"):
            kde(x, bandwidth=bad)
    assert kde(x, grid_size=2)["grid"].size == 2
    assert kde(x, grid_size=65_536)["grid"].size == 65_536
    with pytest.raises(TypeError):
        kde(np.zeros(3, complex))
