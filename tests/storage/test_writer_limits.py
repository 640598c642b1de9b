"""The writer's resource bounds: many metrics stay cheap in file descriptors."""

from __future__ import annotations

import os

from kohakuboard.protocol.messages import Envelope, LogMessage
from kohakuboard.storage.reader import RunReader
from kohakuboard.storage.writer import RunWriter


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_thousand_metrics_use_few_file_descriptors(tmp_path):
    """A run with 1,000 metrics keeps the writer under 64 open file descriptors, and every point reads back."""
    before = _fds()
    w = RunWriter(str(tmp_path / "run"))
    w.attach(client="c", rank=0, pid=os.getpid(), host="h", name="n", project="p", run_id="run", config={})
    for step in range(3):
        w.stage([LogMessage(Envelope("/r", "c", step + 1, 0, step, step, 1.0), {f"m{i:04d}": float(i * step) for i in range(1000)})])
        w.commit()
    used = _fds() - before
    w.close()
    assert used < 64, f"writer holds {used} descriptors for 1,000 metrics"
    with RunReader(tmp_path / "run") as r:
        assert len(r.list_metrics()) == 1000
        assert r.series("m0999")["value"].tolist() == [0.0, 999.0, 1998.0]


def test_second_writer_on_same_run_is_refused(tmp_path):
    """Two writers on one run folder would corrupt it: the second one gets a clear StorageError."""
    import pytest

    from kohakuboard.protocol.errors import StorageError

    w = RunWriter(str(tmp_path / "run"))
    try:
        with pytest.raises(StorageError, match="already being written"):
            RunWriter(str(tmp_path / "run"))
    finally:
        w.close()


def test_steps_table_is_compact_and_maps_every_step(tmp_path):
    """A step()+log() loop is one steps row across batches, and every step maps to its global step."""
    w = RunWriter(str(tmp_path / "run"))
    w.attach(client="c", rank=0, pid=os.getpid(), host="h", name="n", project="p", run_id="run", config={})
    seq = 0
    for batch in range(5):
        msgs = []
        for i in range(batch * 100, batch * 100 + 100):
            seq += 1
            msgs.append(LogMessage(Envelope("/r", "c", seq, 0, i, i + 1, float(i)), {"x": float(i)}))
        w.stage(msgs)
        w.commit()
    # then a stretch without step(): global step constant
    w.stage([LogMessage(Envelope("/r", "c", seq + 1 + i, 0, 500 + i, 500, 0.0), {"x": 0.0}) for i in range(10)])
    w.commit()
    n_rows = w._db.execute("SELECT COUNT(*) FROM steps").fetchone()[0]
    w.close()
    assert n_rows == 2
    with RunReader(tmp_path / "run") as r:
        st = r.steps()
        assert st["step"].tolist() == list(range(510))
        assert st["global_step"].tolist() == [i + 1 for i in range(500)] + [500] * 10
