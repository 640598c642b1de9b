"""The web viewer (``kobo open``): a 1M-point series reduced on the server vs the whole series as JSON.

Every run is written through the real client and daemon (:class:`IsolatedDaemon`):

* ``default/spikes1m``: ``loss``, 1,000,000 points (a decaying curve plus noise)
  with 20 one-point spikes of +5, one in each twentieth of the run;
* ``default/wide``: 200 metrics ``m000`` .. ``m199`` of 3,000 points each (``--quick``: 1,000);
* ``default/live``: written while the page shows it, by a separate training process;
* ``many/default/r00000`` .. : one small finished run copied 10,000 times (new run
  id and ``metadata.json`` each; ``--quick``: 2,000), in a folder of its own.

Then, against a baseline measured in the same run:

1. server, in-process: ``viewer.reduce.reduce_m4`` alone on the 1M points, and the
   whole ``/series`` request through ``httpx.ASGITransport`` (its ``Server-Timing``
   header gives read and reduce), warm (series cached by the app) and cold (a new
   app); bytes sent; spikes kept.  Baseline: the whole series as JSON
   ``{"x": [...], "y": [...]}`` (``json.dumps`` of the lists, as the reference
   KohakuBoard UI sends it) from a tiny Starlette app, warm (arrays cached, the
   JSON made per request) and cold; spikes kept by a stride-to-5,000 sample and
   a random 1,500 sample.  Also the run summary (the page's first request)
   in-process and over one kept-alive HTTP connection to the real process;
2. navigation to chart drawn in headless Chromium (Playwright, Debian's
   ``/usr/bin/chromium``, a new browser context per load, the first load of each
   page discarded, the two pages alternating) on a real ``kobo open --no-token
   --port 0`` process, page ``/#/run/default/spikes1m`` (``window.koboPerf.firstChartDraw``).
   Baseline: a minimal page served by the baseline app under uvicorn that fetches
   the whole series as JSON and draws it with the same vendored uPlot, at the
   width of the app's chart.  Where the app's time goes (scripts loaded, summary
   and series requests, drawn; resource timing) is logged and kept in the JSON;
3. zoom round trip on the warm page: ``window.koboZoom(metric, x0, x1)`` over
   windows of 500 .. 100,000 steps (fetch of the window at full resolution + draw);
4. live: a training process logs one point and calls ``flush()``; time from
   ``flush()`` returning to the page's ``koboState.charts.live.points`` growing
   (the tail is appended and drawn in the same task), both on the wall clock;
5. ``GET /api/runs`` over the 10,000-run folder on its own ``kobo open`` process:
   the first request (cold: a new process, OS page cache warm from the copy)
   and then warm; also the runs page drawn with 10,000 runs (no target);
6. the 200-chart page: navigation to first chart drawn, to usable (first chart
   drawn, all 200 cards laid out and the page scrollable), and the time to scroll
   through it a screen at a time, waiting for the charts in view, until all 200
   are drawn (charts load lazily as they come into view).

Prints a markdown table and writes ``results/viewer.json`` (``--json``), and the
metric records to ``--out`` for ``run_all.py``.  Without Chromium or Playwright
(or with ``--no-browser``) the browser parts are skipped and say so.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import _common as c

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
UPLOT_DIR = os.path.join(REPO, "viewer", "static", "vendor", "uplot")

N_POINTS = 1_000_000
N_SPIKES = 20
SPIKE_HEIGHT = 5.0
SPIKE_RUN = "spikes1m"
WIDE_RUN = "wide"
LIVE_RUN = "live"
N_WIDE = 200
N_MANY = 10_000
ZOOM_SIZES = (500, 1_000, 5_000, 10_000, 50_000, 100_000)
VIEWPORT = {"width": 1280, "height": 900}
STRIDE_POINTS = 5_000  # the reference UI's sample size
RANDOM_POINTS = 1_500  # W&B's random sampling

# Page timeouts (ms): generous, the machine is shared.
LOAD_TIMEOUT_MS = 60_000


# ------------------------------------------------------------------ data


def spike_series(n: int = N_POINTS) -> tuple[Any, list[int]]:
    """A decaying loss with noise and 20 one-point spikes of +5 (one per twentieth of the run)."""
    import numpy as np

    rng = np.random.default_rng(1)
    y = np.exp(-np.arange(n) / 200_000.0) + 0.5 + rng.random(n) * 0.05
    part = n // N_SPIKES
    spikes = [int(k * part + part // 2 + rng.integers(-part // 4, part // 4)) for k in range(N_SPIKES)]
    y[spikes] += SPIKE_HEIGHT
    return y, spikes


def write_runs(base_dir: str, wide_points: int) -> dict[str, Any]:
    """The 1M-point run, the 200-metric run and one small run (to copy), all finished."""
    import numpy as np

    from kohakuboard.client import Board

    out: dict[str, Any] = {}
    y, spikes = spike_series()
    values = y.tolist()
    b = Board("spikes-1m", {"kind": "spikes", "lr": 0.01}, run_id=SPIKE_RUN, base_dir=base_dir, capture_output=False)
    log = b.log
    t0 = time.perf_counter()
    for v in values:
        log(loss=v)
    t1 = time.perf_counter()
    b.flush()
    t2 = time.perf_counter()
    b.finish()
    out.update(spike_path=b.path, spikes=spikes, write_1m_s=t2 - t0, log_loop_s=t1 - t0)
    c.log(f"wrote {SPIKE_RUN}: 1M points in {t2 - t0:.2f} s (log loop {t1 - t0:.2f} s)")

    names = [f"m{k:03d}" for k in range(N_WIDE)]
    rng = np.random.default_rng(2)
    steps = np.arange(wide_points)[:, None]
    scale = rng.uniform(0.5, 2.0, N_WIDE)[None, :]
    grid = scale * np.exp(-steps / (wide_points / rng.uniform(1, 5, N_WIDE)[None, :])) + rng.normal(
        0, 0.02, (wide_points, N_WIDE)
    )
    t0 = time.perf_counter()
    with Board("wide-200", {"kind": "wide"}, run_id=WIDE_RUN, base_dir=base_dir, capture_output=False) as b:
        for row in grid.tolist():
            b.log(**dict(zip(names, row)))
    out.update(wide_path=b.path, wide_write_s=time.perf_counter() - t0)
    c.log(f"wrote {WIDE_RUN}: {N_WIDE} metrics x {wide_points} points in {out['wide_write_s']:.2f} s")

    with Board(
        "small", {"lr": 0.1, "batch": 32}, project="seed", run_id="small0", base_dir=base_dir, capture_output=False
    ) as b:
        for i in range(50):
            b.log(loss=1.0 / (i + 1))
    out["small_path"] = b.path
    return out


def copy_runs(src: str, dest_base: str, n: int) -> float:
    """``n`` copies of the (finished) run folder ``src`` under ``dest_base/default/``, each its own run id."""
    meta = json.load(open(os.path.join(src, "metadata.json")))
    pdir = os.path.join(dest_base, "default")
    os.makedirs(pdir, exist_ok=True)
    t0 = time.perf_counter()
    created = meta.get("created_at") or time.time()
    for i in range(n):
        run_id = f"r{i:05d}"
        dst = os.path.join(pdir, run_id)
        shutil.copytree(src, dst, copy_function=shutil.copyfile)
        m = dict(
            meta,
            run_id=run_id,
            project="default",
            name=f"copy-{i:05d}",
            created_at=created - (n - i),
            finished_at=created - (n - i) + 5.0,
            config=dict(meta.get("config") or {}, seed=i),
        )
        with open(os.path.join(dst, "metadata.json"), "w") as f:
            json.dump(m, f, indent=2)
    return time.perf_counter() - t0


# --------------------------------------------------------------- servers


class ServerProcess:
    """A server subprocess that prints its URL; stopped (SIGTERM, then SIGKILL) by its pid."""

    def __init__(self, cmd: list[str], name: str, timeout: float = 60.0) -> None:
        self.name = name
        self.lines: list[str] = []
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, stdin=subprocess.DEVNULL
        )
        self._url = threading.Event()
        self.origin = ""
        self._reader = threading.Thread(target=self._read, daemon=True, name=f"{name}-stdout")
        self._reader.start()
        if not self._url.wait(timeout) or not self.origin:
            out = "".join(self.lines)[-2000:]
            self.stop()
            raise RuntimeError(f"{name} printed no URL within {timeout:.0f} s: {out}")

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)
            m = re.search(r"(https?://[^/\s]+)/", line)
            if m and not self.origin:
                self.origin = m.group(1)
                self._url.set()
        self._url.set()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._reader.join(5)


def kobo_open(directory: str) -> ServerProcess:
    exe = os.path.join(os.path.dirname(sys.executable), "kobo")
    cmd = [exe] if os.path.exists(exe) else [sys.executable, "-m", "kohakuboard.cli.main"]
    return ServerProcess(cmd + ["open", directory, "--no-token", "--port", "0"], "kobo open")


# --------------------------------------------------------------- baseline


BASELINE_HTML = """<!doctype html>
<html><head><meta charset="utf-8"><title>baseline: whole series as JSON</title>
<link rel="icon" href="data:,">
<link rel="stylesheet" href="/uPlot.min.css">
<style>body{margin:16px;font-family:system-ui,sans-serif}</style></head>
<body><div id="chart" data-metric="loss"></div>
<script src="/uPlot.iife.min.js"></script>
<script>
window.koboPerf = {firstChartDraw: null};
window.koboBench = {};
(async () => {
  const w = Number(new URLSearchParams(location.search).get("w")) || 1200;
  const t0 = performance.now();
  const r = await fetch("/series.json", {cache: "no-store"});
  const t1 = performance.now();
  const d = await r.json();
  const t2 = performance.now();
  Object.assign(window.koboBench, {fetchStart: t0, headers: t1, json: t2, points: d.x.length,
                                   timing: r.headers.get("server-timing")});
  new uPlot({
    width: w, height: 210, legend: {show: false},
    scales: {x: {time: false}},
    series: [{}, {stroke: "#1c7ed6", width: 1, points: {show: false}}],
    hooks: {draw: [() => { if (koboPerf.firstChartDraw === null) koboPerf.firstChartDraw = performance.now(); }]},
  }, [d.x, d.y], document.getElementById("chart"));
})();
</script></body></html>
"""


def baseline_app(run_path: str, metric: str = "loss") -> Any:
    """The baseline server: the page above, uPlot, and ``/series.json`` = every point as JSON.

    The decoded series is cached (as the viewer's ``SeriesCache`` does), so a
    request costs the JSON conversion; ``/series.json?cold=1`` reads it again.
    """
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import FileResponse, HTMLResponse, Response
    from starlette.routing import Route

    from kohakuboard.storage.reader import RunReader

    cache: dict[str, Any] = {}

    def read() -> Any:
        with RunReader(run_path) as r:
            return r.series(metric)

    def body(cold: bool) -> tuple[bytes, float, float]:
        t0 = time.perf_counter()
        s = cache.get("s")
        if s is None or cold:
            s = cache["s"] = read()
        t1 = time.perf_counter()
        text = json.dumps({"x": s["step"].tolist(), "y": s["value"].tolist()}).encode()
        return text, t1 - t0, time.perf_counter() - t1

    async def page(request: Request) -> Response:
        return HTMLResponse(BASELINE_HTML, headers={"cache-control": "no-store"})

    async def series(request: Request) -> Response:
        text, t_read, t_json = await asyncio.to_thread(body, request.query_params.get("cold") == "1")
        return Response(
            text,
            media_type="application/json",
            headers={
                "cache-control": "no-store",
                "server-timing": f"read;dur={t_read * 1e3:.1f}, json;dur={t_json * 1e3:.1f}",
            },
        )

    async def uplot_js(request: Request) -> Response:
        return FileResponse(os.path.join(UPLOT_DIR, "uPlot.iife.min.js"))

    async def uplot_css(request: Request) -> Response:
        return FileResponse(os.path.join(UPLOT_DIR, "uPlot.min.css"))

    return Starlette(
        routes=[
            Route("/", page),
            Route("/series.json", series),
            Route("/uPlot.iife.min.js", uplot_js),
            Route("/uPlot.min.css", uplot_css),
        ]
    )


def serve_baseline(run_path: str) -> None:
    """``bench_viewer.py --serve-baseline RUN``: the baseline app under uvicorn on a free loopback port."""
    import socket

    import uvicorn

    # IPPROTO_TCP, as uvicorn's own binding makes it: asyncio sets TCP_NODELAY on accepted
    # connections only when the socket's proto is IPPROTO_TCP (with proto 0, a response written
    # as headers + body stalls ~40 ms on a kept-alive connection: Nagle + delayed ACK).
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    print(f"baseline at http://127.0.0.1:{sock.getsockname()[1]}/", flush=True)
    config = uvicorn.Config(
        baseline_app(run_path), log_level="warning", access_log=False, lifespan="off", timeout_graceful_shutdown=2
    )
    uvicorn.Server(config).run(sockets=[sock])


# ------------------------------------------------------------ in-process


def timing_of(header: str | None) -> dict[str, float]:
    out = {}
    for part in (header or "").split(","):
        m = re.match(r"\s*([\w-]+);dur=([\d.]+)", part)
        if m:
            out[m.group(1)] = float(m.group(2))
    return out


def spikes_kept(xs: Any, ys: Any, spikes: list[int], spike_y: Any) -> int:
    """How many spikes (step, value) are among the points sent."""
    import numpy as np

    sent = dict(zip(np.asarray(xs).astype(np.int64).tolist(), np.asarray(ys).tolist()))
    return sum(1 for s, v in zip(spikes, spike_y) if sent.get(s) == v)


def spikes_at_width(run_path: str, spikes: list[int], width: int) -> int:
    import numpy as np

    from kohakuboard.storage.reader import RunReader
    from kohakuboard.viewer import reduce as R

    with RunReader(run_path) as r:
        s = r.series("loss")
    x, y = s["step"].astype(np.float64), s["value"]
    idx = R.reduce_m4(x, y, width)
    return spikes_kept(x[idx], y[idx], spikes, y[spikes])


def server_part(base_dir: str, run_path: str, spikes: list[int], repeats: int) -> dict[str, Any]:
    import httpx
    import numpy as np

    from kohakuboard.storage.reader import RunReader
    from kohakuboard.viewer import reduce as R
    from kohakuboard.viewer.app import create_app

    with RunReader(run_path) as r:
        s = r.series("loss")
    assert len(s) == N_POINTS, f"read {len(s)} points, expected {N_POINTS}"
    x = s["step"].astype(np.float64)
    y = np.ascontiguousarray(s["value"])
    expected, _ = spike_series()
    assert np.array_equal(y, expected), "the stored values differ from the logged ones"
    spike_y = y[spikes]
    res: dict[str, Any] = {"reduce_ms": [], "reduce_2000_ms": [], "dumps_ms": []}

    for _ in range(max(repeats, 5)):
        t0 = time.perf_counter()
        idx = R.reduce_m4(x, y, 1000)
        res["reduce_ms"].append((time.perf_counter() - t0) * 1e3)
        t0 = time.perf_counter()
        R.reduce_m4(x, y, 2000)
        res["reduce_2000_ms"].append((time.perf_counter() - t0) * 1e3)
    res["reduced_points"] = int(len(idx))
    c.log(
        f"reduce_m4 1M -> {len(idx)} points (width 1000): {c.median(res['reduce_ms']):.1f} ms "
        f"[{min(res['reduce_ms']):.1f} .. {max(res['reduce_ms']):.1f}]; width 2000 {c.median(res['reduce_2000_ms']):.1f} ms"
    )
    for _ in range(2):
        t0 = time.perf_counter()
        text = json.dumps({"x": s["step"].tolist(), "y": s["value"].tolist()}).encode()
        res["dumps_ms"].append((time.perf_counter() - t0) * 1e3)
    res["json_bytes_standalone"] = len(text)
    del text
    c.log(f"json.dumps of the whole series: {c.median(res['dumps_ms']):.0f} ms, {res['json_bytes_standalone']:,} B")

    # Spikes kept: M4 at the API's default width and at the page's, vs samples of the reference UI and W&B.
    res["spikes_m4_1000"] = spikes_kept(x[idx], y[idx], spikes, spike_y)
    stride = np.arange(0, N_POINTS, N_POINTS // STRIDE_POINTS)
    res["spikes_stride"] = spikes_kept(x[stride], y[stride], spikes, spike_y)
    rnd = np.sort(np.random.default_rng(3).choice(N_POINTS, RANDOM_POINTS, replace=False))
    res["spikes_random"] = spikes_kept(x[rnd], y[rnd], spikes, spike_y)
    c.log(
        f"spikes kept of {N_SPIKES}: M4 (width 1000) {res['spikes_m4_1000']}, stride to {STRIDE_POINTS} "
        f"{res['spikes_stride']}, random {RANDOM_POINTS} {res['spikes_random']}"
    )

    url = f"/api/runs/default/{SPIKE_RUN}/series?metric=loss&width=1000"

    async def requests() -> None:
        cold, warm, timing_warm, timing_cold = [], [], [], []
        bl_cold, bl_warm, summary = [], [], []
        n = max(repeats, 5)
        for i in range(n):
            # cold: a new app (empty series cache) reads the column from disk
            app = create_app(base_dir, token=None)
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1") as cl:
                t0 = time.perf_counter()
                r = await cl.get(url)
                cold.append((time.perf_counter() - t0) * 1e3)
                timing_cold.append(timing_of(r.headers.get("server-timing")))
                assert r.status_code == 200, r.text
                body = r.content
                for _ in range(2):  # the run summary the page asks for first
                    t0 = time.perf_counter()
                    rs = await cl.get(f"/api/runs/default/{SPIKE_RUN}")
                    summary.append((time.perf_counter() - t0) * 1e3)
                    assert rs.status_code == 200 and rs.json()["metrics"][0]["points"] == N_POINTS, rs.text[:300]
                for _ in range(2):  # warm: the app has the series cached
                    t0 = time.perf_counter()
                    r = await cl.get(url)
                    warm.append((time.perf_counter() - t0) * 1e3)
                    timing_warm.append(timing_of(r.headers.get("server-timing")))
            if i < min(repeats, 3):
                bapp = baseline_app(run_path)
                async with httpx.AsyncClient(
                    transport=httpx.ASGITransport(app=bapp), base_url="http://127.0.0.1"
                ) as cl:
                    t0 = time.perf_counter()
                    r = await cl.get("/series.json")
                    bl_cold.append((time.perf_counter() - t0) * 1e3)
                    t0 = time.perf_counter()
                    r = await cl.get("/series.json")
                    bl_warm.append((time.perf_counter() - t0) * 1e3)
                    res["json_bytes"] = len(r.content)
                    res["json_timing"] = timing_of(r.headers.get("server-timing"))
                    if i == 0:
                        assert len(r.json()["x"]) == N_POINTS
                    del r
        header, arrays = R.decode(body)
        res.update(
            series_cold_ms=cold,
            series_warm_ms=warm,
            series_timing_warm=timing_warm,
            series_timing_cold=timing_cold,
            series_bytes=len(body),
            series_points=header["n"],
            json_cold_ms=bl_cold,
            json_warm_ms=bl_warm,
            summary_ms=summary,
            spikes_m4_request=spikes_kept(arrays["x"], arrays["y"], spikes, spike_y),
        )

    asyncio.run(requests())
    med = lambda k, f: c.median(t.get(f, float("nan")) for t in res[k])  # noqa: E731
    c.log(
        f"/series in-process: warm {c.median(res['series_warm_ms']):.1f} ms (reduce {med('series_timing_warm', 'reduce'):.1f}), "
        f"cold {c.median(res['series_cold_ms']):.1f} ms (read {med('series_timing_cold', 'read'):.1f}, "
        f"reduce {med('series_timing_cold', 'reduce'):.1f}); {res['series_bytes']:,} B, {res['series_points']} points; "
        f"JSON baseline warm {c.median(res['json_warm_ms']):.0f} ms, cold {c.median(res['json_cold_ms']):.0f} ms, "
        f"{res['json_bytes']:,} B; run summary {c.median(res['summary_ms']):.1f} ms"
    )
    return res


def keepalive_part(origin: str, repeats: int) -> dict[str, Any]:
    """Requests over one kept-alive HTTP connection to the real ``kobo open`` process, as a browser makes them."""
    import httpx

    res: dict[str, Any] = {}
    paths = {
        "summary": f"/api/runs/default/{SPIKE_RUN}",
        "series": f"/api/runs/default/{SPIKE_RUN}/series?metric=loss&width=1000",
        "static": "/static/app.js",
    }
    with httpx.Client(base_url=origin, timeout=60) as cl:
        for key, path in paths.items():
            assert cl.get(path).status_code == 200  # warm: series cached, connection open
            ts = []
            for _ in range(max(repeats, 5) * 2):
                t0 = time.perf_counter()
                r = cl.get(path)
                ts.append((time.perf_counter() - t0) * 1e3)
                assert r.status_code == 200
            res[key] = ts
        ts = []
        for _ in range(max(repeats, 5)):  # a new connection per request (as curl makes them)
            with httpx.Client(base_url=origin, timeout=60) as one:
                t0 = time.perf_counter()
                one.get(paths["summary"])
                ts.append((time.perf_counter() - t0) * 1e3)
        res["summary_new_connection"] = ts
    c.log(
        "kobo open over HTTP, one kept-alive connection: "
        + ", ".join(f"{k} {c.median(v):.1f} ms" for k, v in res.items())
    )
    return res


def runs_list_part(many_dir: str, cold_repeats: int, warm_repeats: int) -> dict[str, Any]:
    """``GET /api/runs`` over the 10,000-run folder on real ``kobo open`` processes."""
    import httpx

    res: dict[str, Any] = {"cold_ms": [], "warm_ms": [], "start_s": []}
    for i in range(cold_repeats):
        t0 = time.perf_counter()
        srv = kobo_open(many_dir)
        res["start_s"].append(time.perf_counter() - t0)
        try:
            with httpx.Client(base_url=srv.origin, timeout=300) as cl:
                t0 = time.perf_counter()
                r = cl.get("/api/runs")
                res["cold_ms"].append((time.perf_counter() - t0) * 1e3)
                assert r.status_code == 200, r.text[:300]
                data = r.json()
                assert data["total"] == N_MANY and len(data["runs"]) == N_MANY, data["total"]
                assert not any(x["error"] for x in data["runs"]), [x["error"] for x in data["runs"] if x["error"]][:3]
                assert all(x["last_step"] == 49 for x in data["runs"])
                res["bytes"] = len(r.content)
                if i == cold_repeats - 1:
                    for _ in range(warm_repeats):
                        t0 = time.perf_counter()
                        r = cl.get("/api/runs")
                        res["warm_ms"].append((time.perf_counter() - t0) * 1e3)
                        assert r.status_code == 200 and r.json()["total"] == N_MANY
        finally:
            if i < cold_repeats - 1:
                srv.stop()
            else:
                res["server"] = srv  # kept for the runs page in the browser
        c.log(
            f"GET /api/runs over {N_MANY:,} runs: cold {res['cold_ms'][-1]:.0f} ms "
            f"(server started in {res['start_s'][-1]:.2f} s)"
        )
    c.log(
        f"GET /api/runs warm: {c.median(res['warm_ms']):.0f} ms [{min(res['warm_ms']):.0f} .. "
        f"{max(res['warm_ms']):.0f}], {res['bytes']:,} B"
    )
    return res


# --------------------------------------------------------------- browser


def chromium_path(arg: str | None) -> str | None:
    path = arg or os.environ.get("KOBO_CHROMIUM") or "/usr/bin/chromium"
    return path if os.path.exists(path) else None


class Browser:
    """Headless Chromium through Playwright; every page load in a new context."""

    def __init__(self, executable: str) -> None:
        from playwright.sync_api import sync_playwright

        self._pw = sync_playwright().start()
        try:
            self.browser = self._pw.chromium.launch(executable_path=executable, headless=True, args=["--no-sandbox"])
        except Exception:
            self._pw.stop()
            raise
        self.version = self.browser.version

    def page(self, init_script: str | None = None) -> Any:
        ctx = self.browser.new_context(viewport=VIEWPORT)
        if init_script:
            ctx.add_init_script(init_script)
        page = ctx.new_page()
        page.set_default_timeout(LOAD_TIMEOUT_MS)
        page._bench_errors = []  # type: ignore[attr-defined]
        page.on("pageerror", lambda e: page._bench_errors.append(str(e)))  # type: ignore[attr-defined]
        page.on("console", lambda m: m.type == "error" and page._bench_errors.append(m.text))  # type: ignore[attr-defined]
        return page

    def close(self) -> None:
        try:
            self.browser.close()
        finally:
            self._pw.stop()


# The app / baseline page loads are timed by the page (navigation -> chart drawn); the benchmark
# reads the result only after this long, so that its polls never run inside a load (both pages
# draw well within it; a slower one is then polled every 20 ms until it has).
FIRST_POLL_S = 1.5

APP_DRAWN = (
    "() => (window.koboPerf && window.koboPerf.firstChartDraw !== null && window.koboPerf.firstChartDraw !== undefined)"
    " || (window.koboState && window.koboState.errors && window.koboState.errors.length > 0)"
)


def wait_page(
    page: Any, js: str, timeout_ms: float = LOAD_TIMEOUT_MS, poll_s: float = 0.02, first_poll_s: float = 0.0
) -> None:
    """Wait until ``js`` is truthy in the page; give up at once when the page throws.

    Polls with ``page.evaluate`` every ``poll_s`` rather than ``wait_for_function``: that one
    first evaluates Playwright's injected script in the page (~24 ms of the page's main thread,
    measured in a Chromium trace), which lands in the middle of the load being timed and is
    not part of what a user's browser does.  ``first_poll_s``: no poll before then.  Each poll is
    a task on the page's main thread (and the first one sets up Playwright's script world
    there), so a load timed by the page's own clock is left alone until it is surely over.
    Both pages, app and baseline, are waited on alike.
    """
    deadline = time.monotonic() + timeout_ms / 1e3
    if first_poll_s > 0:
        time.sleep(first_poll_s)
    while True:
        if page.evaluate(js):
            return
        if page._bench_errors:
            raise RuntimeError(f"the page reported errors: {page._bench_errors[:3]}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout_ms / 1e3:.0f} s waiting for {js[:100]!r}")
        time.sleep(poll_s)


def page_errors(page: Any) -> list[str]:
    errs = list(page._bench_errors)
    try:
        errs += [e["message"] for e in page.evaluate("() => (window.koboState && window.koboState.errors) || []")]
    except Exception:
        pass
    return errs


def load_app(br: Browser, url: str, metric: str) -> dict[str, Any]:
    """One load of the app's run page in a new context; where the time went (ms since navigation start)."""
    page = br.page()
    try:
        page.goto(url, wait_until="commit")
        wait_page(page, APP_DRAWN, first_poll_s=FIRST_POLL_S)
        errs = page_errors(page)
        if errs:
            raise RuntimeError(f"the page reported errors: {errs[:3]}")
        return page.evaluate(
            r"""(m) => {
            const st = window.koboState.charts[m] || {};
            const lf = st.lastFetch || {};
            const plot = document.querySelector(`.chart-card[data-metric="${m}"] .chart-plot`);
            const nav = performance.getEntriesByType("navigation")[0];
            const res = performance.getEntriesByType("resource");
            const run = location.hash.replace(/^#\/run\//, "").split("?")[0];
            const summary = res.find((e) => new URL(e.name).pathname === `/api/runs/${run}`);
            // the chart's data: index.html's early first-charts request, or the page's own series request
            const series = res.find((e) => e.name.includes("/first-charts?")) || res.find((e) => e.name.includes("/series?"));
            const js = res.filter((e) => e.name.endsWith(".js"));
            const r0 = (v) => (v === undefined || v === null ? null : Math.round(v * 10) / 10);
            return {ms: window.koboPerf.firstChartDraw, points: st.points, reduced: st.reduced,
                    total: lf.total, bytes: lf.bytes, url: lf.url, timing: lf.timing,
                    plotWidth: plot ? plot.clientWidth : null, dpr: window.devicePixelRatio,
                    phases: {html: r0(nav.responseEnd), scripts: r0(Math.max(...js.map((e) => e.responseEnd))),
                             dom_content_loaded: r0(nav.domContentLoadedEventEnd),
                             summary_start: r0(summary && summary.startTime), summary_end: r0(summary && summary.responseEnd),
                             series_start: r0(series && series.startTime), series_first_byte: r0(series && series.responseStart),
                             series_end: r0(series && series.responseEnd), drawn: r0(window.koboPerf.firstChartDraw)}};
        }""",
            metric,
        )
    finally:
        page.context.close()


def load_baseline(br: Browser, url: str) -> dict[str, Any]:
    page = br.page()
    try:
        page.goto(url, wait_until="commit")
        wait_page(page, "() => window.koboPerf && window.koboPerf.firstChartDraw !== null", first_poll_s=FIRST_POLL_S)
        if page._bench_errors:
            raise RuntimeError(f"the baseline page reported errors: {page._bench_errors[:3]}")
        return page.evaluate("""() => {
            const e = performance.getEntriesByType("resource").find((r) => r.name.includes("/series.json"));
            return Object.assign({ms: window.koboPerf.firstChartDraw, first_byte: e && e.responseStart,
                                  data_in: e && e.responseEnd}, window.koboBench);
        }""")
    finally:
        page.context.close()


def page_part(br: Browser, app_origin: str, base_origin: str, loads: int) -> dict[str, Any]:
    """Navigation -> first chart drawn, app vs baseline, alternating, the first load of each discarded."""
    app_url = f"{app_origin}/#/run/default/{SPIKE_RUN}"
    res: dict[str, Any] = {"app": [], "baseline": [], "app_detail": [], "baseline_detail": []}
    first = load_app(br, app_url, "loss")
    width = int(first.get("plotWidth") or 1200)
    res["app_first"] = first
    base_url = f"{base_origin}/?w={width}"
    res["baseline_first"] = load_baseline(br, base_url)
    c.log(
        f"page warm-up loads: app {first['ms']:.0f} ms ({first['points']} points, {first['bytes']:,} B, "
        f"{first['url']}), baseline {res['baseline_first']['ms']:.0f} ms (chart width {width} px)"
    )
    for i in range(loads):
        for who in ("app", "baseline") if i % 2 == 0 else ("baseline", "app"):
            d = load_app(br, app_url, "loss") if who == "app" else load_baseline(br, base_url)
            res[who].append(d["ms"])
            res[who + "_detail"].append(d)
        a, b = res["app_detail"][-1], res["baseline_detail"][-1]
        ph = a["phases"]
        c.log(
            f"load {i + 1}/{loads}: app {a['ms']:.0f} ms (scripts in {ph['scripts']:.0f}, summary "
            f"{ph['summary_start']:.0f}..{ph['summary_end']:.0f}, series {ph['series_start']:.0f}..{ph['series_end']:.0f} "
            f"[{(a['timing'] or {}).get('server')}]), baseline {b['ms']:.0f} ms "
            f"(first byte {b['first_byte']:.0f} ms, data in {b['data_in']:.0f} ms, parsed {b['json']:.0f} ms, {b['timing']})"
        )
    d = res["app_detail"][-1]
    assert d["total"] == N_POINTS and d["reduced"], d
    res["app_phases_median"] = {
        k: c.median(x["phases"][k] for x in res["app_detail"] if x["phases"][k] is not None) for k in d["phases"]
    }
    res["baseline_phases_median"] = {
        k: c.median(x[k] for x in res["baseline_detail"]) for k in ("first_byte", "data_in", "json", "ms")
    }
    c.log(f"app page, medians (ms since navigation): {res['app_phases_median']}")
    c.log(f"baseline page, medians (ms since navigation): {res['baseline_phases_median']}")
    res["width"] = width
    res["page_width_param"] = int(re.search(r"width=(\d+)", d["url"] or "width=0").group(1)) or None
    return res


def zoom_part(br: Browser, app_origin: str, rounds: int) -> dict[str, Any]:
    """``koboZoom`` on a warm page over windows of 500 .. 100,000 steps at random places."""
    import numpy as np

    page = br.page()
    res: dict[str, Any] = {"ms": [], "by_size": {str(s): [] for s in ZOOM_SIZES}, "detail": []}
    try:
        page.goto(f"{app_origin}/#/run/default/{SPIKE_RUN}", wait_until="commit")
        wait_page(page, APP_DRAWN)
        if page_errors(page):
            raise RuntimeError(f"the page reported errors: {page_errors(page)[:3]}")
        if not page.evaluate("() => typeof window.koboZoom === 'function'"):
            raise RuntimeError("window.koboZoom is missing")
        rng = np.random.default_rng(4)
        for _ in range(rounds):
            for size in ZOOM_SIZES:
                x0 = int(rng.integers(0, N_POINTS - size))
                d = page.evaluate(
                    """async ([m, x0, x1]) => {
                    const t0 = performance.now();
                    const st = await window.koboZoom(m, x0, x1);
                    const ms = performance.now() - t0;
                    return {ms, points: st.points, reduced: st.reduced, zoomed: st.zoomed,
                            inRange: st.lastFetch && st.lastFetch.in_range, timing: st.lastFetch && st.lastFetch.timing};
                }""",
                    ["loss", x0, x0 + size - 1],
                )
                assert d["zoomed"] and d["inRange"] == size, d
                res["ms"].append(d["ms"])
                res["by_size"][str(size)].append(d["ms"])
                res["detail"].append(dict(d, size=size))
        errs = page_errors(page)
        if errs:
            raise RuntimeError(f"the page reported errors while zooming: {errs[:3]}")
    finally:
        page.context.close()
    c.log(
        "zoom round trip: median {:.0f} ms [{:.0f} .. {:.0f}]; by window: {}".format(
            c.median(res["ms"]),
            min(res["ms"]),
            max(res["ms"]),
            ", ".join(f"{int(k):,}: {c.median(v):.0f} ms" for k, v in res["by_size"].items()),
        )
    )
    return res


LIVE_SCRIPT = r"""
import math, sys, time
from kohakuboard.client import Board
b = Board(name="live", run_id=sys.argv[1], base_dir=sys.argv[2], capture_output=False)
for i in range(100):
    b.log(live=math.exp(-i / 50))
b.flush()
print("ready", flush=True)
for line in sys.stdin:
    if line.strip() == "quit":
        break
    b.log(live=float(line))
    b.flush()
    print("flushed", repr(time.time()), flush=True)
b.finish()
print("finished", flush=True)
"""

LIVE_WATCH = """() => {
    window.__live = [];
    let last = window.koboState.charts.live.points;
    window.__liveTimer = setInterval(() => {
        const st = window.koboState.charts.live;
        if (st && st.points !== last) {
            last = st.points;
            window.__live.push({points: last, t: performance.timeOrigin + performance.now()});
        }
    }, 2);
}"""


def live_part(br: Browser, app_origin: str, base_dir: str, flushes: int) -> dict[str, Any]:
    """flush() returning in a training process -> the new point in the page."""
    import random

    proc = subprocess.Popen(
        [sys.executable, "-c", LIVE_SCRIPT, LIVE_RUN, base_dir],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        bufsize=1,
    )
    res: dict[str, Any] = {"ms": [], "detail": []}
    page = None

    def readline(timeout: float = 30.0) -> str:
        out: list[str] = []
        t = threading.Thread(target=lambda: out.append(proc.stdout.readline()), daemon=True)  # type: ignore[union-attr]
        t.start()
        t.join(timeout)
        if not out or not out[0]:
            raise RuntimeError(f"the training process said nothing within {timeout:.0f} s (exit {proc.poll()})")
        return out[0]

    try:
        assert readline(60).strip() == "ready"
        page = br.page()
        page.goto(f"{app_origin}/#/run/default/{LIVE_RUN}", wait_until="commit")
        wait_page(page, "() => window.koboState && window.koboState.charts.live && window.koboState.charts.live.drawn")
        wait_page(page, "() => window.koboState.sse === 'open'")
        points0 = page.evaluate("() => window.koboState.charts.live.points")
        assert points0 == 100, points0
        page.evaluate(LIVE_WATCH)
        time.sleep(0.5)
        rnd = random.Random(5)
        for i in range(flushes):
            proc.stdin.write(f"{0.1 + i * 0.01}\n")  # type: ignore[union-attr]
            proc.stdin.flush()  # type: ignore[union-attr]
            line = readline()
            assert line.startswith("flushed"), line
            t_flush = float(line.split()[1]) * 1e3
            want = points0 + i + 1
            wait_page(page, f"() => window.__live.some(e => e.points >= {want})", timeout_ms=15_000)
            seen = page.evaluate(f"() => window.__live.find(e => e.points >= {want}).t")
            res["ms"].append(seen - t_flush)
            res["detail"].append({"flush_wall_ms": t_flush, "seen_wall_ms": seen})
            time.sleep(0.2 + rnd.random() * 0.4)  # spread the flushes over the server's 0.25 s poll
        res["live_updates"] = page.evaluate("() => window.koboState.liveUpdates")
        errs = page_errors(page)
        if errs:
            raise RuntimeError(f"the page reported errors during the live part: {errs[:3]}")
    finally:
        if page is not None:
            page.context.close()
        try:
            proc.stdin.write("quit\n")  # type: ignore[union-attr]
            proc.stdin.flush()  # type: ignore[union-attr]
            proc.wait(30)
        except Exception:
            proc.kill()
            proc.wait(10)
    c.log(
        f"live: flush() -> point in the page: median {c.median(res['ms']):.0f} ms "
        f"[{min(res['ms']):.0f} .. {max(res['ms']):.0f}] over {len(res['ms'])} flushes"
    )
    return res


WIDE_INIT = (
    """
window.__bench = {cardsAt: null, scrollableAt: null, longTasks: []};
try {
  new PerformanceObserver((l) => { for (const e of l.getEntries()) window.__bench.longTasks.push([e.startTime, e.duration]); })
    .observe({type: "longtask", buffered: true});
} catch (_) {}
window.__benchTimer = setInterval(() => {
  const b = window.__bench;
  const n = document.querySelectorAll(".chart-card").length;
  if (b.cardsAt === null && n >= %d) b.cardsAt = performance.now();
  const se = document.scrollingElement;
  if (b.cardsAt !== null && b.scrollableAt === null && se && se.scrollHeight > innerHeight * 2) b.scrollableAt = performance.now();
  if (b.scrollableAt !== null) clearInterval(window.__benchTimer);
}, 5);
"""
    % N_WIDE
)

WIDE_SCROLL = """async () => {
    const t0 = performance.now();
    const cards = () => Array.from(document.querySelectorAll(".chart-card"));
    const H = innerHeight;
    const maxY = () => document.scrollingElement.scrollHeight - H;
    const frame = () => new Promise((r) => requestAnimationFrame(() => r()));
    let y = 0, screens = 0;
    for (;;) {
        window.scrollTo(0, y);
        screens++;
        const deadline = performance.now() + 15000;
        while (performance.now() < deadline) {
            const inView = cards().filter((c) => { const r = c.getBoundingClientRect(); return r.bottom > 0 && r.top < H; });
            if (inView.every((c) => c.dataset.drawn === "1")) break;
            await frame();
        }
        if (y >= maxY()) break;
        y = Math.min(y + H, maxY());
    }
    const deadline = performance.now() + 15000;
    while (cards().some((c) => c.dataset.drawn !== "1") && performance.now() < deadline) await frame();
    const now = performance.now();
    return {ms: now - t0, fromNav: now, screens, drawn: cards().filter((c) => c.dataset.drawn === "1").length,
            cards: cards().length};
}"""


def wide_part(br: Browser, app_origin: str, loads: int) -> dict[str, Any]:
    """The 200-chart page: first chart, usable, and scrolled through with every chart drawn."""
    url = f"{app_origin}/#/run/default/{WIDE_RUN}"
    res: dict[str, Any] = {"first_ms": [], "usable_ms": [], "scroll_ms": [], "all_drawn_ms": [], "detail": []}
    for i in range(loads + 1):
        page = br.page(WIDE_INIT)
        try:
            page.goto(url, wait_until="commit")
            wait_page(page, APP_DRAWN)
            wait_page(page, "() => window.__bench.scrollableAt !== null")
            errs = page_errors(page)
            if errs:
                raise RuntimeError(f"the page reported errors: {errs[:3]}")
            d = page.evaluate("""() => ({first: window.koboPerf.firstChartDraw, cardsAt: window.__bench.cardsAt,
                                         scrollableAt: window.__bench.scrollableAt,
                                         drawnAtUsable: null,
                                         longTasks: window.__bench.longTasks.slice()})""")
            d["usable"] = max(d["first"], d["scrollableAt"])
            s = page.evaluate(WIDE_SCROLL)
            assert s["drawn"] == N_WIDE and s["cards"] == N_WIDE, s
            d.update(scroll=s)
            lt = [t for t in d.pop("longTasks") if t[0] < d["usable"]]
            d["long_tasks_before_usable_ms"] = sum(t[1] for t in lt)
            d["longest_task_before_usable_ms"] = max((t[1] for t in lt), default=0.0)
            errs = page_errors(page)
            if errs:
                raise RuntimeError(f"the page reported errors while scrolling: {errs[:3]}")
        finally:
            page.context.close()
        tag = "warm-up" if i == 0 else f"{i}/{loads}"
        c.log(
            f"200 charts, load {tag}: first chart {d['first']:.0f} ms, 200 cards laid out {d['cardsAt']:.0f} ms, "
            f"usable {d['usable']:.0f} ms (long tasks before: {d['long_tasks_before_usable_ms']:.0f} ms, longest "
            f"{d['longest_task_before_usable_ms']:.0f}); scrolled through {s['screens']} screens, all drawn after "
            f"{s['ms']:.0f} ms ({s['fromNav']:.0f} ms from navigation)"
        )
        if i == 0:
            res["first_load"] = d
            continue
        res["first_ms"].append(d["first"])
        res["usable_ms"].append(d["usable"])
        res["scroll_ms"].append(s["ms"])
        res["all_drawn_ms"].append(s["fromNav"])
        res["detail"].append(d)
    return res


READY_INIT = """
window.__readyAt = null;
window.__readyTimer = setInterval(() => {
  if (window.koboState && window.koboState.ready) { window.__readyAt = performance.now(); clearInterval(window.__readyTimer); }
}, 2);
"""


def runs_page_part(br: Browser, origin: str, loads: int) -> dict[str, Any]:
    """The runs page over 10,000 runs: navigation -> ``koboState.ready`` (no target)."""
    res: dict[str, Any] = {"ms": [], "rows": None}
    for i in range(loads + 1):
        page = br.page(READY_INIT)
        try:
            page.goto(origin + "/#/", wait_until="commit")
            wait_page(
                page,
                "() => window.__readyAt !== null || (window.koboState && window.koboState.errors.length)",
                timeout_ms=120_000,
            )
            errs = page_errors(page)
            if errs:
                raise RuntimeError(f"the runs page reported errors: {errs[:3]}")
            ms, rows = page.evaluate("() => [window.__readyAt, document.querySelectorAll('tr.run-row').length]")
        finally:
            page.context.close()
        if i:
            res["ms"].append(ms)
        res["rows"] = rows
    c.log(f"runs page with {N_MANY:,} runs ready: {c.median(res['ms']):.0f} ms ({res['rows']} rows rendered)")
    return res


# ---------------------------------------------------------------- report


def build_records(
    srv: dict[str, Any], parts: dict[str, Any], rl: dict[str, Any], skipped: dict[str, str], writes: dict[str, Any]
) -> list[dict[str, Any]]:
    ka, pg, zm, lv, rp, wd = (parts.get(k) for k in ("keepalive", "page", "zoom", "live", "runs_page", "wide"))
    m = c.metric
    med = c.median
    recs = []

    def missing(key: str, name: str, target: float | None, part: str) -> dict[str, Any]:
        why = skipped.get(part) or skipped.get("page") or "not run"
        return m(key, f"{name} (NOT MEASURED: {why[:120]})", unit="ms", target=target, op="<=", values=[], note=why)

    json_warm = med(srv["json_warm_ms"])
    t_warm = [t.get("reduce", float("nan")) for t in srv["series_timing_warm"]]
    t_cold = srv["series_timing_cold"]
    recs.append(
        m(
            "viewer_reduce_1m_ms",
            f"M4 reduce_m4 alone, 1M points -> {srv['reduced_points']:,} (width 1000)",
            unit="ms",
            target=None,
            op="<=",
            values=srv["reduce_ms"],
            baseline=f"json.dumps of the whole series {med(srv['dumps_ms']):.0f} ms",
            baseline_values={"json_dumps_ms": med(srv["dumps_ms"])},
            extra={"width_2000_ms": srv["reduce_2000_ms"], "json_dumps_ms": srv["dumps_ms"]},
        )
    )
    recs.append(
        m(
            "viewer_series_request_ms",
            "/series request in-process, 1M points, series cached (warm)",
            unit="ms",
            target=None,
            op="<=",
            values=srv["series_warm_ms"],
            baseline=f"whole series as JSON {json_warm:.0f} ms ({json_warm / med(srv['series_warm_ms']):.0f}x)",
            baseline_values={
                "json_warm_ms": json_warm,
                "json_warm_per_repeat": srv["json_warm_ms"],
                "json_server_timing": srv.get("json_timing"),
            },
            extra={"server_timing_reduce_ms": t_warm},
        )
    )
    recs.append(
        m(
            "viewer_series_cold_ms",
            "/series request in-process, new app (reads 1M points + reduce)",
            unit="ms",
            target=None,
            op="<=",
            values=srv["series_cold_ms"],
            baseline=f"read + whole series as JSON {med(srv['json_cold_ms']):.0f} ms",
            baseline_values={"json_cold_ms": med(srv["json_cold_ms"]), "per_repeat": srv["json_cold_ms"]},
            extra={
                "server_timing_read_ms": [t.get("read") for t in t_cold],
                "server_timing_reduce_ms": [t.get("reduce") for t in t_cold],
            },
        )
    )
    recs.append(
        m(
            "viewer_series_bytes",
            f"/series bytes sent, 1M points ({srv['series_points']:,} points, width 1000)",
            unit="B",
            target=None,
            op="<=",
            values=[srv["series_bytes"]],
            baseline=f"whole series as JSON {srv['json_bytes']:,} B ({srv['json_bytes'] / srv['series_bytes']:.0f}x)",
            baseline_values={"json_bytes": srv["json_bytes"]},
        )
    )
    recs.append(
        m(
            "viewer_summary_ms",
            "run summary request in-process (1M-point run; the page's first request)",
            unit="ms",
            target=None,
            op="<=",
            values=srv["summary_ms"],
            baseline="-",
        )
    )
    if ka:
        recs.append(
            m(
                "viewer_keepalive_ms",
                "kobo open over HTTP: run summary on a kept-alive connection",
                unit="ms",
                target=None,
                op="<=",
                values=ka["summary"],
                baseline=f"same, new connection per request {med(ka['summary_new_connection']):.1f} ms; "
                f"in-process {med(srv['summary_ms']):.1f} ms",
                baseline_values={
                    "new_connection_ms": med(ka["summary_new_connection"]),
                    "in_process_ms": med(srv["summary_ms"]),
                },
                extra={"series_keepalive_ms": ka["series"], "static_keepalive_ms": ka["static"]},
                note="~40 ms over a new connection's time: Nagle + delayed ACK (accepted sockets without TCP_NODELAY)"
                if med(ka["summary"]) - med(ka["summary_new_connection"]) > 30
                else "",
            )
        )
    spike_extra = {
        "m4_width_1000": srv["spikes_m4_1000"],
        "m4_request": srv["spikes_m4_request"],
        "stride_5000": srv["spikes_stride"],
        "random_1500": srv["spikes_random"],
    }
    if "spikes_m4_page" in srv:
        spike_extra.update(m4_page_width=srv["page_width"], m4_page=srv["spikes_m4_page"])
    recs.append(
        m(
            "viewer_spikes_kept",
            f"spikes kept of {N_SPIKES} (M4 /series, width 1000)",
            unit="spikes",
            target=float(N_SPIKES),
            op=">=",
            values=[srv["spikes_m4_request"]],
            baseline=f"stride to {STRIDE_POINTS:,}: {srv['spikes_stride']}; random {RANDOM_POINTS:,}: {srv['spikes_random']}",
            baseline_values={"stride_5000": srv["spikes_stride"], "random_1500": srv["spikes_random"]},
            extra=spike_extra,
        )
    )
    if pg:
        bmed = med(pg["baseline"])
        ratios = [b / a for a, b in zip(pg["app"], pg["baseline"])]
        recs.append(
            m(
                "viewer_page_1m_ms",
                "navigation -> 1M-point chart drawn (headless Chromium)",
                unit="ms",
                target=300.0,
                op="<=",
                values=pg["app"],
                baseline=f"whole series as JSON + uPlot {bmed:.0f} ms [{min(pg['baseline']):.0f} .. {max(pg['baseline']):.0f}]",
                baseline_values={"json_page_ms": bmed, "per_repeat": pg["baseline"]},
                extra={
                    "app_phases_median_ms": pg["app_phases_median"],
                    "baseline_phases_median_ms": pg["baseline_phases_median"],
                    "app_detail": pg["app_detail"],
                    "baseline_detail": pg["baseline_detail"],
                    "chart_width_px": pg["width"],
                },
                note="a new browser context per load; first load of each page discarded; the pages alternate",
            )
        )
        recs.append(
            m(
                "viewer_page_speedup",
                "1M-point chart: baseline time / app time (per alternating pair)",
                unit="x",
                target=5.0,
                op=">=",
                values=ratios,
                baseline=f"ratio of medians {bmed / med(pg['app']):.1f}x",
                baseline_values={"ratio_of_medians": bmed / med(pg["app"])},
            )
        )
    else:
        recs.append(missing("viewer_page_1m_ms", "navigation -> 1M-point chart drawn", 300.0, "page"))
    if zm:
        recs.append(
            m(
                "viewer_zoom_ms",
                "zoom round trip on a warm page (koboZoom, 500..100k-step windows)",
                unit="ms",
                target=None,
                op="<=",
                values=zm["ms"],
                baseline="prototype: 56-145 ms",
                extra={"by_size_median_ms": {k: med(v) for k, v in zm["by_size"].items()}, "detail": zm["detail"]},
            )
        )
    elif "zoom" in skipped or "page" in skipped:
        recs.append(missing("viewer_zoom_ms", "zoom round trip on a warm page", None, "zoom"))
    if not lv:
        recs.append(missing("viewer_live_ms", "live: flush() returned -> point drawn in the page", 1000.0, "live"))
    if lv:
        recs.append(
            m(
                "viewer_live_ms",
                "live: flush() returned -> point drawn in the page",
                unit="ms",
                target=1000.0,
                op="<=",
                values=lv["ms"],
                baseline="server polls every 250 ms",
                extra={"p_max_ms": max(lv["ms"]), "live_updates": lv.get("live_updates")},
            )
        )
    recs.append(
        m(
            "viewer_runs_warm_ms",
            f"GET /api/runs, {N_MANY:,} runs, warm",
            unit="ms",
            target=1000.0,
            op="<=",
            values=rl["warm_ms"],
            baseline=f"cold (first request) {med(rl['cold_ms']):.0f} ms",
            baseline_values={"cold_ms": med(rl["cold_ms"]), "bytes": rl["bytes"]},
            extra={"copy_s": rl.get("copy_s"), "server_start_s": rl["start_s"]},
        )
    )
    recs.append(
        m(
            "viewer_runs_cold_ms",
            f"GET /api/runs, {N_MANY:,} runs, cold (new kobo open process)",
            unit="ms",
            target=None,
            op="<=",
            values=rl["cold_ms"],
            baseline="prototype (metadata.json only): 3.8 s cold cache",
            note="OS page cache warm from the copy",
        )
    )
    if rp:
        recs.append(
            m(
                "viewer_runs_page_ms",
                f"navigation -> runs page ready, {N_MANY:,} runs",
                unit="ms",
                target=None,
                op="<=",
                values=rp["ms"],
                baseline="-",
                extra={"rows_rendered": rp["rows"]},
            )
        )
    if not wd:
        recs.append(missing("viewer_200_usable_ms", "200-chart page: navigation -> usable", 2000.0, "wide"))
    if wd:
        recs.append(
            m(
                "viewer_200_first_ms",
                "200-chart page: navigation -> first chart drawn",
                unit="ms",
                target=None,
                op="<=",
                values=wd["first_ms"],
                baseline="-",
            )
        )
        recs.append(
            m(
                "viewer_200_usable_ms",
                "200-chart page: navigation -> usable (first chart drawn, scrollable)",
                unit="ms",
                target=2000.0,
                op="<=",
                values=wd["usable_ms"],
                baseline="-",
                extra={
                    "long_tasks_before_usable_ms": [d["long_tasks_before_usable_ms"] for d in wd["detail"]],
                    "longest_task_before_usable_ms": [d["longest_task_before_usable_ms"] for d in wd["detail"]],
                },
            )
        )
        recs.append(
            m(
                "viewer_200_scroll_ms",
                "200-chart page: scroll through (a screen at a time) until all drawn",
                unit="ms",
                target=None,
                op="<=",
                values=wd["scroll_ms"],
                baseline=f"from navigation {med(wd['all_drawn_ms']):.0f} ms",
                baseline_values={"from_navigation_ms": med(wd["all_drawn_ms"])},
                extra={"detail": wd["detail"]},
            )
        )
    recs.append(
        m(
            "viewer_write_1m_s",
            "write the 1M-point run (log .. flush, no target)",
            unit="s",
            target=None,
            op="<=",
            values=[writes["write_1m_s"]],
            baseline=f"log loop alone {writes['log_loop_s']:.2f} s",
            baseline_values={"log_loop_s": writes["log_loop_s"]},
        )
    )
    return recs


def main() -> None:
    global N_MANY
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--quick",
        action="store_true",
        help="3 loads per page, fewer zooms/flushes, 1,000-point charts, 2,000 runs in the list",
    )
    p.add_argument("--repeats", type=int, default=None, help="page loads / repeats (default 5, --quick 3)")
    p.add_argument("--out", default=None, help="also write the metric records (JSON list) here")
    p.add_argument("--json", default=os.path.join(c.RESULTS_DIR, "viewer.json"), help="where to write the results")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (runs, daemon log) for inspection")
    p.add_argument("--no-browser", action="store_true", help="skip the parts in Chromium")
    p.add_argument("--chromium", default=None, help="browser binary (default $KOBO_CHROMIUM or /usr/bin/chromium)")
    p.add_argument(
        "--wait-idle",
        type=float,
        default=0,
        metavar="SECONDS",
        help="first wait up to SECONDS for the 1-min load average to fall below 0.7",
    )
    p.add_argument(
        "--many",
        type=int,
        default=None,
        metavar="N",
        help=f"runs in the run-list folder (default {N_MANY:,}, --quick 2,000)",
    )
    args = p.parse_args()
    if args.repeats is None:
        args.repeats = 3 if args.quick else 5
    N_MANY = args.many or (2_000 if args.quick else N_MANY)
    from run_all import machine_info, print_report, wait_idle

    if args.wait_idle:
        wait_idle(args.wait_idle)
    started = time.time()
    loads: dict[str, float] = {"start": c.load_average()[0]}
    skipped: dict[str, str] = {}
    exe = None
    if args.no_browser:
        skipped["page"] = "--no-browser"
    else:
        exe = chromium_path(args.chromium)
        import importlib.util

        if importlib.util.find_spec("playwright") is None:
            skipped["page"] = "the playwright package is not installed (pip install 'playwright==1.65.*')"
        if exe is None:
            skipped["page"] = "no Chromium (apt-get install chromium, or --chromium PATH / KOBO_CHROMIUM)"
        if not os.path.exists(os.path.join(REPO, "viewer", "static", "index.html")):
            skipped["page"] = "viewer/static/index.html does not exist yet"
    if skipped:
        c.log(f"!! browser parts skipped: {skipped['page']}")

    parts: dict[str, Any] = {}
    servers: list[ServerProcess] = []
    br: Browser | None = None

    def attempt(name: str, fn: Callable[[], Any]) -> None:
        """Run one measured part; a failure is logged and recorded, and the other parts still run."""
        loads[name] = os.getloadavg()[0]
        try:
            parts[name] = fn()
        except Exception as exc:
            skipped[name] = f"failed: {type(exc).__name__}: {exc}"[:500]
            c.log(f"!! {name} failed: {skipped[name]}")

    with c.IsolatedDaemon(keep=args.keep) as env:
        try:
            env.start()
            writes = write_runs(env.base_dir, 1_000 if args.quick else 3_000)
            env.stop()  # every run closed (no -wal): the copies are clean finished runs
            many = os.path.join(env.dir, "many")
            copy_s = copy_runs(writes["small_path"], many, N_MANY)
            c.log(f"copied a small run {N_MANY:,} times in {copy_s:.1f} s")

            loads["server"] = os.getloadavg()[0]
            srv = server_part(env.base_dir, writes["spike_path"], writes["spikes"], args.repeats)
            loads["runs_list"] = os.getloadavg()[0]
            rl = runs_list_part(many, 1 if args.quick else 3, 5)
            rl["copy_s"] = copy_s
            servers.append(rl.pop("server"))
            if "page" not in skipped:
                try:
                    br = Browser(exe)  # type: ignore[arg-type]
                    c.log(f"Chromium {br.version} (headless, Playwright)")
                except Exception as exc:
                    skipped["page"] = f"Chromium did not start: {exc}"[:500]
                    c.log(f"!! {skipped['page']}")
            if br is not None:
                attempt("runs_page", lambda: runs_page_part(br, servers[0].origin, 1 if args.quick else 2))
            servers.pop().stop()

            app = kobo_open(env.base_dir)
            servers.append(app)
            attempt("keepalive", lambda: keepalive_part(app.origin, args.repeats))
            if br is not None:
                base = ServerProcess(
                    [sys.executable, os.path.abspath(__file__), "--serve-baseline", writes["spike_path"]],
                    "baseline server",
                )
                servers.append(base)
                c.log(f"kobo open at {app.origin}, baseline at {base.origin}")
                attempt("page", lambda: page_part(br, app.origin, base.origin, args.repeats))
                base.stop()
                servers.remove(base)
                if parts.get("page", {}).get("page_width_param"):
                    srv["page_width"] = parts["page"]["page_width_param"]
                    srv["spikes_m4_page"] = spikes_at_width(writes["spike_path"], writes["spikes"], srv["page_width"])
                    c.log(f"spikes kept at the page's width {srv['page_width']}: {srv['spikes_m4_page']}/{N_SPIKES}")
                attempt("zoom", lambda: zoom_part(br, app.origin, 2 if args.quick else 3))
                attempt("wide", lambda: wide_part(br, app.origin, args.repeats))
                attempt("live", lambda: live_part(br, app.origin, env.base_dir, 10 if args.quick else 15))
        finally:
            if br is not None:
                try:
                    br.close()
                except Exception as exc:
                    c.log(f"closing the browser: {exc}")
            for server in servers:
                server.stop()

    recs = build_records(srv, parts, rl, skipped, writes)
    text = print_report(recs)
    result = {
        "generated_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python", *sys.argv]),
        "repeats": args.repeats,
        "quick": args.quick,
        "chromium": br.version if br is not None else None,
        "skipped": skipped,
        "machine": machine_info(),
        "loadavg_1min_before": loads,
        "loadavg_at_end": os.getloadavg(),
        "total_s": round(time.time() - started, 1),
        "table_markdown": text,
        "metrics": recs,
    }
    c.write_results(args.json, result, args.out, recs)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--serve-baseline":
        serve_baseline(sys.argv[2])
    else:
        main()
