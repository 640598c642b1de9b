"""Acknowledged delivery: what acknowledgements and replay cost ``log()`` and throughput, against the commit before them.

Two interpreters are compared in the same run:

* ``current``: this interpreter, with this checkout installed (editable).
* ``pre-ack``: a separate venv at ``/tmp/kobo-baseline-venv`` with a plain (non-editable)
  install of commit ``e944063`` (the parent of "Acknowledged delivery with replay", where the
  client forgets a message once it is sent).  It is built on first use from ``git archive``
  of that commit, with the same versions of pyzmq, msgpack, numpy, kohakuvault, pillow and
  click as this interpreter; its ``kobo-baseline.json`` records the commit, and a venv made
  for another commit or Python is rebuilt.  No ``--system-site-packages``: the editable
  install's import hook would shadow the baseline.

Each measurement runs in a worker process of the interpreter under test
(``bench_ack.py --worker CASE``), against a daemon started by the same interpreter
(``python -m kohakuboard.daemon run``, readiness from its ``READY=1`` on a
``NOTIFY_SOCKET``, stopped with SIGTERM), with its own endpoint ``ipc:///tmp/kb-ack-XXXX/kobo``
and base dir, and ``KOBO_DAEMON_AUTOSTART=0``.  Every repeat runs every case once per
interpreter, the order alternating between repeats (current first in even repeats).
Children get a shared temporary ``PYTHONPYCACHEPREFIX`` (warmed up before the first repeat),
so neither side compiles its sources at start-up and nothing is written into the source tree.

Cases:

a. ``latency``: ``log()`` of 4 scalars, p50/p99 over ``N`` calls each timed with
   ``perf_counter_ns`` (after a warm-up and a flush; the code of ``bench_log_latency.py``).
b. ``throughput``: 1 client, 32 scalars per call, back-to-back; values/s from the first
   ``log()`` to the return of ``flush()``.  Every metric is read back: count exact,
   ``m00`` equal to the logged sequence.
c. ``replay``: 1 client logs 32 scalars per call, paced (a sleep every 1000 calls) to
   ``RATE`` calls/s for ``SECONDS``.  After 40 % of the calls the worker tells the bench,
   which kills the daemon with SIGKILL and at once starts a new one.  At the end the worker
   flushes (if that raises, as it may before acknowledgements, it flushes once more) and
   reads all 32 columns back: a call is stored when its step is in every column; calls lost =
   calls logged - calls stored (of which "partly stored": in some columns only); a step
   stored twice in a column is a duplicate.  Reported: values/s to durable (first ``log()``
   .. ``flush()`` return), ``log()`` p50/p99 over the run, calls lost, and (current only) the
   time from the new daemon's start until every call logged before it was ready is
   acknowledged (``stats()["acknowledged"]``, sampled every 2 ms from the kill on; a sampler
   thread runs in both versions), and from its READY to the first acknowledgement.

Writes ``bench/results/ack.json`` (and, with ``--out``, the metric records as a JSON list,
like the other ``bench_*.py`` scripts).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any

import _common as c

BASELINE_COMMIT = "e944063716af26f4483c7213475fdf6cba94b00c"  # parent of d1db613 "Acknowledged delivery with replay"
BASELINE_VENV = "/tmp/kobo-baseline-venv"
REPO = os.path.dirname(c.BENCH_DIR)
SCRIPT = os.path.abspath(__file__)
DEPS = ("pyzmq", "msgpack", "numpy", "kohakuvault", "pillow", "click")
N_METRICS = 32
CASES = ("latency", "throughput", "replay")


# ------------------------------------------------------------ interpreters


def ensure_baseline_venv(commit: str = BASELINE_COMMIT, venv: str = BASELINE_VENV, rebuild: bool = False) -> str:
    """Python of a venv holding a plain install of ``commit``; built unless cached for it."""
    from importlib import metadata

    python = os.path.join(venv, "bin", "python")
    marker = os.path.join(venv, "kobo-baseline.json")
    pins = {d: metadata.version(d) for d in DEPS}
    want = {"commit": commit, "python": sys.version.split()[0], "deps": pins}
    if not rebuild and os.path.exists(python):
        try:
            with open(marker) as f:
                have = json.load(f)
        except (OSError, ValueError):
            have = None
        if have == want:
            return python
    c.log(
        f"building the pre-ack venv {venv} for {commit[:10]} (deps pinned: "
        + ", ".join(f"{k}=={v}" for k, v in pins.items())
        + ")"
    )
    shutil.rmtree(venv, ignore_errors=True)
    src = tempfile.mkdtemp(prefix="kobo-baseline-src-", dir="/tmp")
    try:
        archive = subprocess.run(
            ["git", "archive", "--format=tar", commit], cwd=REPO, check=True, capture_output=True
        ).stdout
        subprocess.run(["tar", "-x", "-C", src], input=archive, check=True)
        subprocess.run([sys.executable, "-m", "venv", venv], check=True)
        cons = os.path.join(src, "kobo-bench-constraints.txt")
        with open(cons, "w") as f:
            f.write("".join(f"{k}=={v}\n" for k, v in pins.items()))
        subprocess.run([python, "-m", "pip", "install", "-q", src, "-c", cons], check=True)
    finally:
        shutil.rmtree(src, ignore_errors=True)
    with open(marker, "w") as f:
        json.dump(want, f)
    return python


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of daemons and workers: defaults for every KOBO_ setting, no launcher vars."""
    env = dict(os.environ)
    for key in list(env):
        if key.startswith("KOBO_") or key in (
            "RANK",
            "LOCAL_RANK",
            "WORLD_SIZE",
            "TORCHELASTIC_RUN_ID",
            "PYTHONPATH",
            "PYTHONHOME",
            "NOTIFY_SOCKET",
            "PYTHONDONTWRITEBYTECODE",
            "VIRTUAL_ENV",
        ):
            env.pop(key)
    env.update(extra or {})
    return env


class Workspace:
    """A fresh endpoint + base dir under /tmp, and a daemon of a given interpreter on it."""

    def __init__(self, python: str, pycache: str, keep: bool = False, prefix: str = "kb-ack-") -> None:
        self.python = python
        self.keep = keep
        self.dir = tempfile.mkdtemp(prefix=prefix, dir="/tmp")
        self.endpoint = f"ipc://{self.dir}/kobo"
        self.base_dir = os.path.join(self.dir, "runs")
        self.env = child_env(
            {
                "KOBO_DAEMON_ENDPOINT": self.endpoint,
                "KOBO_BASE_DIR": self.base_dir,
                "KOBO_DAEMON_AUTOSTART": "0",
                "PYTHONPYCACHEPREFIX": pycache,
            }
        )
        self.log_path = os.path.join(self.dir, "daemon.log")
        self._notify_path = os.path.join(self.dir, "notify")
        self._notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._notify.bind(self._notify_path)
        self._notify.setblocking(False)
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts: list[tuple[float, float]] = []  # (Popen, READY=1) per daemon start, time.monotonic()

    def __enter__(self) -> Workspace:
        return self

    def __exit__(self, *exc: Any) -> None:
        try:
            self.stop()
        finally:
            self._notify.close()
            if not self.keep:
                shutil.rmtree(self.dir, ignore_errors=True)

    def start_daemon(self, timeout: float = 30.0) -> tuple[float, float]:
        """``python -m kohakuboard.daemon run``; returns (started, ready) on ``time.monotonic()``."""
        while True:  # forget notifications of an earlier daemon
            try:
                self._notify.recv(4096)
            except BlockingIOError:
                break
        env = dict(self.env, NOTIFY_SOCKET=self._notify_path)
        with open(self.log_path, "ab") as log:
            t0 = time.monotonic()
            self.proc = subprocess.Popen(
                [self.python, "-m", "kohakuboard.daemon", "run"],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=env,
                cwd=self.dir,
                start_new_session=True,
            )
        deadline = t0 + timeout
        while True:
            ready, _, _ = select.select([self._notify], [], [], 0.02)
            if ready:
                msg = self._notify.recv(4096)
                if b"READY=1" in msg.split(b"\n"):
                    t1 = time.monotonic()
                    break
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.proc.kill()
                raise RuntimeError(f"daemon ({self.python}) did not start: {self._tail()}")
        self.starts.append((t0, t1))
        return t0, t1

    def kill_daemon(self) -> float:
        """SIGKILL, then reap it; returns the time of the kill."""
        assert self.proc is not None
        t = time.monotonic()
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        return t

    def stop(self, timeout: float = 60.0) -> int | None:
        """SIGTERM (drain, flush, exit 0), SIGKILL after ``timeout``; the exit code."""
        p, self.proc = self.proc, None
        if p is None:
            return None
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                c.log(f"!! daemon {p.pid} ignored SIGTERM for {timeout:.0f} s; killing it")
                p.kill()
                p.wait()
        return p.returncode

    def duplicates_dropped(self) -> int | None:
        """Calls the daemon received more than once and stored once (``kobo-daemon status``), if it counts them."""
        try:
            out = subprocess.run(
                [self.python, "-m", "kohakuboard.daemon", "status", "--json"],
                env=self.env,
                cwd=self.dir,
                capture_output=True,
                text=True,
                timeout=60,
            ).stdout
            runs = json.loads(out).get("runs", [])
            counts = [r.get("duplicates") for r in runs if isinstance(r, dict)]
            return sum(x for x in counts if x is not None) if any(x is not None for x in counts) else None
        except (OSError, ValueError, AttributeError, subprocess.TimeoutExpired):
            return None

    def _tail(self, n: int = 1500) -> str:
        try:
            with open(self.log_path, "rb") as f:
                return f.read()[-n:].decode(errors="replace")
        except OSError:
            return "(no log)"

    def run_worker(
        self,
        case: str,
        params: dict[str, Any],
        on_line: Callable[[str], None] | None = None,
        timeout: float = 600.0,
        script: str = SCRIPT,
    ) -> dict[str, Any]:
        """Run ``script --worker case`` to its end; lines other than its RESULT go to ``on_line``."""
        cmd = [self.python, script, "--worker", case, "--params", json.dumps(params)]
        proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, env=self.env, cwd=self.dir, text=True
        )
        result = None
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("RESULT "):
                result = json.loads(line[7:])
            elif on_line is not None:
                on_line(line.strip())
        rc = proc.wait(timeout)
        if rc != 0 or result is None:
            raise RuntimeError(f"worker {case} ({self.python}) exited {rc}; daemon log: {self._tail()}")
        return result


def warm_up(python: str, pycache: str) -> None:
    """Compile every module both sides import into the shared pycache prefix (outside the timings)."""
    env = child_env({"PYTHONPYCACHEPREFIX": pycache})
    # Modules of either side: the pre-ack commit has no outbox or sender module (a missing one is skipped).
    modules = (
        "kohakuboard.client kohakuboard.client._outbox kohakuboard.client._sender kohakuboard.client._transport "
        "kohakuboard.daemon.server kohakuboard.daemon.cli kohakuboard.storage.reader kohakuboard.storage.writer "
        "numpy zmq msgpack"
    )
    code = (
        "import importlib\n"
        f"for name in {modules!r}.split():\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except ModuleNotFoundError as exc:\n"
        "        if exc.name != name:\n"
        "            raise\n"
    )
    subprocess.run([python, "-c", code], env=env, cwd="/", check=True)


# ---------------------------------------------------------------- workers


def _say(line: str) -> None:
    out = sys.__stdout__
    out.write(line + "\n")
    out.flush()


def w_latency(p: dict[str, Any]) -> dict[str, Any]:
    import gc

    from bench_log_latency import _pcts, _timed_log

    from kohakuboard.client import Board

    n, warmup = p["calls"], p["warmup"]
    board = Board(
        "latency", {"bench": "ack"}, project="bench", run_id="lat", base_dir=p["base_dir"], capture_output=True
    )
    _timed_log(board, warmup)
    board.flush()
    gc.collect()
    lat = _timed_log(board, n)
    t0 = time.perf_counter()
    board.flush()
    drain = time.perf_counter() - t0
    stats = board.stats()
    board.finish()
    pts = len(c.read_series(board.path, "loss"))
    assert pts == warmup + n, f"latency: {pts} points read back, {warmup + n} logged"
    res = _pcts(lat)
    res.update(flush_after_s=drain, peak_queue=stats["peak_queue"], points=pts)
    return res


def w_throughput(p: dict[str, Any]) -> dict[str, Any]:
    import numpy as np

    from kohakuboard.client import Board

    n = p["calls"]
    board = Board(
        "throughput", {"bench": "ack"}, project="bench", run_id="tp", base_dir=p["base_dir"], capture_output=True
    )
    vals = {f"m{j:02d}": j * 0.25 for j in range(N_METRICS)}
    log = board.log
    t0 = time.perf_counter()
    for i in range(n):
        vals["m00"] = float(i)
        log(**vals)
    t1 = time.perf_counter()
    board.flush()
    t2 = time.perf_counter()
    stats = board.stats()
    board.finish()
    expected = np.arange(n, dtype=np.float64)
    for j in range(N_METRICS):
        s = c.read_series(board.path, f"m{j:02d}")
        assert len(s) == n, f"throughput m{j:02d}: {len(s)} points read back, {n} logged"
        if j == 0:
            assert np.array_equal(s["value"], expected), "throughput: m00 differs from the logged sequence"
    return {
        "values": n * N_METRICS,
        "values_per_s": n * N_METRICS / (t2 - t0),
        "enqueue_values_per_s": n * N_METRICS / (t1 - t0),
        "flush_wait_s": t2 - t1,
        "peak_queue": stats["peak_queue"],
    }


def w_replay(p: dict[str, Any]) -> dict[str, Any]:
    import warnings

    import numpy as np

    from kohakuboard.client import Board

    n, rate, kill_at = p["calls"], p["rate"], p["kill_at"]
    board = Board(
        "replay", {"bench": "ack"}, project="bench", run_id="replay", base_dir=p["base_dir"], capture_output=True
    )
    has_ack = "acknowledged" in board.stats()
    vals = {f"m{j:02d}": j * 0.25 for j in range(N_METRICS)}
    samples: list[tuple[float, int, int]] = []
    stop = threading.Event()

    def sample() -> None:
        stats, mono = board.stats, time.monotonic
        key = "acknowledged" if has_ack else "sent"
        while not stop.is_set():
            s = stats()
            samples.append((mono(), s["logged"], s[key]))
            stop.wait(0.002)

    poller = threading.Thread(target=sample, daemon=True, name="ack-sampler")
    lat = [0] * n
    pc = time.perf_counter_ns
    log = board.log
    t_first = time.monotonic()
    for i in range(n):
        if i and i % 1000 == 0:
            delay = t_first + i / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        if i == kill_at:
            at_kill = board.stats()
            _say("KILL")
            poller.start()
        vals["m00"] = float(i)
        t0 = pc()
        log(**vals)
        lat[i] = pc() - t0
    t_logged = time.monotonic()
    errors: list[str] = []
    flushed = False
    for attempt in range(2):
        try:
            board.flush(timeout=p["flush_timeout"])
            flushed = True
            break
        except Exception as exc:  # before acknowledgements, a flush after a restart may fail
            errors.append(f"flush {attempt + 1}: {exc!r}")
    t_flushed = time.monotonic()
    stop.set()
    poller.join()
    stats = board.stats()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            board.finish(timeout=30)
        except Exception as exc:
            errors.append(f"finish: {exc!r}")
    errors += [f"finish warning: {w.message}" for w in caught]
    # A call counts as stored when every one of its 32 values is (its step in every column).
    m00 = c.read_series(board.path, "m00")
    assert np.array_equal(m00["step"], m00["value"].astype(np.int64)), "replay: m00 step and value disagree"
    lengths, dups = [], 0
    complete = union = None
    for j in range(N_METRICS):
        steps = c.read_series(board.path, f"m{j:02d}")["step"]
        u = np.unique(steps)
        lengths.append(int(len(steps)))
        dups = max(dups, int(len(steps) - len(u)))
        complete = u if complete is None else np.intersect1d(complete, u)
        union = u if union is None else np.union1d(union, u)
    missing = np.setdiff1d(np.arange(n), complete)
    s = sorted(lat)
    return {
        "calls": n,
        "values": n * N_METRICS,
        "has_ack": has_ack,
        "t_first": t_first,
        "t_logged": t_logged,
        "t_flushed": t_flushed,
        "values_per_s": n * N_METRICS / (t_flushed - t_first),
        "flushed": flushed,
        "errors": errors,
        "p50_us": c.percentile(s, 50) / 1000,
        "p99_us": c.percentile(s, 99) / 1000,
        "p999_us": c.percentile(s, 99.9) / 1000,
        "max_us": s[-1] / 1000,
        "complete": int(len(complete)),
        "lost": int(n - len(complete)),
        "partial": int(len(union) - len(complete)),
        "lost_entirely": int(n - len(union)),
        "duplicates": dups,
        "metric_lengths": sorted(set(lengths)),
        "unexpected_steps": int(len(np.setdiff1d(union, np.arange(n)))),
        "missing_first": int(missing[0]) if len(missing) else None,
        "missing_last": int(missing[-1]) if len(missing) else None,
        "logged_at_kill": at_kill["logged"],
        "unconfirmed_at_kill": at_kill["logged"] - at_kill["acknowledged"] if has_ack else None,
        "resent": stats.get("replayed_calls"),
        "samples": samples,
        "stats": stats,
    }


WORKERS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "latency": w_latency,
    "throughput": w_throughput,
    "replay": w_replay,
}


def worker_main(argv: list[str]) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--worker", required=True)
    p.add_argument("--params", required=True)
    a = p.parse_args(argv)
    res = WORKERS[a.worker](json.loads(a.params))
    _say("RESULT " + json.dumps(res))


# ----------------------------------------------------------------- driver


def run_case(case: str, python: str, sizes: dict[str, Any], pycache: str, keep: bool) -> dict[str, Any]:
    with Workspace(python, pycache, keep) as ws:
        ws.start_daemon()
        params = dict(sizes[case], base_dir=ws.base_dir)
        if case != "replay":
            res = ws.run_worker(case, params)
        else:
            marks: dict[str, float] = {}

            def on_line(line: str) -> None:
                if line == "KILL":
                    marks["kill"] = ws.kill_daemon()
                    marks["restart"], marks["ready"] = ws.start_daemon()

            res = ws.run_worker(case, params, on_line)
            assert "ready" in marks, "the replay worker never asked for the kill"
            res.update(marks)
            res.update(recovery(res))
            res["daemon_duplicates_dropped"] = ws.duplicates_dropped()
        res["daemon_exit"] = ws.stop()
    return res


def recovery(res: dict[str, Any]) -> dict[str, Any]:
    """Time from the new daemon's start until every call logged before it was ready is acknowledged."""
    samples = res.pop("samples")
    out: dict[str, Any] = {
        "restart_to_ready_s": res["ready"] - res["restart"],
        "kill_to_ready_s": res["ready"] - res["kill"],
    }
    before = [s for s in samples if s[0] <= res["ready"]]
    target = (before[-1] if before else samples[0])[1]
    out["target_seq"] = target
    out["restart_to_acked_s"] = out["ready_to_first_ack_s"] = None
    if res["has_ack"]:
        acked0 = before[-1][2] if before else samples[0][2]
        for t, _logged, acked in samples:
            if t > res["ready"] and acked > acked0:
                out["ready_to_first_ack_s"] = t - res["ready"]
                break
        for t, _logged, acked in samples:
            if acked >= target and t >= res["ready"]:
                out["restart_to_acked_s"] = t - res["restart"]
                break
        else:  # acknowledged only by the final flush
            out["restart_to_acked_s"] = res["t_flushed"] - res["restart"]
    return out


def fmt(v: float | None, unit: str) -> str:
    if v is None or v != v:
        return "n/a"
    if unit == "us":
        return f"{v:.2f} us" if v < 100 else f"{v:.0f} us" if v < 1000 else f"{v / 1000:.1f} ms"
    if unit == "values/s":
        return f"{v / 1e6:.2f} M/s"
    if unit == "s":
        return f"{v * 1000:.0f} ms" if v < 1 else f"{v:.2f} s"
    if unit == "calls":
        return f"{v:,.0f}"
    return f"{v:g}"


def spread(values: list[float], unit: str) -> str:
    vals = [v for v in values if v is not None]
    if not vals:
        return "n/a"
    if len(vals) == 1:
        return fmt(vals[0], unit)
    return f"{fmt(c.median(vals), unit)} [{fmt(min(vals), unit)} .. {fmt(max(vals), unit)}]"


ROWS = [
    # key, case, field, unit, label
    ("log_p50_us", "latency", "p50", "us", "log() 4 scalars: p50"),
    ("log_p99_us", "latency", "p99", "us", "log() 4 scalars: p99"),
    ("throughput", "throughput", "values_per_s", "values/s", "durable throughput, 1 client, 32 scalars/call"),
    (
        "replay_values_per_s",
        "replay",
        "values_per_s",
        "values/s",
        "replay run: values/s to durable (paced, incl. kill)",
    ),
    ("replay_p50_us", "replay", "p50_us", "us", "replay run: log() p50"),
    ("replay_p99_us", "replay", "p99_us", "us", "replay run: log() p99"),
    ("replay_lost", "replay", "lost", "calls", "replay run: calls lost after kill -9 + restart"),
    ("replay_partial", "replay", "partial", "calls", "replay run: calls stored only in some of their 32 columns"),
    ("replay_duplicates", "replay", "duplicates", "calls", "replay run: calls stored twice"),
    ("replay_resent", "replay", "resent", "calls", "replay run: calls re-sent to the new daemon"),
    (
        "replay_dup_dropped",
        "replay",
        "daemon_duplicates_dropped",
        "calls",
        "replay run: calls the new daemon received twice (stored once)",
    ),
    ("replay_restart_to_ready", "replay", "restart_to_ready_s", "s", "replay run: new daemon start -> READY"),
    ("replay_first_ack", "replay", "ready_to_first_ack_s", "s", "replay run: READY -> first acknowledgement"),
    ("replay_recovery", "replay", "restart_to_acked_s", "s", "replay run: new daemon start -> all acknowledged"),
]


def change(cur: float, base: float) -> str:
    if cur != cur or base != base or base == 0:
        return "-"
    return f"{(cur - base) / base * 100:+.0f} %"


def report(res: dict[str, dict[str, list[dict]]], sizes: dict[str, Any], repeats: int, commit: str) -> str:
    r = sizes["replay"]
    lines = [
        f"| measure | before acknowledgements ({commit[:7]}) | with acknowledgements (current) | change |",
        "|---|---|---|---|",
    ]
    for _key, case, field, unit, label in ROWS:
        cur = [x[field] for x in res["current"][case]]
        base = [x[field] for x in res["pre-ack"][case]]
        if case == "replay" and field == "lost":
            label += f" (of {r['calls']:,})"
        cur_ok = [v for v in cur if v is not None]
        base_ok = [v for v in base if v is not None]
        delta = change(c.median(cur_ok), c.median(base_ok)) if unit != "calls" and cur_ok and base_ok else "-"
        if field in ("lost", "partial", "duplicates"):

            def cell(vals: list[Any]) -> str:
                hit = sum(1 for v in vals if v)
                return (
                    f"{spread(vals, unit)}; in {hit} of {len(vals)} repeats" if vals and vals[0] == vals[0] else "n/a"
                )

            lines.append(f"| {label} | {cell(base)} | {cell(cur)} | {delta} |")
            continue
        lines.append(f"| {label} | {spread(base, unit)} | {spread(cur, unit)} | {delta} |")
    lat, tp = sizes["latency"], sizes["throughput"]
    lines.append("")
    lines.append(
        f"Medians of {repeats} repeats, [min .. max]. latency: {lat['calls']:,} timed calls after "
        f"{lat['warmup']:,} warm-up calls; throughput: {tp['calls']:,} calls x {N_METRICS} scalars; replay: "
        f"{r['calls']:,} calls x {N_METRICS} scalars paced at {r['rate']:,} calls/s, daemon killed "
        f"(SIGKILL) after {r['kill_at']:,} calls and restarted at once."
    )
    return "\n".join(lines)


def records(res: dict[str, dict[str, list[dict]]], commit: str) -> list[dict[str, Any]]:
    out = []
    for key, case, field, unit, label in ROWS:
        cur = [x[field] for x in res["current"][case] if x[field] is not None]
        base = [x[field] for x in res["pre-ack"][case] if x[field] is not None]
        bmed = c.median(base)
        btext = f"before acks ({commit[:7]}): {fmt(bmed, unit)}" if base else f"before acks ({commit[:7]}): n/a"
        target, op = (
            (0, "<=") if field in ("lost", "partial", "duplicates") else (None, ">=" if unit == "values/s" else "<=")
        )
        out.append(
            c.metric(
                f"ack_{key}",
                f"{label} (with acks)",
                unit=unit if unit != "calls" else "calls",
                target=target,
                op=op,
                values=cur,
                baseline=btext,
                baseline_values={"pre_ack_median": bmed, "pre_ack_values": base},
                extra={"per_repeat": {who: [x[field] for x in res[who][case]] for who in res}},
            )
        )
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smaller sizes, 3 repeats")
    p.add_argument("--repeats", type=int, default=None, help="repeats (default 5, --quick 3)")
    p.add_argument("--cases", default=",".join(CASES), help="comma-separated subset of: " + ", ".join(CASES))
    p.add_argument("--out", default=None, help="also write the metric records (JSON list) here")
    p.add_argument("--json", default=os.path.join(c.RESULTS_DIR, "ack.json"), help="where to write the results")
    p.add_argument("--keep", action="store_true", help="keep the temp dirs (runs, daemon logs) for inspection")
    p.add_argument("--baseline-commit", default=BASELINE_COMMIT, help="the commit before acknowledgements")
    p.add_argument("--baseline-venv", default=BASELINE_VENV, help="where to build (or reuse) its venv")
    p.add_argument("--rebuild", action="store_true", help="rebuild the baseline venv even if it matches")
    p.add_argument(
        "--wait-idle",
        type=float,
        default=0,
        metavar="SECONDS",
        help="first wait up to SECONDS for the 1-min load average to fall below 0.7",
    )
    args = p.parse_args()
    if args.repeats is None:
        args.repeats = 3 if args.quick else 5
    cases = [x.strip() for x in args.cases.split(",") if x.strip()]
    if set(cases) - set(CASES):
        p.error("unknown case(s)")
    from run_all import machine_info, wait_idle

    commit = (
        subprocess.run(
            ["git", "rev-parse", args.baseline_commit], cwd=REPO, capture_output=True, text=True
        ).stdout.strip()
        or args.baseline_commit
    )
    pythons = {"current": sys.executable, "pre-ack": ensure_baseline_venv(commit, args.baseline_venv, args.rebuild)}
    replay_rate, replay_s = 15_000, (2.0 if args.quick else 3.0)
    replay_calls = int(replay_rate * replay_s)
    sizes = {
        "latency": {"calls": 50_000 if args.quick else 200_000, "warmup": 10_000},
        "throughput": {"calls": 15_000 if args.quick else 100_000},
        "replay": {
            "calls": replay_calls,
            "rate": replay_rate,
            "kill_at": int(replay_calls * 0.4),
            "flush_timeout": 20.0,
        },
    }
    if args.wait_idle:
        wait_idle(args.wait_idle)
    started = time.time()
    load_start = c.load_average()
    pycache = tempfile.mkdtemp(prefix="kb-ack-pyc-", dir="/tmp")
    res: dict[str, dict[str, list[dict]]] = {k: {case: [] for case in CASES} for k in pythons}
    loads: list[float] = []
    try:
        for py in pythons.values():
            warm_up(py, pycache)
        for r in range(args.repeats):
            order = ["current", "pre-ack"] if r % 2 == 0 else ["pre-ack", "current"]
            for case in cases:
                for who in order:
                    loads.append(os.getloadavg()[0])
                    x = run_case(case, pythons[who], sizes, pycache, args.keep)
                    res[who][case].append(x)
                    c.log(f"ack {case} {who} repeat {r + 1}/{args.repeats}: " + summary(case, x))
    finally:
        shutil.rmtree(pycache, ignore_errors=True)

    for case in CASES:  # cases not run: empty rows
        if not res["current"][case]:
            for who in res:
                res[who][case] = [
                    {
                        k: float("nan")
                        for k in (
                            "p50",
                            "p99",
                            "values_per_s",
                            "p50_us",
                            "p99_us",
                            "lost",
                            "partial",
                            "duplicates",
                            "resent",
                            "daemon_duplicates_dropped",
                            "restart_to_ready_s",
                            "ready_to_first_ack_s",
                            "restart_to_acked_s",
                        )
                    }
                ]
    text = report(res, sizes, args.repeats, commit)
    print()
    print(text)
    print()
    recs = records(res, commit)
    lost_now = [x["lost"] for x in res["current"]["replay"] if x.get("lost") == x.get("lost")]
    if any(lost_now) or any(x.get("duplicates") for x in res["current"]["replay"]):
        c.log("!! the current version lost or duplicated calls across the daemon restart: see ack.json")
    result = {
        "generated_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python", *sys.argv]),
        "repeats": args.repeats,
        "sizes": sizes,
        "pythons": pythons,
        "baseline_commit": commit,
        "machine": machine_info(),
        "loadavg_at_start": load_start,
        "loadavg_before_each_case": loads,
        "loadavg_at_end": os.getloadavg(),
        "total_s": round(time.time() - started, 1),
        "table_markdown": text,
        "results": res,
        "metrics": recs,
    }
    c.write_results(args.json, result, args.out, recs)


def summary(case: str, x: dict[str, Any]) -> str:
    if case == "latency":
        return f"p50 {x['p50']:.2f} us, p99 {x['p99']:.2f} us, p99.9 {x['p999']:.1f} us"
    if case == "throughput":
        return f"{x['values_per_s'] / 1e6:.2f} M values/s durable (enqueue {x['enqueue_values_per_s'] / 1e6:.2f} M/s)"
    rec = x.get("restart_to_acked_s")
    return (
        f"{x['values_per_s'] / 1e6:.2f} M values/s to durable, log() p99 {x['p99_us']:.1f} us, "
        f"lost {x['lost']:,} of {x['calls']:,} calls ({x['partial']:,} of them partly stored), "
        f"duplicates {x['duplicates']}, "
        f"start->ready {x['restart_to_ready_s'] * 1000:.0f} ms, "
        f"start->all acked {'n/a' if rec is None else f'{rec * 1000:.0f} ms'}"
        + (
            f" (first ack {x['ready_to_first_ack_s'] * 1000:.0f} ms after ready)"
            if x.get("ready_to_first_ack_s") is not None
            else ""
        )
        + (f", re-sent {x['resent']:,}" if x.get("resent") is not None else "")
        + (f"; column lengths {x['metric_lengths']}" if len(x["metric_lengths"]) != 1 else "")
        + (f"; errors: {x['errors']}" if x["errors"] else "")
    )


if __name__ == "__main__":
    if "--worker" in sys.argv:
        worker_main(sys.argv[1:])
    else:
        main()
