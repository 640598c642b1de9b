"""8 clients under load: aggregate durable throughput and each client's own ``log()`` latency.

Scenarios, each repeat of each with a freshly started daemon (``python -m kohakuboard.daemon
run`` of the interpreter under test, its own endpoint ``ipc:///tmp/kb-load-XXXX/kobo`` and
base dir, stopped with SIGTERM):

* ``1 client`` (the baseline in the same run): one process alone, one run.
* ``8 clients, 1 shared run``: 8 processes, one run, ranks 0..7 (a DDP job).
* ``8 clients, 8 runs``: 8 processes, a run each.

Every client logs ``CALLS`` calls of 32 scalars back-to-back and times each call with
``perf_counter_ns`` (the timer pair costs ~0.1 us per call), then flushes and finishes.
Clients are separate worker processes (``bench_load.py --worker``) started first; each opens
its Board and says so, and the bench then releases them together (a barrier over their
stdin), as ``bench_throughput.py`` does with a multiprocessing barrier.  Reported:

* durable values/s = all values / (earliest first ``log()`` .. latest ``flush()`` return);
* ``log()`` p99 (and p50) of each client over its own calls: the median over the clients,
  and the worst client.

Afterwards every metric of every rank is read back (by a worker of the same interpreter):
point count exact, ``m00`` equal to the logged sequence.

``--pre-ack`` runs the same scenarios, interleaved, with the pre-acknowledgement venv that
``bench_ack.py`` builds (``/tmp/kobo-baseline-venv``, commit e944063).

Writes ``bench/results/load.json`` (and, with ``--out``, the metric records as a JSON list,
like the other ``bench_*.py`` scripts).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any

import _common as c

SCRIPT = os.path.abspath(__file__)
N_METRICS = 32
SCENARIOS = [
    # key, label, processes, shared run
    ("single", "1 client alone", 1, False),
    ("shared", "8 clients, 1 shared run", 8, True),
    ("runs", "8 clients, 8 runs", 8, False),
]


# ---------------------------------------------------------------- workers


def _say(line: str) -> None:
    sys.__stdout__.write(line + "\n")
    sys.__stdout__.flush()


def w_client(p: dict[str, Any]) -> None:
    from kohakuboard.client import Board

    n, rank = p["calls"], p["rank"]
    board = Board(
        f"load-{p['run_id']}",
        {"proc": p["proc"]},
        project="load",
        run_id=p["run_id"],
        base_dir=p["base_dir"],
        rank=rank,
        capture_output=True,
    )
    vals = {f"m{j:02d}": j * 0.25 + rank for j in range(N_METRICS)}
    lat = [0] * n
    log = board.log
    pc = time.perf_counter_ns
    _say("READY")
    assert sys.stdin.readline().strip() == "GO"
    cpu0 = os.times()
    t0 = time.perf_counter()
    for i in range(n):
        vals["m00"] = float(i)
        a = pc()
        log(**vals)
        lat[i] = pc() - a
    t1 = time.perf_counter()
    board.flush()
    t2 = time.perf_counter()
    cpu1 = os.times()
    stats = board.stats()
    board.finish()
    s = sorted(lat)
    _say(
        "RESULT "
        + json.dumps(
            {
                "proc": p["proc"],
                "rank": rank,
                "path": board.path,
                "t_first_log": t0,
                "t_logged": t1,
                "t_flushed": t2,
                "cpu_s": (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system),
                "p50_us": c.percentile(s, 50) / 1000,
                "p90_us": c.percentile(s, 90) / 1000,
                "p99_us": c.percentile(s, 99) / 1000,
                "p999_us": c.percentile(s, 99.9) / 1000,
                "max_us": s[-1] / 1000,
                "mean_us": sum(s) / n / 1000,
                "over_1ms": sum(1 for x in lat if x > 1_000_000),
                "peak_queue": stats["peak_queue"],
            }
        )
    )


def w_verify(p: dict[str, Any]) -> None:
    import numpy as np

    n = p["calls"]
    expected = np.arange(n, dtype=np.float64)
    for path, rank in p["series"]:
        for j in range(N_METRICS):
            s = c.read_series(path, f"m{j:02d}", rank)
            assert len(s) == n, f"{path} rank {rank} m{j:02d}: {len(s)} points read back, {n} logged"
            if j == 0:
                assert np.array_equal(s["value"], expected), f"{path} rank {rank}: m00 differs from the logged sequence"
                assert (np.diff(s["step"]) == 1).all(), f"{path} rank {rank}: steps not consecutive"
            else:
                assert (s["value"] == j * 0.25 + rank).all(), f"{path} rank {rank} m{j:02d}: values differ"
    _say("RESULT " + json.dumps({"checked_series": len(p["series"]) * N_METRICS}))


def worker_main(argv: list[str]) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--worker", required=True, choices=("client", "verify"))
    p.add_argument("--params", required=True)
    a = p.parse_args(argv)
    (w_client if a.worker == "client" else w_verify)(json.loads(a.params))


# ----------------------------------------------------------------- driver


def run_scenario(
    python: str, n_procs: int, shared: bool, n_calls: int, tag: str, pycache: str, keep: bool
) -> dict[str, Any]:
    from bench_ack import Workspace

    with Workspace(python, pycache, keep, prefix="kb-load-") as ws:
        ws.start_daemon()
        procs = []
        for proc in range(n_procs):
            params = {
                "proc": proc,
                "rank": proc if shared else 0,
                "calls": n_calls,
                "base_dir": ws.base_dir,
                "run_id": f"{tag}-shared" if shared else f"{tag}-p{proc}",
            }
            procs.append(
                subprocess.Popen(
                    [python, SCRIPT, "--worker", "client", "--params", json.dumps(params)],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    env=ws.env,
                    cwd=ws.dir,
                    text=True,
                )
            )
        try:
            for p in procs:  # barrier: every Board open
                line = p.stdout.readline().strip()
                if line != "READY":
                    raise RuntimeError(f"client did not open its board (said {line!r})")
            for p in procs:
                p.stdin.write("GO\n")
                p.stdin.flush()
            out = []
            for p in procs:
                for line in p.stdout:
                    if line.startswith("RESULT "):
                        out.append(json.loads(line[7:]))
                if p.wait(600) != 0:
                    raise RuntimeError(f"client exited {p.returncode}")
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
        assert len(out) == n_procs, f"{len(out)} results from {n_procs} clients"
        series = sorted({(r["path"], r["rank"]) for r in out})
        ws.run_worker("verify", {"calls": n_calls, "series": series}, script=SCRIPT)
        ws.stop()
    start = min(r["t_first_log"] for r in out)
    logged = max(r["t_logged"] for r in out)
    end = max(r["t_flushed"] for r in out)
    total = n_procs * n_calls * N_METRICS
    p99s = [r["p99_us"] for r in out]
    return {
        "values": total,
        "seconds": end - start,
        "values_per_s": total / (end - start),
        "enqueue_values_per_s": total / (logged - start),
        "flush_wait_s": end - logged,
        "p50_us": c.median(r["p50_us"] for r in out),
        "p99_us": c.median(p99s),
        "p99_max_us": max(p99s),
        "p999_max_us": max(r["p999_us"] for r in out),
        "max_us": max(r["max_us"] for r in out),
        "over_1ms": sum(r["over_1ms"] for r in out),
        "peak_queue": max(r["peak_queue"] for r in out),
        "clients_cpu_s": sum(r["cpu_s"] for r in out),
        "clients": out,
    }


def fmt(v: float | None, unit: str) -> str:
    if v is None or v != v:
        return "n/a"
    if unit == "values/s":
        return f"{v / 1e6:.2f} M/s"
    return f"{v:.2f} us" if v < 100 else f"{v:.0f} us" if v < 1000 else f"{v / 1000:.1f} ms"


def spread(values: list[float], unit: str) -> str:
    if len(values) == 1:
        return fmt(values[0], unit)
    return f"{fmt(c.median(values), unit)} [{fmt(min(values), unit)} .. {fmt(max(values), unit)}]"


def report(res: dict[str, dict[str, list[dict]]], n_calls: int, repeats: int) -> str:
    lines = [
        "| scenario | interpreter | durable values/s | log() p50 (median client) | log() p99 (median client) "
        "| log() p99 (worst client) | calls > 1 ms (all clients) |",
        "|---|---|---|---|---|---|---|",
    ]
    for who, by in res.items():
        for key, label, _n, _shared in SCENARIOS:
            xs = by[key]
            if not xs:
                continue
            lines.append(
                f"| {label} | {who} | {spread([x['values_per_s'] for x in xs], 'values/s')} "
                f"| {spread([x['p50_us'] for x in xs], 'us')} | {spread([x['p99_us'] for x in xs], 'us')} "
                f"| {spread([x['p99_max_us'] for x in xs], 'us')} | {c.median(x['over_1ms'] for x in xs):,.0f} |"
            )
    lines.append("")
    lines.append(
        f"Medians of {repeats} repeats, [min .. max]; {n_calls:,} calls x {N_METRICS} scalars per client, "
        "back-to-back; every point read back and checked."
    )
    return "\n".join(lines)


def records(res: dict[str, dict[str, list[dict]]]) -> list[dict[str, Any]]:
    cur = res["current"]
    single_p99 = c.median(x["p99_us"] for x in cur["single"])
    single_vps = c.median(x["values_per_s"] for x in cur["single"])
    out = []
    for key, label, n_procs, _shared in SCENARIOS[1:]:
        xs = cur[key]
        extra = {
            "per_repeat": [{k: v for k, v in x.items() if k != "clients"} for x in xs],
            "pre_ack": {k: c.median(x[k] for x in res["pre-ack"][key]) for k in ("values_per_s", "p99_us")}
            if "pre-ack" in res
            else None,
        }
        out.append(
            c.metric(
                f"load_{key}_values_per_s",
                f"durable throughput under load, {label}",
                unit="values/s",
                target=1_000_000,
                op=">=",
                values=[x["values_per_s"] for x in xs],
                baseline=f"1 client alone {single_vps / 1e6:.2f} M/s",
                baseline_values={"single_values_per_s": single_vps},
                extra=extra,
            )
        )
        out.append(
            c.metric(
                f"load_{key}_p99_us",
                f"log() 32 scalars p99 per client (median of 8), {label}",
                unit="us",
                target=None,
                op="<=",
                values=[x["p99_us"] for x in xs],
                baseline=f"1 client alone {single_p99:.2f} us",
                baseline_values={"single_p99_us": single_p99},
                extra={"worst_client_p99_us": [x["p99_max_us"] for x in xs], "p50_us": [x["p50_us"] for x in xs]},
            )
        )
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="2,500 calls per client, 3 repeats")
    p.add_argument("--repeats", type=int, default=None, help="repeats (default 5, --quick 3)")
    p.add_argument("--calls", type=int, default=None, help="calls per client (default 15,000, --quick 2,500)")
    p.add_argument(
        "--pre-ack",
        action="store_true",
        help="also run every scenario, interleaved, with the pre-acknowledgement venv of bench_ack.py",
    )
    p.add_argument("--out", default=None, help="also write the metric records (JSON list) here")
    p.add_argument("--json", default=os.path.join(c.RESULTS_DIR, "load.json"), help="where to write the results")
    p.add_argument("--keep", action="store_true", help="keep the temp dirs (runs, daemon logs) for inspection")
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
    n_calls = args.calls or (2_500 if args.quick else 15_000)
    from bench_ack import ensure_baseline_venv, warm_up
    from run_all import machine_info, wait_idle

    pythons = {"current": sys.executable}
    if args.pre_ack:
        pythons["pre-ack"] = ensure_baseline_venv()
    if args.wait_idle:
        wait_idle(args.wait_idle)
    started = time.time()
    load_start = c.load_average()
    pycache = tempfile.mkdtemp(prefix="kb-load-pyc-", dir="/tmp")
    res: dict[str, dict[str, list[dict]]] = {who: {k: [] for k, *_ in SCENARIOS} for who in pythons}
    loads: list[float] = []
    try:
        for py in pythons.values():
            warm_up(py, pycache)
        for r in range(args.repeats):
            order = list(pythons) if r % 2 == 0 else list(reversed(pythons))
            for key, label, n_procs, shared in SCENARIOS:
                for who in order:
                    loads.append(os.getloadavg()[0])
                    x = run_scenario(pythons[who], n_procs, shared, n_calls, f"{key}{r}", pycache, args.keep)
                    res[who][key].append(x)
                    c.log(
                        f"load {label} ({who}) repeat {r + 1}/{args.repeats}: {x['values_per_s'] / 1e6:.2f} M values/s "
                        f"durable ({x['seconds']:.2f} s; enqueue {x['enqueue_values_per_s'] / 1e6:.2f} M/s), log() "
                        f"p50 {x['p50_us']:.1f} us, p99 median client {x['p99_us']:.1f} us, worst {x['p99_max_us']:.1f} us, "
                        f"{x['over_1ms']} calls > 1 ms, peak queue {x['peak_queue']}"
                    )
    finally:
        shutil.rmtree(pycache, ignore_errors=True)

    text = report(res, n_calls, args.repeats)
    print()
    print(text)
    print()
    recs = records(res)
    result = {
        "generated_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python", *sys.argv]),
        "repeats": args.repeats,
        "calls_per_client": n_calls,
        "pythons": pythons,
        "machine": machine_info(),
        "loadavg_at_start": load_start,
        "loadavg_before_each_scenario": loads,
        "loadavg_at_end": os.getloadavg(),
        "total_s": round(time.time() - started, 1),
        "table_markdown": text,
        "results": res,
        "metrics": recs,
    }
    c.write_results(args.json, result, args.out, recs)


if __name__ == "__main__":
    if "--worker" in sys.argv:
        worker_main(sys.argv[1:])
    else:
        main()
