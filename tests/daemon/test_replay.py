"""Acknowledged delivery: kill -9 the daemon while clients log, and nothing is lost or doubled.

The clients keep what the daemon has not acknowledged as durable and re-send
it to the next daemon instance; the daemon drops what a run already has (by
client id and sequence number, stored in the run), and a batch a dying daemon
half wrote is rolled back to the last commit point when the run is reopened.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time

import numpy as np
import pytest

from kohakuboard.storage.reader import RunReader

CLIENT = r"""
import json, sys, time
from kohakuboard.client import Board
n, rank = int(sys.argv[1]), int(sys.argv[2])
with Board(run_id="killed", rank=rank, world_size=4, capture_output=False) as b:
    print("open", flush=True)
    for i in range(n):
        b.log(x=float(i), y=float(-i))
        if i % 100 == 99:
            time.sleep(0.012)  # ~15 s of logging: the daemon dies ten times meanwhile
    b.flush(timeout=180)
    print(json.dumps(b.stats()))
"""


@pytest.mark.slow
def test_sigkill_ten_times_while_four_clients_log_exactly_once(endpoint, daemon_factory, base_dir, tmp_path):
    """SIGKILL the daemon at 10 random moments while 4 clients log 100,000 calls each, restarting it
    each time: every (client, step) value is in the run exactly once, in order."""
    n = 100_000
    seed = int(os.environ.get("KOBO_TEST_SEED", "20261129"))
    rng = random.Random(seed)
    env = dict(os.environ, KOBO_DAEMON_AUTOSTART="0")  # the test restarts the daemon, not the clients
    d = daemon_factory()
    clients = [
        subprocess.Popen(
            [sys.executable, "-c", CLIENT, str(n), str(rank)],
            env=env,
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(4)
    ]
    kills_while_logging = 0
    try:
        for c in clients:  # every Board is open (the clients do not start daemons themselves)
            assert c.stdout.readline().strip() == "open", c.stderr.read()
        for _ in range(10):
            time.sleep(rng.uniform(0.2, 1.0))
            if any(c.poll() is None for c in clients):
                kills_while_logging += 1
            d.kill()
            time.sleep(rng.uniform(0.0, 0.4))
            d = daemon_factory()
        outs = [c.communicate(timeout=240) for c in clients]
    finally:
        for c in clients:
            if c.poll() is None:
                c.kill()
    for c, (out, err) in zip(clients, outs):
        assert c.returncode == 0, f"client failed (seed {seed}): {err[-2000:]}"
        assert "Traceback" not in err, err[-2000:]
    stats = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    assert kills_while_logging >= 8, f"only {kills_while_logging} kills hit the clients while they logged"
    # the clients really saw restarts (a daemon killed before a client asked it anything goes unseen)
    assert all(s["daemon_restarts_seen"] >= 1 for s in stats) and sum(s["daemon_restarts_seen"] for s in stats) >= 10, (
        stats
    )
    assert all(s["acknowledged"] == s["logged"] for s in stats), stats
    expected = np.arange(n, dtype=np.float64)
    with RunReader(base_dir / "default" / "killed") as r:
        for rank in range(4):
            x = r.series("x", rank=rank)
            y = r.series("y", rank=rank)
            assert len(x) == n, f"rank {rank}: {len(x)} points of x instead of {n} (seed {seed})"
            assert np.array_equal(x["value"], expected), f"rank {rank}: x values differ (seed {seed})"
            assert np.array_equal(x["step"], np.arange(n)), f"rank {rank}: steps differ (seed {seed})"
            assert np.array_equal(y["value"], -expected)
        assert r.status == "finished"


def test_replayed_batch_after_half_written_commit_is_not_doubled(daemon, endpoint, base_dir, monkeypatch):
    """Rows a daemon appended but never committed (it died in between) are rolled back when the run is
    reopened, so the client's re-send does not store them twice."""
    from kohakuvault import ColumnVault

    from kohakuboard.client import Board
    from kohakuboard.storage import format as fmt
    from kohakuboard.storage.writer import RunWriter

    monkeypatch.setenv("KOBO_DAEMON_AUTOSTART", "0")
    b = Board(run_id="half", capture_output=False)
    for i in range(10):
        b.log(x=float(i))
    b.flush()
    daemon.terminate()
    # What a daemon dying between the column append and the commit transaction leaves behind:
    cv = ColumnVault(os.path.join(b.path, fmt.SCALARS_DB))
    col = cv.ensure(fmt.column_name(0, "x"), fmt.SCALAR_COLUMN_DTYPE)
    rec = np.zeros(3, dtype=fmt.scalar_record_dtype())
    rec["value"] = [10.0, 11.0, 12.0]
    col.append_array(rec.view(np.uint8).reshape(-1, fmt.SCALAR_RECORD_SIZE))
    assert len(col) == 13
    cv.close()
    with RunReader(b.path) as r:  # readers stop at the commit point already
        assert r.series("x")["value"].tolist() == [float(i) for i in range(10)]
    w = RunWriter(b.path)
    try:
        assert [e["kind"] for e in w_events(w)].count("recovered") == 1
    finally:
        w.close()
    with RunReader(b.path) as r:
        assert r.series("x")["value"].tolist() == [float(i) for i in range(10)]
    with pytest.warns(RuntimeWarning):
        b.finish(timeout=1)  # no daemon any more: finish() warns, and changes nothing


def w_events(w):
    return [{"kind": k} for (k,) in w._db.execute("SELECT kind FROM events")]
