"""Shared fixtures: an isolated daemon endpoint and base dir per test, a real daemon.

Every test gets a ``KOBO_BASE_DIR`` under ``tmp_path`` and a ``KOBO_DAEMON_ENDPOINT``
in a short temporary directory (Unix socket paths are limited to 107 bytes); other
``KOBO_*`` and rank variables are scrubbed.

``daemon`` is a real daemon shared by the tests of the session (started by
:func:`kohakuboard.testing.isolated_daemon` on first use; its endpoint is the test's
endpoint): its runs are each test's own, under each test's ``tmp_path``, and what
tests check in its status are differences.  A test that kills, stops, pauses or
restarts its daemon, or reads its whole log, is marked ``@pytest.mark.own_daemon``
and gets one of its own, stopped (exit status 0 asserted) afterwards; a test that
kills the shared one anyway fails, and the next test gets a new one.  Whatever
daemon a test started on its own endpoint, by hand or through client autostart, is
stopped afterwards.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from kohakuboard.protocol.endpoint import Endpoint, resolve
from kohakuboard.testing import RANK_VARIABLES, KoboDaemon, isolated_daemon, stop_endpoint

# kobo_daemon: a daemon of the test's own from the package's plugin (tests/testing uses it as a user would)
pytest_plugins = ["kohakuboard.testing.plugin"]

OWN_DAEMON = "own_daemon"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        f"{OWN_DAEMON}: the test's daemon is its own (it kills, stops, pauses or restarts it, or reads its log)",
    )


def _wants_shared_daemon(request: pytest.FixtureRequest) -> bool:
    return "daemon" in request.fixturenames and request.node.get_closest_marker(OWN_DAEMON) is None


class SharedDaemon:
    """The daemon the tests share, started on first use; a new one replaces it if a test killed it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.started = 0
        self._stack = contextlib.ExitStack()
        self._daemon: KoboDaemon | None = None

    def get(self) -> KoboDaemon:
        if self._daemon is None or not self._daemon.running:
            self.started += 1
            base = self.root / f"daemon-{self.started}"
            self._daemon = self._stack.enter_context(isolated_daemon(base, set_environ=False))
        return self._daemon

    def close(self) -> None:
        self._stack.close()  # SIGTERM each; AssertionError if one still running exits other than 0


@pytest.fixture(scope="session")
def shared_daemons(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SharedDaemon]:
    shared = SharedDaemon(tmp_path_factory.mktemp("shared-daemon"))
    try:
        yield shared
    finally:
        shared.close()


@pytest.fixture
def shared_daemon(shared_daemons: SharedDaemon) -> KoboDaemon:
    """The daemon of the tests that do not need their own (exit status 0 asserted at the end of the session)."""
    return shared_daemons.get()


@pytest.fixture(autouse=True)
def kobo_env(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Endpoint]:
    """Isolate the daemon endpoint and the default base dir of this test."""
    for key in list(os.environ):
        if key.startswith("KOBO_") or key in RANK_VARIABLES:
            monkeypatch.delenv(key, raising=False)
    shared: KoboDaemon | None = None
    sock_dir = None
    if _wants_shared_daemon(request):
        shared = request.getfixturevalue("shared_daemon")
        ep = shared.endpoint
    else:
        sock_dir = tempfile.mkdtemp(prefix="kobo-", dir="/tmp")
        ep = resolve(f"ipc://{sock_dir}/kobo", {})
    monkeypatch.setenv("KOBO_DAEMON_ENDPOINT", str(ep))
    monkeypatch.setenv("KOBO_BASE_DIR", str(tmp_path / "kohakuboard"))
    # Node samples (sys/HOST/...) every 10 s would add metrics to long tests' runs;
    # tests/daemon/test_system_metrics.py turns them on where it checks them.
    monkeypatch.setenv("KOBO_DAEMON_SYSTEM_METRICS", "0")
    try:
        yield ep
    finally:
        if shared is not None:
            assert shared.running, (
                f"the shared daemon died during this test (mark it own_daemon?): {shared.output()[-3000:]}"
            )
        else:
            stop_endpoint(ep)
            shutil.rmtree(sock_dir, ignore_errors=True)


@pytest.fixture
def endpoint(kobo_env: Endpoint) -> Endpoint:
    return kobo_env


@pytest.fixture
def base_dir(tmp_path: Path) -> Path:
    return tmp_path / "kohakuboard"


def start_daemon(ep: Endpoint, args: tuple[str, ...] = (), prefix: tuple[str, ...] = ()) -> KoboDaemon:
    """A real ``kobo-daemon run`` child on ``ep`` with this test's environment."""
    return KoboDaemon(ep, args, env=dict(os.environ), prefix=prefix, log_path=ep.base + ".test.log")


@pytest.fixture
def daemon(request: pytest.FixtureRequest, endpoint: Endpoint) -> Iterator[KoboDaemon]:
    """A real daemon on this test's endpoint: the module's shared one, or (``own_daemon``) the test's own."""
    if request.node.get_closest_marker(OWN_DAEMON) is None:
        yield request.getfixturevalue("shared_daemon")
        return
    d = start_daemon(endpoint)
    try:
        yield d
    finally:
        if d.running:
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
    started: list[KoboDaemon] = []

    def make(ep: Endpoint = endpoint, *args: str, prefix: tuple[str, ...] = ()) -> KoboDaemon:
        """``prefix``: a command the daemon runs under (e.g. ``unshare --uts ...``; it must exec the daemon)."""
        d = start_daemon(ep, args, prefix)
        started.append(d)
        return d

    yield make
    for d in started:
        d.kill()  # (one already gone: its log is closed)
