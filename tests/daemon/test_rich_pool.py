"""Rich values prepared on the daemon's compute pool: order and exactly-once delivery hold.

Several clients log images, histograms, tensors and KDEs into one run at once,
enough that the compute pool always has work queued; the daemon is killed with
SIGKILL half way and restarted.  Every row is read back through RunReader
exactly once, in call order, with the content of its call.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys

import numpy as np
from PIL import Image

from kohakuboard.storage.reader import RunReader

CLIENTS = 3
CALLS = 80
HIST_VALUES = 200_000

CLIENT = (
    r"""
import sys
import numpy as np
from kohakuboard.client import Board, Histogram, KernelDensity, Media, TensorLog
n, rank, hist_values, kill_at = (int(x) for x in sys.argv[1:5])
rng = np.random.default_rng(rank)
noise = rng.standard_normal(hist_values + n, dtype=np.float32)
with Board(run_id="pooled", rank=rank, world_size=%d, capture_output=False) as b:
    print("open", flush=True)
    for i in range(n):
        img = rng.integers(0, 256, (96, 96, 3), dtype=np.uint8)
        img[0, 0] = (rank, i, 7)  # the call, readable from the stored PNG
        b.log(
            img=Media(img),
            hist=Histogram(noise[: hist_values + i]),  # its total names the call
            t=TensorLog(np.full((4, 8), rank * 1000 + i, np.float32)),
            kde=KernelDensity(noise[: 100 + i], grid_size=64),  # its count names the call
        )
        if i == kill_at:
            print("half", flush=True)  # the test kills the daemon now, while calls are in flight
    b.flush(timeout=120)
    s = b.stats()
    print("done", s["acknowledged"], s["logged"], flush=True)
"""
    % CLIENTS
)


def test_pooled_rich_values_in_call_order_exactly_once_through_sigkill(endpoint, daemon_factory, base_dir, tmp_path):
    """3 clients x 80 calls of image + 200k-value histogram + tensor + KDE into one run, the daemon
    SIGKILLed and restarted half way: every row once, steps 0..79 per rank, stored in call order,
    each with its own call's content."""
    env = dict(os.environ, KOBO_DAEMON_AUTOSTART="0")  # the test restarts the daemon
    d = daemon_factory(endpoint, "--compute-threads", "2")
    clients = [
        subprocess.Popen(
            [sys.executable, "-c", CLIENT, str(CALLS), str(rank), str(HIST_VALUES), str(CALLS // 2)],
            env=env,
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(CLIENTS)
    ]
    try:
        for c in clients:
            assert c.stdout.readline().strip() == "open", c.stderr.read()
        # Wait until one client is half way: the others are logging too, and the
        # pool has work queued (each call is ~1 MB of histogram to bin).
        assert clients[0].stdout.readline().strip() == "half", clients[0].stderr.read()
        d.kill()
        d = daemon_factory(endpoint, "--compute-threads", "2")
        outs = [c.communicate(timeout=120) for c in clients]
    finally:
        for c in clients:
            if c.poll() is None:
                c.kill()
    for c, (out, err) in zip(clients, outs):
        assert c.returncode == 0, err[-2000:]
        assert "Traceback" not in err, err[-2000:]
        done = out.strip().splitlines()[-1].split()
        assert done[0] == "done" and done[1] == done[2], out
    assert any("restarted" in err for _, err in outs), "no client saw the daemon restart"

    calls = list(range(CALLS))
    with RunReader(base_dir / "default" / "pooled") as r:
        for rank in range(CLIENTS):
            media = r.media("img", rank=rank)
            assert [m["step"] for m in media] == calls, f"rank {rank}: media steps"
            ids = [m["id"] for m in media]
            assert ids == sorted(ids), f"rank {rank}: media rows not stored in call order: {ids}"
            for i, m in enumerate(media):
                px = np.asarray(Image.open(io.BytesIO(RunReader.media_bytes(m))))
                assert px.shape == (96, 96, 3) and tuple(px[0, 0]) == (rank, i, 7), f"rank {rank} call {i}: image"
            hists = r.histograms("hist", rank=rank)
            assert [h["step"] for h in hists] == calls, f"rank {rank}: histogram steps"
            assert [h["total"] for h in hists] == [HIST_VALUES + i for i in calls], f"rank {rank}: histograms"
            assert all(int(h["counts"].sum()) == h["total"] for h in hists)
            tensors = r.tensors("t", rank=rank)
            assert [t["step"] for t in tensors] == calls, f"rank {rank}: tensor steps"
            assert [float(t["array"][0, 0]) for t in tensors] == [rank * 1000.0 + i for i in calls]
            kdes = r.kde("kde", rank=rank)
            assert [k["step"] for k in kdes] == calls, f"rank {rank}: KDE steps"
            assert [k["count"] for k in kdes] == [100 + i for i in calls], f"rank {rank}: KDEs"
        assert r.status == "finished"
    d.terminate()
