"""SeqRanges (which sequence numbers a run has per client) agrees with a plain set.

This is the daemon's duplicate filter: a wrong answer would store a re-sent call
twice or drop one that was never stored."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from kohakuboard.daemon.seqranges import SeqRanges

ranges = st.lists(st.tuples(st.integers(1, 200), st.integers(0, 30)).map(lambda t: (t[0], t[0] + t[1])), max_size=30)


@settings(max_examples=300, deadline=None)
@given(ranges, st.integers(1, 240), st.integers(0, 40))
def test_matches_a_set(added, lo, width):
    r = SeqRanges()
    model: set[int] = set()
    for a, b in added:
        r.add(a, b)
        model.update(range(a, b + 1))
    hi = lo + width
    assert r.covers(lo, hi) == all(s in model for s in range(lo, hi + 1))
    assert r.overlaps(lo, hi) == any(s in model for s in range(lo, hi + 1))
    assert (lo in r) == (lo in model)
    prefix = 0
    while prefix + 1 in model:
        prefix += 1
    assert r.prefix() == prefix
    assert r.highest() == (max(model) if model else 0)
    # stored as disjoint, non-adjacent, sorted ranges: the rows written to metadata.db
    rows = r.ranges()
    assert all(b1 + 1 < a2 for (_, b1), (a2, _) in zip(rows, rows[1:]))
    assert {s for a, b in rows for s in range(a, b + 1)} == model
    assert SeqRanges(rows) == r


def test_a_normal_client_is_one_range():
    r = SeqRanges()
    for s in range(1, 1001):
        r.add(s, s)
    assert r.ranges() == [(1, 1000)] and r.prefix() == 1000
    r.add(1003, 1010)  # messages after a gap (a daemon lost 1001..1002)
    assert r.prefix() == 1000 and r.highest() == 1010
    r.add(1001, 1002)  # the client's re-send fills it
    assert r.ranges() == [(1, 1010)]
