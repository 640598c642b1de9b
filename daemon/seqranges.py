"""Which sequence numbers of one client a run has: a small set of closed ranges.

The daemon uses it to store every ``log()`` call exactly once: a message whose
numbers are already in the set is a re-send (the client replays what a dead
daemon never acknowledged) and is dropped.  A client numbers its messages
1, 2, 3, ... and every number is carried by exactly one message, so the set is
almost always the single range ``1..n``; holes appear only while a replay fills
in what a dead daemon lost.  Pure logic, no I/O.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterable


class SeqRanges:
    """A set of positive integers kept as sorted, disjoint, non-adjacent ``[lo, hi]`` ranges."""

    __slots__ = ("_lo", "_hi")

    def __init__(self, ranges: Iterable[tuple[int, int]] = ()) -> None:
        self._lo: list[int] = []
        self._hi: list[int] = []
        for lo, hi in sorted(ranges):
            self.add(lo, hi)

    def copy(self) -> SeqRanges:
        new = SeqRanges()
        new._lo = list(self._lo)
        new._hi = list(self._hi)
        return new

    def ranges(self) -> list[tuple[int, int]]:
        return list(zip(self._lo, self._hi))

    def __bool__(self) -> bool:
        return bool(self._lo)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SeqRanges) and self.ranges() == other.ranges()

    def __repr__(self) -> str:
        return f"SeqRanges({self.ranges()})"

    def __contains__(self, seq: int) -> bool:
        i = bisect_right(self._lo, seq) - 1
        return i >= 0 and seq <= self._hi[i]

    def covers(self, lo: int, hi: int) -> bool:
        """Whether every number in ``lo..hi`` is in the set."""
        i = bisect_right(self._lo, lo) - 1
        return i >= 0 and hi <= self._hi[i]

    def overlaps(self, lo: int, hi: int) -> bool:
        """Whether any number in ``lo..hi`` is in the set."""
        i = bisect_right(self._lo, hi) - 1
        return i >= 0 and self._hi[i] >= lo

    def add(self, lo: int, hi: int) -> None:
        """Add ``lo..hi`` (merging with neighbours that overlap or touch)."""
        if hi < lo:
            raise ValueError(f"empty range {lo}..{hi}")
        i = bisect_right(self._lo, lo) - 1
        if i >= 0 and self._hi[i] >= lo - 1:
            start = i
            lo = self._lo[i]
        else:
            start = i + 1
        end = start
        n = len(self._lo)
        while end < n and self._lo[end] <= hi + 1:
            hi = max(hi, self._hi[end])
            end += 1
        self._lo[start:end] = [lo]
        self._hi[start:end] = [hi]

    def prefix(self) -> int:
        """The largest ``n`` such that all of ``1..n`` is in the set (0 if 1 is missing)."""
        if self._lo and self._lo[0] <= 1:
            return self._hi[0]
        return 0

    def highest(self) -> int:
        return self._hi[-1] if self._hi else 0
