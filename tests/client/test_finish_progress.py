"""finish() with a backlog of more than a second shows one progress line on stderr."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import threading

import pytest

from kohakuboard.client._progress import FinishProgress
from kohakuboard.storage.reader import RunReader

SCRIPT = r"""
import sys
from kohakuboard.client import Board
b = Board(run_id="progress", capture_output=False)
print("open", flush=True)
sys.stdin.readline()
for i in range(2000):
    b.log(x=float(i))
b.finish(timeout=60)
print("finished", flush=True)
"""


@pytest.mark.own_daemon
def test_finish_shows_progress_without_carriage_returns_when_stderr_is_a_file(daemon, base_dir, tmp_path):
    """The daemon is stopped (SIGSTOP) while finish() waits: after ~1 s finish() prints a progress line
    (written / total calls, rate); stderr is a pipe, so there is no carriage return; after SIGCONT the
    last line says all calls were written."""
    proc = subprocess.Popen(
        [sys.executable, "-c", SCRIPT],
        cwd=tmp_path,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    stopped = False
    try:
        assert proc.stdout.readline().strip() == "open", proc.stderr.read()
        os.kill(daemon.pid, signal.SIGSTOP)
        stopped = True
        proc.stdin.write("go\n")
        proc.stdin.flush()
        first = proc.stderr.readline()  # blocks until finish() has waited its second
        assert "finishing" in first and "0/2,000 log() calls written" in first, first
        os.kill(daemon.pid, signal.SIGCONT)
        stopped = False
        out, err = proc.communicate(timeout=60)
    finally:
        if stopped:
            os.kill(daemon.pid, signal.SIGCONT)
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0 and out.strip() == "finished", err
    text = first + err
    assert "\r" not in text
    lines = [x for x in text.splitlines() if "log() calls written" in x]
    assert 2 <= len(lines) <= 3, text  # the first, maybe one 10 s later, the last
    assert "2,000/2,000 log() calls written" in lines[-1] and "not written" not in lines[-1], lines[-1]
    with RunReader(base_dir / "default" / "progress") as r:
        assert len(r.series("x")) == 2000


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_on_a_terminal_is_one_line_rewritten_in_place():
    """On a terminal each update starts with a carriage return and only the last ends the line."""
    left = [100]
    released = threading.Event()
    stream = _Tty()

    def unwritten() -> int:
        if stream.getvalue().count("\r") >= 3:
            left[0] = 0
            released.set()
        return left[0]

    with FinishProgress(unwritten, "finishing run", stream=stream, delay=0.0):
        assert released.wait(10)
    text = stream.getvalue()
    assert text.count("\n") == 1 and text.endswith("\n") and text.count("\r") >= 3
    assert "100/100 log() calls written" in text.rsplit("\r", 1)[-1]


def test_no_progress_when_finish_is_quick():
    """Nothing is printed when the backlog is written within the delay."""
    stream = _Tty()
    with FinishProgress(lambda: 5, "finishing run", stream=stream, delay=5.0):
        pass
    assert stream.getvalue() == ""
