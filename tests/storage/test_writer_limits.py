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
