"""5. ``import kohakuboard.client`` over a bare interpreter.

Per repeat: ``python -c "import kohakuboard.client"`` and ``python -c "pass"``
run ``N`` times each, interleaved, in fresh subprocesses; the figure is
median(import) - median(bare).

Two settings.  ``cached bytecode`` (the target row): what a user has after the
first import, .pyc files written (to a temporary ``PYTHONPYCACHEPREFIX``, so
nothing is written into the source tree) and ``PYTHONDONTWRITEBYTECODE`` unset.
``environment as is``: this machine sets ``PYTHONDONTWRITEBYTECODE=1`` and the
package is an editable install without ``__pycache__``, so every import
compiles kohakuboard's sources again; reported as a second row.  ``python -X importtime`` is run a few times and
the modules the import adds (not loaded by a bare interpreter) are ranked by
their median self and cumulative time into the JSON.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import _common as c


def _wall(code: str, env: dict) -> float:
    t0 = time.perf_counter()
    subprocess.run(
        [sys.executable, "-c", code], env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    return time.perf_counter() - t0


def _importtime(code: str, env: dict) -> dict[str, tuple[int, int]]:
    out = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", code], env=env, check=True, capture_output=True, text=True
    ).stderr
    mods = {}
    for line in out.splitlines():
        if not line.startswith("import time:") or "self [us]" in line:
            continue
        self_us, cum_us, name = line[len("import time:") :].split("|", 2)
        mods[name.strip()] = (int(self_us), int(cum_us), len(name) - len(name.lstrip()))
    return mods


def _measure(env: dict, n: int, repeats: int, label: str) -> tuple[list[float], list[float], list[float]]:
    diffs, imp_meds, bare_meds = [], [], []
    _wall("import kohakuboard.client", env)  # warm the page cache (and write .pyc files if allowed)
    _wall("import kohakuboard.client", env)
    for r in range(repeats):
        imp, bare = [], []
        for _ in range(n):
            imp.append(_wall("import kohakuboard.client", env))
            bare.append(_wall("pass", env))
        imp_meds.append(c.median(imp) * 1000)
        bare_meds.append(c.median(bare) * 1000)
        diffs.append(imp_meds[-1] - bare_meds[-1])
        c.log(
            f"import ({label}) repeat {r + 1}/{repeats}: import {imp_meds[-1]:.1f} ms, bare {bare_meds[-1]:.1f} ms, "
            f"difference {diffs[-1]:.1f} ms"
        )
    return diffs, imp_meds, bare_meds


def _importtime_rows(env: dict) -> tuple[list[dict], float]:
    bare_mods = set(_importtime("pass", env))
    samples = [_importtime("import kohakuboard.client", env) for _ in range(5)]
    names = [m for m in samples[0] if m not in bare_mods]
    rows = []
    for m in names:
        selfs = [s[m][0] for s in samples if m in s]
        cums = [s[m][1] for s in samples if m in s]
        rows.append(
            {"module": m, "self_us": c.median(selfs), "cumulative_us": c.median(cums), "depth": samples[0][m][2]}
        )
    return rows, sum(x["self_us"] for x in rows) / 1000


def main() -> None:
    args = c.parse_args(__doc__.splitlines()[0])
    n = 10 if args.quick else 20
    with c.IsolatedDaemon(keep=args.keep) as iso:
        raw_env = dict(os.environ)
        raw_env.pop("PYTHONPROFILEIMPORTTIME", None)
        cached_env = dict(raw_env, PYTHONPYCACHEPREFIX=os.path.join(iso.dir, "pycache"))
        cached_env.pop("PYTHONDONTWRITEBYTECODE", None)
        diffs, imp_meds, bare_meds = _measure(cached_env, n, args.repeats, "cached bytecode")
        rdiffs, rimp, rbare = _measure(raw_env, n, args.repeats, "environment as is")
        rows, total_ms = _importtime_rows(cached_env)
        raw_rows, raw_total_ms = _importtime_rows(raw_env)
    top_self = sorted(rows, key=lambda x: -x["self_us"])[:15]
    top_cum = sorted(rows, key=lambda x: -x["cumulative_us"])[:15]
    records = [
        c.metric(
            "import_client_ms",
            "import kohakuboard.client over bare python",
            unit="ms",
            target=30.0,
            op="<=",
            values=diffs,
            baseline=f"bare `python -c pass` {c.median(bare_meds):.1f} ms (with import {c.median(imp_meds):.1f} ms)",
            baseline_values={"bare_ms": c.median(bare_meds), "with_import_ms": c.median(imp_meds)},
            extra={
                "runs_per_repeat": n,
                "modules_added": len(rows),
                "importtime_self_sum_ms": total_ms,
                "importtime_top_self": top_self,
                "importtime_top_cumulative": top_cum,
            },
            note="cached bytecode; subprocess wall time, median of N runs each, interleaved",
        ),
        c.metric(
            "import_client_nocache_ms",
            "import kohakuboard.client, no bytecode cache (this env)",
            unit="ms",
            target=30.0,
            op="<=",
            values=rdiffs,
            baseline=f"bare `python -c pass` {c.median(rbare):.1f} ms (with import {c.median(rimp):.1f} ms)",
            baseline_values={"bare_ms": c.median(rbare), "with_import_ms": c.median(rimp)},
            extra={
                "importtime_self_sum_ms": raw_total_ms,
                "importtime_top_self": sorted(raw_rows, key=lambda x: -x["self_us"])[:15],
                "importtime_top_cumulative": sorted(raw_rows, key=lambda x: -x["cumulative_us"])[:15],
            },
            note="PYTHONDONTWRITEBYTECODE=1 as set on this machine: sources compiled at every import",
        ),
    ]
    c.emit(args, records)


if __name__ == "__main__":
    main()
