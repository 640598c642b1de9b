"""Rich values: ``log()`` latency and daemon throughput for histograms, images and mixed calls.

    python bench/bench_rich.py                    # full: 5 repeats of every case (~3 minutes)
    python bench/bench_rich.py --quick            # ~30 s: fewer calls, 3 repeats
    python bench/bench_rich.py --cases hist1m,mixed --repeats 3
    python bench/bench_rich.py --py-spy img_distinct         # also profile the daemon during one repeat
    python bench/bench_rich.py --py-spy hist1m:client        # ... or the training process

Cases (one ``log()`` call each):

* ``hist1m``: ``Histogram(values)`` of 1,000,000 raw float32 values (binned by the daemon).
* ``img_distinct``: ``Media(img)``, a 256x256x3 uint8 image of uniform noise, a different
  image every call (the call index is written into its first 8 bytes before the call, so
  content-addressed dedup cannot cheat; noise is the worst case for the PNG encoder).
* ``img_same``: the same call with one identical image every time (dedup case: one blob,
  one media row per call).
* ``hist50``: 50 ``Histogram``s of 10,000 float32 values each in ONE call (the guide's
  "no step inflation" case: 50 histograms = 1 step).
* ``mixed``: 4 scalars + a 64x64x3 image (distinct) + an 8-row ``Table`` of strings and
  numbers + a 10,000-value ``Histogram``.
* ``tensor_kde``: a 64x64x16 float32 ``TensorLog`` (256 KiB, distinct every call) and a
  ``KernelDensity`` of 10,000 values on 4,096 points (64 KiB stored) in one call.

Disk (``hist50``, ``tensor_kde``): the run folder's size (``du``) over the bytes its values hold
as read back, measured after the repeat's last flush while the daemon still holds the run open,
and again after the daemon stopped; target <= 1.3x (issue 9).

Each repeat uses a fresh Board (``capture_output=False``) on one isolated daemon
(endpoint ``ipc:///tmp/kobo-rb-XXXX/kobo``, started before the timings and stopped with
``python -m kohakuboard.daemon stop`` at the end).  After 2 warm-up calls and a flush:

1. back to back: N calls, each timed with ``perf_counter_ns`` around the call alone
   (constructing the ``Histogram``/``Media``/``Table`` object included, preparing the
   input not), then ``flush()``.  N is a few seconds of the daemon's work, so the
   loop runs far ahead of the daemon and its p99 includes any back-pressure blocking;
2. paced: the same call started every ``2 / throughput`` seconds of step 1 (half what
   the daemon sustains; the loop sleeps in between, as a training step would) for
   1.5 s, then ``flush()``: the cost of ``log()`` when the daemon keeps up.

Reported per repeat:

* ``log()`` p50/p99 of both phases;
* daemon throughput: N calls (and N x payload bytes: the arrays' bytes) divided by the time
  from the first timed ``log()`` of step 1 to its ``flush()`` returning;
* peak RSS (VmHWM, reset through ``/proc/PID/clear_refs`` before the calls) of the daemon
  and of the training process during step 1, the RSS left after its flush, and how many
  calls the daemon held received but unwritten at once (``kobo-daemon status``);
* in the JSON also: the loop thread's minor page faults per call, its involuntary context
  switches and CPU/wall ratio (getrusage), and the VM's steal time during step 1.

At the end (full mode) the benchmark waits until the daemon has closed every run (it does
30 s after a run's last client left) and records the daemon's RSS then.

After a repeat's last flush, everything is read back through ``RunReader`` and counted exactly
(histograms and their value totals, media rows and distinct blobs, table rows, scalar
points, one step per call); a repeat that lost anything fails the benchmark.

Baselines, timed the same way in the same process right after each repeat:
``np.ascontiguousarray(values).copy()`` and ``np.histogram`` (hist1m); the image copy and
PIL PNG encoding at the daemon's level 1 and at PIL's default level 6 (images); 50 copies
(and 50 ``np.histogram``) of the 10,000-value arrays (hist50); a 4-scalar ``log()`` on a
separate Board (mixed).  Each copy is timed twice: freed at once (it then reuses the same
mapped memory) and kept alive until the loop ends (up to 64 MB), as ``log()``'s copies are
while they wait to be sent, so that each lands in fresh pages and pays their first-touch faults.

Writes ``bench/results/rich.json`` (and, with ``--out``, the metric records as a JSON list,
like the other ``bench_*.py`` scripts).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import io
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import _common as c
import numpy as np

WARMUP = 2
PACED_LOAD_INVERSE = 2.0  # paced calls come every 2 / (burst calls/s): half the daemon's throughput
PACED_SECONDS_FULL, PACED_SECONDS_QUICK = 1.5, 0.5
PACED_MIN_CALLS, PACED_MAX_CALLS = 20, 400

# Calls per repeat, chosen so that one repeat of each case takes 2-4 s on the project's
# 2-core machine (the daemon, not the loop, sets the pace).
CALLS_FULL = {"hist1m": 150, "img_distinct": 200, "img_same": 220, "hist50": 160, "mixed": 1000, "tensor_kde": 200}
CALLS_QUICK = {"hist1m": 40, "img_distinct": 60, "img_same": 70, "hist50": 50, "mixed": 300, "tensor_kde": 60}
# Size on disk of a run over the bytes its values hold, both while the daemon holds the run
# open and after the daemon stopped (issue 9): the histogram and tensor stores.
DISK_RATIO_TARGET = 1.3
DISK_CASES = ("hist50", "tensor_kde")
CASES = list(CALLS_FULL)

TITLES = {
    "hist1m": "(a) Histogram, 1M float32 raw",
    "img_distinct": "(b) Media 256x256x3 uint8, distinct",
    "img_same": "(b') Media 256x256x3 uint8, identical",
    "hist50": "(c) 50 x Histogram(10k float32), one call",
    "mixed": "(d) 4 scalars + 64x64 image + 8-row Table + Histogram(10k)",
    "tensor_kde": "(e) TensorLog 64x64x16 float32 + KernelDensity(10k values, 4096 points)",
}


# ---------------------------------------------------------------- daemon


class RichDaemon(c.IsolatedDaemon):
    """``IsolatedDaemon`` in ``/tmp/kobo-rb-XXXX``, stopped with ``python -m kohakuboard.daemon stop``."""

    def __init__(self, keep: bool = False) -> None:
        super().__init__(keep=keep)
        shutil.rmtree(self.dir, ignore_errors=True)
        self.dir = tempfile.mkdtemp(prefix="kobo-rb-", dir="/tmp")
        self.endpoint = f"ipc://{self.dir}/kobo"
        self.base = os.path.join(self.dir, "kobo")
        self.base_dir = os.path.join(self.dir, "runs")

    def stop(self, timeout: float = 60.0) -> None:
        if self.alive():
            env = dict(os.environ, KOBO_DAEMON_ENDPOINT=self.endpoint)
            try:
                subprocess.run(
                    [sys.executable, "-m", "kohakuboard.daemon", "stop"],
                    env=env,
                    capture_output=True,
                    timeout=timeout + 5,
                )
            except subprocess.TimeoutExpired:
                pass
        super().stop(timeout)  # SIGTERM/SIGKILL fallback if it is still alive


# ---------------------------------------------------------------- memory


def reset_hwm(pid: int) -> bool:
    """Reset VmHWM (peak RSS) of ``pid`` (Linux ``clear_refs`` 5)."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def steal_jiffies() -> int:
    """Host steal time of this VM so far (``/proc/stat``, in USER_HZ ticks), 0 if unknown."""
    try:
        with open("/proc/stat") as f:
            parts = f.readline().split()
        return int(parts[8]) if len(parts) > 8 and parts[0] == "cpu" else 0
    except (OSError, ValueError):
        return 0


def thread_usage() -> tuple[int, int, float]:
    """(minor page faults, involuntary context switches, CPU seconds) of the calling thread."""
    import resource

    ru = resource.getrusage(getattr(resource, "RUSAGE_THREAD", resource.RUSAGE_SELF))
    return ru.ru_minflt, ru.ru_nivcsw, ru.ru_utime + ru.ru_stime


def daemon_status(endpoint: str) -> dict[str, Any]:
    """The daemon's status map (what ``kobo-daemon status --json`` prints)."""
    from kohakuboard.protocol import messages as m
    from kohakuboard.protocol.control import ControlClient
    from kohakuboard.protocol.endpoint import resolve

    conn = ControlClient(resolve(endpoint, os.environ))
    try:
        return conn.request(m.StatusRequest, m.Envelope(), 10.0).info
    finally:
        conn.close()


def mem_mb(pid: int) -> dict[str, float]:
    st = c.proc_status_all(pid)
    return {"rss": st.get("VmRSS", 0) / 1024, "hwm": st.get("VmHWM", 0) / 1024}


# ---------------------------------------------------------------- timing


def timed(n: int, prep: Callable[[int], Any] | None, call: Callable[[int], Any]) -> list[int]:
    """Nanoseconds of ``call(i)`` for i in range(n); ``prep(i)`` runs before, untimed."""
    out = [0] * n
    pc = time.perf_counter_ns
    for i in range(n):
        if prep is not None:
            prep(i)
        t0 = pc()
        call(i)
        out[i] = pc() - t0
    return out


KEPT_BYTES = 64 << 20


def timed_kept(n: int, call: Callable[[int], Any], nbytes: int) -> list[int]:
    """Like :func:`timed`, but every result stays alive until the end, as queued copies do.

    A copy that is freed at once reuses the same, already mapped memory; the copies
    ``log()`` makes wait in the queue, so each lands in fresh pages and pays their
    first-touch page faults.  This is that copy.  At most ``KEPT_BYTES`` are kept
    (``nbytes`` per call), so the baseline does not inflate the next repeat's RSS.
    """
    n = max(4, min(n, KEPT_BYTES // max(nbytes, 1)))
    keep: list[Any] = []
    out = [0] * n
    pc = time.perf_counter_ns
    for i in range(n):
        t0 = pc()
        keep.append(call(i))
        out[i] = pc() - t0
    del keep
    return out


def pcts_ms(ns: list[int]) -> dict[str, float]:
    s = sorted(ns)
    return {
        "p50": c.percentile(s, 50) / 1e6,
        "p90": c.percentile(s, 90) / 1e6,
        "p99": c.percentile(s, 99) / 1e6,
        "max": s[-1] / 1e6,
        "mean": sum(s) / len(s) / 1e6,
        "n": len(s),
    }


# ---------------------------------------------------------------- cases


class Case:
    """One kind of log() call: its inputs, the call, its verification and its baselines."""

    key = ""
    payload_bytes = 0

    def __init__(self, rng: np.random.Generator) -> None:
        self.rng = rng

    def prep(self, i: int) -> None:  # untimed, before call i (negative i: warm-up)
        pass

    def call(self, board: Any, i: int) -> None:
        raise NotImplementedError

    def verify(self, path: str, calls: int) -> dict[str, Any]:
        raise NotImplementedError

    def baselines(self, n: int) -> dict[str, dict[str, float]]:
        return {}

    def baseline_text(self, b: dict[str, float]) -> str:
        return ""


def _stamp(img: np.ndarray, i: int) -> None:
    """Make ``img`` unique to call ``i`` (writes i into its first 8 bytes, in place)."""
    img.reshape(-1)[:8].view(np.int64)[0] = i


def _check_steps(steps: list[int], calls: int, what: str) -> None:
    if steps != list(range(calls)):
        raise AssertionError(
            f"{what}: steps are not 0..{calls - 1} one per call "
            f"(got {len(steps)} steps, first {steps[:5]}, last {steps[-5:]})"
        )


class Hist1M(Case):
    key = "hist1m"
    size = 1_000_000
    payload_bytes = size * 4

    def __init__(self, rng: np.random.Generator) -> None:
        super().__init__(rng)
        from kohakuboard.client import Histogram

        self.Histogram = Histogram
        self.pool = [rng.standard_normal(self.size, dtype=np.float32) for _ in range(4)]

    def call(self, board: Any, i: int) -> None:
        board.log(weights=self.Histogram(self.pool[i % 4]))

    def verify(self, path: str, calls: int) -> dict[str, Any]:
        from kohakuboard.storage.reader import RunReader

        with RunReader(path) as r:
            hs = r.histograms("weights")
        assert len(hs) == calls, f"hist1m: {len(hs)} histograms read back, {calls} logged"
        bad = [h["step"] for h in hs if h["total"] != self.size or int(h["counts"].sum()) != self.size]
        assert not bad, f"hist1m: histograms at steps {bad[:5]} do not count {self.size} values"
        _check_steps([int(h["step"]) for h in hs], calls, "hist1m")
        return {"histograms": len(hs), "values_per_histogram": self.size}

    def baselines(self, n: int) -> dict[str, dict[str, float]]:
        pool = self.pool
        copy = timed(n, None, lambda i: np.ascontiguousarray(pool[i % 4]).copy())
        fresh = timed_kept(n, lambda i: np.ascontiguousarray(pool[i % 4]).copy(), self.payload_bytes)
        hist = timed(max(5, n // 4), None, lambda i: np.histogram(pool[i % 4], bins=64))
        return {"copy": pcts_ms(copy), "copy_kept": pcts_ms(fresh), "np_histogram": pcts_ms(hist)}

    def baseline_text(self, b: dict[str, float]) -> str:
        return (
            f"copy {_ms(b['copy'])} (into fresh pages, kept as the queue keeps them: {_ms(b['copy_kept'])}); "
            f"np.histogram {_ms(b['np_histogram'])}"
        )


class Image256(Case):
    shape = (256, 256, 3)
    payload_bytes = 256 * 256 * 3

    def __init__(self, rng: np.random.Generator, distinct: bool) -> None:
        super().__init__(rng)
        from kohakuboard.client import Media

        self.Media = Media
        self.distinct = distinct
        self.key = "img_distinct" if distinct else "img_same"
        self.pool = [rng.integers(0, 256, self.shape, dtype=np.uint8) for _ in range(16 if distinct else 1)]

    def _img(self, i: int) -> np.ndarray:
        return self.pool[i % len(self.pool)]

    def prep(self, i: int) -> None:
        if self.distinct:
            _stamp(self._img(i), i)

    def call(self, board: Any, i: int) -> None:
        board.log(sample=self.Media(self._img(i)))

    def verify(self, path: str, calls: int) -> dict[str, Any]:
        from kohakuboard.storage import format as fmt
        from kohakuboard.storage.reader import RunReader

        with RunReader(path) as r:
            rows = r.media("sample")
        assert len(rows) == calls, f"{self.key}: {len(rows)} media rows read back, {calls} logged"
        hashes = {row["hash"] for row in rows}
        want = calls if self.distinct else 1
        assert len(hashes) == want, f"{self.key}: {len(hashes)} distinct images stored, expected {want}"
        files = [f for f in os.listdir(os.path.join(path, fmt.MEDIA_DIR)) if not f.startswith(".")]
        assert len(files) == want, f"{self.key}: {len(files)} files in media/, expected {want}"
        missing = [row["path"] for row in rows if not os.path.isfile(row["path"])]
        assert not missing, f"{self.key}: media files missing: {missing[:3]}"
        bad = [row["step"] for row in rows if (row["width"], row["height"]) != (self.shape[1], self.shape[0])]
        assert not bad, f"{self.key}: wrong image size at steps {bad[:5]}"
        _check_steps([int(row["step"]) for row in rows], calls, self.key)
        return {
            "media_rows": len(rows),
            "distinct_blobs": len(hashes),
            "blob_bytes": sum(os.path.getsize(os.path.join(path, fmt.MEDIA_DIR, f)) for f in files),
        }

    def baselines(self, n: int) -> dict[str, dict[str, float]]:
        from PIL import Image

        pool = self.pool

        def png(i: int, level: int) -> bytes:
            buf = io.BytesIO()
            Image.fromarray(pool[i % len(pool)]).save(buf, format="PNG", compress_level=level)
            return buf.getvalue()

        m = max(5, n // 4)
        return {
            "copy": pcts_ms(timed(n, None, lambda i: pool[i % len(pool)].copy())),
            "copy_kept": pcts_ms(timed_kept(n, lambda i: pool[i % len(pool)].copy(), self.payload_bytes)),
            "png_level1": pcts_ms(timed(m, None, lambda i: png(i, 1))),
            "png_level6": pcts_ms(timed(m, None, lambda i: png(i, 6))),
        }

    def baseline_text(self, b: dict[str, float]) -> str:
        return (
            f"copy {_ms(b['copy'])} (fresh pages, kept: {_ms(b['copy_kept'])}); PIL PNG {_ms(b['png_level1'])} "
            f"(level 1, as the daemon), {_ms(b['png_level6'])} (default level 6)"
        )


class Hist50(Case):
    key = "hist50"
    count = 50
    size = 10_000
    payload_bytes = count * size * 4

    def __init__(self, rng: np.random.Generator) -> None:
        super().__init__(rng)
        from kohakuboard.client import Histogram

        self.Histogram = Histogram
        self.names = [f"grad/layer{j:02d}" for j in range(self.count)]
        self.pool = [rng.standard_normal(self.size, dtype=np.float32) * (j + 1) for j in range(self.count)]

    def call(self, board: Any, i: int) -> None:
        H = self.Histogram
        board.log(**{name: H(v) for name, v in zip(self.names, self.pool)})

    def verify(self, path: str, calls: int) -> dict[str, Any]:
        from kohakuboard.storage.reader import RunReader

        n_hist = 0
        with RunReader(path) as r:
            for name in self.names:
                hs = r.histograms(name)
                assert len(hs) == calls, f"hist50: {name}: {len(hs)} histograms read back, {calls} logged"
                bad = [h["step"] for h in hs if h["total"] != self.size or int(h["counts"].sum()) != self.size]
                assert not bad, f"hist50: {name} at steps {bad[:5]} does not count {self.size} values"
                _check_steps([int(h["step"]) for h in hs], calls, f"hist50 {name}")
                n_hist += len(hs)
            steps = r.steps()
        # No step inflation: the run has one step per call, not one per histogram.
        assert len(steps) == calls and int(steps["step"].max()) == calls - 1, (
            f"hist50: run has {len(steps)} steps for {calls} calls (step inflation?)"
        )
        # stored: each histogram's record (format: header, 65 edges, 64 int32 counts)
        import struct

        from kohakuboard.storage import format as fmt

        record = struct.calcsize(fmt.HISTOGRAM_HEADER) + 65 * 8 + 64 * 4
        return {"histograms": n_hist, "steps": int(len(steps)), "stored_bytes": n_hist * record}

    def baselines(self, n: int) -> dict[str, dict[str, float]]:
        pool = self.pool
        copy = timed(n, None, lambda i: [np.ascontiguousarray(v).copy() for v in pool])
        fresh = timed_kept(n, lambda i: [np.ascontiguousarray(v).copy() for v in pool], self.payload_bytes)
        hist = timed(max(5, n // 4), None, lambda i: [np.histogram(v, bins=64) for v in pool])
        return {"copy50": pcts_ms(copy), "copy50_kept": pcts_ms(fresh), "np_histogram50": pcts_ms(hist)}

    def baseline_text(self, b: dict[str, float]) -> str:
        return (
            f"50 copies {_ms(b['copy50'])} (fresh pages, kept: {_ms(b['copy50_kept'])}); "
            f"50 np.histogram {_ms(b['np_histogram50'])}"
        )


class TensorKde(Case):
    """A 256 KiB TensorLog and a 4096-point KDE (64 KiB stored) in one call: the tensor store."""

    key = "tensor_kde"
    shape = (64, 64, 16)
    kde_values = 10_000
    grid = 4096
    payload_bytes = 64 * 64 * 16 * 4 + kde_values * 4

    def __init__(self, rng: np.random.Generator) -> None:
        super().__init__(rng)
        from kohakuboard.client import KernelDensity, TensorLog

        self.TensorLog, self.KernelDensity = TensorLog, KernelDensity
        self.t = rng.standard_normal(self.shape, dtype=np.float32)
        self.v = rng.standard_normal(self.kde_values, dtype=np.float32)

    def prep(self, i: int) -> None:
        _stamp(self.t, i)

    def call(self, board: Any, i: int) -> None:
        board.log(act=self.TensorLog(self.t), logits=self.KernelDensity(values=self.v, grid_size=self.grid))

    def verify(self, path: str, calls: int) -> dict[str, Any]:
        from kohakuboard.storage.reader import RunReader

        with RunReader(path) as r:
            ts, ks = r.tensors("act"), r.kde("logits")
        assert len(ts) == calls and len(ks) == calls, f"tensor_kde: {len(ts)} tensors, {len(ks)} KDEs for {calls}"
        bad = [
            t["step"]
            for t in ts
            if t["array"].shape != self.shape
            or int(t["array"].reshape(-1)[:2].view(np.int64)[0])
            != (t["step"] - WARMUP if t["step"] >= WARMUP else -(t["step"] + 1))
        ]  # warm-up calls: -1, -2
        assert not bad, f"tensor_kde: wrong tensors at steps {bad[:5]}"
        _check_steps([int(t["step"]) for t in ts], calls, "tensor_kde")
        stored = sum(t["array"].nbytes for t in ts) + sum(k["grid"].nbytes + k["density"].nbytes for k in ks)
        return {"tensors": len(ts), "kdes": len(ks), "stored_bytes": stored}

    def baselines(self, n: int) -> dict[str, dict[str, float]]:
        t = self.t
        return {"copy": pcts_ms(timed(n, None, lambda i: t.copy()))}

    def baseline_text(self, b: dict[str, float]) -> str:
        return f"tensor copy {_ms(b['copy'])}"


class Mixed(Case):
    key = "mixed"
    img_shape = (64, 64, 3)
    hist_size = 10_000
    table_rows = 8
    payload_bytes = 64 * 64 * 3 + hist_size * 4 + 4 * 8

    def __init__(self, rng: np.random.Generator) -> None:
        super().__init__(rng)
        from kohakuboard.client import Histogram, Media, Table

        self.Histogram, self.Media, self.Table = Histogram, Media, Table
        self.imgs = [rng.integers(0, 256, self.img_shape, dtype=np.uint8) for _ in range(16)]
        self.hists = [rng.standard_normal(self.hist_size, dtype=np.float32) for _ in range(4)]
        labels = ["cat", "dog", "bird", "fish", "horse", "ship", "truck", "plane"]
        self.rows = [
            [
                {"id": k, "label": labels[k], "pred": labels[(k + j) % 8], "score": 0.5 + k / 20, "correct": j == 0}
                for k in range(self.table_rows)
            ]
            for j in range(4)
        ]
        self.scalar_board: Any = None

    def prep(self, i: int) -> None:
        _stamp(self.imgs[i % 16], i)

    def call(self, board: Any, i: int) -> None:
        x = i * 0.5
        board.log(
            loss=x,
            lr=0.001,
            acc=x,
            grad_norm=1.5,
            sample=self.Media(self.imgs[i % 16]),
            preds=self.Table(self.rows[i % 4]),
            acts=self.Histogram(self.hists[i % 4]),
        )

    def verify(self, path: str, calls: int) -> dict[str, Any]:
        from kohakuboard.storage.reader import RunReader

        with RunReader(path) as r:
            series = {k: r.series(k) for k in ("loss", "lr", "acc", "grad_norm")}
            media = r.media("sample")
            tables = r.tables("preds")
            hs = r.histograms("acts")
        for k, s in series.items():
            assert len(s) == calls, f"mixed: {k}: {len(s)} points read back, {calls} logged"
        assert len(media) == calls, f"mixed: {len(media)} media rows, {calls} logged"
        assert len({m["hash"] for m in media}) == calls, "mixed: images were not all distinct"
        assert len(tables) == calls, f"mixed: {len(tables)} tables, {calls} logged"
        bad = [t["step"] for t in tables if len(t["rows"]) != self.table_rows or len(t["columns"]) != 5]
        assert not bad, f"mixed: tables at steps {bad[:5]} are not {self.table_rows} rows x 5 columns"
        assert len(hs) == calls and all(h["total"] == self.hist_size for h in hs), (
            f"mixed: {len(hs)} histograms, {calls} logged (or a wrong total)"
        )
        for what, steps in (
            ("loss", [int(p) for p in series["loss"]["step"]]),
            ("media", [int(m["step"]) for m in media]),
            ("table", [int(t["step"]) for t in tables]),
            ("histogram", [int(h["step"]) for h in hs]),
        ):
            _check_steps(steps, calls, f"mixed {what}")
        return {
            "scalar_points": sum(len(s) for s in series.values()),
            "media_rows": len(media),
            "tables": len(tables),
            "table_rows": sum(len(t["rows"]) for t in tables),
            "histograms": len(hs),
        }

    def baselines(self, n: int) -> dict[str, dict[str, float]]:
        # A 4-scalar log() on its own Board (so the mixed run's counts stay exact).
        board = self.scalar_board
        m = 20_000
        timed(2_000, None, lambda i: board.log(loss=i * 0.5, lr=0.001, acc=i * 0.5, grad_norm=1.5))
        board.flush()
        gc.collect()
        lat = timed(m, None, lambda i: board.log(loss=i * 0.5, lr=0.001, acc=i * 0.5, grad_norm=1.5))
        board.flush()
        self.scalar_points = 2_000 + m
        return {"log_4_scalars": pcts_ms(lat)}

    def baseline_text(self, b: dict[str, float]) -> str:
        return f"log() of 4 scalars {b['log_4_scalars'] * 1000:.1f} us"


# ---------------------------------------------------------------- runner


def paced(board: Any, case: Case, first: int, interval: float, seconds: float) -> list[int]:
    """Calls ``first, first+1, ...`` started every ``interval`` s for ``seconds``; ns of each call.

    The loop sleeps between calls (as a training step that releases the GIL would), so the
    daemon is idle at each call when ``interval`` is well above its time per call.
    """
    m = max(PACED_MIN_CALLS, min(PACED_MAX_CALLS, int(seconds / interval)))
    out = [0] * m
    pc, pcn = time.perf_counter, time.perf_counter_ns
    call, prep = case.call, case.prep
    due = pc()
    for j in range(m):
        i = first + j
        prep(i)
        t0 = pcn()
        call(board, i)
        out[j] = pcn() - t0
        due += interval
        delay = due - pc()
        if delay > 0:
            time.sleep(delay)
    return out


def run_repeat(
    case: Case, env: RichDaemon, daemon_pid: int, n: int, r: int, spy: str | None, paced_seconds: float
) -> dict[str, Any]:
    from kohakuboard.client import Board

    board = Board(
        case.key,
        {"bench": "rich", "case": case.key},
        project="bench-rich",
        run_id=f"{case.key}-r{r}",
        base_dir=env.base_dir,
        capture_output=False,
    )
    try:
        for w in range(WARMUP):
            i = -(w + 1)
            case.prep(i)
            case.call(board, i)
        board.flush()
        gc.collect()
        me = os.getpid()
        mem_before = {"daemon": mem_mb(daemon_pid), "client": mem_mb(me)}
        hwm_ok = reset_hwm(daemon_pid) and reset_hwm(me)
        spy_proc = start_spy(spy, case.key, daemon_pid)
        call = case.call
        pc = time.perf_counter
        steal0 = steal_jiffies()
        flt0, ivcs0, cpu0 = thread_usage()
        t_first = pc()
        lat = timed(n, case.prep, lambda i: call(board, i))
        t_loop = pc()
        flt1, ivcs1, cpu1 = thread_usage()
        board.flush()
        t_done = pc()
        steal1 = steal_jiffies()
        stop_spy(spy_proc)
        mem_after = {"daemon": mem_mb(daemon_pid), "client": mem_mb(me)}
        stats = board.stats()
        run_info = next((x for x in daemon_status(env.endpoint).get("runs", []) if x.get("path") == board.path), {})
        warned = bool(getattr(board._outbox, "_warned", False))
        window = t_done - t_first
        res: dict[str, Any] = {
            "calls": n,
            "log_ms": pcts_ms(lat),
            "loop_s": t_loop - t_first,
            "flush_wait_s": t_done - t_loop,
            "window_s": window,
            "calls_per_s": n / window,
            "MB_per_s": n * case.payload_bytes / window / 1e6,
            "client_calls_per_s_in_loop": n / (t_loop - t_first),
            "loop_minor_faults_per_call": (flt1 - flt0) / n,
            "loop_involuntary_switches": ivcs1 - ivcs0,
            "loop_cpu_over_wall": (cpu1 - cpu0) / max(t_loop - t_first, 1e-9),
            "steal_ms": (steal1 - steal0) * 1000 / os.sysconf("SC_CLK_TCK"),
            "peak_queue": stats["peak_queue"],
            # Calls the daemon held received-but-unwritten for this run at once, and the
            # batches it wrote them in (a run's counters, warm-up included).
            "daemon_peak_pending_calls": run_info.get("peak_pending"),
            "daemon_batches": run_info.get("batches"),
            "backpressure_warning": warned,
            "daemon_peak_rss_mb": mem_after["daemon"]["hwm"] if hwm_ok else None,
            "client_peak_rss_mb": mem_after["client"]["hwm"] if hwm_ok else None,
            "daemon_rss_before_mb": mem_before["daemon"]["rss"],
            "daemon_rss_after_mb": mem_after["daemon"]["rss"],
            "client_rss_before_mb": mem_before["client"]["rss"],
            "client_rss_after_mb": mem_after["client"]["rss"],
            "daemon_rss_growth_mb": (mem_after["daemon"]["hwm"] - mem_before["daemon"]["rss"]) if hwm_ok else None,
            "client_rss_growth_mb": (mem_after["client"]["hwm"] - mem_before["client"]["rss"]) if hwm_ok else None,
        }
        # Paced: the same call at half the rate the daemon just sustained.
        if paced_seconds > 0:
            interval = PACED_LOAD_INVERSE / res["calls_per_s"]
            t0 = pc()
            lat_p = paced(board, case, n, interval, paced_seconds)
            board.flush()
            res["paced"] = {
                "calls": len(lat_p),
                "interval_ms": interval * 1000,
                "log_ms": pcts_ms(lat_p),
                "window_s": pc() - t0,
            }
        m = res["paced"]["calls"] if "paced" in res else 0
        # Everything logged (warm-up included) must read back exactly.
        t0 = pc()
        res["verified"] = case.verify(board.path, WARMUP + n + m)
        res["verify_s"] = pc() - t0
        res["run_path"] = board.path
        res["disk_held_bytes"] = c.du_bytes(board.path)[0]  # the daemon still holds the run open
        res["disk_held_files"] = _file_sizes(board.path)
    finally:
        board.finish()
    return res


def _file_sizes(path: str) -> dict[str, int]:
    """Allocated bytes of each file of the run over 64 KiB (relative path -> bytes)."""
    out = {}
    for root, _dirs, files in os.walk(path):
        for name in files:
            full = os.path.join(root, name)
            try:
                size = os.lstat(full).st_blocks * 512
            except OSError:
                continue
            if size > 64 << 10:
                out[os.path.relpath(full, path)] = size
    return out


def start_spy(spy: str | None, key: str, daemon_pid: int) -> subprocess.Popen[bytes] | None:
    if not spy:
        return None
    want, _, target = spy.partition(":")
    if want != key or getattr(start_spy, "done", False):
        return None
    start_spy.done = True  # type: ignore[attr-defined]
    pid = os.getpid() if target == "client" else daemon_pid
    os.makedirs(c.RESULTS_DIR, exist_ok=True)
    out = os.path.join(c.RESULTS_DIR, f"profile-rich-{key}-{target or 'daemon'}.txt")
    proc = subprocess.Popen(
        [
            "py-spy",
            "record",
            "--pid",
            str(pid),
            "--rate",
            "250",
            "--threads",
            "--format",
            "raw",
            "--output",
            out,
            "--nonblocking",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    proc.out_path = out  # type: ignore[attr-defined]
    time.sleep(1.0)  # let py-spy attach
    return proc


def stop_spy(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is None:
        return
    time.sleep(0.2)
    proc.send_signal(signal.SIGINT)  # py-spy writes the file and exits
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
    out = proc.out_path  # type: ignore[attr-defined]
    if os.path.exists(out):
        from profile_daemon import summarize

        c.log(f"py-spy profile ({out}):\n{summarize(out, top=30)}")
    else:
        c.log("py-spy wrote nothing: " + (proc.stderr.read().decode(errors="replace") if proc.stderr else ""))


def make_case(key: str, rng: np.random.Generator) -> Case:
    if key == "hist1m":
        return Hist1M(rng)
    if key in ("img_distinct", "img_same"):
        return Image256(rng, key == "img_distinct")
    if key == "hist50":
        return Hist50(rng)
    if key == "tensor_kde":
        return TensorKde(rng)
    return Mixed(rng)


# ---------------------------------------------------------------- report


def _ms(v: float) -> str:
    if v != v:
        return "n/a"
    if v < 0.1:
        return f"{v * 1000:.0f} us"
    if v < 10:
        return f"{v:.2f} ms"
    return f"{v:.0f} ms"


def _spread(vals: list[float], fmt: Callable[[float], str]) -> str:
    return f"{fmt(c.median(vals))} ({fmt(min(vals))}..{fmt(max(vals))})"


def report(results: dict[str, dict[str, Any]]) -> str:
    lines = [
        "| case | log() p50: paced / back-to-back | log() p99: paced / back-to-back "
        "| baseline in the same run (p50) | daemon throughput (back-to-back, to flush()) |",
        "|---|---|---|---|---|",
    ]
    for key, res in results.items():
        runs = res["repeats"]

        def both(q: str) -> str:
            b2b = _spread([x["log_ms"][q] for x in runs], _ms)
            if not all("paced" in x for x in runs):
                return f"- / {b2b}"
            return f"{_spread([x['paced']['log_ms'][q] for x in runs], _ms)} / {b2b}"

        p50, p99 = both("p50"), both("p99")
        cps = [x["calls_per_s"] for x in runs]
        mbs = [x["MB_per_s"] for x in runs]
        thr = f"{_spread(cps, lambda v: f'{v:.0f}')} calls/s = {_spread(mbs, lambda v: f'{v:.0f}')} MB/s"
        paced_n = f" + {runs[0]['paced']['calls']} paced" if "paced" in runs[0] else ""
        lines.append(
            f"| {TITLES[key]} (N={runs[0]['calls']}{paced_n}, {len(runs)} repeats) | {p50} | {p99} "
            f"| {res['baseline_text']} | {thr} |"
        )
    lines += [
        "",
        "| case | loop busy / flush() waited | daemon peak RSS (target <= 150 MB) | daemon held unwritten at once "
        "| training process peak RSS (growth in the calls) | RSS after each repeat's flush: daemon / client "
        "| page faults per log() | back-pressure warning |",
        "|---|---|---|---|---|---|---|---|",
    ]
    mb = lambda v: f"{v:.0f}"  # noqa: E731
    for key, res in results.items():
        runs = res["repeats"]
        loop = c.median(x["loop_s"] for x in runs)
        wait = c.median(x["flush_wait_s"] for x in runs)
        d_hwm = [x["daemon_peak_rss_mb"] or 0 for x in runs]
        c_hwm = [x["client_peak_rss_mb"] or 0 for x in runs]
        c_grow = [x["client_rss_growth_mb"] or 0 for x in runs]
        d_after = [x["daemon_rss_after_mb"] for x in runs]
        c_after = [x["client_rss_after_mb"] for x in runs]
        pend = [x["daemon_peak_pending_calls"] or 0 for x in runs]
        held = c.median(pend)
        bp = sum(1 for x in runs if x["backpressure_warning"] or x["peak_queue"])
        lines.append(
            f"| {key} | {loop:.2f} s / {wait:.2f} s | {_spread(d_hwm, mb)} MB "
            f"| {held:.0f} calls = {held * res['payload_bytes'] / 1e6:.0f} MB (max {max(pend)}) "
            f"| {_spread(c_hwm, mb)} MB (+{c.median(c_grow):.0f}) "
            f"| {' '.join(mb(v) for v in d_after)} / {' '.join(mb(v) for v in c_after)} MB "
            f"| {c.median(x['loop_minor_faults_per_call'] for x in runs):.0f} "
            f"| {'in ' + str(bp) + ' repeat(s)' if bp else 'none'} |"
        )
    disk = [k for k in results if k in DISK_CASES]
    if disk:
        lines += [
            "",
            f"| case | bytes the values hold (read back) | run on disk while the daemon holds it "
            f"| after the daemon stopped | ratio held / stopped (target <= {DISK_RATIO_TARGET}) |",
            "|---|---|---|---|---|",
        ]
        for key in disk:
            runs = results[key]["repeats"]
            stored = c.median(x["verified"]["stored_bytes"] for x in runs)
            held = [x["disk_held_bytes"] / x["verified"]["stored_bytes"] for x in runs]
            stopped = [x["disk_stopped_bytes"] / x["verified"]["stored_bytes"] for x in runs]
            lines.append(
                f"| {key} | {stored / 2**20:.1f} MiB | {c.median(x['disk_held_bytes'] for x in runs) / 2**20:.1f} MiB "
                f"| {c.median(x['disk_stopped_bytes'] for x in runs) / 2**20:.1f} MiB "
                f"| {_spread(held, lambda v: f'{v:.2f}x')} / {_spread(stopped, lambda v: f'{v:.2f}x')} |"
            )
    return "\n".join(lines)


def records(results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for key, res in results.items():
        runs = res["repeats"]
        title = TITLES[key]
        base = {k: c.median(b[k]["p50"] for b in res["baselines"]) for k in res["baselines"][0]}
        common = {"per_repeat": runs, "baseline_per_repeat": res["baselines"], "payload_bytes": res["payload_bytes"]}
        out += [
            c.metric(
                f"rich_{key}_log_p50_ms",
                f"{title}: log() p50, back-to-back",
                unit="ms",
                target=None,
                op="<=",
                values=[x["log_ms"]["p50"] for x in runs],
                baseline=res["baseline_text"],
                baseline_values=base,
                extra=common,
                note=f"{runs[0]['calls']} back-to-back calls per repeat",
            ),
            c.metric(
                f"rich_{key}_log_p99_ms",
                f"{title}: log() p99, back-to-back",
                unit="ms",
                target=None,
                op="<=",
                values=[x["log_ms"]["p99"] for x in runs],
                baseline=res["baseline_text"],
                baseline_values={k: c.median(b[k]["p99"] for b in res["baselines"]) for k in res["baselines"][0]},
            ),
            *(
                [
                    c.metric(
                        f"rich_{key}_paced_log_p50_ms",
                        f"{title}: log() p50, paced",
                        unit="ms",
                        target=None,
                        op="<=",
                        values=[x["paced"]["log_ms"]["p50"] for x in runs],
                        baseline=res["baseline_text"],
                        baseline_values=base,
                        note="calls at half the daemon's measured throughput",
                    ),
                    c.metric(
                        f"rich_{key}_paced_log_p99_ms",
                        f"{title}: log() p99, paced",
                        unit="ms",
                        target=None,
                        op="<=",
                        values=[x["paced"]["log_ms"]["p99"] for x in runs],
                    ),
                ]
                if all("paced" in x for x in runs)
                else []
            ),
            c.metric(
                f"rich_{key}_calls_per_s",
                f"{title}: durable calls/s",
                unit="calls/s",
                target=None,
                op=">=",
                values=[x["calls_per_s"] for x in runs],
                note="first log() to flush() returning; every value read back",
            ),
            c.metric(
                f"rich_{key}_MB_per_s",
                f"{title}: durable payload MB/s",
                unit="MB/s",
                target=None,
                op=">=",
                values=[x["MB_per_s"] for x in runs],
                note=f"payload {res['payload_bytes']:,} B per call",
            ),
            c.metric(
                f"rich_{key}_daemon_peak_rss_mb",
                f"{title}: daemon peak RSS",
                unit="MB",
                target=150.0,
                op="<=",
                values=[x["daemon_peak_rss_mb"] or float("nan") for x in runs],
                note="PRODUCT.md 9: daemon RSS <= 150 MB while ingesting at full speed",
            ),
            c.metric(
                f"rich_{key}_client_peak_rss_mb",
                f"{title}: training process peak RSS",
                unit="MB",
                target=None,
                op="<=",
                values=[x["client_peak_rss_mb"] or float("nan") for x in runs],
            ),
        ]
        if key in DISK_CASES:
            out += [
                c.metric(
                    f"rich_{key}_disk_ratio_{when}",
                    f"{title}: run on disk / stored values, {what}",
                    unit="x",
                    target=DISK_RATIO_TARGET,
                    op="<=",
                    values=[x[f"disk_{when}_bytes"] / x["verified"]["stored_bytes"] for x in runs],
                    note="du of the run folder over the bytes its values hold (issue 9)",
                )
                for when, what in (("held", "daemon holding the run"), ("stopped", "daemon stopped"))
            ]
    return out


# ---------------------------------------------------------------- main


def git_diff_sha1() -> str | None:
    """SHA-1 of ``git diff HEAD`` (the uncommitted changes measured along with the commit)."""
    import hashlib

    try:
        out = subprocess.run(
            ["git", "diff", "HEAD"], cwd=os.path.dirname(c.BENCH_DIR), capture_output=True, timeout=30
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    return hashlib.sha1(out).hexdigest() if out else None


# ---------------------------------------------------------------- scaling (issue 11)

SCALE_IMAGES_FULL, SCALE_IMAGES_QUICK = 400, 150
SCALE_HISTS_FULL, SCALE_HISTS_QUICK = 300, 100
IMAGES_TARGET, HISTS_TARGET = 2.5, 1.5  # durable rate over the single-thread floor


def _start_pinned_daemon(endpoint: str, cpus: list[int], threads: int, log_path: str) -> subprocess.Popen[bytes]:
    """``kobo-daemon run --compute-threads THREADS`` allowed on ``cpus`` only (sched_setaffinity)."""
    from kohakuboard.protocol.endpoint import daemon_alive, resolve

    env = dict(os.environ, KOBO_DAEMON_ENDPOINT=endpoint)
    with open(log_path, "ab") as logf:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "kohakuboard.daemon",
                "run",
                "--compute-threads",
                str(threads),
                "--system-metrics",
                "0",
            ],
            env=env,
            stdout=logf,
            stderr=logf,
            preexec_fn=lambda: os.sched_setaffinity(0, set(cpus)),
        )
    ep = resolve(endpoint, env)
    deadline = time.monotonic() + 20
    while not daemon_alive(ep):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"daemon did not start (see {log_path})")
        time.sleep(0.02)
    return proc


def _stop_daemon(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (all its threads)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _durable_rate(
    board: Any,
    n: int,
    call: Callable[[int], None],
    prep: Callable[[int], None] | None = None,
    daemon_pid: int | None = None,
) -> tuple[float, float]:
    """(calls per second from the first of ``n`` back-to-back calls to ``flush()`` returning,
    CPU ms per call of the daemon and this process together)."""
    for i in range(-WARMUP, 0):
        call(i)
    board.flush()
    cpu0 = _cpu_s(daemon_pid) if daemon_pid else 0.0
    own0 = time.process_time()
    t0 = time.perf_counter()
    for i in range(n):
        if prep is not None:
            prep(i)
        call(i)
    board.flush()
    wall = time.perf_counter() - t0
    cpu = (_cpu_s(daemon_pid) - cpu0 if daemon_pid else 0.0) + time.process_time() - own0
    return n / wall, cpu / n * 1000


def _floors(images: list[np.ndarray], hists: list[np.ndarray], m: int) -> dict[str, float]:
    """Single-thread rates (per wall second) and CPU ms per item of Pillow PNG level 1 and np.histogram."""
    from PIL import Image

    out = {}
    for key, fn in (
        ("pillow_png", lambda i: Image.fromarray(images[i % 16]).save(io.BytesIO(), format="PNG", compress_level=1)),
        ("np_histogram", lambda i: np.histogram(hists[i % 4], bins=64)),
    ):
        c0, t0 = time.process_time(), time.perf_counter()
        for i in range(m):
            fn(i)
        out[f"{key}_per_s"] = m / (time.perf_counter() - t0)
        out[f"{key}_cpu_ms"] = (time.process_time() - c0) / m * 1000
    return out


def scaling(args: argparse.Namespace, rng: np.random.Generator) -> dict[str, Any]:
    """Durable images/s and 1M-value histograms/s with the daemon on 1, 2, ... all CPUs, against
    the single-thread floors (Pillow PNG, ``np.histogram``) measured in the same repeat."""
    from kohakuboard.client import Board, Histogram, Media
    from kohakuboard.storage.reader import RunReader

    cpus = sorted(os.sched_getaffinity(0))
    levels = sorted({k for k in (1, 2, len(cpus)) if k <= len(cpus)})
    n_img = SCALE_IMAGES_QUICK if args.quick else SCALE_IMAGES_FULL
    n_hist = SCALE_HISTS_QUICK if args.quick else SCALE_HISTS_FULL
    images = [rng.integers(0, 256, (256, 256, 3), dtype=np.uint8) for _ in range(16)]
    hists = [rng.standard_normal(1_000_000, dtype=np.float32) for _ in range(4)]
    tmp = tempfile.mkdtemp(prefix="kobo-rs-", dir="/tmp")
    endpoint = f"ipc://{tmp}/kobo"
    saved = {k: os.environ.get(k) for k in ("KOBO_DAEMON_ENDPOINT", "KOBO_DAEMON_AUTOSTART")}
    os.environ["KOBO_DAEMON_ENDPOINT"] = endpoint
    os.environ["KOBO_DAEMON_AUTOSTART"] = "0"
    repeats: list[dict[str, Any]] = []
    try:
        for r in range(args.repeats):
            if args.wait_idle:
                from run_all import wait_idle

                wait_idle(args.wait_idle)
            rep: dict[str, Any] = {"loadavg_before": os.getloadavg()[0]}
            m = 60 if args.quick else 120
            for k in levels:
                # The floors right before each level, so that each ratio compares
                # rates measured under the same load of the (shared) machine.
                floors = _floors(images, hists, m)
                proc = _start_pinned_daemon(endpoint, cpus[:k], k, os.path.join(tmp, "daemon.log"))
                try:
                    b = Board(
                        "scale-img",
                        project="bench-rich",
                        run_id=f"img-{r}-{k}",
                        base_dir=os.path.join(tmp, "runs"),
                        capture_output=False,
                    )
                    img_rate, img_cpu = _durable_rate(
                        b,
                        n_img,
                        lambda i: b.log(sample=Media(images[i % 16])),
                        lambda i: _stamp(images[i % 16], i),
                        proc.pid,
                    )
                    b.finish()
                    with RunReader(b.path) as rd:
                        rows = rd.media("sample")
                    _check_steps([int(x["step"]) for x in rows], n_img + WARMUP, "scaling images")
                    b = Board(
                        "scale-hist",
                        project="bench-rich",
                        run_id=f"hist-{r}-{k}",
                        base_dir=os.path.join(tmp, "runs"),
                        capture_output=False,
                    )
                    hist_rate, hist_cpu = _durable_rate(
                        b, n_hist, lambda i: b.log(weights=Histogram(hists[i % 4])), None, proc.pid
                    )
                    b.finish()
                    with RunReader(b.path) as rd:
                        hs = rd.histograms("weights")
                    _check_steps([int(h["step"]) for h in hs], n_hist + WARMUP, "scaling histograms")
                    assert all(int(h["counts"].sum()) == 1_000_000 for h in hs), "scaling: a histogram lost values"
                finally:
                    _stop_daemon(proc)
                rep[f"cpus{k}"] = {
                    "images_per_s": img_rate,
                    "histograms_per_s": hist_rate,
                    "image_cpu_ms": img_cpu,
                    "histogram_cpu_ms": hist_cpu,
                    **floors,
                }
                shutil.rmtree(os.path.join(tmp, "runs"), ignore_errors=True)
            c.log(
                f"scaling {r + 1}/{args.repeats}: "
                + " | ".join(
                    f"{k} CPU(s): {x['images_per_s']:.0f} images/s (Pillow {x['pillow_png_per_s']:.0f}/s), "
                    f"{x['histograms_per_s']:.0f} histograms/s (np.histogram {x['np_histogram_per_s']:.0f}/s); "
                    f"CPU ms per image {x['image_cpu_ms']:.1f} (Pillow {x['pillow_png_cpu_ms']:.1f}), per histogram "
                    f"{x['histogram_cpu_ms']:.1f} (np.histogram {x['np_histogram_cpu_ms']:.1f})"
                    for k, x in ((k, rep[f"cpus{k}"]) for k in levels)
                )
                + f" | load {rep['loadavg_before']:.2f}"
            )
            repeats.append(rep)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    return {"levels": levels, "images_per_call": n_img, "histograms_per_call": n_hist, "repeats": repeats}


def scaling_report(sc: dict[str, Any]) -> str:
    reps = sc["repeats"]

    def med(vals: list[float], digits: int = 0) -> str:
        return f"{c.median(vals):.{digits}f} ({min(vals):.{digits}f}..{max(vals):.{digits}f})"

    def ratio(vals: list[float]) -> str:
        return f"{c.median(vals):.2f}x ({min(vals):.2f}x..{max(vals):.2f}x)"

    lines = [
        "| daemon on | durable images/s (256x256x3 noise) | / Pillow PNG 1 thread (target >= 2.5x) "
        "| durable histograms/s (1M float32) | / np.histogram 1 thread (target >= 1.5x) "
        "| CPU ms per image / per histogram (daemon + client) |",
        "|---|---|---|---|---|---|",
    ]
    for k in sc["levels"]:
        xs = [x[f"cpus{k}"] for x in reps]
        lines.append(
            f"| {k} CPU(s), {k} compute thread(s) | {med([x['images_per_s'] for x in xs])} "
            f"| {ratio([x['images_per_s'] / x['pillow_png_per_s'] for x in xs])} "
            f"| {med([x['histograms_per_s'] for x in xs])} "
            f"| {ratio([x['histograms_per_s'] / x['np_histogram_per_s'] for x in xs])} "
            f"| {med([x['image_cpu_ms'] for x in xs], 1)} / {med([x['histogram_cpu_ms'] for x in xs], 1)} |"
        )
    xs = [x[f"cpus{k}"] for x in reps for k in sc["levels"]]
    lines.append(
        f"\nFloors, measured in this process on one thread right before each level: Pillow PNG level 1 "
        f"{med([x['pillow_png_per_s'] for x in xs])} images/s ({med([x['pillow_png_cpu_ms'] for x in xs], 1)} CPU ms "
        f"each), np.histogram(bins=64) {med([x['np_histogram_per_s'] for x in xs])} per s "
        f"({med([x['np_histogram_cpu_ms'] for x in xs], 1)} CPU ms each). Medians of {len(reps)} repeats (min..max); "
        f"{sc['images_per_call']} images / {sc['histograms_per_call']} histograms back to back per repeat "
        f"and level, to flush(); load average before each repeat "
        + ", ".join(f"{x['loadavg_before']:.2f}" for x in reps)
        + "."
    )
    return "\n".join(lines)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="~30 s: fewer calls per repeat, 3 repeats")
    p.add_argument("--repeats", type=int, default=None, help="repeats per case (default 5, --quick 3)")
    p.add_argument("--cases", default="", help="comma-separated subset of: " + ", ".join(CASES))
    p.add_argument("--calls-scale", type=float, default=1.0, help="multiply every case's calls per repeat")
    p.add_argument("--out", default=None, help="also write the metric records (JSON list) here")
    p.add_argument("--json", default=os.path.join(c.RESULTS_DIR, "rich.json"), help="where to write the results")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (runs, daemon log) for inspection")
    p.add_argument(
        "--wait-idle",
        type=float,
        default=0,
        metavar="SECONDS",
        help="first wait up to SECONDS for the 1-min load average to fall below 0.7",
    )
    p.add_argument(
        "--paced-seconds",
        type=float,
        default=None,
        metavar="SECONDS",
        help=f"length of the paced phase of each repeat (default {PACED_SECONDS_FULL}, "
        f"--quick {PACED_SECONDS_QUICK}; 0: none)",
    )
    p.add_argument(
        "--settle",
        type=float,
        default=None,
        metavar="SECONDS",
        help="at the end, wait up to SECONDS for the daemon to close every run and record its RSS "
        "(default 40, --quick 0)",
    )
    p.add_argument(
        "--scaling",
        action="store_true",
        help="durable images/s and histograms/s with the daemon pinned to 1, 2 and all CPUs against "
        "the single-thread Pillow PNG and np.histogram rates (only this, unless --cases is given)",
    )
    p.add_argument(
        "--py-spy",
        default=None,
        metavar="CASE[:client]",
        help="py-spy the daemon (or the training process) during the first repeat of CASE; "
        "stacks to bench/results/profile-rich-CASE-*.txt (slows the profiled process)",
    )
    args = p.parse_args()
    if args.repeats is None:
        args.repeats = 3 if args.quick else 5
    if args.paced_seconds is None:
        args.paced_seconds = PACED_SECONDS_QUICK if args.quick else PACED_SECONDS_FULL
    if args.settle is None:
        args.settle = 0.0 if args.quick else 40.0
    explicit = [x.strip() for x in args.cases.split(",") if x.strip()]
    args.cases = explicit or ([] if args.scaling else CASES)
    unknown = set(args.cases) - set(CASES)
    if unknown:
        p.error(f"unknown case(s): {', '.join(sorted(unknown))}")
    if args.py_spy and shutil.which("py-spy") is None:
        p.error("py-spy is not installed")
    return args


def main() -> None:
    args = parse_args()
    from run_all import machine_info, wait_idle

    if args.wait_idle:
        wait_idle(args.wait_idle)
    started = time.time()
    load_start = c.load_average()
    calls = {
        k: max(5, int(round(v * args.calls_scale))) for k, v in (CALLS_QUICK if args.quick else CALLS_FULL).items()
    }
    rng = np.random.default_rng(12345)
    scale_result: dict[str, Any] = {}
    if args.scaling:
        scale_result = scaling(args, rng)
        print()
        print(scaling_report(scale_result))
        print()
        if not args.cases:
            c.write_results(
                args.json,
                {
                    "generated_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                    "command": " ".join(["python", *sys.argv]),
                    "machine": machine_info(),
                    "git_diff_sha1": git_diff_sha1(),
                    "total_s": round(time.time() - started, 1),
                    "scaling": scale_result,
                    "table_markdown": scaling_report(scale_result),
                },
                args.out,
                [],
            )
            return
    results: dict[str, dict[str, Any]] = {}
    daemon_rss: list[tuple[str, float]] = []
    from kohakuboard.client import Board

    with RichDaemon(keep=args.keep) as env:
        daemon_pid = env.start()
        c.log(f"daemon pid {daemon_pid} on {env.endpoint}")
        daemon_rss.append(("start", mem_mb(daemon_pid)["rss"]))
        for key in args.cases:
            case = make_case(key, rng)
            if isinstance(case, Mixed):
                case.scalar_board = Board(
                    "scalars", project="bench-rich", run_id="mixed-scalars", base_dir=env.base_dir, capture_output=False
                )
            n = calls[key]
            runs, bases = [], []
            load = os.getloadavg()[0]
            for r in range(args.repeats):
                res = run_repeat(case, env, daemon_pid, n, r, args.py_spy, args.paced_seconds)
                runs.append(res)
                gc.collect()
                b = case.baselines(n)
                bases.append(b)
                pz = res.get("paced", {}).get("log_ms", {})
                c.log(
                    f"{key} {r + 1}/{args.repeats}: log() p50/p99 back-to-back {_ms(res['log_ms']['p50'])} / "
                    f"{_ms(res['log_ms']['p99'])}, paced {_ms(pz.get('p50', float('nan')))} / "
                    f"{_ms(pz.get('p99', float('nan')))} | {res['calls_per_s']:.1f} calls/s, {res['MB_per_s']:.1f} MB/s "
                    f"(loop {res['loop_s']:.2f} s + flush {res['flush_wait_s']:.2f} s) | peak RSS daemon "
                    f"{res['daemon_peak_rss_mb'] or 0:.0f} MB, client {res['client_peak_rss_mb'] or 0:.0f} MB | "
                    f"baseline: {case.baseline_text({k: v['p50'] for k, v in b.items()})}"
                )
            if isinstance(case, Mixed):
                sb = case.scalar_board
                pts = len(c.read_series(sb.path, "loss"))
                want = getattr(case, "scalar_points", 0) * args.repeats
                assert pts == want, f"4-scalar baseline board: {pts} points read back, {want} logged"
                sb.finish()
            base_med = {k: c.median(x[k]["p50"] for x in bases) for k in bases[0]}
            results[key] = {
                "repeats": runs,
                "baselines": bases,
                "baseline_text": case.baseline_text(base_med),
                "payload_bytes": case.payload_bytes,
                "calls_per_repeat": n,
                "loadavg_before": load,
            }
            daemon_rss.append((key, mem_mb(daemon_pid)["rss"]))
            del case
            gc.collect()
        c.log("daemon RSS after each case: " + ", ".join(f"{k} {v:.0f} MB" for k, v in daemon_rss))
        settled: dict[str, Any] = {}
        if args.settle > 0:
            # The daemon closes a run 30 s after its last client left: once every run is
            # closed, what is left of its RSS is what it keeps for good.
            c.log(f"waiting up to {args.settle:.0f} s for the daemon to close every run")
            t0 = time.monotonic()
            st = daemon_status(env.endpoint)
            while st.get("runs") and time.monotonic() - t0 < args.settle:
                time.sleep(1.0)
                st = daemon_status(env.endpoint)
            settled = {
                "waited_s": round(time.monotonic() - t0, 1),
                "open_runs": len(st.get("runs", [])),
                "daemon_rss_mb": mem_mb(daemon_pid)["rss"],
                "daemon_rss_at_start_mb": daemon_rss[0][1],
            }
            c.log(
                f"after {settled['waited_s']:.0f} s: {settled['open_runs']} run(s) open, daemon RSS "
                f"{settled['daemon_rss_mb']:.0f} MB (at start {settled['daemon_rss_at_start_mb']:.0f} MB)"
            )

        # Stop the daemon (it closes every run): the size of each run at rest.
        env.stop()
        for res in results.values():
            for x in res["repeats"]:
                x["disk_stopped_bytes"] = c.du_bytes(x["run_path"])[0]
                x["disk_stopped_files"] = _file_sizes(x["run_path"])
    text = report(results)
    if settled:
        text += (
            f"\n\nDaemon RSS: {daemon_rss[0][1]:.0f} MB at start; after each case "
            + ", ".join(f"{k} {v:.0f}" for k, v in daemon_rss[1:])
            + f" MB; {settled['daemon_rss_mb']:.0f} MB once every run was closed "
            f"({settled['open_runs']} open after {settled['waited_s']:.0f} s)."
        )
    print()
    print(text)
    print()
    recs = records(results)
    result = {
        "generated_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python", *sys.argv]),
        "mode": "quick" if args.quick else "full",
        "repeats": args.repeats,
        "calls_per_repeat": {k: calls[k] for k in args.cases},
        "warmup_calls": WARMUP,
        "machine": machine_info(),
        "git_diff_sha1": git_diff_sha1(),
        "loadavg_at_start": load_start,
        "loadavg_at_end": os.getloadavg(),
        "daemon_rss_after_each_case_mb": daemon_rss,
        "daemon_after_runs_closed": settled,
        "total_s": round(time.time() - started, 1),
        "table_markdown": text,
        "cases": results,
        "scaling": scale_result,
        "metrics": recs,
    }
    c.write_results(args.json, result, args.out, recs)


if __name__ == "__main__":
    main()
