"""A Board inherited by a forked child logs into the same run through sockets of its own."""

from __future__ import annotations

import multiprocessing
import os

from kohakuboard.client import Board
from kohakuboard.storage.reader import RunReader


def _child_logs(board: Board, n: int) -> None:
    for i in range(n):
        board.log(**{"child/value": i})
    board.flush()


def test_multiprocessing_fork_child_logs_into_the_same_run(daemon):
    """Parent and a fork-started child both log while the other does; every point arrives and the run ends finished."""
    board = Board(name="forked", run_id="forked", capture_output=False)
    for i in range(100):
        board.log(**{"parent/value": i})
    child = multiprocessing.get_context("fork").Process(target=_child_logs, args=(board, 1000))
    child.start()
    for i in range(100, 200):
        board.log(**{"parent/value": i})
    child.join(60)
    assert child.exitcode == 0
    board.log(**{"parent/value": 200})
    board.flush()
    with RunReader(board.path) as r:
        parent = r.series("parent/value")
        assert parent["value"].tolist() == list(range(201))
        assert parent["step"].tolist() == list(range(201))
        kid = r.series("child/value")
        assert kid["value"].tolist() == list(range(1000))
        # the child's steps continue from the parent's at fork time (step 99)
        assert kid["step"].tolist() == list(range(100, 1100))
        clients = r.clients()
        assert len(clients) == 2 and len({c["client"] for c in clients}) == 2
        assert sorted(c["pid"] for c in clients) == sorted([os.getpid(), child.pid])
        # the child finished its own client when it exited; the parent's is still attached
        assert {c["pid"]: c["status"] for c in clients}[child.pid] == "finished"
        assert r.status == "running"
    board.finish()
    with RunReader(board.path) as r:
        assert r.status == "finished"


def test_os_fork_child_finish_does_not_close_the_parent(daemon):
    """A child's finish() ends only the child's client; a child that never logs attaches nothing; the parent keeps logging."""
    board = Board(name="osfork", run_id="osfork", capture_output=False)
    board.log(parent=0.0)
    pids = []
    for logs in (True, False):
        pid = os.fork()
        if pid == 0:  # child: never return into pytest
            code = 1
            try:
                if logs:
                    for i in range(10):
                        board.log(child=i)
                board.finish()
                code = 0
            finally:
                os._exit(code)
        pids.append(pid)
    for pid in pids:
        assert os.waitpid(pid, 0)[1] == 0
    for i in range(1, 50):
        board.log(parent=float(i))
    board.flush()
    with RunReader(board.path) as r:
        assert len(r.series("parent")) == 50 and r.series("child")["value"].tolist() == list(range(10))
        assert {c["pid"]: c["status"] for c in r.clients()} == {os.getpid(): "attached", pids[0]: "finished"}
    board.finish()
    with RunReader(board.path) as r:
        assert r.status == "finished"
