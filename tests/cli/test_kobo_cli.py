"""kobo list / show / export through click's CliRunner, on run folders written by hand per storage/format.py."""

from __future__ import annotations

import csv
import io
import json
import math
import sqlite3
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner
from kohakuvault import ColumnVault

from kohakuboard.cli.main import main as kobo
from kohakuboard.storage import format as fmt

T0 = 1_700_000_000.0


def make_run(
    base: Path,
    project: str = "proj",
    run_id: str = "run1",
    metrics: dict[Any, list[tuple[int, int, float, float]]] | None = None,
    *,
    name: str | None = None,
    status: str = fmt.STATUS_FINISHED,
    config: dict[str, Any] | None = None,
    created_at: float = T0,
    format_version: int = fmt.FORMAT_VERSION,
) -> Path:
    """Write {base}/{project}/{run_id}; ``metrics`` maps a name (rank 0) or (rank, name) to (step, gstep, wall, value)s."""
    path = base / project / run_id
    (path / fmt.METRICS_DIR).mkdir(parents=True)
    fmt.write_json_atomic(
        str(path / fmt.METADATA_JSON),
        {
            "name": name or run_id,
            "project": project,
            "run_id": run_id,
            "config": config or {},
            "status": status,
            "created_at": created_at,
            "finished_at": created_at + 60,
            "format_version": format_version,
        },
    )
    vault = ColumnVault(str(path / fmt.SCALARS_DB), block_bytes=fmt.VAULT_BLOCK_BYTES)
    for key, points in (metrics or {}).items():
        rank, metric = key if isinstance(key, tuple) else (0, key)
        rec = np.array(points, dtype=fmt.scalar_record_dtype())
        vault.ensure(fmt.column_name(rank, metric), fmt.SCALAR_COLUMN_DTYPE).append_array(
            rec.view(np.uint8).reshape(-1, fmt.SCALAR_RECORD_SIZE)
        )
    vault.close()
    db = sqlite3.connect(path / fmt.METADATA_DB)
    db.executescript(fmt.SCHEMA_SQL)
    db.execute("INSERT INTO meta(key, value) VALUES ('format_version', ?)", (str(format_version),))
    db.commit()
    db.close()
    return path


LOSS = [(0, 0, T0, 2.5), (1, 8, T0 + 0.5, math.nan), (2, 16, T0 + 1.0, math.inf), (3, 24, T0 + 1.5, 0.1)]
ACC = [(0, 0, T0, -math.inf), (5, 40, T0 + 2.0, 0.875)]
LOSS_R1 = [(0, 0, T0 + 0.1, 3.0), (1, 8, T0 + 0.6, 1e-300)]


@pytest.fixture
def runs(tmp_path: Path) -> Path:
    """Three runs in two projects; nlp/r1 has NaN/inf values and two ranks."""
    base = tmp_path / "boards"
    make_run(
        base,
        "nlp",
        "r1",
        {"train/loss": LOSS, "val,acc": ACC, (1, "train/loss"): LOSS_R1},
        name="bert-base",
        config={"lr": 0.001, "opt": "adam"},
    )
    make_run(base, "nlp", "r2", {"train/loss": LOSS[:1]}, status=fmt.STATUS_RUNNING, created_at=T0 + 100)
    make_run(base, "vision", "v1", {}, name="resnet", status=fmt.STATUS_CRASHED, created_at=T0 + 200)
    return base


def invoke(*args: str, **kw: Any):
    return CliRunner().invoke(kobo, list(args), **kw)


def test_list_shows_every_run_as_a_table(runs):
    """kobo list prints one line per run across projects: run, name, status and metric count."""
    res = invoke("list", str(runs))
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    assert lines[0].split() == ["RUN", "NAME", "STATUS", "CREATED", "METRICS"]
    body = [line.split() for line in lines[1:]]
    assert [(b[0], b[1], b[2], b[-1]) for b in body] == [
        ("nlp/r1", "bert-base", "finished", "2"),
        ("nlp/r2", "r2", "running?", "1"),  # says running, but no daemon holds it: stale
        ("vision/v1", "resnet", "crashed", "0"),
    ]


def test_list_uses_kobo_base_dir_and_reports_bad_directories(runs, tmp_path):
    """kobo list without DIR reads $KOBO_BASE_DIR; a missing directory is a clear error, an empty one says so."""
    res = invoke("list", env={"KOBO_BASE_DIR": str(runs)})
    assert res.exit_code == 0 and "nlp/r1" in res.output
    res = invoke("list", str(tmp_path / "nowhere"))
    assert res.exit_code == 1 and "nowhere is not a directory" in res.output
    (tmp_path / "empty").mkdir()
    res = invoke("list", str(tmp_path / "empty"))
    assert res.exit_code == 0 and "no runs" in res.output


def test_show_prints_metadata_config_and_each_metric(runs):
    """kobo show gives status, config and, per metric, its point count, step range, last value and ranks."""
    res = invoke("show", "r1", "--dir", str(runs))
    assert res.exit_code == 0, res.output
    out = res.output
    assert "run:      nlp/r1" in out and "name:     bert-base" in out and "status:   finished" in out
    assert "lr: 0.001" in out and 'opt: "adam"' in out
    assert "ranks:    2 (0, 1)" in out
    loss_line = next(line for line in out.splitlines() if "train/loss" in line)
    assert "4 points" in loss_line and "steps 0..3" in loss_line and "last 0.1" in loss_line
    assert "ranks 0,1" in loss_line
    acc_line = next(line for line in out.splitlines() if "val,acc" in line)
    assert "2 points" in acc_line and "steps 0..5" in acc_line and "last 0.875" in acc_line


def test_show_json_is_valid_json_even_with_nan(runs):
    """kobo show --json prints strict JSON: a NaN last value becomes null."""
    make_run(runs, "nlp", "nanrun", {"x": [(0, 0, T0, math.nan)], "y": [(0, 0, T0, -math.inf)]})
    res = invoke("show", "nlp/nanrun", "--dir", str(runs), "--json")
    assert res.exit_code == 0, res.output
    summary = json.loads(res.output, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    assert summary["metrics"]["x"]["last_value"] is None
    assert summary["metrics"]["y"]["last_value"] == "-inf"
    assert summary["run_id"] == "nanrun" and summary["num_ranks"] == 1


def test_no_option_is_taken_from_an_undocumented_environment_variable(runs, monkeypatch):
    """Only documented variables configure the CLIs: click's automatic KOBO_<COMMAND>_<OPTION> names
    (KOBO_SHOW_JSON, KOBO_DAEMON_STOP_TIMEOUT) must not change what a command does."""
    from kohakuboard.daemon.cli import main as kobo_daemon

    plain = invoke("show", "r1", "--dir", str(runs))
    res = invoke("show", "r1", "--dir", str(runs), env={"KOBO_SHOW_JSON": "1", "KOBO_SHOW_OUTPUT": "1"})
    assert res.exit_code == 0 and res.output == plain.output and res.output.startswith("run:")
    monkeypatch.setenv("KOBO_BASE_DIR", str(runs))  # the documented one still works
    assert invoke("show", "r1").output == plain.output
    # a daemon endpoint nobody listens on: stop says so; the stray variable is not parsed as --timeout
    env = {"KOBO_DAEMON_ENDPOINT": f"ipc://{runs}/none", "KOBO_DAEMON_STOP_TIMEOUT": "not-a-number"}
    res = CliRunner().invoke(kobo_daemon, ["stop"], env=env)
    assert "not-a-number" not in res.output and res.exit_code != 2, res.output


def test_show_missing_or_newer_run_is_a_clear_error(runs):
    """Unknown runs and runs from a newer format fail with exit code 1 and a message, not a traceback."""
    res = invoke("show", "ghost", "--dir", str(runs))
    assert res.exit_code == 1 and "no run 'ghost'" in res.output and "Traceback" not in res.output
    make_run(runs, "nlp", "future", format_version=fmt.FORMAT_VERSION + 1)
    res = invoke("show", "nlp/future", "--dir", str(runs))
    assert res.exit_code == 1
    assert f"format version {fmt.FORMAT_VERSION + 1}" in res.output and str(fmt.FORMAT_VERSION) in res.output


def test_show_ambiguous_run_id_lists_candidates(runs):
    """A run id that exists in two projects is refused, naming both project/run_id choices."""
    make_run(runs, "vision", "r1")
    res = invoke("show", "r1", "--dir", str(runs))
    assert res.exit_code == 1 and "nlp/r1" in res.output and "vision/r1" in res.output


def test_export_csv_has_every_point_exactly(runs):
    """CSV export has the documented columns, every point of rank 0, exact floats and nan/inf spelled out."""
    res = invoke("export", str(runs / "nlp" / "r1"), "--format", "csv")
    assert res.exit_code == 0, res.output
    assert res.output.splitlines()[0] == "metric,rank,step,global_step,wall,value"
    rows = list(csv.DictReader(io.StringIO(res.output)))
    got = [
        (r["metric"], int(r["rank"]), int(r["step"]), int(r["global_step"]), float(r["wall"]), r["value"]) for r in rows
    ]
    expected = [("train/loss", 0, *p[:3], v) for p, v in zip(LOSS, ["2.5", "nan", "inf", "0.1"])]
    expected += [("val,acc", 0, *p[:3], v) for p, v in zip(ACC, ["-inf", "0.875"])]
    assert got == expected  # "val,acc" survives CSV quoting, wall times round-trip exactly


def test_export_jsonl_is_valid_json_with_null_and_inf_strings(runs):
    """JSON lines export: one strict JSON object per point, NaN as null, infinities as "inf"/"-inf"."""
    res = invoke("export", "nlp/r1", "--dir", str(runs), "--format", "jsonl")
    assert res.exit_code == 0, res.output
    points = [json.loads(line, parse_constant=lambda c: pytest.fail(c)) for line in res.output.splitlines()]
    assert points[0] == {"metric": "train/loss", "rank": 0, "step": 0, "global_step": 0, "wall": T0, "value": 2.5}
    assert [p["value"] for p in points] == [2.5, None, "inf", 0.1, "-inf", 0.875]


def test_export_selected_metrics_and_ranks(runs):
    """--metric picks metrics (repeatable) and --rank picks one rank or all of them."""
    res = invoke("export", "r1", "--dir", str(runs), "--format", "jsonl", "--metric", "train/loss", "--rank", "all")
    assert res.exit_code == 0, res.output
    points = [json.loads(line) for line in res.output.splitlines()]
    assert [(p["rank"], p["step"]) for p in points] == [(0, 0), (0, 1), (0, 2), (0, 3), (1, 0), (1, 1)]
    assert points[-1]["value"] == 1e-300
    res = invoke("export", "r1", "--dir", str(runs), "--rank", "1")
    assert res.exit_code == 0, res.output
    assert [line.split(",")[:3] for line in res.output.splitlines()[1:]] == [
        ["train/loss", "1", "0"],
        ["train/loss", "1", "1"],
    ]
    res = invoke("export", "r1", "--dir", str(runs), "--metric", "val,acc", "--metric", "train/loss")
    assert [row["metric"] for row in csv.DictReader(io.StringIO(res.output))] == ["val,acc"] * 2 + ["train/loss"] * 4


def test_export_to_file(runs, tmp_path):
    """-o FILE writes the export there and nothing to stdout."""
    out = tmp_path / "loss.csv"
    res = invoke("export", "r2", "--dir", str(runs), "-o", str(out))
    assert res.exit_code == 0 and res.output == ""
    assert out.read_text().splitlines() == ["metric,rank,step,global_step,wall,value", f"train/loss,0,0,0,{T0!r},2.5"]


def test_export_unknown_metric_fails_before_writing(runs, tmp_path):
    """A misspelt --metric fails naming it and the likely intended metric, and leaves no partial file."""
    out = tmp_path / "out.csv"
    res = invoke("export", "r1", "--dir", str(runs), "--metric", "train/loss", "--metric", "train/los", "-o", str(out))
    assert res.exit_code == 1
    assert "train/los" in res.output and "did you mean 'train/loss'" in res.output
    assert not out.exists() or out.read_text() == ""
    res = invoke("export", "r1", "--dir", str(runs), "--metric", "val,acc", "--rank", "1")
    assert res.exit_code == 1 and "rank" in res.output


def test_export_rejects_a_bad_rank(runs):
    """--rank must be an integer or 'all'."""
    res = invoke("export", "r1", "--dir", str(runs), "--rank", "first")
    assert res.exit_code == 2 and "--rank" in res.output


def test_every_command_has_help():
    """kobo --help lists list/show/export and each command documents itself."""
    res = invoke("--help")
    assert res.exit_code == 0 and all(cmd in res.output for cmd in ("list", "show", "export"))
    for cmd in ("list", "show", "export"):
        res = invoke(cmd, "--help")
        assert res.exit_code == 0 and len(res.output.splitlines()) > 4
    assert "null" in invoke("export", "--help").output  # the NaN convention of jsonl is documented
