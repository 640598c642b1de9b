"""Several training processes logging at once: every value arrives, exactly and in order."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from kohakuboard.storage.reader import RunReader

N_PROC = 4
N_CALLS = 10_000

WORKER = """
import sys
from kohakuboard.client import Board
proc, run_id = int(sys.argv[1]), sys.argv[2]
board = Board(name="many", run_id=run_id, project="multi", capture_output=False)
for i in range(N_CALLS):
    # exact binary fractions and NaN/inf: any loss or rounding would show
    board.log(**{f"p{proc}/value": proc * 1_000_000 + i + 0.25, "shared": float(i)})
board.flush()
board.finish()
"""


def _spawn_workers(script_path: Path, run_ids: list[str]):
    import subprocess
    import sys

    procs = [
        subprocess.Popen([sys.executable, str(script_path), str(p), run_ids[p]], stderr=subprocess.PIPE, text=True)
        for p in range(N_PROC)
    ]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err


@pytest.mark.parametrize("shared", [False, True], ids=["4-runs", "1-shared-run"])
def test_four_processes_ten_thousand_calls_each(daemon, base_dir, tmp_path, shared):
    """4 processes x 10,000 log() calls: every value read back exactly, in order, per process."""
    script = tmp_path / "worker.py"
    script.write_text(WORKER.replace("N_CALLS", str(N_CALLS)))
    run_ids = ["shared"] * N_PROC if shared else [f"run{p}" for p in range(N_PROC)]
    _spawn_workers(script, run_ids)

    for p in range(N_PROC):
        with RunReader(base_dir / "multi" / run_ids[p]) as r:
            s = r.series(f"p{p}/value")
            expected = p * 1_000_000 + np.arange(N_CALLS) + 0.25
            assert len(s) == N_CALLS
            np.testing.assert_array_equal(s["value"], expected)
            assert (np.diff(s["step"]) == 1).all()
            shared_points = r.series("shared")
            assert len(shared_points) == (N_PROC if shared else 1) * N_CALLS
            meta = json.loads((base_dir / "multi" / run_ids[p] / "metadata.json").read_text())
            assert meta["status"] == "finished"
    if shared:
        with RunReader(base_dir / "multi" / "shared") as r:
            # each process's points keep their own order inside the shared series
            values = r.series("shared")["value"]
            assert sorted(values.tolist()) == sorted([float(i) for i in range(N_CALLS)] * N_PROC)
