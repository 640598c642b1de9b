"""Clean exit: a stopped daemon leaves no socket files; an autostarted daemon is no child of the script."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from kohakuboard.protocol.endpoint import daemon_alive


def _files(endpoint) -> set[str]:
    return set(os.listdir(endpoint.directory))


@pytest.mark.own_daemon
def test_a_cleanly_stopped_daemon_removes_its_socket_and_pid_files(daemon, endpoint):
    assert {"kobo.data", "kobo.ctl", "kobo.pid", "kobo.lock"} <= _files(endpoint)
    assert daemon.terminate() == 0  # SIGTERM: drain and exit
    left = _files(endpoint)
    assert not {"kobo.data", "kobo.ctl", "kobo.pid"} & left, left
    # and `kobo-daemon stop` too, on the daemon a client started
    r = subprocess.run(
        [sys.executable, "-c", "from kohakuboard.client import Board\nBoard(capture_output=False).finish()"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    assert daemon_alive(endpoint) and {"kobo.data", "kobo.ctl"} <= _files(endpoint)
    r = subprocess.run([sys.executable, "-m", "kohakuboard.daemon", "stop"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert not daemon_alive(endpoint)
    assert not {"kobo.data", "kobo.ctl", "kobo.pid"} & _files(endpoint)


SCRIPT = """
import os
from kohakuboard.client import Board
with Board(capture_output=False) as b:
    b.log(x=1.0)
print(os.getpid(), flush=True)
"""


def test_an_autostarted_daemon_is_no_child_of_the_script_and_nothing_warns(endpoint, tmp_path):
    """The script exits first, as it should, without 'ResourceWarning: subprocess ... is still running'."""
    r = subprocess.run(
        [sys.executable, "-W", "always", "-X", "dev", "-c", SCRIPT],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    assert "Warning" not in r.stderr, r.stderr
    script_pid = int(r.stdout.split()[0])
    assert daemon_alive(endpoint)
    with open(endpoint.pid_path) as f:
        pid = int(f.read())
    with open(f"/proc/{pid}/stat", "rb") as f:
        ppid = int(f.read().rsplit(b")", 1)[1].split()[1])
    assert ppid != script_pid and ppid != os.getpid()
    # it runs in a session of its own (no terminal's Ctrl-C or hang-up reaches it)
    assert os.getsid(pid) == pid or os.getsid(pid) != os.getsid(0)
