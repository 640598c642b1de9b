"""Every run ends: finish() keeps asking across a daemon restart (one node; several nodes are in test_multinode.py)."""

from __future__ import annotations

import os
import signal
import threading
import time
import warnings

import pytest

from kohakuboard.client import Board
from kohakuboard.protocol import codec
from kohakuboard.protocol.messages import FinishRun
from kohakuboard.storage.reader import RunReader


@pytest.mark.own_daemon
def test_finish_asks_again_after_the_daemon_restarts(daemon, daemon_factory, endpoint, base_dir, monkeypatch):
    """The daemon dies with finish()'s request unanswered and comes back 2 s later: the run still ends finished."""
    monkeypatch.setenv("KOBO_DAEMON_AUTOSTART", "0")
    b = Board(run_id="ends", capture_output=False)
    for i in range(10):
        b.log(x=float(i))
    b.flush()
    os.kill(daemon.pid, signal.SIGSTOP)  # finish()'s request waits in its socket ...
    asked = threading.Event()

    class NotingSocket:
        """The Board's control socket, noting when finish()'s request has been sent (an observer:
        everything goes to the real socket unchanged)."""

        def __init__(self, sock):
            self._sock = sock

        def send_multipart(self, frames, *args, **kwargs):
            out = self._sock.send_multipart(frames, *args, **kwargs)
            if codec.decode(frames).KIND == FinishRun.KIND:
                asked.set()
            return out

        def __getattr__(self, name):
            return getattr(self._sock, name)

    b._conn._dealer = NotingSocket(b._conn._dealer)

    def restart() -> None:
        assert asked.wait(30), "finish() sent no FinishRun"
        daemon.kill()  # ... and dies with it
        time.sleep(2.0)  # no daemon at all for a while
        daemon_factory(endpoint)

    t = threading.Thread(target=restart)
    t.start()
    t0 = time.monotonic()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no "could not be finished"
            b.finish(timeout=20)
    finally:
        t.join()
    assert time.monotonic() - t0 < 20
    with RunReader(base_dir / "default" / "ends") as r:
        assert r.status == "finished"
        assert r.series("x")["value"].tolist() == [float(i) for i in range(10)]
        assert [c["status"] for c in r.clients()] == ["finished"]


@pytest.mark.own_daemon
def test_finish_waits_its_timeout_for_a_daemon_that_is_down(daemon, endpoint, base_dir, monkeypatch):
    """Daemon down, autostart off: finish() keeps asking for its whole timeout, then warns (it does not give up after ~1 s)."""
    monkeypatch.setenv("KOBO_DAEMON_AUTOSTART", "0")
    b = Board(run_id="down", capture_output=False)
    b.log(x=1.0)
    b.flush()  # everything is stored; only the end is missing
    daemon.kill()
    t0 = time.monotonic()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        b.finish(timeout=3)
    elapsed = time.monotonic() - t0
    assert 2.8 <= elapsed < 6, elapsed
    assert any("could not be finished" in str(w.message) and "not running" in str(w.message) for w in caught), caught
