"""A training process killed with SIGKILL: what it flushed is there, the run reads as crashed."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

from kohakuboard.storage.reader import RunReader
from kohakuboard.testing import wait_until

KILLED = """
import sys, time
from kohakuboard.client import Board
board = Board(name="doomed", run_id="doomed", capture_output=False)
for i in range(5000):
    board.step()
    board.log(loss=1.0 / (i + 1), acc=i / 5000)
board.flush()
print("flushed", flush=True)
time.sleep(600)
"""


def test_sigkill_after_flush_keeps_data_and_marks_crashed(daemon, base_dir, tmp_path):
    """Everything flushed before kill -9 is in the run folder and the run is marked crashed."""
    proc = subprocess.Popen([sys.executable, "-c", KILLED], stdout=subprocess.PIPE, text=True, cwd=tmp_path)
    assert proc.stdout.readline().strip() == "flushed"
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    proc.stdout.close()
    run = base_dir / "default" / "doomed"
    wait_until(
        lambda: json.loads((run / "metadata.json").read_text())["status"] == "crashed",
        interval=0.05,
        message="run was not marked crashed",
    )
    with RunReader(run) as r:
        assert r.status == "crashed"
        loss = r.series("loss")
        assert len(loss) == 5000 and len(r.series("acc")) == 5000
        assert loss["value"][-1] == 1.0 / 5000
    assert "crashed" in (run / "logs" / "writer.log").read_text()


def test_uncaught_exception_marks_run_crashed(daemon, base_dir, tmp_path, script):
    """A script that dies of an exception leaves a crashed run with all it logged and its traceback."""
    code = """
from kohakuboard.client import Board
board = Board(name="boom", run_id="boom")
for i in range(100):
    board.log(x=i)
raise RuntimeError("diverged at step 100")
"""
    res = script(code, cwd=tmp_path)
    assert res.returncode == 1 and "diverged at step 100" in res.stderr
    run = base_dir / "default" / "boom"
    with RunReader(run) as r:
        assert r.status == "crashed"
        assert len(r.series("x")) == 100
    assert "RuntimeError: diverged at step 100" in (run / "logs" / "output.log").read_text()
