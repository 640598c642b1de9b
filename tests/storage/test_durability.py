"""Power loss: every file a commit names is synced before the commit that names it (issue 9, part 5).

The writer runs here as the daemon runs it, on a real run folder; ``os.fsync`` is
wrapped to record which file each sync reached, and the metadata database's
connection to record each ``COMMIT``.  For every commit, each file the committed
rows name (a vault file and its write-ahead log, a media file, the tensor store,
``logs/output.log``) and each directory that gained an entry must have been
synced after it was written and before that COMMIT; the commit itself is
``synchronous=FULL``.  The read-back at the end checks that what was committed is
what was logged.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from kohakuboard.client import Histogram, KernelDensity, Media, TensorLog
from kohakuboard.client._board import _encode_rich
from kohakuboard.daemon.ingest import stage
from kohakuboard.protocol import messages as m
from kohakuboard.storage import format as fmt
from kohakuboard.storage.reader import RunReader
from kohakuboard.storage.writer import RunWriter


class _Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, str]] = []


class _RecordingDb:
    """The writer's sqlite3 connection, recording each COMMIT in order with the syncs."""

    def __init__(self, db: Any, rec: _Recorder) -> None:
        self._db, self._rec = db, rec

    def execute(self, sql: str, *args: Any) -> Any:
        out = self._db.execute(sql, *args)
        if sql.strip().upper() == "COMMIT":
            self._rec.events.append(("commit", ""))
        return out

    def __getattr__(self, name: str) -> Any:
        return getattr(self._db, name)


@pytest.fixture
def recorded(monkeypatch: pytest.MonkeyPatch) -> _Recorder:
    rec = _Recorder()
    real = os.fsync

    def fsync(fd: int) -> None:
        rec.events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return rec


def _message(seq: int, rich: list[tuple[str, Any]], scalars: dict[str, float]) -> m.LogMessage:
    items, blobs = _encode_rich(rich)
    env = m.Envelope(run="", client="c", seq=seq, rank=0, step=seq - 1, global_step=0, wall=time.time())
    return m.LogMessage(env, scalars, items, [bytes(b) for b in blobs])


def _named_files(run: Path) -> set[str]:
    """Every file the run's commit point names (relative paths), from metadata.db itself."""
    import sqlite3

    db = sqlite3.connect(run / fmt.METADATA_DB)
    try:
        named = {f for (f,) in db.execute("SELECT DISTINCT file FROM committed")}
        named |= {f"{fmt.MEDIA_DIR}/{h}.{e}" for h, e in db.execute("SELECT hash, ext FROM media")}
        if db.execute("SELECT (SELECT count(*) FROM tensors) + (SELECT count(*) FROM kde)").fetchone()[0]:
            named.add(fmt.TENSORS_DB)
        return named
    finally:
        db.close()


def _check_order(run: Path, events: list[tuple[str, str]], written: dict[str, int]) -> None:
    """Each file named by a commit is synced after it was last written and before that commit."""
    commits = [i for i, (kind, _) in enumerate(events) if kind == "commit"]
    assert commits, events
    for rel, written_at in written.items():
        path = str(run / rel)
        first_commit = next(i for i in commits if i > written_at)
        # a media file is synced under its temporary name, then renamed (same inode)
        synced = [
            i
            for i, (kind, p) in enumerate(events)
            if kind == "fsync"
            and written_at <= i < first_commit
            and (p == path or p.startswith(path + ".tmp-") and rel.startswith(fmt.MEDIA_DIR))
        ]
        assert synced, f"{rel} was written but not synced before the commit that names it: {events}"


def test_every_named_file_is_synced_before_its_commit(tmp_path: Path, recorded: _Recorder) -> None:
    run = tmp_path / "run"
    w = RunWriter(str(run))
    try:
        w._db = _RecordingDb(w._db, recorded)
        assert w._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL: the COMMIT reaches the disk
        w.attach(client="c", rank=0, pid=os.getpid(), host="h", name="n", project="p", run_id="run", config={})
        recorded.events.clear()
        rng = np.random.default_rng(0)
        img = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        first = [
            _message(
                1,
                [
                    ("img", Media(img)),
                    ("h", Histogram(np.arange(100.0))),
                    ("t", TensorLog(np.arange(6.0).reshape(2, 3))),
                    ("k", KernelDensity(values=np.arange(9.0))),
                ],
                {"loss": 0.5},
            ),
            m.OutputMessage(m.Envelope(run="", client="c", seq=2, wall=time.time()), "stdout", "epoch 1\n"),
        ]
        stage(w, first)
        w.commit()
        names = _named_files(run)
        assert {fmt.SCALARS_DB, fmt.HISTOGRAM_FILES["exact"], fmt.TENSORS_DB, fmt.OUTPUT_LOG} <= names
        assert any(n.startswith(fmt.MEDIA_DIR + "/") for n in names)
        # Everything was written before the commit (phase A), so "written" is the start.
        _check_order(run, recorded.events, {rel: 0 for rel in names})
        # New files' names: their directories are synced before the commit too.
        c0 = next(i for i, e in enumerate(recorded.events) if e[0] == "commit")
        synced = {p for kind, p in recorded.events[:c0] if kind == "fsync"}
        for d in (fmt.MEDIA_DIR, fmt.TENSORS_DIR, fmt.HISTOGRAMS_DIR, fmt.DATA_DIR):
            assert str(run / d) in synced, f"directory {d} not synced before the commit"
        # The vaults' appends live in their write-ahead logs: those are synced too.
        for rel in (fmt.SCALARS_DB, fmt.HISTOGRAM_FILES["exact"]):
            assert str(run / rel) + "-wal" in synced, f"{rel}-wal not synced before the commit"

        # A second batch: only what it writes is synced again, still before its commit.
        recorded.events.clear()
        stage(w, [_message(3, [], {"loss": 0.25})])
        w.commit()
        kinds = [(k, os.path.relpath(p, run) if p else "") for k, p in recorded.events]
        assert kinds[-1] == ("commit", "") and ("fsync", fmt.SCALARS_DB + "-wal") in kinds[:-1], kinds
        assert not any(p.startswith(fmt.MEDIA_DIR) for _, p in kinds), kinds
    finally:
        w.close()
    with RunReader(run) as r:
        assert r.series("loss")["value"].tolist() == [0.5, 0.25]
        assert r.tensors("t")[0]["array"].tolist() == [[0, 1, 2], [3, 4, 5]]
        assert len(r.media("img")) == 1 and len(r.histograms("h")) == 1 and len(r.kde("k")) == 1


def test_process_durability_is_opt_in_and_syncs_nothing(tmp_path: Path, recorded: _Recorder) -> None:
    """The daemon's opt-in ``process`` durability (RunWriter(durable=False)): no fsync, NORMAL commits."""
    w = RunWriter(str(tmp_path / "run"), durable=False)
    try:
        assert w._db.execute("PRAGMA synchronous").fetchone()[0] == 1
        w.attach(client="c", rank=0, pid=os.getpid(), host="h", name="n", project="p", run_id="run", config={})
        recorded.events.clear()
        stage(w, [_message(1, [("img", Media(np.zeros((4, 4, 3), np.uint8)))], {"loss": 1.0})])
        w.commit()
    finally:
        w.close()
    assert not [e for e in recorded.events if e[0] == "fsync"], recorded.events
    with RunReader(tmp_path / "run") as r:
        assert r.series("loss")["value"].tolist() == [1.0]


def test_the_daemon_setting_is_checked() -> None:
    from kohakuboard.daemon.config import DaemonConfig

    assert DaemonConfig.from_env({}).durability == "sync"
    assert DaemonConfig.from_env({}, durability="process").durability == "process"
    with pytest.raises(ValueError, match="durability must be 'sync' or 'process', got 'fast'"):
        DaemonConfig.from_env({}, durability="fast")
