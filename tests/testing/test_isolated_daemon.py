"""kohakuboard.testing: a real daemon in a temp dir for a user's own tests, and its pytest fixture."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from kohakuboard.client import Board
from kohakuboard.protocol.endpoint import daemon_alive
from kohakuboard.testing import daemon_status, isolated_daemon, wait_until

SCRIPT = """
from kohakuboard.client import Board
with Board(run_id="script", capture_output=False) as b:
    for i in range(5):
        b.log(loss=1.0 / (i + 1))
"""


def test_boards_in_the_block_log_to_the_isolated_daemon_and_read_back(monkeypatch):
    """Boards made in the block use the daemon and base dir of the block; afterwards the daemon is gone,
    its temporary base dir removed and the environment as it was, settings of the shell included."""
    monkeypatch.setenv("KOBO_QUEUE_POLICY", "drop")  # a user's shell setting must not leak into the test
    monkeypatch.setenv("RANK", "3")
    before = dict(os.environ)
    with isolated_daemon() as kobo:
        assert os.environ["KOBO_DAEMON_ENDPOINT"] == str(kobo.endpoint)
        assert os.environ["KOBO_BASE_DIR"] == str(kobo.base_dir)
        assert "KOBO_QUEUE_POLICY" not in os.environ and "RANK" not in os.environ
        with Board(run_id="t1", capture_output=False) as b:
            for i in range(100):
                b.log(loss=1.0 / (i + 1))
        assert Path(b.path) == kobo.run_path("t1")
        with kobo.read("t1") as run:
            assert run.series("loss")["value"].tolist() == [1.0 / (i + 1) for i in range(100)]
            assert run.series("loss")["step"].tolist() == list(range(100))
            assert run.status == "finished"
        info = kobo.status()
        assert info["pid"] == kobo.pid and info["running"] and info["received"] >= 1
        assert [r["path"] for r in info["runs"]] == [b.path]
        endpoint, base = kobo.endpoint, kobo.base_dir
    assert not daemon_alive(endpoint)
    assert not base.exists()
    assert dict(os.environ) == before


def test_a_training_script_run_as_a_subprocess_uses_the_daemon(tmp_path):
    """env() is the environment for a script: this daemon, this base dir (kept: it was given)."""
    with isolated_daemon(tmp_path / "runs") as kobo:
        res = subprocess.run(
            [sys.executable, "-c", SCRIPT], env=kobo.env(), cwd=tmp_path, capture_output=True, text=True, timeout=120
        )
        assert res.returncode == 0, res.stderr
        with kobo.read("script") as run:
            assert len(run.series("loss")) == 5
        assert daemon_status(kobo.endpoint)["pid"] == kobo.pid
    assert (tmp_path / "runs" / "default" / "script" / "metadata.json").is_file()


def test_no_second_daemon_is_started_when_the_isolated_one_is_gone():
    """Autostart is off in the block: a Board whose daemon died raises instead of starting an unwatched one."""
    from kohakuboard.protocol.errors import DaemonUnavailable

    with isolated_daemon() as kobo:
        kobo.kill()
        with pytest.raises(DaemonUnavailable):
            Board(run_id="after", capture_output=False)
        assert not daemon_alive(kobo.endpoint)


def test_wait_until_returns_the_value_at_once_or_fails_after_its_timeout():
    calls = []
    assert wait_until(lambda: calls.append(1) or len(calls) >= 3 and "done") == "done"
    assert len(calls) == 3
    with pytest.raises(AssertionError, match="waited 0.05s: never"):
        wait_until(lambda: False, timeout=0.05, message=lambda: "never")


def test_the_pytest_plugin_gives_a_kobo_daemon_fixture(kobo_daemon, tmp_path):
    """``pytest_plugins = ["kohakuboard.testing.plugin"]`` (this suite's conftest has it): a daemon of the
    test's own, runs under ``tmp_path / "kohakuboard"``, Boards of the test pointed at it."""
    assert kobo_daemon.base_dir == tmp_path / "kohakuboard"
    assert os.environ["KOBO_DAEMON_ENDPOINT"] == str(kobo_daemon.endpoint)
    with Board(run_id="t1", capture_output=False) as b:
        b.log(loss=0.5)
    with kobo_daemon.read("t1") as run:
        assert run.series("loss")["value"].tolist() == [0.5]
