"""Status that tells the truth: interrupted, crashed with its traceback, stale "running?", stderr marked, ANSI stripped."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from click.testing import CliRunner

from kohakuboard.cli.main import main as kobo
from kohakuboard.client import Board
from kohakuboard.storage import format as fmt
from kohakuboard.storage.reader import RunReader, list_runs, strip_ansi, writer_alive


def _output(path) -> str:
    with RunReader(path) as r:
        return r.read_output()


ENDINGS = {
    "interrupt-at-top-level": (
        "b = Board(run_id='end', capture_output=CAPTURE)\nb.log(x=1.0)\nprint('started')\nraise KeyboardInterrupt\n",
        "interrupted",
        "KeyboardInterrupt",
    ),
    "interrupt-in-with": (
        "with Board(run_id='end', capture_output=CAPTURE) as b:\n    b.log(x=1.0)\n    print('started')\n"
        "    raise KeyboardInterrupt\n",
        "interrupted",
        "KeyboardInterrupt",
    ),
    "exception-at-top-level": (
        "b = Board(run_id='end', capture_output=CAPTURE)\nb.log(x=1.0)\nprint('started')\n"
        "def train():\n    raise ValueError('boom')\ntrain()\n",
        "crashed",
        "ValueError: boom",
    ),
    "exception-in-with": (
        "with Board(run_id='end', capture_output=CAPTURE) as b:\n    b.log(x=1.0)\n    print('started')\n"
        "    def train():\n        raise ValueError('boom')\n    train()\n",
        "crashed",
        "ValueError: boom",
    ),
}


@pytest.mark.parametrize("capture", [True, False], ids=["capture", "no-capture"])
@pytest.mark.parametrize("ending", list(ENDINGS))
def test_how_the_script_ended_is_the_status_with_the_traceback_in_output_log(
    daemon, script, tmp_path, base_dir, ending, capture
):
    code, status, last_line = ENDINGS[ending]
    r = script("from kohakuboard.client import Board\n" + code.replace("CAPTURE", str(capture)), cwd=tmp_path)
    assert r.returncode != 0 and last_line in r.stderr  # Python still prints the traceback itself
    path = base_dir / "default" / "end"
    with RunReader(path) as run:
        assert run.status == status
        assert run.series("x")["value"].tolist() == [1.0]
        out = run.read_output()
    lines = out.splitlines()
    assert f"{fmt.STDERR_MARK}Traceback (most recent call last):" in lines, out
    assert lines[-1] == fmt.STDERR_MARK + last_line, out
    assert out.count("Traceback (most recent call last):") == 1, out  # once, not twice
    if "exception" in ending:
        assert any(line.startswith(fmt.STDERR_MARK) and "in train" in line for line in lines), out
    if capture:
        assert "started" in lines  # stdout lines are not marked


def test_finish_status_interrupted_and_crash_wins(daemon):
    """Two clients: one interrupted, one finished -> interrupted; a crashed one makes the run crashed."""
    a = Board(run_id="mix", capture_output=False)
    b = Board(run_id="mix", capture_output=False)
    a.finish(status="interrupted")
    b.finish()
    with RunReader(a.path) as r:
        assert r.status == "interrupted"
    a = Board(run_id="mix2", capture_output=False)
    b = Board(run_id="mix2", capture_output=False)
    a.finish(status="interrupted")
    b.finish(status="crashed")
    with RunReader(a.path) as r:
        assert r.status == "crashed"


HOLD = """
import sys, time
from kohakuboard.client import Board
b = Board(run_id="stale", capture_output=False)
b.log(x=1.0)
b.flush()
print("ready", flush=True)
time.sleep(120)
"""


@pytest.mark.own_daemon
def test_a_run_nobody_writes_any_more_reads_as_running_question_mark(daemon, tmp_path, base_dir, endpoint):
    """Daemon and client both killed (kill -9): metadata.json still says running; readers say "running?"."""
    env = dict(os.environ, KOBO_DAEMON_AUTOSTART="0")
    proc = subprocess.Popen([sys.executable, "-c", HOLD], cwd=tmp_path, env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        path = base_dir / "default" / "stale"
        assert writer_alive(path)
        with RunReader(path) as r:
            assert r.status == "running"  # live: the daemon holds it open
        assert [i.status for i in list_runs(base_dir)] == ["running"]
        daemon.kill()
        proc.kill()
    finally:
        proc.kill()
        proc.wait(10)
        proc.stdout.close()
    assert not writer_alive(path)
    with RunReader(path) as r:
        assert r.metadata["status"] == "running" and r.status == "running?"
        assert r.series("x")["value"].tolist() == [1.0]
    assert [i.status for i in list_runs(base_dir)] == ["running?"]
    out = CliRunner().invoke(kobo, ["list", str(base_dir)])
    assert "running?" in out.output
    out = CliRunner().invoke(kobo, ["show", "stale", "--dir", str(base_dir)])
    assert out.exit_code == 0 and "status:   running? (no daemon holds this run open" in out.output


def test_stderr_lines_are_marked_and_ansi_codes_can_be_stripped(daemon, script, tmp_path, base_dir):
    code = (
        "import sys\nfrom kohakuboard.client import Board\n"
        "with Board(run_id='out', capture_output=True) as b:\n"
        "    print('plain stdout')\n"
        "    print('\\x1b[31mred warning\\x1b[0m on stderr', file=sys.stderr)\n"
        "    print('\\x1b[1;32mbold green\\x1b[0m\\x1b[K done')\n"
        "    sys.stderr.write('two\\nlines\\n')\n"
    )
    r = script(code, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    path = base_dir / "default" / "out"
    raw = _output(path)
    assert raw.splitlines() == [
        "plain stdout",
        "[stderr] \x1b[31mred warning\x1b[0m on stderr",
        "\x1b[1;32mbold green\x1b[0m\x1b[K done",
        "[stderr] two",
        "[stderr] lines",
    ]
    with RunReader(path) as run:
        clean = run.read_output(strip_ansi=True)
    assert clean.splitlines() == [
        "plain stdout",
        "[stderr] red warning on stderr",
        "bold green done",
        "[stderr] two",
        "[stderr] lines",
    ]
    res = CliRunner().invoke(kobo, ["show", "out", "--dir", str(base_dir), "--output", "--strip-ansi"])
    assert res.exit_code == 0 and res.output == clean
    res = CliRunner().invoke(kobo, ["show", "out", "--dir", str(base_dir), "--output"])
    assert res.output == raw
    assert strip_ansi("\x1b]8;;http://x\x1b\\link\x1b]8;;\x1b\\ \x1b[2J\x1b[Hz") == "link z"


def test_ranks_keep_their_prefix_before_the_stderr_mark(daemon, script, tmp_path, base_dir):
    code = (
        "import sys\nfrom kohakuboard.client import Board\n"
        "with Board(run_id='ddp', capture_output=True, rank=1, world_size=2) as b:\n"
        "    print('out')\n    print('err', file=sys.stderr)\n"
    )
    r = script(code, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert _output(base_dir / "default" / "ddp").splitlines() == ["[rank 1] out", "[rank 1] [stderr] err"]
