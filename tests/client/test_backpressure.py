"""A stalled daemon (SIGSTOP): the client's memory stays bounded, it warns, and after SIGCONT
every value arrives (policy block) or the stored drop count equals what is missing (policy drop)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from kohakuboard.cli.main import main as kobo
from kohakuboard.storage.reader import RunReader
from kohakuboard.testing import wait_until

N_CALLS = 300_000
K = 8  # scalars per call: unbounded, 300k calls would hold ~200 MB of Python objects

CLIENT = r"""
import json, sys, time
from kohakuboard.client import Board
b = Board(run_id=sys.argv[1], capture_output=False)
print("open", flush=True)
sys.stdin.readline()
t0 = time.monotonic()
for i in range(int(sys.argv[2])):
    b.log(**{f"m{j}": float(i) for j in range(8)})
print("logged", time.monotonic() - t0, flush=True)
b.flush(timeout=120)
print(json.dumps(b.stats()), flush=True)
b.finish()
"""


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


CLIENT_OUTPUT = r"""
import json, os, sys, time
from kohakuboard.client import Board
real = sys.stdout
sys.stdout = open(os.devnull, "w")  # the terminal's copy of every line would fill the test's pipe
b = Board(run_id=sys.argv[1])  # captures stdout
print("open", file=real, flush=True)
sys.stdin.readline()
for i in range(int(sys.argv[2])):
    b.log(x=float(i))
    print(f"line {i}")
b.flush(timeout=120)
print(json.dumps(b.stats()), file=real, flush=True)
b.finish()
"""


def _stalled_run(daemon, tmp_path, policy: str, client: str = CLIENT, n: int = N_CALLS, run_id: str = ""):
    env = dict(os.environ, KOBO_MAX_INFLIGHT_MB="4", KOBO_QUEUE_POLICY=policy)
    err_path = tmp_path / "client.err"
    with open(err_path, "w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-c", client, run_id or f"stall-{policy}", str(n)],
            env=env,
            cwd=tmp_path,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
        )
    try:
        assert proc.stdout.readline().strip() == "open"
        rss0 = _rss_mb(proc.pid)
        os.kill(daemon.pid, signal.SIGSTOP)
        try:
            proc.stdin.write("go\n")
            proc.stdin.flush()
            peak = rss0
            # the client says when it reached the bound: log() blocks (block) or drops (drop)
            at_bound = "log() blocks" if policy == "block" else "Queue size is at 100%"

            def bound_reached() -> bool:
                nonlocal peak
                peak = max(peak, _rss_mb(proc.pid))
                assert proc.poll() is None, "the client ended while the daemon was stopped"
                return at_bound in err_path.read_text()

            wait_until(bound_reached, timeout=60, interval=0.05, message=f"the client never said {at_bound!r}")
            for _ in range(20):  # keep sampling a little after the bound is hit
                time.sleep(0.05)
                peak = max(peak, _rss_mb(proc.pid))
            if policy == "block":
                assert proc.poll() is None, "log() should block while the daemon is stopped"
        finally:
            os.kill(daemon.pid, signal.SIGCONT)
        out, _ = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
    err_text = err_path.read_text()
    assert proc.returncode == 0, err_text[-2000:]
    lines = out.strip().splitlines()
    stats = json.loads(lines[-1])
    return peak - rss0, err_text, stats


@pytest.mark.own_daemon
def test_block_policy_bounds_memory_and_delivers_everything(daemon, tmp_path, base_dir):
    growth, err, stats = _stalled_run(daemon, tmp_path, "block")
    assert "kohakuboard: Queue size is" in err and "capacity" in err
    assert "log() blocks" in err
    assert growth < 48, f"client memory grew by {growth:.0f} MB with a 4 MB in-flight bound"
    assert stats["dropped_calls"] == 0 and stats["acknowledged"] == N_CALLS
    with RunReader(base_dir / "default" / "stall-block") as r:
        for j in (0, 7):
            v = r.series(f"m{j}")["value"]
            assert len(v) == N_CALLS and v[0] == 0.0 and v[-1] == N_CALLS - 1
            assert (v[1:] > v[:-1]).all()
        assert r.dropped() == {"calls": 0, "values": 0, "lines": 0}


@pytest.mark.own_daemon
def test_drop_policy_counts_exactly_what_is_missing(daemon, tmp_path, base_dir):
    growth, err, stats = _stalled_run(daemon, tmp_path, "drop")
    assert "kohakuboard: Queue size is" in err and "dropping the newest" in err
    assert growth < 48, f"client memory grew by {growth:.0f} MB with a 4 MB in-flight bound"
    assert stats["dropped_calls"] > 0
    run = base_dir / "default" / "stall-drop"
    with RunReader(run) as r:
        stored = len(r.series("m0"))
        assert stored + stats["dropped_calls"] == N_CALLS
        assert r.dropped() == {"calls": stats["dropped_calls"], "values": K * stats["dropped_calls"], "lines": 0}
        values = r.series("m3")["value"]
        assert len(values) == stored and (values[1:] > values[:-1]).all()  # what arrived is in order
    res = CliRunner().invoke(kobo, ["show", str(run)])
    assert res.exit_code == 0, res.output
    assert f"dropped:  {stats['dropped_calls']} log() call(s) ({K * stats['dropped_calls']} value(s))" in res.output


@pytest.mark.own_daemon
def test_drop_policy_counts_output_lines_apart_and_marks_them(daemon, tmp_path, base_dir):
    """Calls and captured output lines dropped together: each counted as what it is; output.log says where lines went."""
    import re

    n = 40_000
    _, err, stats = _stalled_run(daemon, tmp_path, "drop", CLIENT_OUTPUT, n, "stall-output")
    assert "dropping the newest" in err
    assert stats["dropped_calls"] > 0 and stats["dropped_lines"] > 0
    run = base_dir / "default" / "stall-output"
    with RunReader(run) as r:
        assert len(r.series("x")) + stats["dropped_calls"] == n
        assert r.dropped() == {
            "calls": stats["dropped_calls"],
            "values": stats["dropped_calls"],
            "lines": stats["dropped_lines"],
        }
        text = r.read_output()
    kept = re.findall(r"^line (\d+)$", text, re.M)
    assert len(kept) + stats["dropped_lines"] == n
    marks = [int(k) for k in re.findall(r"^\[kohakuboard: (\d+) line\(s\) of output dropped here", text, re.M)]
    assert marks and sum(marks) == stats["dropped_lines"]
    # Each mark stands where its lines were: between two kept lines, the marks
    # account for exactly the lines missing there.
    previous, marked = -1, 0
    for kept_line, mark in re.findall(
        r"^(?:line (\d+)|\[kohakuboard: (\d+) line\(s\) of output dropped here.*)$", text, re.M
    ):
        if mark:
            marked += int(mark)
        else:
            assert int(kept_line) - previous - 1 == marked, (previous, kept_line, marked)
            previous, marked = int(kept_line), 0
    assert n - 1 - previous == marked
    res = CliRunner().invoke(kobo, ["show", str(run)])
    assert res.exit_code == 0, res.output
    assert f"and {stats['dropped_lines']} output line(s) discarded" in res.output
    # the viewer's run summary (its dropped-data banner) counts both
    from kohakuboard.viewer.app import Viewer

    shown = Viewer(str(base_dir)).run_summary("default", "stall-output")["dropped"]
    assert shown == {"calls": stats["dropped_calls"], "values": stats["dropped_calls"], "lines": stats["dropped_lines"]}
