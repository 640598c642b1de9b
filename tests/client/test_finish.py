"""finish(): a daemon-side timeout warns (never raises StorageError), and finish() right after log() is quick."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

import pytest

from kohakuboard.client import Board
from kohakuboard.protocol.endpoint import daemon_alive
from kohakuboard.protocol.errors import (
    ERROR_CODES,
    KoboTimeoutError,
    StorageError,
    code_for,
    error_from_code,
)
from kohakuboard.storage.reader import RunReader


def test_timeouts_travel_as_kobo_timeout_error():
    """On Python >= 3.11 asyncio.TimeoutError is TimeoutError, an OSError: it must not become StorageError."""
    for exc in (asyncio.TimeoutError(), TimeoutError(), KoboTimeoutError("x")):
        assert code_for(exc) == ERROR_CODES[KoboTimeoutError], type(exc)
        assert isinstance(error_from_code(code_for(exc), "t"), KoboTimeoutError)
    assert code_for(PermissionError()) == ERROR_CODES[StorageError]  # other OSErrors stay storage errors


@pytest.fixture
def short_grace_daemon(endpoint):
    """A real daemon whose barriers give up after 1 s (graceful_timeout=1.0)."""
    code = (
        "import sys; from kohakuboard.daemon.config import DaemonConfig; from kohakuboard.daemon.server import Daemon; "
        "sys.exit(Daemon(DaemonConfig.from_env(graceful_timeout=1.0)).run())"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 20
    while not (daemon_alive(endpoint) and os.path.exists(endpoint.control_addr[6:])):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read().decode()
        time.sleep(0.01)
    try:
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        err = proc.communicate(timeout=30)[1].decode()
        assert proc.returncode == 0, err


def test_finish_warns_when_the_daemon_times_out(short_grace_daemon):
    """The daemon answers FinishRun with a timeout (calls it never received): finish() warns, returns."""
    b = Board(run_id="lost", capture_output=False)
    b.log(x=1.0)
    b.flush()
    with b._lock:
        b._outbox.seq += 3  # three calls the daemon will never receive
    t0 = time.monotonic()
    with pytest.warns(RuntimeWarning, match=r"could not be finished \(.*timed out"):
        b.finish(timeout=8)
    assert time.monotonic() - t0 < 5  # the daemon's 1 s, not the client's 8 s
    with RunReader(b.path) as r:
        assert r.series("x")["value"].tolist() == [1.0]


def _median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2]


@pytest.mark.parametrize("capture", [False, True])
def test_finish_right_after_log_is_as_quick_as_flush(daemon, capture):
    """finish() right after log() was ~505 ms (the sender's acknowledgement socket was still connecting)."""
    fin, fl = [], []
    paths = []
    for i in range(5):
        b = Board(run_id=f"fin{i}", capture_output=capture)
        b.log(x=float(i))
        t0 = time.perf_counter()
        b.finish()
        fin.append(time.perf_counter() - t0)
        paths.append((b.path, float(i)))
        b = Board(run_id=f"flu{i}", capture_output=capture)
        b.log(x=float(i))
        t0 = time.perf_counter()
        b.flush()
        fl.append(time.perf_counter() - t0)
        b.finish()
    # Loose bounds (a shared machine): the defect took half a second every time.
    assert _median(fin) < 0.1, (fin, fl)
    assert _median(fin) < 4 * _median(fl) + 0.02, (fin, fl)
    for path, value in paths:
        with RunReader(path) as r:
            assert r.status == "finished"
            assert r.series("x")["value"].tolist() == [value]


def test_a_call_that_fails_to_encode_is_reported_once_and_the_rest_is_delivered(daemon, base_dir, monkeypatch):
    """A call log() accepted but the sender cannot encode (a KohakuBoard bug, injected here) is counted
    as dropped and named by the next flush(), once; the calls before and after it are stored and
    later flush() calls succeed."""
    from kohakuboard.client import _encoding
    from kohakuboard.protocol.errors import TransportError

    real = _encoding.codec.encode_log

    def encode_log(run, client, seq, rank, step, gstep, wall, scalars):
        if scalars.get("x") == 2.0:  # the third call: an encoder bug
            raise RuntimeError("injected encoder bug")
        return real(run, client, seq, rank, step, gstep, wall, scalars)

    monkeypatch.setattr(_encoding.codec, "encode_log", encode_log)
    b = Board(run_id="encode-bug", capture_output=False)
    for i in range(2):
        b.log(x=float(i))
        b.flush()
    b.log(x=2.0)  # alone in the queue: encoded as one message
    with pytest.raises(TransportError, match="could not be encoded and was counted as dropped"):
        b.flush()
    b.flush()  # reported once; nothing else is wrong
    for i in range(3, 6):
        b.log(x=float(i))
    b.flush()
    b.log(x=2.0)  # again, right before finish(): a warning, the run is finished
    with pytest.warns(RuntimeWarning, match="could not be encoded and were counted as dropped"):
        b.finish()
    with RunReader(b.path) as r:
        assert r.series("x")["value"].tolist() == [0.0, 1.0, 3.0, 4.0, 5.0]
        assert r.dropped()["calls"] == 2 and r.status == "finished"
