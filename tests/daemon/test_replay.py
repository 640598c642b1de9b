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
from kohakuboard.testing import daemon_status, wait_until

CLIENT = r"""
import json, os, sys, time
from kohakuboard.client import Board
stop_file, rank = sys.argv[1], int(sys.argv[2])
with Board(run_id="killed", rank=rank, world_size=4, capture_output=False) as b:
    print("open", flush=True)
    i = 0
    while True:  # until the test has killed the daemon ten times
        b.log(x=float(i), y=float(-i))
        i += 1
        if i % 100 == 0:
            if os.path.exists(stop_file):
                break
            time.sleep(0.012)  # a training loop does other work too (and the daemon gets a core)
    b.flush(timeout=180)
    print(json.dumps(b.stats()))
"""
KILLS = 10


def _taking_data(endpoint, last: dict[str, int]) -> bool:
    """True once the daemon on ``endpoint`` has taken new calls from all four clients (``last``: their
    ``received_seq`` when last seen, updated)."""
    try:
        info = daemon_status(endpoint, timeout=2)
    except AssertionError:  # starting, or too busy to answer in time: ask again
        return False
    runs = [r for r in info["runs"] if os.path.basename(r["path"]) == "killed"]
    seqs = {c["client"]: c["received_seq"] for r in runs for c in r["clients"]}
    if len(seqs) < 4 or any(seq <= last.get(client, 0) for client, seq in seqs.items()):
        return False
    last.update(seqs)
    return True


@pytest.mark.slow
def test_sigkill_ten_times_while_four_clients_log_exactly_once(endpoint, daemon_factory, base_dir, tmp_path):
    """SIGKILL the daemon ten times while 4 clients log, each time at a random moment after the
    restarted daemon took new calls from every client, restarting it after a random gap: every
    (client, step) value is in the run exactly once, in order."""
    seed = int(os.environ.get("KOBO_TEST_SEED", "20261129"))
    rng = random.Random(seed)
    env = dict(os.environ, KOBO_DAEMON_AUTOSTART="0")  # the test restarts the daemon, not the clients
    stop_file = tmp_path / "stop"
    d = daemon_factory()
    clients = [
        subprocess.Popen(
            [sys.executable, "-c", CLIENT, str(stop_file), str(rank)],
            env=env,
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(4)
    ]
    seen: dict[str, int] = {}
    try:
        for c in clients:  # every Board is open (the clients do not start daemons themselves)
            assert c.stdout.readline().strip() == "open", c.stderr.read()
        for k in range(KILLS):
            wait_until(lambda: _taking_data(endpoint, seen), timeout=60, message=f"daemon {k} took no calls")
            time.sleep(rng.uniform(0.0, 0.3))  # the random moment of the kill (not a wait for anything)
            assert all(c.poll() is None for c in clients), "a client stopped logging before the last kill"
            d.kill()
            time.sleep(rng.uniform(0.0, 0.2))  # the random time with no daemon at all
            d = daemon_factory()
        stop_file.touch()
        outs = [c.communicate(timeout=240) for c in clients]
    finally:
        stop_file.touch()
        for c in clients:
            if c.poll() is None:
                c.kill()
    for c, (out, err) in zip(clients, outs):
        assert c.returncode == 0, f"client failed (seed {seed}): {err[-2000:]}"
        assert "Traceback" not in err, err[-2000:]
    stats = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    # the clients really saw restarts (a daemon killed before a client asked it anything goes unseen)
    assert all(s["daemon_restarts_seen"] >= 1 for s in stats) and sum(s["daemon_restarts_seen"] for s in stats) >= 10, (
        stats
    )
    assert all(s["acknowledged"] == s["logged"] for s in stats), stats
    with RunReader(base_dir / "default" / "killed") as r:
        for rank, s in enumerate(stats):
            n = s["logged"]
            expected = np.arange(n, dtype=np.float64)
            x = r.series("x", rank=rank)
            y = r.series("y", rank=rank)
            assert len(x) == n, f"rank {rank}: {len(x)} points of x instead of {n} (seed {seed})"
            assert np.array_equal(x["value"], expected), f"rank {rank}: x values differ (seed {seed})"
            assert np.array_equal(x["step"], np.arange(n)), f"rank {rank}: steps differ (seed {seed})"
            assert np.array_equal(y["value"], -expected)
        assert r.status == "finished"


@pytest.mark.own_daemon
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


def test_a_client_whose_data_reached_a_restarted_daemon_first_is_still_watched(endpoint, daemon_factory, base_dir):
    """After a daemon restart the client's queued data can be written before its first acknowledgement
    request arrives.  The client must still be re-attached by that request (a ``resume`` event), so
    that when its process dies the run is marked crashed instead of staying ``running`` for good."""
    from kohakuboard.protocol import codec
    from kohakuboard.protocol import messages as m
    from kohakuboard.protocol.peer import process_start_ticks

    from .test_item_contract import _Raw

    trainer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    peer = (trainer.pid, process_start_ticks(trainer.pid), __import__("socket").gethostname())
    run = str(base_dir / "default" / "early")

    def data(raw, first, last):
        for seq in range(first, last + 1):
            env = m.Envelope(run=run, client="early", seq=seq, step=seq, wall=1.7e9 + seq)
            raw.push.send_multipart(codec.encode(m.LogMessage(env, {"x": float(seq)})))

    def points() -> int:
        runs = daemon_status(endpoint)["runs"]
        return sum(r["points"] for r in runs if r["path"] == run)

    try:
        first = daemon_factory(endpoint)
        raw = _Raw(endpoint)
        try:
            opened = raw.request(
                m.OpenRun(m.Envelope(run=run, client="early", seq=1), "early", "default", "early", {}, *peer)
            )
            assert isinstance(opened, m.RunOpened), opened
            data(raw, 1, 5)
            assert raw.request(m.FlushRequest(m.Envelope(run=run, client="early", seq=2), 5)).durable_seq == 5
        finally:
            raw.close()
        first.kill()
        daemon_factory(endpoint)
        raw = _Raw(endpoint)
        try:
            data(raw, 6, 10)  # what the client had queued reaches the new daemon first
            wait_until(lambda: points() == 5, message="the new daemon did not write the queued calls")
            acked = raw.request(m.AckRequest(m.Envelope(run=run, client="early", seq=3), 10, 0, *peer))
            assert isinstance(acked, m.Acked) and acked.durable_seq == 10, acked
        finally:
            raw.close()
        with RunReader(run) as r:
            assert [e["kind"] for e in r.events()].count("resume") == 1, r.events()
        trainer.kill()  # the training process dies without finishing
        trainer.wait()

        def status() -> str:
            with RunReader(run) as r:
                return r.status

        wait_until(lambda: status() == "crashed", message="the run of a dead client stayed running")
        with RunReader(run) as r:
            assert r.series("x")["value"].tolist() == [float(i) for i in range(1, 11)]
    finally:
        trainer.kill()
        trainer.wait()
