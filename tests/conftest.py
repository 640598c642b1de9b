"""Shared fixtures: an isolated daemon endpoint and base dir per test, a real daemon.

Every test gets its own ``KOBO_DAEMON_ENDPOINT`` in a short temporary directory
(Unix socket paths are limited to 107 bytes) and a ``KOBO_BASE_DIR`` under
``tmp_path``; other ``KOBO_*`` and rank variables are scrubbed.  Whatever daemon
a test started, by hand or through client autostart, is stopped afterwards.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kohakuboard.protocol.endpoint import Endpoint, daemon_alive, resolve

SCRUB = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "TORCHELASTIC_RUN_ID")


def _read_pid(ep: Endpoint) -> int | None:
    try:
        return int(Path(ep.pid_path).read_text().strip())
    except (OSError, ValueError):
        return None


def stop_daemon(ep: Endpoint, timeout: float = 20.0) -> None:
    """SIGTERM the daemon on ``ep`` (SIGKILL after ``timeout``) and wait for the lock to drop."""
    pid = _read_pid(ep)
    if pid is None or not daemon_alive(ep):
        return
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while daemon_alive(ep) and time.monotonic() < deadline:
        time.sleep(0.02)
    if daemon_alive(ep):
        os.kill(pid, signal.SIGKILL)
        raise AssertionError(f"daemon {pid} ignored SIGTERM for {timeout}s")


@pytest.fixture(autouse=True)
def kobo_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Endpoint]:
    """Isolate the daemon endpoint and the default base dir of this test."""
    for key in list(os.environ):
        if key.startswith("KOBO_") or key in SCRUB:
            monkeypatch.delenv(key, raising=False)
    sock_dir = tempfile.mkdtemp(prefix="kobo-", dir="/tmp")
    value = f"ipc://{sock_dir}/kobo"
    monkeypatch.setenv("KOBO_DAEMON_ENDPOINT", value)
    monkeypatch.setenv("KOBO_BASE_DIR", str(tmp_path / "kohakuboard"))
    # Node samples (sys/HOST/...) every 10 s would add metrics to long tests' runs;
    # tests/daemon/test_system_metrics.py turns them on where it checks them.
    monkeypatch.setenv("KOBO_DAEMON_SYSTEM_METRICS", "0")
    ep = resolve(value, os.environ)
    try:
        yield ep
    finally:
        stop_daemon(ep)
        shutil.rmtree(sock_dir, ignore_errors=True)


@pytest.fixture
def endpoint(kobo_env: Endpoint) -> Endpoint:
    return kobo_env


@pytest.fixture
def base_dir(tmp_path: Path) -> Path:
    return tmp_path / "kohakuboard"


class DaemonProcess:
    """A real ``kobo-daemon run`` child process."""

    def __init__(self, ep: Endpoint, extra_args: tuple[str, ...] = (), prefix: tuple[str, ...] = ()) -> None:
        self.ep = ep
        self.log_path = ep.base + ".test.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [*prefix, sys.executable, "-m", "kohakuboard.daemon", "run", *extra_args],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=dict(os.environ),
        )
        deadline = time.monotonic() + 20
        while not (daemon_alive(ep) and os.path.exists(ep.control_addr[6:])):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"daemon did not start: {self.output()}")
            time.sleep(0.01)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self) -> str:
        self._log.flush()
        return Path(self.log_path).read_text(errors="replace")

    def terminate(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout)
        self._log.close()
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        self._log.close()


@pytest.fixture
def daemon(endpoint: Endpoint) -> Iterator[DaemonProcess]:
    """A real daemon for this test's endpoint; stopped (SIGTERM, exit 0 asserted) afterwards."""
    d = DaemonProcess(endpoint)
    try:
        yield d
    finally:
        if d.proc.poll() is None:
            code = d.terminate()
            assert code == 0, f"daemon exited {code}: {d.output()}"


def run_script(
    code: str, *, cwd: Path, timeout: float = 120, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run Python ``code`` as a separate training script; return the finished process."""
    full_env = dict(os.environ)
    if env:
        full_env.update(env)
    return subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture
def script() -> object:
    """``script(code, cwd=...)`` runs a training script in a fresh interpreter."""
    return run_script


@pytest.fixture
def daemon_factory(endpoint: Endpoint) -> Iterator[object]:
    """Start extra daemons by hand (restarts, second-daemon tests); all stopped afterwards."""
    started: list[DaemonProcess] = []

    def make(ep: Endpoint = endpoint, *args: str, prefix: tuple[str, ...] = ()) -> DaemonProcess:
        """``prefix``: a command the daemon runs under (e.g. ``unshare --uts ...``; it must exec the daemon)."""
        d = DaemonProcess(ep, args, prefix)
        started.append(d)
        return d

    yield make
    for d in started:
        if d.proc.poll() is None:
            d.kill()
