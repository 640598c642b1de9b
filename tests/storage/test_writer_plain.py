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


def test_plain_calls_write_a_run_with_the_callers_marks(tmp_path):
    w = RunWriter(str(tmp_path / "run"))
    try:
        w.attach(client="c", rank=0, pid=os.getpid(), host="h", name="n", project="p", run_id="run", config={})
        w.stage_calls(0, np.arange(3), np.arange(3), np.zeros(3))
        w.stage_scalars([_scalars(0, ["loss", "acc"], [0, 1, 2], [[1.0, 0.1], [0.5, 0.2], [0.25, 0.3]])])
        w.stage_output("hello\n")
        pixels = np.zeros((2, 3, 3), np.uint8)
        w.stage_media(rich.Call("c", 4, 0, 3, 3, 0.0), "img", rich.media_from_pixels(pixels), "a caption")
        w.commit({"c": ([(1, 4)], 4)})
        assert w.delivery_marks() == [("c", 1, 4)]
        w.stage_calls(0, 5, 5, 0.0)
        w.stage_scalars([_scalars(0, ["loss"], [5], [[0.125]])])
        w.stage_drops("c", 2, 3, 0)
        w.commit({"c": ([(1, 5), (7, 7)], 5)})  # the writer stores the marks as given
        assert w.delivery_marks() == [("c", 1, 5), ("c", 7, 7)]
        w.commit()  # nothing staged, no marks: nothing to do
    finally:
        w.close()
    w = RunWriter(str(tmp_path / "run"))  # the next writer hands them back for the daemon's ledger
    try:
        assert w.delivery_marks() == [("c", 1, 5), ("c", 7, 7)]
    finally:
        w.close()
    with RunReader(tmp_path / "run") as r:
        assert r.series("loss")["value"].tolist() == [1.0, 0.5, 0.25, 0.125]
        assert r.series("acc")["value"].tolist() == [0.1, 0.2, 0.3]
        assert r.read_output() == "hello\n"
        (media,) = r.media("img")
        assert media["caption"] == "a caption" and (media["width"], media["height"]) == (3, 2)
        (client,) = r.clients()
        assert (client["durable_seq"], client["dropped_calls"], client["dropped_values"]) == (5, 2, 3)
