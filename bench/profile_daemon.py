"""Profile the daemon (py-spy) while it ingests one of the throughput scenarios.

    python bench/profile_daemon.py multi_runs      # 8 clients, 8 runs (default)
    python bench/profile_daemon.py multi_shared    # 8 clients, 1 shared run
    python bench/profile_daemon.py single          # 1 client
    python bench/profile_daemon.py client          # profile one client process instead

Writes the collapsed stacks to ``bench/results/profile-<scenario>.txt`` (feed
them to flamegraph.pl or speedscope) and prints the functions with the most
samples, self and inclusive, per thread, plus the daemon's peak RSS.
Not part of run_all.py: py-spy slows the profiled process a little.
"""

from __future__ import annotations

import collections
import multiprocessing as mp
import os
import shutil
import subprocess
import sys
import time

import _common as c
import bench_throughput as bt


def summarize(path: str, top: int = 25) -> str:
    self_s: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    threads: collections.Counter[str] = collections.Counter()
    total = 0
    with open(path) as f:
        for line in f:
            stack, _, n = line.rstrip().rpartition(" ")
            if not stack:
                continue
            n = int(n)
            frames = stack.split(";")
            total += n
            threads[frames[0]] += n
            self_s[frames[-1]] += n
            for fr in set(frames[1:]):
                incl[fr] += n
    out = [f"{total} samples"]
    out.append("by thread:")
    out += [f"  {n / total:6.1%}  {t}" for t, n in threads.most_common(10)]
    out.append("self (where the CPU is):")
    out += [f"  {n / total:6.1%}  {fr}" for fr, n in self_s.most_common(top)]
    out.append("inclusive:")
    out += [f"  {n / total:6.1%}  {fr}" for fr, n in incl.most_common(top)]
    return "\n".join(out)


def main() -> None:
    scenario = sys.argv[1] if len(sys.argv) > 1 else "multi_runs"
    spec = {
        "single": (1, False, 100_000),
        "multi_runs": (8, False, 15_000),
        "multi_shared": (8, True, 15_000),
        "client": (1, False, 100_000),
    }[scenario]
    if shutil.which("py-spy") is None:
        sys.exit("py-spy is not installed")
    n_procs, shared, n_calls = spec
    os.makedirs(c.RESULTS_DIR, exist_ok=True)
    out_path = os.path.join(c.RESULTS_DIR, f"profile-{scenario}.txt")
    ctx = mp.get_context("spawn")
    with c.IsolatedDaemon() as env:
        pid = env.start()
        run_ids = ["prof-shared"] * n_procs if shared else [f"prof-p{p}" for p in range(n_procs)]
        ranks = list(range(n_procs)) if shared else [0] * n_procs
        barrier = ctx.Barrier(n_procs + 1)
        results = ctx.Queue()
        procs = [
            ctx.Process(target=_worker, args=(p, run_ids[p], ranks[p], n_calls, env.base_dir, barrier, results))
            for p in range(n_procs)
        ]
        for p in procs:
            p.start()
        target = procs[0].pid if scenario == "client" else pid
        spy = subprocess.Popen(
            [
                "py-spy",
                "record",
                "--pid",
                str(target),
                "--rate",
                "500",
                "--threads",
                "--format",
                "raw",
                "--output",
                out_path,
                "--nonblocking",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        time.sleep(1.0)  # let py-spy attach
        with c.RssSampler(pid) as sampler:
            barrier.wait()
            out = [results.get(timeout=600) for _ in procs]
        for p in procs:
            p.join(60)
        time.sleep(0.3)
        spy.send_signal(2)  # SIGINT: py-spy writes the file and exits
        spy.wait(30)
        total = n_procs * n_calls * bt.N_METRICS
        secs = max(r["t_flushed"] for r in out) - min(r["t_first_log"] for r in out)
        print(
            f"{scenario}: {total:,} values in {secs:.2f} s = {total / secs / 1e6:.2f} M values/s "
            f"(under py-spy); daemon peak RSS {sampler.peak_mb:.0f} MB"
        )
    if os.path.exists(out_path):
        print(summarize(out_path))
        print(f"collapsed stacks: {out_path}")
    else:
        print("py-spy wrote nothing:", spy.stderr.read().decode(errors="replace") if spy.stderr else "")


def _worker(proc, run_id, rank, n_calls, base_dir, barrier, results):
    # bt.worker waits on a barrier of the workers alone; here the parent joins it too
    bt.worker(proc, run_id, rank, n_calls, base_dir, barrier, results)


if __name__ == "__main__":
    main()
