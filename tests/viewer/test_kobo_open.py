"""``kobo open`` as a user starts it: a real server process on a loopback port, live updates over SSE."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time

import httpx

from kohakuboard.testing import wait_until
from kohakuboard.viewer import reduce as R


def test_open_prints_a_token_url_and_serves_the_page(open_server, viewer_runs):
    s = open_server(viewer_runs)
    assert s.token and len(s.token) >= 32 and s.origin.startswith("http://127.0.0.1:")
    with httpx.Client(base_url=s.origin, timeout=10) as c:
        assert c.get("/api/runs").status_code == 401
        r = c.get(f"/?token={s.token}", follow_redirects=False)
        assert r.status_code == 303 and "kobo_session" in r.cookies
        page = c.get("/")  # the cookie jar now holds the session
        assert page.status_code == 200 and "<script" in page.text
        assert c.get("/api/runs").json()["total"] == 4
        assert c.get("/static/vendor/uplot/uPlot.iife.min.js").status_code == 200


def test_port_in_use_falls_back_to_a_free_port(open_server, viewer_runs):
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    port = busy.getsockname()[1]
    try:
        s = open_server(viewer_runs, "--port", str(port))
        assert f"port {port} is in use" in "".join(s.lines)
        assert not s.origin.endswith(f":{port}")
        assert httpx.get(s.origin + "/api/runs", headers=s.headers(), timeout=10).status_code == 200
    finally:
        busy.close()


def test_unsafe_or_wrong_options_are_refused(tmp_path, viewer_runs):
    def kobo_open(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "kohakuboard.cli.main", "open", *args], capture_output=True, text=True, timeout=30
        )

    r = kobo_open(str(viewer_runs), "--host", "0.0.0.0", "--no-token", "--port", "0")
    assert r.returncode != 0 and "--no-token is only allowed on a loopback address" in r.stderr
    r = kobo_open(str(tmp_path / "nope"))
    assert r.returncode != 0 and "is not a directory" in r.stderr


def test_no_token_on_loopback(open_server, viewer_runs):
    s = open_server(viewer_runs, "--no-token")
    assert s.token is None
    assert httpx.get(s.origin + "/api/runs", timeout=10).json()["total"] == 4


LIVE = """
import sys, time
from kohakuboard.client import Board
b = Board(name="live", run_id="live", capture_output=False)
for i in range(5):
    b.log(loss=float(i))
b.flush()
print("ready", flush=True)
sys.stdin.readline()
b.log(loss=42.0, lr=0.5)
b.flush()
print("flushed", time.time(), flush=True)
sys.stdin.readline()
b.finish()
print("finished", flush=True)
"""


def _events(response: httpx.Response, out: list, stop: threading.Event) -> None:
    event = None
    try:
        for line in response.iter_lines():
            if stop.is_set():
                return
            if line.startswith("event:"):
                event = line.split(":", 1)[1].strip()
            elif line.startswith("data:") and event:
                out.append((time.time(), event, json.loads(line.split(":", 1)[1])))
    except httpx.HTTPError:
        if not stop.is_set():  # the stream ended before the test was done with it
            raise


def test_live_run_pushes_new_points_new_metrics_and_status(open_server, daemon, base_dir, tmp_path):
    """A running script's flushed point, its new metric and its finish reach an open event stream."""
    proc = subprocess.Popen(
        [sys.executable, "-c", LIVE], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=tmp_path
    )
    try:
        assert proc.stdout.readline().strip() == "ready"
        s = open_server(base_dir)
        with httpx.Client(base_url=s.origin, headers=s.headers(), timeout=30) as c:
            listed = c.get("/api/runs").json()["runs"]
            assert [(r["run_id"], r["status"]) for r in listed] == [("live", "running")]
            got: list = []
            stop = threading.Event()
            with c.stream("GET", "/api/events?runs=default/live") as resp:
                assert resp.headers["content-type"].startswith("text/event-stream")
                t = threading.Thread(target=_events, args=(resp, got, stop), daemon=True)
                t.start()
                wait_until(lambda: got, message="no event from the live run")
                assert got[0][2]["lengths"] == {"0/loss": 5} and got[0][2]["status"] == "running"
                # the summary and the whole series, read now, are what the server keeps until the next commit
                before = c.get("/api/runs/default/live").json()
                assert [m["name"] for m in before["metrics"]] == ["loss"] and before["status"] == "running"
                _, whole = R.decode(c.get("/api/runs/default/live/series?metric=loss").content)
                assert whole["y"].tolist() == [0.0, 1.0, 2.0, 3.0, 4.0]
                proc.stdin.write("\n")
                proc.stdin.flush()
                line = proc.stdout.readline().split()
                assert line[0] == "flushed"
                flushed_at = float(line[1])
                seen = wait_until(
                    lambda: next((e for e in got if e[2]["lengths"].get("0/lr")), None),
                    message="the flushed point of the new metric was not pushed",
                )
                assert seen[2]["lengths"]["0/loss"] == 6
                assert seen[0] - flushed_at < 1.0, "a flushed point must be pushed within a second"
                tail = c.get("/api/runs/default/live/series?metric=loss&start=5")
                header, arrays = R.decode(tail.content)
                assert header["n"] == 1 and arrays["y"].tolist() == [42.0]
                # a new commit is a new summary (new metric, new lengths) and a longer series
                after = c.get("/api/runs/default/live").json()
                assert sorted(m["name"] for m in after["metrics"]) == ["loss", "lr"]
                assert after["version"] != before["version"]
                _, whole = R.decode(c.get("/api/runs/default/live/series?metric=loss").content)
                assert whole["y"].tolist() == [0.0, 1.0, 2.0, 3.0, 4.0, 42.0]
                header, arrays = R.decode(c.get("/api/runs/default/live/series?metric=loss&start=2").content)
                assert header["start"] == 2 and arrays["y"].tolist() == [2.0, 3.0, 4.0, 42.0]
                proc.stdin.write("\n")
                proc.stdin.flush()
                assert proc.stdout.readline().strip() == "finished"
                wait_until(lambda: any(e[2].get("status") == "finished" for e in got), message="no finished event")
                stop.set()
                # end the stream now: the reading thread is blocked in recv, and a close alone leaves the
                # connection open until that returns (the server's next ping, or its shutdown's 2 s grace)
                resp.extensions["network_stream"].get_extra_info("socket").shutdown(socket.SHUT_RDWR)
                t.join(10)
            assert any(e[2].get("status") == "finished" for e in got)
            assert c.get("/api/runs/default/live").json()["status"] == "finished"
            # the reads above went through readers kept open between requests, and still saw every
            # commit and the finish (metadata.json rewritten: a new reader)
            readers = c.get("/api/stats").json()["readers"]
            assert readers["lent"] > 0 and readers["opened"] >= 2
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        proc.stdin.close()
        proc.stdout.close()


def test_a_copied_run_appears_without_restart(open_server, viewer_runs, tmp_path):
    import shutil

    base = tmp_path / "kohakuboard"
    shutil.copytree(viewer_runs / "default" / "ddp", base / "default" / "ddp")
    s = open_server(base)
    with httpx.Client(base_url=s.origin, headers=s.headers(), timeout=10) as c:
        assert [r["run_id"] for r in c.get("/api/runs").json()["runs"]] == ["ddp"]
        shutil.copytree(viewer_runs / "other" / "crashed", base / "other" / "crashed")  # "rsync" in
        assert {r["run_id"] for r in c.get("/api/runs").json()["runs"]} == {"ddp", "crashed"}


def test_many_pages_on_one_run_share_one_poller(open_server, viewer_runs):
    """20 pages streaming one run cost one commit-state read per poll interval, not 20."""
    s = open_server(viewer_runs)
    with httpx.Client(base_url=s.origin, headers=s.headers(), timeout=20) as c:
        streams = [c.stream("GET", "/api/events?runs=default/rich") for _ in range(20)]
        responses = [st.__enter__() for st in streams]
        try:
            lines = [r.iter_lines() for r in responses]  # kept: a dropped iterator closes its stream
            assert all(next(it).startswith("retry:") for it in lines)
            start = wait_until(
                lambda: (st := c.get("/api/stats").json())["subscribers"] == 20 and st,
                message="the 20 pages did not all subscribe",
            )
            assert start["watched"] == 1
            time.sleep(2.0)  # the window the poll rate is counted over (not a wait for anything)
            polls = c.get("/api/stats").json()["polls"] - start["polls"]
            assert 2 <= polls <= 12, polls  # ~8 at 0.25 s; 20 pages polling alone would be ~160
        finally:
            for st in streams:
                st.__exit__(None, None, None)
        wait_until(
            lambda: c.get("/api/stats").json()["subscribers"] == 0,
            interval=0.05,
            message="closed pages are still subscribed",
        )
    assert httpx.get(s.origin + "/healthz", timeout=5).json() == {"ok": True}


def test_kept_alive_connections_answer_without_delayed_ack_stalls(open_server, viewer_runs):
    """Requests on one kept-alive connection take milliseconds, not the ~40 ms a missing TCP_NODELAY costs."""
    s = open_server(viewer_runs)
    with httpx.Client(base_url=s.origin, headers=s.headers(), timeout=10) as c:
        c.get("/api/runs/default/ddp")
        times = []
        for _ in range(9):
            t0 = time.perf_counter()
            assert c.get("/api/runs/default/ddp").status_code == 200
            times.append(time.perf_counter() - t0)
    assert sorted(times)[4] < 0.035, times
