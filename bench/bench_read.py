"""6. Read a 1,000,000-point series to numpy (and the time to write it).

The series is written through the real client and daemon: ``board.log(x=...)``
called 1,000,000 times (one scalar per call), then ``flush()``; the write time
(first log .. flush returned) is reported, and the run's disk bytes per point
(one scalar per call: the per-call ``steps`` row is not shared by 32 values).

Read, per repeat: ``RunReader(path).series("x")`` in a fresh reader (cold:
opens the vault) and again on the same reader (warm).  Values are checked
exactly.  Baseline in the same run: ``np.load`` of the same 1M records
(32 MB) from a ``.npy`` file on the same filesystem.
"""

from __future__ import annotations

import os
import time

import _common as c


def main() -> None:
    args = c.parse_args(__doc__.splitlines()[0])
    n_points = 1_000_000
    writes = 1 if args.quick else 2
    import numpy as np

    from kohakuboard.client import Board

    try:
        from kohakuboard.storage.reader import RunReader
    except ImportError:  # pragma: no cover - the reader is being written
        RunReader = None

    write_s, write_logged_s, paths = [], [], []
    npy: list[float] = []
    with c.IsolatedDaemon(keep=args.keep) as env:
        env.start()
        for w in range(writes):
            board = Board(
                "read-1m", {}, project="read", run_id=f"series1m-{w}", base_dir=env.base_dir, capture_output=True
            )
            log = board.log
            t0 = time.perf_counter()
            for i in range(n_points):
                log(x=float(i))
            t1 = time.perf_counter()
            board.flush()
            t2 = time.perf_counter()
            board.finish()
            write_s.append(t2 - t0)
            write_logged_s.append(t1 - t0)
            paths.append(board.path)
            c.log(
                f"wrote 1M points in {t2 - t0:.2f} s ({n_points / (t2 - t0) / 1e3:.0f} k calls/s; "
                f"log loop alone {t1 - t0:.2f} s)"
            )
        path = paths[0]
        expected = np.arange(n_points, dtype=np.float64)
        npy_path = os.path.join(env.dir, "baseline.npy")

        def read_once(phase: str, r: int) -> None:
            t0 = time.perf_counter()
            if RunReader is not None:
                reader = RunReader(path)
                s = reader.series("x")
            else:
                s = c.read_series(path, "x")
            t1 = time.perf_counter()
            if RunReader is not None:
                s2 = reader.series("x")
                t2 = time.perf_counter()
                reader.close()
                warm[phase].append((t2 - t1) * 1000)
                assert len(s2) == n_points
                del s2
            cold[phase].append((t1 - t0) * 1000)
            assert len(s) == n_points, f"read {len(s)} points, expected {n_points}"
            assert np.array_equal(s["value"], expected), "values differ"
            assert (np.diff(s["step"]) == 1).all(), "steps not consecutive"
            if not os.path.exists(npy_path):
                np.save(npy_path, np.ascontiguousarray(s))
            del s
            t0 = time.perf_counter()
            b = np.load(npy_path)
            npy.append((time.perf_counter() - t0) * 1000)
            assert len(b) == n_points
            del b
            c.log(
                f"read ({phase}) repeat {r + 1}/{n_reads}: cold {cold[phase][-1]:.1f} ms, "
                f"warm {warm[phase][-1] if warm[phase] else float('nan'):.1f} ms, np.load {npy[-1]:.1f} ms"
            )

        n_reads = max(args.repeats, 5)
        cold = {"live": [], "rest": []}
        warm = {"live": [], "rest": []}
        # Live: the run is finished but the daemon still holds it open (as while training).
        for r in range(n_reads):
            read_once("live", r)
        live = c.du_bytes(path)[0] / n_points
        env.stop()
        # At rest: the daemon closed the run (vault checkpointed).
        for r in range(n_reads):
            read_once("rest", r)
        rest = c.du_bytes(path)[0] / n_points
    records = [
        c.metric(
            "read_1m_ms",
            "read 1M-point series to numpy, closed run (new RunReader + series)",
            unit="ms",
            target=50.0,
            op="<=",
            values=cold["rest"],
            baseline=f"np.load of the same records {c.median(npy):.1f} ms",
            baseline_values={
                "npy_load_ms": c.median(npy),
                "warm_series_ms": c.median(warm["rest"]) if warm["rest"] else None,
            },
            extra={"warm_series_ms_per_repeat": warm["rest"], "npy_ms_per_repeat": npy},
            note="values and steps verified exactly",
        ),
        c.metric(
            "read_1m_live_ms",
            "read 1M-point series, run still open in the daemon",
            unit="ms",
            target=50.0,
            op="<=",
            values=cold["live"],
            baseline=f"np.load of the same records {c.median(npy):.1f} ms",
            baseline_values={
                "npy_load_ms": c.median(npy),
                "warm_series_ms": c.median(warm["live"]) if warm["live"] else None,
            },
            extra={"warm_series_ms_per_repeat": warm["live"]},
        ),
        c.metric(
            "write_1m_s",
            "write 1M points, 1 scalar/call, log..flush (no target)",
            unit="s",
            target=None,
            op="<=",
            values=write_s,
            baseline=f"log loop alone {c.median(write_logged_s):.2f} s",
            baseline_values={"log_loop_s": c.median(write_logged_s)},
        ),
        c.metric(
            "disk_bytes_per_point_1scalar",
            "disk per point, 1 scalar/call run (at rest)",
            unit="B",
            target=40,
            op="<=",
            values=[rest],
            baseline="32 B record",
            baseline_values={"record_bytes": 32},
            extra={"live_bytes_per_point": live},
            note="informative: each call also writes a steps row",
        ),
    ]
    c.emit(args, records)


if __name__ == "__main__":
    main()
