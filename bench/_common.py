"""Shared helpers of the benchmarks in ``bench/``.

Every benchmark script runs in its own interpreter (``run_all.py`` starts them
one after the other) and uses :class:`IsolatedDaemon`: a fresh endpoint
``ipc:///tmp/kb-XXXX/kobo`` and base dir in a temporary directory, exported in
``os.environ`` so that the client autostarts *its own* daemon there (and spawned
worker processes inherit it), stopped with ``kobo-daemon stop`` at the end.

A benchmark script writes a JSON list of metric records (see :func:`metric`) to
the file given by ``--out``; ``run_all.py`` turns them into the table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from typing import Any

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
RESULTS_DIR = os.path.join(BENCH_DIR, "results")


def log(msg: str) -> None:
    """Progress to the real stderr (a Board with capture_output=True tees sys.stderr)."""
    stream = sys.__stderr__ or sys.stderr
    stream.write(f"[{time.strftime('%H:%M:%S')}] {msg}\n")
    stream.flush()


def load_average(before: str = "") -> tuple[float, float, float]:
    """The load averages now; said in the log when other processes compete for the cores (1-min > 1)."""
    load = os.getloadavg()
    if load[0] > 1.0:
        log(
            f"!! load average {load[0]:.2f}{' before ' + before if before else ''}: "
            f"other processes compete for the {os.cpu_count()} cores"
        )
    return load


# ----------------------------------------------------------------- daemons


class IsolatedDaemon:
    """A private daemon endpoint + base dir in a short temp dir; stops its daemon on exit.

    The daemon itself is started by the first ``Board`` (client autostart), as a
    user's would be; :meth:`start` starts it explicitly when a benchmark wants
    daemon start-up out of its timings.
    """

    def __init__(self, keep: bool = False) -> None:
        self.keep = keep
        self.dir = tempfile.mkdtemp(prefix="kb-", dir="/tmp")
        self.endpoint = f"ipc://{self.dir}/kobo"
        self.base = os.path.join(self.dir, "kobo")
        self.base_dir = os.path.join(self.dir, "runs")
        self._saved: dict[str, str | None] = {}

    def __enter__(self) -> IsolatedDaemon:
        for key, value in (
            ("KOBO_DAEMON_ENDPOINT", self.endpoint),
            ("KOBO_BASE_DIR", self.base_dir),
            ("KOBO_DAEMON_AUTOSTART", "1"),
        ):
            self._saved[key] = os.environ.get(key)
            os.environ[key] = value
        for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
            self._saved[key] = os.environ.pop(key, None)
        return self

    def __exit__(self, *exc: Any) -> None:
        try:
            self.stop()
        finally:
            for key, value in self._saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
            if not self.keep:
                shutil.rmtree(self.dir, ignore_errors=True)

    @property
    def pid_path(self) -> str:
        return self.base + ".pid"

    def pid(self) -> int | None:
        try:
            with open(self.pid_path) as f:
                return int(f.read().strip())
        except (OSError, ValueError):
            return None

    def alive(self) -> bool:
        from kohakuboard.protocol.endpoint import daemon_alive, resolve

        return daemon_alive(resolve(self.endpoint, os.environ))

    def start(self) -> int:
        """Start the daemon (as autostart would) and return its pid."""
        from kohakuboard.protocol.control import ensure_daemon
        from kohakuboard.protocol.endpoint import resolve

        ensure_daemon(resolve(self.endpoint, os.environ), autostart=True)
        deadline = time.monotonic() + 10
        while self.pid() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        pid = self.pid()
        assert pid is not None, "daemon wrote no pid file"
        return pid

    def stop(self, timeout: float = 60.0) -> None:
        """``kobo-daemon stop`` (it drains and closes every run); SIGTERM/SIGKILL as fallback."""
        if not self.alive():
            return
        env = dict(os.environ, KOBO_DAEMON_ENDPOINT=self.endpoint)
        exe = shutil.which("kobo-daemon")
        cmd = [exe, "stop"] if exe else [sys.executable, "-m", "kohakuboard.daemon", "stop"]
        try:
            subprocess.run(cmd, env=env, capture_output=True, timeout=timeout + 5)
        except subprocess.TimeoutExpired:
            pass
        if self.alive():
            pid = self.pid()
            if pid:
                _kill(pid, signal.SIGTERM)
                deadline = time.monotonic() + 20
                while self.alive() and time.monotonic() < deadline:
                    time.sleep(0.05)
                if self.alive():
                    _kill(pid, signal.SIGKILL)


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


# ---------------------------------------------------------- /proc sampling


def proc_status_kb(pid: int, field: str) -> int | None:
    """``VmRSS``/``VmHWM``/... of ``pid`` in KiB, None if the process is gone."""
    return proc_status_all(pid).get(field)


def proc_status_all(pid: int) -> dict[str, int]:
    """Every ``kB`` field of ``/proc/<pid>/status`` (empty if the process is gone)."""
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                parts = rest.split()
                if len(parts) == 2 and parts[1] == "kB":
                    out[key] = int(parts[0])
    except OSError:
        pass
    return out


class RssSampler:
    """Samples VmRSS of ``pid`` every ``interval`` seconds on a thread."""

    def __init__(self, pid: int, interval: float = 0.01) -> None:
        import threading

        self.pid = pid
        self.interval = interval
        self.samples: list[int] = []
        self.at_peak: dict[str, int] = {}  # RssAnon/RssFile/... at the highest VmRSS sample
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="rss-sampler")

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            st = proc_status_all(self.pid)
            v = st.get("VmRSS")
            if v is not None:
                if v > max(self.samples, default=0):
                    self.at_peak = {k: st[k] for k in ("VmRSS", "RssAnon", "RssFile", "RssShmem") if k in st}
                self.samples.append(v)
            self._stop.wait(self.interval)

    @property
    def peak_mb(self) -> float:
        return max(self.samples, default=0) / 1024


# ------------------------------------------------------------------- disk


def du_bytes(path: str) -> tuple[int, int]:
    """(allocated bytes as ``du`` counts them, apparent bytes) of a folder tree."""
    alloc = apparent = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                st = os.lstat(os.path.join(root, name))
            except OSError:
                continue
            alloc += st.st_blocks * 512
            apparent += st.st_size
    return alloc, apparent


# ---------------------------------------------------------------- reading


def read_series(run_path: str, name: str, rank: int = 0) -> Any:
    """The metric's points as a numpy structured array (step, global_step, wall, value).

    Uses ``RunReader`` when it is importable, else kohakuvault directly as
    ``storage/format.py`` describes the file.
    """
    try:
        from kohakuboard.storage.reader import RunReader
    except ImportError:
        RunReader = None  # type: ignore[assignment]
    if RunReader is not None:
        with RunReader(run_path) as r:
            return r.series(name, rank)
    import numpy as np
    from kohakuvault import ColumnVault

    from kohakuboard.storage import format as fmt

    vault = ColumnVault(os.path.join(run_path, fmt.SCALARS_DB), read_only=True)
    try:
        raw = vault.ensure(fmt.column_name(rank, name), fmt.SCALAR_COLUMN_DTYPE).read_array()
        return np.asarray(raw).view(fmt.scalar_record_dtype()).reshape(-1).copy()
    finally:
        vault.close()


# --------------------------------------------------------------- results


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of already sorted values (q in [0, 100])."""
    if not sorted_values:
        return float("nan")
    k = max(0, min(len(sorted_values) - 1, int(round(q / 100 * len(sorted_values) + 0.5)) - 1))
    return float(sorted_values[k])


def median(values: Iterable[float]) -> float:
    vals = list(values)
    return float(statistics.median(vals)) if vals else float("nan")


def metric(
    key: str,
    name: str,
    *,
    unit: str,
    target: float | None,
    op: str,
    values: Sequence[float],
    baseline: str = "",
    baseline_values: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
    note: str = "",
) -> dict[str, Any]:
    """One result row. ``op`` is ``<=`` or ``>=`` (the direction of the target)."""
    med = median(values)
    ok = None
    if target is not None and med == med:
        ok = med <= target if op == "<=" else med >= target
    return {
        "key": key,
        "metric": name,
        "unit": unit,
        "target": target,
        "op": op,
        "median": med,
        "n": len(values),
        "values": [float(v) for v in values],
        "min": float(min(values)) if values else None,
        "max": float(max(values)) if values else None,
        "pass": ok,
        "baseline": baseline,
        "baseline_values": baseline_values or {},
        "extra": extra or {},
        "note": note,
    }


def parse_args(description: str, default_repeats: int = 5) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="smaller sizes, fewer repeats (~1 minute for all)")
    p.add_argument("--repeats", type=int, default=None, help=f"repeats (default {default_repeats}, --quick 3)")
    p.add_argument("--out", default=None, help="write the metric records (JSON list) here")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (runs, daemon log) for inspection")
    args = p.parse_args()
    if args.repeats is None:
        args.repeats = 3 if args.quick else default_repeats
    return args


def emit(args: argparse.Namespace, records: list[dict[str, Any]]) -> None:
    text = json.dumps(records, indent=2)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    else:
        print(text)


def write_results(json_path: str, result: dict[str, Any], out_path: str | None, records: list[dict[str, Any]]) -> None:
    """Write a benchmark's full result to ``json_path`` and, with ``--out``, its records for run_all."""
    os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
    with open(json_path, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {json_path} (total {result['total_s']:.0f} s)")
    if out_path:
        with open(out_path, "w") as f:
            json.dump(records, f, indent=2)
