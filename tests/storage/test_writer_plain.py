"""RunWriter takes plain data: no wire message is needed to write a run (issue 12: storage knows
nothing of the wire; daemon/ingest.py translates messages into these calls)."""

from __future__ import annotations

import os

import numpy as np

from kohakuboard.storage import rich
from kohakuboard.storage.reader import RunReader
from kohakuboard.storage.writer import RunWriter


def _scalars(rank, names, steps, values, first=0):
    n = len(steps)
    steps = np.asarray(steps, np.int64)
    return (rank, tuple(names), np.arange(first, first + n), steps, steps, np.zeros(n), np.asarray(values, float))


def test_plain_calls_write_a_run_and_claims_refuse_repeats(tmp_path):
    w = RunWriter(str(tmp_path / "run"))
    try:
        w.attach(client="c", rank=0, pid=os.getpid(), host="h", name="n", project="p", run_id="run", config={})
        assert w.claim_each("c", np.array([1, 2, 3], np.int64)) is None  # all new
        w.stage_calls(0, np.arange(3), np.arange(3), np.zeros(3))
        w.stage_scalars([_scalars(0, ["loss", "acc"], [0, 1, 2], [[1.0, 0.1], [0.5, 0.2], [0.25, 0.3]])])
        assert w.claim("c", 4, 4)
        w.stage_output("hello\n")
        pixels = np.zeros((2, 3, 3), np.uint8)
        w.stage_media(rich.Call("c", 4, 0, 3, 3, 0.0), "img", rich.media_from_pixels(pixels), "a caption")
        assert w.commit() == {"c": 4}
        # a re-send: what the run has is refused, the rest staged
        keep = w.claim_each("c", np.array([3, 4, 5], np.int64))
        assert keep.tolist() == [False, False, True] and w.duplicates == 2
        assert not w.claim("c", 2, 2) and w.duplicates == 3
        assert w.highest_seen("c") == 5 and w.highest_seen("other") == 0
        w.stage_calls(0, 5, 5, 0.0)
        w.stage_scalars([_scalars(0, ["loss"], [5], [[0.125]])])
        w.stage_drops("c", 2, 3, 0)
        assert w.commit() == {"c": 5}
    finally:
        w.close()
    with RunReader(tmp_path / "run") as r:
        assert r.series("loss")["value"].tolist() == [1.0, 0.5, 0.25, 0.125]
        assert r.series("acc")["value"].tolist() == [0.1, 0.2, 0.3]
        assert r.read_output() == "hello\n"
        (media,) = r.media("img")
        assert media["caption"] == "a caption" and (media["width"], media["height"]) == (3, 2)
