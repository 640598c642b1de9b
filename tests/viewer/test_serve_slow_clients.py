"""A slow or hostile client never stalls the others (issue 13): a real ``kobo-serve`` process, real sockets.

While clients that never read their (large) answers, clients that send their
request a byte at a time (slowloris) and a flood of idle connections hold the
server, authenticated readers keep getting the run list and a 1M-point chart
promptly; the server closes the hostile connections by itself (request
timeout, send timeout, connections per client address).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from kohakuboard.testing import wait_until

from .conftest import ServerProcess

PASSWORD = "correct horse battery"
REQUEST_TIMEOUT = 2  # the server's --request-timeout here (default 15)
SEND_TIMEOUT = 3  # --send-timeout (default 60)
KEEP_ALIVE = 1  # --keep-alive (default 30)
PER_CLIENT = 40  # --max-connections-per-client (default 128)
BOUND_S = 2.0  # every authenticated request must answer within this, whatever the attackers do
# the hostile clients' source addresses (all of 127/8 is loopback on Linux); the readers come from 127.0.0.1
STUCK, LORIS, IDLE = "127.0.0.2", "127.0.0.3", "127.0.0.4"


def cli(config: Path, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kohakuboard.viewer.serve_cli", "--config-dir", str(config), *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture(scope="module")
def server(viewer_runs: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("slow")
    data = root / "data"
    for run in ("spikes", "rich"):
        shutil.copytree(viewer_runs / "default" / run, data / "default" / run)
    config = root / "config"
    assert cli(config, "user", "add", "alice", "--password-stdin", stdin=PASSWORD + "\n").returncode == 0
    token = cli(config, "token", "create", "alice").stdout.strip()
    s = ServerProcess(
        [
            sys.executable,
            "-m",
            "kohakuboard.viewer.serve_cli",
            "--data-dir",
            str(data),
            "--config-dir",
            str(config),
            "--port",
            "0",
            "--nice",
            "0",
            "--no-sched-idle",
            "--request-timeout",
            str(REQUEST_TIMEOUT),
            "--send-timeout",
            str(SEND_TIMEOUT),
            "--keep-alive",
            str(KEEP_ALIVE),
            "--max-connections-per-client",
            str(PER_CLIENT),
        ]
    )
    try:
        yield {"server": s, "token": token, "port": int(s.origin.rsplit(":", 1)[1])}
    finally:
        s.stop()


def connect(port: int, source: str, rcvbuf: int | None = None) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf is not None:  # before connect: the TCP window stays this small
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.bind((source, 0))
    sock.connect(("127.0.0.1", port))
    return sock


def closed_by_server(sock: socket.socket, within: float) -> bool:
    """Whether the server closes ``sock`` within ``within`` s (reading and dropping whatever it still sends)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            if not sock.recv(1 << 16):
                return True
        except (ConnectionResetError, BrokenPipeError):
            return True
        except (TimeoutError, BlockingIOError):
            return False
    return False


def head(path: str, token: str) -> bytes:
    return (f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n\r\n").encode()


class Readers:
    """Authenticated readers in threads (each its own connection): the run list and a 1M-point chart, in a loop."""

    def __init__(self, origin: str, token: str, n: int = 3) -> None:
        self.origin, self.token = origin, token
        self.times: list[tuple[str, float]] = []
        self.failures: list[str] = []
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self.run, daemon=True) for _ in range(n)]

    def run(self) -> None:
        urls = {"runs": "/api/runs", "chart": "/api/runs/default/spikes/series?metric=loss&width=1000"}
        with httpx.Client(base_url=self.origin, headers={"authorization": f"Bearer {self.token}"}, timeout=30) as c:
            while not self.stop.is_set():
                for kind, url in urls.items():
                    t0 = time.perf_counter()
                    try:
                        r = c.get(url)
                        ok = r.status_code == 200
                        if not ok:
                            self.failures.append(f"{kind}: HTTP {r.status_code} {r.text[:100]}")
                    except httpx.HTTPError as exc:
                        self.failures.append(f"{kind}: {type(exc).__name__} {exc}")
                        ok = False
                    if ok:
                        self.times.append((kind, time.perf_counter() - t0))
                time.sleep(0.05)

    def __enter__(self) -> Readers:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(40)

    def check(self, min_requests: int) -> None:
        assert not self.failures, self.failures[:5]
        slow = [(k, round(s, 2)) for k, s in self.times if s > BOUND_S]
        assert not slow, f"{len(slow)} of {len(self.times)} requests took over {BOUND_S} s: {slow[:10]}"
        for kind in ("runs", "chart"):
            n = sum(1 for k, _ in self.times if k == kind)
            assert n >= min_requests, f"only {n} {kind} requests answered"


def test_slow_readers_slowloris_and_idle_connections_do_not_stall_other_readers(server):
    port, token = server["port"], server["token"]
    origin = server["server"].origin
    with httpx.Client(base_url=origin, headers={"authorization": f"Bearer {token}"}, timeout=30) as c:
        assert c.get("/api/runs/default/spikes/series?metric=loss&width=1000").status_code == 200  # warm

    # clients that ask for big answers and never read them: a 1M-row CSV export (~20 MB), an SSE stream
    stuck_csv = []
    for _ in range(2):
        sock = connect(port, STUCK, rcvbuf=4096)
        sock.sendall(head("/api/runs/default/spikes/series.csv?metric=loss", token))
        stuck_csv.append(sock)
    stuck_sse = []
    for _ in range(2):
        sock = connect(port, STUCK, rcvbuf=4096)
        sock.sendall(head("/api/events?runs=default/rich", token))
        stuck_sse.append(sock)
    # slowloris: a request head sent a byte at a time, never finished; half of them on a connection
    # kept alive after a first, complete request
    loris = [connect(port, LORIS) for _ in range(10)]
    for sock in loris[5:]:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert sock.recv(4096).startswith(b"HTTP/1.1 200 ")
    # idle connections that never send a byte: 20 more than one client address may hold
    idle = [connect(port, IDLE) for _ in range(PER_CLIENT + 20)]
    busy: dict[int, bytes] = {}
    deadline = time.monotonic() + 5  # the server accepts them as fast as its loop gets the CPU
    while len(busy) < 20 and time.monotonic() < deadline:
        time.sleep(0.1)
        for i, sock in enumerate(idle):
            sock.setblocking(False)
            try:
                busy.setdefault(i, sock.recv(4096))
            except BlockingIOError:
                pass
    assert len(busy) == 20, f"{len(busy)} of {len(idle)} idle connections refused (cap {PER_CLIENT})"
    assert all(b.startswith(b"HTTP/1.1 503 ") and b"retry-after: 5" in b for b in busy.values()), list(busy.values())[
        :2
    ]

    stop = threading.Event()

    def trickle() -> None:
        msg = b"GET /api/runs HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Padding: " + b"a" * 200
        i = 0
        while not stop.is_set() and i < len(msg):
            for sock in loris:
                try:
                    sock.send(msg[i : i + 1])
                except OSError:
                    pass
            i += 1
            stop.wait(0.1)

    t = threading.Thread(target=trickle, daemon=True)
    t.start()
    t0 = time.monotonic()
    try:
        with Readers(origin, token) as readers:
            time.sleep(max(KEEP_ALIVE + REQUEST_TIMEOUT, SEND_TIMEOUT) + 2)
        readers.check(min_requests=10)
        # the server ended the hostile connections by itself: slowloris and idle ones after the
        # request timeout (the kept-alive ones after the keep-alive wait and the request timeout),
        # the unread CSV exports after the send timeout (a reset: aborted)
        assert all(closed_by_server(s, 0.5) for s in loris), "slowloris connections still open"
        assert all(closed_by_server(s, 0.5) for s in idle), "idle connections still open"
        assert all(closed_by_server(s, 3.0) for s in stuck_csv), "clients that read nothing still connected"
        # an unread event stream costs only its socket buffer (a ping every 15 s): it stays, within the cap
        assert not any(closed_by_server(s, 0.2) for s in stuck_sse)
    finally:
        stop.set()
        t.join(5)
        for sock in stuck_csv + stuck_sse + loris + idle:
            sock.close()
    with httpx.Client(base_url=origin, headers={"authorization": f"Bearer {token}"}, timeout=5) as c:
        assert c.get("/api/runs").json()["total"] == 2
    print(
        f"{len(readers.times)} requests in {time.monotonic() - t0:.1f} s, max "
        f"{max(s for _, s in readers.times) * 1e3:.0f} ms"
    )


def test_a_run_whose_files_hang_stalls_only_itself(viewer_runs, tmp_path):
    """A run whose files block every read (FIFOs: as a stale network mount behaves) costs the others nothing:
    ten requests hang on it, more than the threads it may hold, while the run list and the other runs answer."""
    data = tmp_path / "data"
    for run in ("ddp", "hang", "fifo"):
        shutil.copytree(viewer_runs / "default" / "ddp", data / "default" / run)
    hang_db = data / "default" / "hang" / "data" / "metrics" / "scalars.db"
    fifo_db = data / "default" / "fifo" / "data" / "metadata.db"
    for p in (hang_db, fifo_db):
        p.unlink()
        os.mkfifo(p)
    config = tmp_path / "config"
    assert cli(config, "user", "add", "alice", "--password-stdin", stdin=PASSWORD + "\n").returncode == 0
    token = cli(config, "token", "create", "alice").stdout.strip()
    s = ServerProcess(
        [
            sys.executable,
            "-m",
            "kohakuboard.viewer.serve_cli",
            "--data-dir",
            str(data),
            "--config-dir",
            str(config),
            "--port",
            "0",
            "--nice",
            "0",
            "--no-sched-idle",
        ]
    )
    hung: list[threading.Thread] = []
    try:
        auth = {"authorization": f"Bearer {token}"}

        def stuck(url: str) -> None:
            with httpx.Client(base_url=s.origin, headers=auth, timeout=8) as c:
                try:
                    c.get(url)
                except httpx.HTTPError:
                    pass

        for i in range(10):
            url = ["/api/runs/default/hang", "/api/runs/default/hang/series?metric=loss"][i % 2]
            hung.append(threading.Thread(target=stuck, args=(url,), daemon=True))
            hung[-1].start()
        with httpx.Client(base_url=s.origin, headers=auth, timeout=10) as c:
            # every hung request has reached the server: in flight on the run's threads, or waiting for one
            wait_until(
                lambda: c.get("/api/stats").json()["reads"].get("default/hang") == 10,
                message=lambda: f"the hung requests never all arrived: {c.get('/api/stats').json()}",
            )
            for _ in range(5):
                t0 = time.perf_counter()
                runs = c.get("/api/runs")
                summary = c.get("/api/runs/default/ddp")
                chart = c.get("/api/runs/default/ddp/series?metric=loss&width=100")
                took = time.perf_counter() - t0
                assert runs.status_code == summary.status_code == chart.status_code == 200
                assert took < BOUND_S, f"the other runs waited {took:.1f} s"
            listed = {r["run_id"]: r for r in runs.json()["runs"]}
            assert set(listed) == {"ddp", "hang", "fifo"}
            assert "not a regular file" in listed["fifo"]["error"]
            r = c.get("/api/runs/default/fifo")  # refused at once, not hung
            assert r.status_code == 500 and "not a regular file" in r.text
        assert all(t.is_alive() for t in hung), "the hung run's requests should still be waiting"
    finally:
        # let the blocked opens return (each open for writing releases one; a request that waited for a
        # thread opens the FIFO after that) until every hung request is answered, so that the server
        # stops at once instead of after its shutdown grace with requests still hanging
        deadline = time.monotonic() + 15
        while any(t.is_alive() for t in hung) and time.monotonic() < deadline:
            try:
                os.close(os.open(hang_db, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:  # no reader blocked in open() right now
                time.sleep(0.01)
        s.stop()
        for t in hung:
            t.join(10)


def test_connection_cap_in_total_and_the_open_files_limit(viewer_runs, tmp_path):
    """--max-connections: one more connection is answered 503 at once, and a slot freed is taken again;
    a server started with a soft open-files limit of 256 (systemd gives 1024) raises it to fit its cap."""
    import resource

    data = tmp_path / "data"
    shutil.copytree(viewer_runs / "default" / "ddp", data / "default" / "ddp")
    config = tmp_path / "config"
    assert cli(config, "user", "add", "alice", "--password-stdin", stdin=PASSWORD + "\n").returncode == 0
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard != resource.RLIM_INFINITY and hard < 2000:
        pytest.skip(f"hard open-files limit {hard}")
    s = ServerProcess(
        [
            sys.executable,
            "-c",
            "import resource, runpy, sys; "
            "resource.setrlimit(resource.RLIMIT_NOFILE, (256, resource.getrlimit(resource.RLIMIT_NOFILE)[1])); "
            "sys.argv = ['kobo-serve', *sys.argv[1:]]; "
            "runpy.run_module('kohakuboard.viewer.serve_cli', run_name='__main__')",
            "--data-dir",
            str(data),
            "--config-dir",
            str(config),
            "--port",
            "0",
            "--max-connections",
            "5",
        ]
    )
    port = int(s.origin.rsplit(":", 1)[1])
    held: list[socket.socket] = []
    try:
        with httpx.Client(base_url=s.origin, timeout=5) as c:
            assert c.get("/healthz").status_code == 200  # serving: the limits are set
        with open(f"/proc/{s.proc.pid}/limits") as f:
            soft = int(next(line for line in f if line.startswith("Max open files")).split()[3])
        assert soft >= 5 + 256
        held = [connect(port, "127.0.0.1") for _ in range(5)]

        def extra_refused() -> bool:
            """A sixth connection is answered 503 at once (False while the server has not yet
            taken all five held ones: it then waits for a request, and is closed here)."""
            extra = connect(port, "127.0.0.1")
            extra.settimeout(0.5)
            try:
                return extra.recv(4096).startswith(b"HTTP/1.1 503 ")
            except TimeoutError:
                return False
            finally:
                extra.close()

        wait_until(extra_refused, message="a connection over --max-connections was not refused")
        held.pop().close()
        with httpx.Client(base_url=s.origin, timeout=5) as c:
            # the freed slot, once the server has seen the close
            wait_until(lambda: c.get("/healthz").status_code == 200, message="the freed slot was not given back")
    finally:
        for sock in held:
            sock.close()
        out = s.stop()
    assert "refused a connection from 127.0.0.1: 5 open (--max-connections 5)" in out
