"""2. Durable throughput, 7a. daemon RSS while ingesting, 7b. disk bytes per scalar point.

Scenarios (each repeat of each scenario gets a freshly started daemon, so that
runs of earlier repeats, which the daemon keeps open for ``idle_close``, do not
weigh on its RSS):

* ``1 client``: one process, one run, 32 scalars per ``log()`` call.
* ``8 clients, 8 runs``: 8 processes (multiprocessing, spawn), each its own run.
* ``8 clients, 1 shared run``: 8 processes, one run, ranks 0..7 (a DDP job).

Clients are started and their Boards opened first; a barrier then releases
them together.  values/s = all values / (earliest first ``log()`` .. latest
``flush()`` return), i.e. until everything is durable.  Afterwards every
metric of every rank is read back through the reader: point count exact,
``m00`` equal to the logged sequence, steps consecutive.

During the 8-client scenarios VmRSS of the daemon is sampled every 10 ms
(its pid from ``<endpoint>.pid``).  Disk per point: allocated bytes of the run
folder (as ``du`` counts them) / points, once right after ``finish()`` and once
after the daemon stopped (files closed, WAL checkpointed).

Baselines in the same run: the clients' enqueue rate alone (log loop without
waiting for the daemon), and the storage ceiling: kohakuvault ``append_array``
of the same records (32 columns, 4096-row chunks) in-process, no daemon.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import shutil
import tempfile
import time

import _common as c

N_METRICS = 32


def _cpu_ticks(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            parts = f.read().rsplit(")", 1)[1].split()
        return int(parts[11]) + int(parts[12])  # utime + stime
    except (OSError, IndexError, ValueError):
        return None


def worker(proc: int, run_id: str, rank: int, n_calls: int, base_dir: str, barrier, results) -> None:
    from kohakuboard.client import Board

    board = Board(
        f"tp-{run_id}", {"proc": proc}, project="tp", run_id=run_id, base_dir=base_dir, rank=rank, capture_output=True
    )
    vals = {f"m{j:02d}": j * 0.25 + rank for j in range(N_METRICS)}
    log = board.log
    barrier.wait()
    cpu0 = os.times()
    t0 = time.perf_counter()
    for i in range(n_calls):
        vals["m00"] = float(i)
        log(**vals)
    t1 = time.perf_counter()
    board.flush()
    t2 = time.perf_counter()
    cpu1 = os.times()
    stats = board.stats()
    board.finish()
    results.put(
        {
            "proc": proc,
            "rank": rank,
            "path": board.path,
            "t_first_log": t0,
            "t_logged": t1,
            "t_flushed": t2,
            "cpu_s": (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system),
            "peak_queue": stats["peak_queue"],
        }
    )


def run_scenario(env: c.IsolatedDaemon, ctx, n_procs: int, shared: bool, n_calls: int, tag: str) -> dict:
    run_ids = [f"{tag}-shared"] * n_procs if shared else [f"{tag}-p{p}" for p in range(n_procs)]
    ranks = list(range(n_procs)) if shared else [0] * n_procs
    pid = env.start()
    idle_rss = c.proc_status_kb(pid, "VmRSS") / 1024
    barrier = ctx.Barrier(n_procs)
    results = ctx.Queue()
    procs = [
        ctx.Process(target=worker, args=(p, run_ids[p], ranks[p], n_calls, env.base_dir, barrier, results))
        for p in range(n_procs)
    ]
    cpu_before = _cpu_ticks(pid)
    with c.RssSampler(pid, 0.01) as sampler:
        for p in procs:
            p.start()
        out = [results.get(timeout=600) for _ in procs]
    cpu_after = _cpu_ticks(pid)
    for p in procs:
        p.join(60)
        assert p.exitcode == 0, f"worker exited {p.exitcode}"
    hwm = c.proc_status_kb(pid, "VmHWM") / 1024
    start = min(r["t_first_log"] for r in out)
    logged = max(r["t_logged"] for r in out)
    end = max(r["t_flushed"] for r in out)
    total = n_procs * n_calls * N_METRICS

    # Exactness: every metric of every rank, read back through the reader.
    import numpy as np

    expected = np.arange(n_calls, dtype=np.float64)
    for r in out:
        for j in range(N_METRICS):
            s = c.read_series(r["path"], f"m{j:02d}", r["rank"])
            assert len(s) == n_calls, f"{r['path']} rank {r['rank']} m{j:02d}: {len(s)} points, expected {n_calls}"
            if j == 0:
                assert np.array_equal(s["value"], expected), f"{r['path']} m00 values differ"
                assert (np.diff(s["step"]) == 1).all(), f"{r['path']} steps not consecutive"
            else:
                assert (s["value"] == j * 0.25 + r["rank"]).all()
    paths = sorted({r["path"] for r in out})
    live = sum(c.du_bytes(p)[0] for p in paths)
    env.stop()
    rest_alloc = sum(c.du_bytes(p)[0] for p in paths)
    rest_apparent = sum(c.du_bytes(p)[1] for p in paths)
    tick = os.sysconf("SC_CLK_TCK")
    return {
        "values": total,
        "seconds": end - start,
        "values_per_s": total / (end - start),
        "enqueue_values_per_s": total / (logged - start),
        "flush_wait_s": end - logged,
        "daemon_cpu_s": (cpu_after - cpu_before) / tick if cpu_before is not None and cpu_after is not None else None,
        "clients_cpu_s": sum(r["cpu_s"] for r in out),
        "peak_queue": max(r["peak_queue"] for r in out),
        "daemon_idle_rss_mb": idle_rss,
        "daemon_peak_rss_mb": sampler.peak_mb,
        "daemon_peak_anon_mb": sampler.at_peak.get("RssAnon", 0) / 1024,
        "daemon_peak_file_mb": sampler.at_peak.get("RssFile", 0) / 1024,
        "daemon_vmhwm_mb": hwm,
        "rss_samples": len(sampler.samples),
        "disk_bytes_per_point_live": live / total,
        "disk_bytes_per_point_at_rest": rest_alloc / total,
        "disk_apparent_bytes_per_point_at_rest": rest_apparent / total,
    }


def storage_ceiling(n_calls: int) -> float:
    """values/s of kohakuvault append_array alone: 32 columns, 4096-row chunks."""
    import numpy as np
    from kohakuvault import ColumnVault

    from kohakuboard.storage import format as fmt

    d = tempfile.mkdtemp(prefix="kb-vault-", dir="/tmp")
    try:
        rec = np.zeros(4096, dtype=fmt.scalar_record_dtype())
        rec["step"] = np.arange(4096)
        rec["value"] = np.random.default_rng(0).random(4096)
        chunk = rec.view(np.uint8).reshape(-1, fmt.SCALAR_RECORD_SIZE)
        t0 = time.perf_counter()
        vault = ColumnVault(os.path.join(d, "scalars.db"), block_bytes=fmt.VAULT_BLOCK_BYTES)
        cols = [vault.ensure(f"0/m{j:02d}", fmt.SCALAR_COLUMN_DTYPE) for j in range(N_METRICS)]
        done = 0
        while done < n_calls:
            k = min(4096, n_calls - done)
            for col in cols:
                col.append_array(chunk[:k])
            done += k
        vault.checkpoint()
        vault.close()
        return n_calls * N_METRICS / (time.perf_counter() - t0)
    finally:
        shutil.rmtree(d, ignore_errors=True)


def main() -> None:
    args = c.parse_args(__doc__.splitlines()[0])
    single_calls = 15_000 if args.quick else 100_000
    multi_calls = 2_500 if args.quick else 15_000
    ctx = mp.get_context("spawn")
    scenarios = [
        ("single", "1 client, 32 scalars/call", 1, False, single_calls),
        ("multi_runs", "8 clients, 8 runs", 8, False, multi_calls),
        ("multi_shared", "8 clients, 1 shared run", 8, True, multi_calls),
    ]
    res: dict[str, list[dict]] = {k: [] for k, *_ in scenarios}
    ceiling: list[float] = []
    with c.IsolatedDaemon(keep=args.keep) as env:
        for r in range(args.repeats):
            for key, label, n_procs, shared, n_calls in scenarios:
                x = run_scenario(env, ctx, n_procs, shared, n_calls, f"{key}{r}")
                res[key].append(x)
                c.log(
                    f"throughput {label} repeat {r + 1}/{args.repeats}: {x['values_per_s'] / 1e6:.2f} M values/s "
                    f"durable ({x['values']:,} values in {x['seconds']:.2f} s; enqueue "
                    f"{x['enqueue_values_per_s'] / 1e6:.2f} M/s), daemon cpu {x['daemon_cpu_s']:.2f} s, "
                    f"peak rss {x['daemon_peak_rss_mb']:.0f} MB, disk {x['disk_bytes_per_point_at_rest']:.1f} B/pt"
                )
            ceiling.append(storage_ceiling(single_calls))

    def med(key: str, field: str) -> float:
        return c.median(x[field] for x in res[key])

    ceil = c.median(ceiling)
    records = []
    for key, label, n_procs, _shared, n_calls in scenarios:
        records.append(
            c.metric(
                f"throughput_{key}",
                f"durable throughput, {label}",
                unit="values/s",
                target=1_000_000,
                op=">=",
                values=[x["values_per_s"] for x in res[key]],
                baseline=f"clients' enqueue rate {med(key, 'enqueue_values_per_s') / 1e6:.2f} M/s; "
                f"kohakuvault append alone {ceil / 1e6:.2f} M/s",
                baseline_values={
                    "enqueue_values_per_s": med(key, "enqueue_values_per_s"),
                    "storage_ceiling_values_per_s": ceil,
                },
                extra={
                    "procs": n_procs,
                    "calls_per_proc": n_calls,
                    "per_repeat": res[key],
                    "daemon_cpu_s_median": med(key, "daemon_cpu_s"),
                    "clients_cpu_s_median": med(key, "clients_cpu_s"),
                },
                note=f"{n_procs * n_calls * N_METRICS:,} values per repeat; point counts verified exact",
            )
        )
    peaks = [
        max(a["daemon_peak_rss_mb"], b["daemon_peak_rss_mb"]) for a, b in zip(res["multi_runs"], res["multi_shared"])
    ]
    records.append(
        c.metric(
            "daemon_rss_mb",
            "daemon RSS while ingesting (8 clients, peak VmRSS)",
            unit="MB",
            target=150,
            op="<=",
            values=peaks,
            baseline=f"idle daemon {med('multi_runs', 'daemon_idle_rss_mb'):.0f} MB",
            baseline_values={"idle_rss_mb": med("multi_runs", "daemon_idle_rss_mb")},
            extra={
                k: {
                    "peak_rss_mb": med(k, "daemon_peak_rss_mb"),
                    "vmhwm_mb": med(k, "daemon_vmhwm_mb"),
                    "anon_at_peak_mb": med(k, "daemon_peak_anon_mb"),
                    "file_at_peak_mb": med(k, "daemon_peak_file_mb"),
                }
                for k in res
            },
            note="max of the two 8-client scenarios per repeat, sampled every 10 ms",
        )
    )
    records.append(
        c.metric(
            "disk_bytes_per_point",
            "disk per scalar point (32 scalars/call run, at rest)",
            unit="B",
            target=40,
            op="<=",
            values=[x["disk_bytes_per_point_at_rest"] for x in res["single"]],
            baseline="32 B record (format.SCALAR_RECORD_SIZE)",
            baseline_values={"record_bytes": 32},
            extra={
                k: {
                    "live": med(k, "disk_bytes_per_point_live"),
                    "at_rest": med(k, "disk_bytes_per_point_at_rest"),
                    "apparent_at_rest": med(k, "disk_apparent_bytes_per_point_at_rest"),
                }
                for k in res
            },
            note="du of the run folder after the daemon closed it / points; 'live' (right after finish) in JSON",
        )
    )
    c.emit(args, records)


if __name__ == "__main__":
    main()
