"""kobo-daemon run/start/stop/status, the endpoint lock, permissions and SIGTERM draining."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from kohakuboard.client import Board
from kohakuboard.protocol.endpoint import daemon_alive
from kohakuboard.storage.reader import RunReader
from kohakuboard.testing import daemon_status, wait_until


def _kobo_daemon(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kohakuboard.daemon", *args], capture_output=True, text=True, timeout=timeout
    )


def test_second_daemon_refuses_to_start(daemon, endpoint):
    """A second daemon on the same endpoint exits with code 4 and names the running one."""
    res = _kobo_daemon("run", timeout=30)
    assert res.returncode == 4
    assert f"pid {daemon.pid}" in res.stderr and "already running" in res.stderr
    assert daemon.proc.poll() is None, "the first daemon must keep running"


def test_socket_directory_and_sockets_are_private(daemon, endpoint):
    """The endpoint directory is 0700 and the sockets 0600."""
    assert stat.S_IMODE(os.stat(endpoint.directory).st_mode) == 0o700
    for addr in (endpoint.data_addr, endpoint.control_addr):
        assert stat.S_IMODE(os.stat(addr[len("ipc://") :]).st_mode) == 0o600


def test_start_status_stop(endpoint):
    """start detaches a daemon, status reports it, stop drains it and removes nothing the user logged."""
    res = _kobo_daemon("start")
    assert res.returncode == 0 and "started" in res.stdout, res.stderr
    assert daemon_alive(endpoint)
    assert "already running" in _kobo_daemon("start").stdout
    st = _kobo_daemon("status", "--json")
    assert st.returncode == 0
    info = json.loads(st.stdout)
    assert info["running"] and info["pid"] == int(Path(endpoint.pid_path).read_text())
    res = _kobo_daemon("stop")
    assert res.returncode == 0 and "stopped" in res.stdout
    assert not daemon_alive(endpoint)
    res = _kobo_daemon("status")
    assert res.returncode == 1 and "no kobo-daemon running" in res.stdout


def test_status_lists_runs_and_clients(daemon, endpoint):
    """status shows each open run with its attached clients and written points."""
    with Board(run_id="watched", capture_output=False) as b:
        for i in range(100):
            b.log(x=i)
        b.flush()
        res = _kobo_daemon("status")
        assert res.returncode == 0
        assert "watched: 1 client(s), 100 points" in res.stdout


@pytest.mark.own_daemon
def test_sigterm_drains_and_flushes_everything(daemon, endpoint, base_dir):
    """SIGTERM while a client has unflushed data: the daemon writes it all and exits 0."""
    b = Board(run_id="drain", capture_output=False)
    for i in range(20_000):
        b.log(x=float(i))

    def received_everything() -> bool:  # by the daemon, nothing flushed
        runs = [r for r in daemon_status(endpoint)["runs"] if r["path"] == b.path]
        return bool(runs) and any(c["received_seq"] >= 20_000 for c in runs[0]["clients"])

    wait_until(received_everything, message="the daemon never received all 20,000 calls")
    assert daemon.terminate() == 0
    with RunReader(base_dir / "default" / "drain") as r:
        assert len(r.series("x")) == 20_000
        assert r.series("x")["value"][-1] == 19_999.0
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the daemon is gone on purpose
        b.finish(timeout=0.5)


@pytest.mark.own_daemon
def test_stale_socket_files_from_a_killed_daemon_do_not_block_a_restart(daemon, daemon_factory, endpoint, base_dir):
    """After kill -9, a new daemon starts on the same endpoint and a new board works."""
    daemon.kill()
    assert not daemon_alive(endpoint)
    daemon_factory(endpoint)
    with Board(run_id="again", capture_output=False) as b:
        b.log(x=1.0)
        b.flush()
    with RunReader(base_dir / "default" / "again") as r:
        assert r.series("x")["value"].tolist() == [1.0]
