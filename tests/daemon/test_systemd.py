"""The systemd side: Type=notify readiness over $NOTIFY_SOCKET, and the unit files."""

from __future__ import annotations

import configparser
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_notify_socket_gets_ready_and_stopping(endpoint, tmp_path):
    """The daemon sends READY=1 once it serves and STOPPING=1 on SIGTERM, then exits 0."""
    addr = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(addr)
    sock.settimeout(20)
    env = dict(os.environ, NOTIFY_SOCKET=addr)
    proc = subprocess.Popen([sys.executable, "-m", "kohakuboard.daemon", "run"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert sock.recv(256) == b"READY=1"
        # ready means ready: the control socket answers at once
        from kohakuboard.client._transport import Connection
        from kohakuboard.protocol import messages as m

        conn = Connection(endpoint)
        try:
            assert conn.request(m.StatusRequest, m.Envelope(), 2.0).info["pid"] == proc.pid
        finally:
            conn.close()
        proc.send_signal(signal.SIGTERM)
        assert sock.recv(256) == b"STOPPING=1"
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        sock.close()


def test_unit_files_run_the_daemon_with_notify_and_restart():
    """Both units start `kobo-daemon run` as Type=notify, restart on failure, and stop slower than the drain."""
    for name in ("kobo-daemon.service", "kobo-daemon@.service"):
        cp = configparser.ConfigParser(interpolation=None, strict=False)
        cp.read(ROOT / "systemd" / name)
        svc = cp["Service"]
        assert svc["Type"] == "notify"
        assert svc["ExecStart"].endswith("kobo-daemon run")
        assert svc["Restart"] == "on-failure"
        assert "3" in svc["RestartPreventExitStatus"].split()
        assert int(svc["TimeoutStopSec"]) > 30  # the daemon's graceful drain is 30 s
    assert cp["Service"]["User"] == "%i"
