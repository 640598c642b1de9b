"""Two writers, one rank: a second live process with the same run_id and rank is warned; resuming is silent.

And what a resume does to ``name`` and ``config``: the run keeps its name, rank 0's config is merged in.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from kohakuboard.client import Board
from kohakuboard.storage.reader import RunReader

HOLD = """
import sys, time
from kohakuboard.client import Board
b = Board(run_id="twice", capture_output=False)
b.log(x=1.0)
b.flush()
print("ready", flush=True)
sys.stdin.read()  # until the test closes our stdin
b.finish()
"""


@pytest.fixture
def other_writer(daemon, tmp_path):
    """Another live process logging into run "twice" with rank 0."""
    env = dict(os.environ, KOBO_DAEMON_AUTOSTART="0")
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD], cwd=tmp_path, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout.readline().strip() == "ready"
        yield proc
    finally:
        proc.stdin.close()
        proc.wait(30)
        proc.stdout.close()


def test_a_second_process_with_the_same_rank_is_warned_naming_the_other(other_writer):
    with pytest.warns(
        UserWarning,
        match=rf"another live process with rank 0 \(pid {other_writer.pid} on "
        rf"{socket.gethostname()}\).*interleave.*same run_id",
    ) as caught:
        b = Board(run_id="twice", capture_output=False)
    assert len(caught) == 1
    b.log(x=2.0)
    b.finish()


def test_another_rank_or_another_board_of_this_process_is_not_warned(other_writer):
    with Board(run_id="twice", rank=1, world_size=2, capture_output=False) as b:  # filterwarnings=error
        b.log(x=2.0)
    a = Board(run_id="mine", capture_output=False)
    with Board(run_id="mine", capture_output=False) as b:  # two Boards of one process: not two scripts
        b.log(x=1.0)
    a.finish()


def test_resume_keeps_the_name_and_merges_rank0s_config_silently(daemon):
    with Board(name="first", run_id="again", config={"lr": 0.1, "batch": 32}, capture_output=False) as b:
        b.log(loss=1.0)
    with Board(name="second", run_id="again", config={"lr": 0.2, "wd": 0.01}, capture_output=False) as b:
        assert b.resumed and b.name == "first"  # the run keeps its name; the Board says so
        b.log(loss=0.5)
    with RunReader(b.path) as r:
        assert r.metadata["name"] == "first"
        assert r.config == {"lr": 0.2, "batch": 32, "wd": 0.01}  # given keys replaced, new added, others kept
        assert r.series("loss")["step"].tolist() == [0, 1]  # steps continue
    with Board(run_id="again", capture_output=False) as b:  # no name, no config: both stay
        assert b.name == "first"
    with RunReader(b.path) as r:
        assert r.config == {"lr": 0.2, "batch": 32, "wd": 0.01}
