"""The reduction a chart is drawn from (pure logic, checked against a plain per-bucket loop).

What a user relies on: every spike and dip survives the reduction: each pixel column keeps its
first and last point and the first point holding its smallest and its largest finite value,
whatever the NaN, infinities, repeated x or empty columns in the data.
"""

from __future__ import annotations

import numpy as np
import pytest

from kohakuboard.viewer import reduce as R


def _reference(x: np.ndarray, y: np.ndarray, width: int) -> np.ndarray:
    """The same rule written out bucket by bucket."""
    n = len(x)
    if n <= 4 * width:
        return np.arange(n)
    starts = R._bucket_starts(x, width)
    ends = list(starts[1:]) + [n]
    keep: set[int] = set()
    for a, b in zip(starts, ends):
        keep |= {int(a), int(b) - 1}
        idx = [i for i in range(a, b) if np.isfinite(y[i])]
        if idx:
            keep.add(min(idx, key=lambda i: (y[i], i)))
            keep.add(min(idx, key=lambda i: (-y[i], i)))
    return np.array(sorted(keep))


@pytest.mark.parametrize("seed", range(12))
def test_reduce_m4_keeps_first_last_min_max_of_every_column(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(50, 5000))
    width = int(rng.integers(1, 60))
    x = np.sort(rng.choice([rng.integers(0, n // 3 + 1, n), rng.random(n) * 100, np.arange(n)], 1)[0]).astype(
        np.float64
    )
    if seed % 4 == 0:
        x[n // 3 : n // 2] = x[n // 3]  # many points at one x
    y = rng.standard_normal(n).round(1)  # ties: the first of equal extremes is kept
    y[rng.random(n) < 0.05] = np.nan
    y[rng.random(n) < 0.01] = np.inf
    y[rng.random(n) < 0.01] = -np.inf
    if seed % 3 == 0:
        y[: n // 4] = np.nan  # whole columns with no finite value
    got = R.reduce_m4(x, y, width)
    assert np.array_equal(got, _reference(x, y, width))
    assert len(got) <= 4 * width


def test_reduce_m4_spike_in_a_million_points_survives() -> None:
    x = np.arange(1_000_000, dtype=np.float64)
    y = np.zeros(1_000_000)
    y[123_457] = 1e9
    y[876_543] = -1e9
    idx = R.reduce_m4(x, y, 1000)
    assert 123_457 in idx and 876_543 in idx and len(idx) <= 4000
