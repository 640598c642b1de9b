"""1. ``log()`` latency of 4 scalars per call, in the training process.

Each repeat: a fresh Board (capture_output=True, as a training script has it),
a warm-up of ``WARMUP`` calls and a flush, then ``N`` calls each timed with
``time.perf_counter_ns()`` around the call alone; p50/p99 over the N calls.
The sender thread runs concurrently (it competes for the GIL, as in real use),
and the queue never reaches the 80 % back-pressure mark (checked).

Baselines, timed the same way in the same process right after each repeat:
an empty Python function taking the same ``**kwargs``, and
``collections.deque.append`` of a 4-tuple (the minimum a queued log can cost).
"""

from __future__ import annotations

import collections
import gc
import time

import _common as c


def _timed_log(board, n: int) -> list[int]:
    out = [0] * n
    pc = time.perf_counter_ns
    log = board.log
    for i in range(n):
        x = i * 0.5
        t0 = pc()
        log(loss=x, lr=0.001, acc=x, grad_norm=1.5)
        out[i] = pc() - t0
    return out


def _timed_empty_call(n: int) -> list[int]:
    def f(auto_step=True, **values):
        pass

    out = [0] * n
    pc = time.perf_counter_ns
    for i in range(n):
        x = i * 0.5
        t0 = pc()
        f(loss=x, lr=0.001, acc=x, grad_norm=1.5)
        out[i] = pc() - t0
    return out


def _timed_deque_append(n: int) -> list[int]:
    dq: collections.deque = collections.deque()
    append = dq.append
    out = [0] * n
    pc = time.perf_counter_ns
    for i in range(n):
        x = i * 0.5
        t0 = pc()
        append((x, 0.001, x, 1.5))
        out[i] = pc() - t0
    return out


def _timed_nothing(n: int) -> list[int]:
    out = [0] * n
    pc = time.perf_counter_ns
    for i in range(n):
        t0 = pc()
        out[i] = pc() - t0
    return out


def _pcts(ns: list[int]) -> dict[str, float]:
    s = sorted(ns)
    return {
        "p50": c.percentile(s, 50) / 1000,
        "p90": c.percentile(s, 90) / 1000,
        "p99": c.percentile(s, 99) / 1000,
        "p999": c.percentile(s, 99.9) / 1000,
        "max": s[-1] / 1000,
        "mean": sum(s) / len(s) / 1000,
    }


def main() -> None:
    args = c.parse_args(__doc__.splitlines()[0])
    n = 50_000 if args.quick else 200_000
    warmup = 10_000
    from kohakuboard.client import Board

    runs: list[dict] = []
    base: dict[str, list[dict]] = {"empty_call": [], "deque_append": [], "timer_only": []}
    with c.IsolatedDaemon(keep=args.keep) as env:
        env.start()
        for r in range(args.repeats):
            board = Board(
                "latency",
                {"bench": "log_latency"},
                project="bench",
                run_id=f"lat{r}",
                base_dir=env.base_dir,
                capture_output=True,
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
            res = _pcts(lat)
            res.update(flush_after_s=drain, peak_queue=stats["peak_queue"], max_queue=stats["max_queue"])
            runs.append(res)
            # Verify nothing was lost (warm-up + measured calls).
            s = c.read_series(board.path, "loss")
            assert len(s) == warmup + n, f"expected {warmup + n} points, read {len(s)}"
            base["empty_call"].append(_pcts(_timed_empty_call(n)))
            base["deque_append"].append(_pcts(_timed_deque_append(n)))
            base["timer_only"].append(_pcts(_timed_nothing(n)))
            c.log(
                f"log latency repeat {r + 1}/{args.repeats}: p50 {res['p50']:.2f} us, p99 {res['p99']:.2f} us, "
                f"p99.9 {res['p999']:.1f} us, max {res['max']:.0f} us, drain {drain * 1000:.0f} ms"
            )

    def bmed(kind: str, p: str) -> float:
        return c.median(x[p] for x in base[kind])

    def btext(p: str) -> str:
        return (
            f"empty f(**4 kwargs) {bmed('empty_call', p):.2f} us; deque.append(tuple) "
            f"{bmed('deque_append', p):.2f} us; timer alone {bmed('timer_only', p):.2f} us"
        )

    common = {"calls_per_repeat": n, "warmup": warmup, "per_repeat": runs, "baseline_per_repeat": base}
    records = [
        c.metric(
            "log_p50_us",
            "log() 4 scalars: p50",
            unit="us",
            target=5.0,
            op="<=",
            values=[x["p50"] for x in runs],
            baseline=btext("p50"),
            baseline_values={k: bmed(k, "p50") for k in base},
            extra=common,
            note=f"{n:,} timed calls after {warmup:,} warm-up calls; timer overhead included in all",
        ),
        c.metric(
            "log_p99_us",
            "log() 4 scalars: p99",
            unit="us",
            target=25.0,
            op="<=",
            values=[x["p99"] for x in runs],
            baseline=btext("p99"),
            baseline_values={k: bmed(k, "p99") for k in base},
            extra={
                "p999_us_median": c.median(x["p999"] for x in runs),
                "max_us_median": c.median(x["max"] for x in runs),
            },
        ),
    ]
    c.emit(args, records)


if __name__ == "__main__":
    main()
