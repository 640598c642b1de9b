"""The writer's resource bounds: many metrics stay cheap in file descriptors."""

from __future__ import annotations

import os

from kohakuboard.daemon.ingest import stage
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
        stage(
            w,
            [
                LogMessage(
                    Envelope("/r", "c", step + 1, 0, step, step, 1.0),
                    {f"m{i:04d}": float(i * step) for i in range(1000)},
                )
            ],
        )
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
        stage(w, msgs)
        w.commit()
    # then a stretch without step(): global step constant
    stage(w, [LogMessage(Envelope("/r", "c", seq + 1 + i, 0, 500 + i, 500, 0.0), {"x": 0.0}) for i in range(10)])
    w.commit()
    n_rows = w._db.execute("SELECT COUNT(*) FROM steps").fetchone()[0]
    w.close()
    assert n_rows == 2
    with RunReader(tmp_path / "run") as r:
        st = r.steps()
        assert st["step"].tolist() == list(range(510))
        assert st["global_step"].tolist() == [i + 1 for i in range(500)] + [500] * 10


def test_scalar_vault_is_reopened_after_each_mebibyte_without_losing_points(tmp_path, monkeypatch):
    """The writer closes and reopens the scalar vault after 1 MiB of appends (kohakuvault keeps the
    pages a connection wrote in memory); every point of every batch reads back, in order, and a
    reopened run (recovery) finds the commit lengths the reopened vault wrote."""
    from kohakuboard.storage import writer as writer_mod

    reopened = []
    real = RunWriter._reopen_scalars
    monkeypatch.setattr(RunWriter, "_reopen_scalars", lambda self: (reopened.append(1), real(self)))
    w = RunWriter(str(tmp_path / "run"))
    w.attach(client="c", rank=0, pid=os.getpid(), host="h", name="n", project="p", run_id="run", config={})
    seq = step = 0
    for batch in range(12):  # 12 x 4,000 calls x 4 metrics x 32 B = 6 MiB
        msgs = []
        for _ in range(4000):
            seq += 1
            msgs.append(LogMessage(Envelope("/r", "c", seq, 0, step, step, 0.0), {k: float(step) for k in "abcd"}))
            step += 1
        stage(w, msgs)
        w.commit()
        assert w._scalar_bytes < writer_mod._SCALAR_REOPEN_BYTES
    w.close()
    assert len(reopened) >= 4, f"the scalar vault was reopened {len(reopened)} times for 6 MiB"
    w = RunWriter(str(tmp_path / "run"))  # recovery against the committed lengths: nothing cut
    w.close()
    with RunReader(tmp_path / "run") as r:
        for k in "abcd":
            s = r.series(k)
            assert s["step"].tolist() == list(range(step)) and s["value"].tolist() == [float(i) for i in range(step)]
