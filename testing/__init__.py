"""Test your own training code against a real ``kobo-daemon`` in a temporary directory.

A context manager starts a real daemon on an endpoint of its own (a Unix socket in a
fresh ``/tmp`` directory) with runs written under a base dir of its own, points every
:class:`~kohakuboard.client.Board` made meanwhile in this process at both, lets you
read the runs back, and stops the daemon afterwards::

    from kohakuboard.testing import isolated_daemon

    def test_training_logs_a_falling_loss():
        with isolated_daemon() as kobo:
            train(steps=100)                      # calls Board(run_id="t1", ...) and log()
            with kobo.read("t1") as run:          # a storage RunReader
                loss = run.series("loss")["value"]
                assert len(loss) == 100 and loss[-1] < loss[0]
            assert kobo.status()["rejected"] == {}  # the daemon's counters, as `kobo-daemon status --json`

With pytest, add ``pytest_plugins = ["kohakuboard.testing.plugin"]`` to your
``conftest.py`` and ask for the ``kobo_daemon`` fixture (one daemon per test, runs
under the test's ``tmp_path``); see :mod:`kohakuboard.testing.plugin`.

While the block runs, this process's environment names the daemon
(``KOBO_DAEMON_ENDPOINT``) and the base dir (``KOBO_BASE_DIR``), and the other
``KOBO_*`` and rank variables (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``,
``TORCHELASTIC_RUN_ID``) are removed, so neither a daemon of your own nor a setting in
your shell leaks into the test; everything is put back afterwards. Client autostart
is off in the block: a Board whose daemon died raises instead of starting a second,
unwatched daemon.  A training *script* run as a subprocess gets the same settings
from :meth:`KoboDaemon.env`.  When the block ends the daemon is stopped with SIGTERM
(it flushes and closes every run first); a daemon that does not exit with status 0
(unless :meth:`KoboDaemon.kill` killed it) raises :class:`AssertionError` quoting its log.

:func:`wait_until` waits for a condition (a run's data being there, a status
counter) instead of sleeping a fixed time.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from ..protocol.endpoint import Endpoint, daemon_alive, resolve

if TYPE_CHECKING:
    from ..storage.reader import RunReader

__all__ = [
    "RANK_VARIABLES",
    "KoboDaemon",
    "daemon_status",
    "isolated_daemon",
    "scrubbed_environ",
    "stop_endpoint",
    "wait_until",
]

T = TypeVar("T")

#: Environment variables that are not ``KOBO_*`` but change what a Board does.
RANK_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "TORCHELASTIC_RUN_ID")


def wait_until(
    cond: Callable[[], T],
    timeout: float = 30.0,
    interval: float = 0.01,
    message: str | Callable[[], str] = "",
) -> T:
    """Call ``cond`` until it returns something true and return that; AssertionError after ``timeout`` s.

    The timeout is a generous upper bound for a slow machine, not a measurement:
    the call returns as soon as the condition holds.  ``message`` (or a function
    returning it, called only on a timeout) says what did not happen.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() >= deadline:
            text = message() if callable(message) else message
            raise AssertionError(f"waited {timeout:g}s: {text or getattr(cond, '__name__', 'condition')}")
        time.sleep(interval)


def scrubbed_environ(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """A copy of ``environ`` (default ``os.environ``) without ``KOBO_*`` and rank variables."""
    env = os.environ if environ is None else environ
    return {k: v for k, v in env.items() if not k.startswith("KOBO_") and k not in RANK_VARIABLES}


def daemon_status(endpoint: Endpoint | str, timeout: float = 10.0) -> dict[str, Any]:
    """The status of the daemon on ``endpoint``: the map ``kobo-daemon status --json`` prints.

    Asked through the public control client (:func:`kohakuboard.protocol.control.status`);
    AssertionError when no daemon answers within ``timeout`` s.
    """
    from ..protocol import control
    from ..protocol.errors import KoboError

    try:
        info = dict(control.status(endpoint, timeout))
    except KoboError as exc:
        raise AssertionError(f"kobo-daemon on {endpoint} did not answer a status request: {exc}") from None
    info["running"] = True
    return info


def _read_pid(ep: Endpoint) -> int | None:
    try:
        return int(Path(ep.pid_path).read_text().strip())
    except (OSError, ValueError):
        return None


def stop_endpoint(ep: Endpoint, timeout: float = 30.0) -> None:
    """SIGTERM whatever daemon holds ``ep`` (one a client autostarted, say) and wait until it is gone.

    SIGKILL and AssertionError when it is still there after ``timeout`` s.
    """
    pid = _read_pid(ep)
    if pid is None or not daemon_alive(ep):
        return
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        wait_until(lambda: not daemon_alive(ep), timeout, 0.01)
    except AssertionError:
        os.kill(pid, signal.SIGKILL)
        raise AssertionError(f"kobo-daemon {pid} on {ep} ignored SIGTERM for {timeout:g}s") from None


class KoboDaemon:
    """A real ``kobo-daemon run`` child process on ``endpoint``, ready when the constructor returns.

    ``args``: extra ``kobo-daemon run`` options; ``env``: its whole environment
    (default: this process's, without ``KOBO_*`` and rank variables, system metrics
    off); ``prefix``: a command it runs under, which must exec it.  Its output goes
    to ``log_path`` (default ``<endpoint>.test.log``), read by :meth:`output`.
    ``base_dir``: where :meth:`read` and :meth:`run_path` look for runs.
    """

    def __init__(
        self,
        endpoint: Endpoint,
        args: Sequence[str] = (),
        *,
        base_dir: str | os.PathLike[str] | None = None,
        env: Mapping[str, str] | None = None,
        prefix: Sequence[str] = (),
        log_path: str | None = None,
        ready_timeout: float = 30.0,
    ) -> None:
        self.endpoint = endpoint
        self.base_dir = Path(base_dir) if base_dir is not None else None
        self.log_path = log_path or endpoint.base + ".test.log"
        self.killed = False  # by kill(): its exit status is no failure
        if env is None:
            env = {**scrubbed_environ(), "KOBO_DAEMON_SYSTEM_METRICS": "0"}
        env = {**env, "KOBO_DAEMON_ENDPOINT": str(endpoint)}
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [*prefix, sys.executable, "-m", "kohakuboard.daemon", "run", *args],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        ctl = endpoint.control_addr[len("ipc://") :]
        deadline = time.monotonic() + ready_timeout
        while not (daemon_alive(endpoint) and os.path.exists(ctl)):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                if self.proc.poll() is None:
                    self.proc.kill()
                    self.proc.wait(10)
                self._log.close()
                raise AssertionError(f"kobo-daemon did not start on {endpoint}: {self.output()}")
            time.sleep(0.01)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def running(self) -> bool:
        """True while the process has not exited."""
        return self.proc.poll() is None

    def output(self) -> str:
        """Everything the daemon printed (its log) so far."""
        if not self._log.closed:
            self._log.flush()
        return Path(self.log_path).read_text(errors="replace")

    def status(self, timeout: float = 10.0) -> dict[str, Any]:
        """:func:`daemon_status` of this daemon's endpoint."""
        return daemon_status(self.endpoint, timeout)

    def env(self, **extra: str) -> dict[str, str]:
        """Environment for a training script run as a subprocess: this daemon, this base dir, no autostart."""
        env = scrubbed_environ()
        env.update(KOBO_DAEMON_ENDPOINT=str(self.endpoint), KOBO_DAEMON_AUTOSTART="0")
        if self.base_dir is not None:
            env["KOBO_BASE_DIR"] = str(self.base_dir)
        env.update(extra)
        return env

    def run_path(self, run_id: str, project: str = "default") -> Path:
        """The folder of run ``run_id`` in ``project`` under the base dir."""
        if self.base_dir is None:
            raise ValueError("this daemon was started without a base_dir")
        return self.base_dir / project / run_id

    def read(self, run_id: str, project: str = "default") -> RunReader:
        """A :class:`~kohakuboard.storage.reader.RunReader` of that run (use it in a ``with`` block)."""
        from ..storage.reader import RunReader

        return RunReader(self.run_path(run_id, project))

    def terminate(self, timeout: float = 60.0) -> int:
        """SIGTERM (the daemon flushes and closes every run), wait, return the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        finally:
            self._log.close()

    def kill(self) -> None:
        """SIGKILL, as a crash: nothing is flushed."""
        self.killed = True
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        self._log.close()


@contextmanager
def isolated_daemon(
    base_dir: str | os.PathLike[str] | None = None,
    args: Sequence[str] = (),
    *,
    system_metrics: bool = False,
    set_environ: bool = True,
) -> Iterator[KoboDaemon]:
    """Start a real daemon on a fresh endpoint, yield it (a :class:`KoboDaemon`), stop it.

    ``base_dir``: where runs are written (default: a temporary directory removed
    afterwards). ``args``: extra ``kobo-daemon run`` options. ``system_metrics``:
    let the daemon sample the node into runs (off by default, so runs hold only
    what the code under test logged). ``set_environ``: point this process's Boards
    at the daemon and base dir for the duration (see the module docstring).
    """
    sock_dir = tempfile.mkdtemp(prefix="kobo-", dir="/tmp")  # short: a Unix socket path has at most 107 bytes
    own_base = base_dir is None
    base = Path(tempfile.mkdtemp(prefix="kobo-runs-") if base_dir is None else os.path.abspath(os.fspath(base_dir)))
    ep = resolve(f"ipc://{sock_dir}/kobo", {})
    env = scrubbed_environ()
    env["KOBO_DAEMON_SYSTEM_METRICS"] = "10" if system_metrics else "0"
    saved: dict[str, str] | None = None
    daemon: KoboDaemon | None = None
    failed = True
    try:
        daemon = KoboDaemon(ep, args, base_dir=base, env=env)
        if set_environ:
            saved = {k: v for k, v in os.environ.items() if k.startswith("KOBO_") or k in RANK_VARIABLES}
            for k in saved:
                del os.environ[k]
            os.environ.update(KOBO_DAEMON_ENDPOINT=str(ep), KOBO_BASE_DIR=str(base), KOBO_DAEMON_AUTOSTART="0")
        yield daemon
        failed = False
    finally:
        if saved is not None:
            for k in [k for k in os.environ if k.startswith("KOBO_") or k in RANK_VARIABLES]:
                del os.environ[k]
            os.environ.update(saved)
        code = 0
        if daemon is not None:
            code = daemon.terminate()
        stop_endpoint(ep)
        log = daemon.output() if daemon is not None else ""
        shutil.rmtree(sock_dir, ignore_errors=True)
        if own_base:
            shutil.rmtree(base, ignore_errors=True)
        if code != 0 and not failed and not (daemon is not None and daemon.killed):
            raise AssertionError(f"kobo-daemon exited with status {code}: {log[-3000:]}")
