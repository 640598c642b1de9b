"""Run every KohakuBoard benchmark and report against PRODUCT.md section 9.

    python bench/run_all.py            # full run (~6-8 minutes on the 2-core machine)
    python bench/run_all.py --quick    # about a minute: smaller sizes, 3 repeats
    python bench/run_all.py --only log_latency,read --repeats 3

Each benchmark module runs in its own interpreter with its own daemon endpoint
(``ipc:///tmp/kb-XXXX/kobo``) and base dir in a temp dir, and stops that daemon
at the end.  Prints a markdown table and writes every figure, per repeat, to
``bench/results/latest.json`` (``--json PATH`` to write elsewhere).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import _common as c  # noqa: E402

BENCHES = [
    ("log_latency", "bench_log_latency.py"),
    ("throughput", "bench_throughput.py"),
    ("flush_finish", "bench_flush_finish.py"),
    ("import", "bench_import.py"),
    ("read", "bench_read.py"),
    ("ack", "bench_ack.py"),
    ("load", "bench_load.py"),
    ("viewer", "bench_viewer.py"),
    ("serve", "bench_serve.py"),
]


def fmt_value(v: float | None, unit: str) -> str:
    if v is None or v != v:
        return "n/a"
    if unit == "values/s":
        return f"{v / 1e6:.2f} M values/s"
    if unit == "us":
        return f"{v:.2f} us"
    if unit == "ms":
        return f"{v:.3f} ms" if v < 1 else f"{v:.1f} ms" if v >= 100 else f"{v:.2f} ms"
    if unit == "s":
        return f"{v:.2f} s"
    if unit == "MB":
        return f"{v:.0f} MB"
    if unit == "B":
        return f"{v:,.0f} B" if v >= 10_000 else f"{v:.1f} B"
    if unit == "x":
        return f"{v:.1f}x"
    return f"{v:g} {unit}"


def fmt_target(rec: dict) -> str:
    if rec["target"] is None:
        return "-"
    return f"{rec['op']} {fmt_value(rec['target'], rec['unit'])}"


def missed_line(records: list[dict]) -> str:
    """``N target(s) missed: name; name`` for the records whose target was not met."""
    missed = [r for r in records if r["pass"] is False]
    return f"{len(missed)} target(s) missed" + (": " + "; ".join(r["metric"] for r in missed) if missed else "")


def print_report(records: list[dict]) -> str:
    """Print a benchmark's table and its missed-targets line; return the table."""
    text = table(records)
    print()
    print(text)
    print()
    print(missed_line(records))
    return text


def table(records: list[dict]) -> str:
    lines = [
        "| metric | target | measured (median of N repeats) | baseline in the same run | status |",
        "|---|---|---|---|---|",
    ]
    for r in records:
        status = "-" if r["pass"] is None else ("ok" if r["pass"] else "**MISSED**")
        spread = ""
        if r["n"] > 1:
            spread = f" [{fmt_value(r['min'], r['unit'])} .. {fmt_value(r['max'], r['unit'])}]"
        lines.append(
            f"| {r['metric']} | {fmt_target(r)} | {fmt_value(r['median'], r['unit'])} (N={r['n']}){spread} "
            f"| {r['baseline']} | {status} |"
        )
    return "\n".join(lines)


def machine_info() -> dict:
    info = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "loadavg_at_start": os.getloadavg(),
    }
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        info["git_commit"] = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=os.path.dirname(HERE), capture_output=True, text=True
        ).stdout.strip()
        info["git_dirty"] = bool(
            subprocess.run(
                ["git", "status", "--porcelain"], cwd=os.path.dirname(HERE), capture_output=True, text=True
            ).stdout.strip()
        )
    except OSError:
        pass
    for mod in ("zmq", "msgpack", "numpy", "kohakuvault"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:
            pass
    info["PYTHONDONTWRITEBYTECODE"] = os.environ.get("PYTHONDONTWRITEBYTECODE")
    return info


def wait_idle(limit: float, threshold: float = 0.7) -> None:
    deadline = time.monotonic() + limit
    if os.getloadavg()[0] >= threshold:
        c.log(f"waiting up to {limit:.0f} s for load average < {threshold} (now {os.getloadavg()[0]:.2f})")
    while os.getloadavg()[0] >= threshold and time.monotonic() < deadline:
        time.sleep(2)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="~1 minute: smaller sizes, 3 repeats")
    p.add_argument("--repeats", type=int, default=None, help="repeats per benchmark (default 5, --quick 3)")
    p.add_argument("--only", default="", help="comma-separated subset of: " + ", ".join(k for k, _ in BENCHES))
    p.add_argument("--json", default=os.path.join(c.RESULTS_DIR, "latest.json"), help="where to write the JSON")
    p.add_argument("--keep", action="store_true", help="keep each benchmark's temp dir (runs, daemon log)")
    p.add_argument(
        "--wait-idle",
        type=float,
        default=0,
        metavar="SECONDS",
        help="before each benchmark, wait up to SECONDS for the 1-min load average to fall below 0.7 "
        "(other processes on a 2-core machine skew every figure)",
    )
    args = p.parse_args()
    only = {x.strip() for x in args.only.split(",") if x.strip()}
    unknown = only - {k for k, _ in BENCHES}
    if unknown:
        p.error(f"unknown benchmark(s): {', '.join(sorted(unknown))}")

    started = time.time()
    records: list[dict] = []
    durations: dict[str, float] = {}
    failures: dict[str, str] = {}
    load: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="kb-results-") as tmp:
        for key, script in BENCHES:
            if only and key not in only:
                continue
            out = os.path.join(tmp, key + ".json")
            cmd = [sys.executable, os.path.join(HERE, script), "--out", out]
            if args.quick:
                cmd.append("--quick")
            if args.repeats:
                cmd += ["--repeats", str(args.repeats)]
            if args.keep:
                cmd.append("--keep")
            if args.wait_idle:
                wait_idle(args.wait_idle)
            load[key] = c.load_average(before=key)[0]
            c.log(f"== {key}: {' '.join(cmd[1:])}")
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, cwd=HERE)
            durations[key] = round(time.perf_counter() - t0, 1)
            if proc.returncode != 0 or not os.path.exists(out):
                failures[key] = f"exit code {proc.returncode}"
                c.log(f"!! {key} FAILED ({failures[key]})")
                continue
            with open(out) as f:
                for rec in json.load(f):
                    rec["bench"] = key
                    records.append(rec)
            c.log(f"== {key} done in {durations[key]:.0f} s")

    text = table(records)
    print()
    print(text)
    print()
    if failures:
        print("FAILED benchmarks: " + ", ".join(f"{k} ({v})" for k, v in failures.items()))
    print(missed_line(records))
    print(f"total {time.time() - started:.0f} s")

    result = {
        "generated_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python", *sys.argv]),
        "mode": "quick" if args.quick else "full",
        "machine": machine_info(),
        "durations_s": durations,
        "loadavg_1min_before": load,
        "loadavg_at_end": os.getloadavg(),
        "total_s": round(time.time() - started, 1),
        "failures": failures,
        "missed": [r["key"] for r in records if r["pass"] is False],
        "table_markdown": text,
        "metrics": records,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.json}")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
