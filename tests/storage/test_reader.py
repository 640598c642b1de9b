"""RunReader, list_runs and find_run on run folders written by hand exactly as storage/format.py says.

No writer and no daemon: the files are made here with kohakuvault, sqlite3 and json, so
these tests pin the on-disk format the reader understands.
"""

from __future__ import annotations

import math
import sqlite3
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from kohakuvault import ColumnVault

from kohakuboard.protocol.errors import FormatVersionError, KoboError, RunNotFound
from kohakuboard.storage import format as fmt
from kohakuboard.storage.reader import RunInfo, RunReader, find_run, list_runs

REC = fmt.scalar_record_dtype()
T0 = 1_700_000_000.0


def records(points: list[Any]) -> np.ndarray:
    """Points as SCALAR_RECORDs: a bare value gets step i, global_step 10*i and wall T0+i."""
    rows = [p if isinstance(p, tuple) else (i, 10 * i, T0 + i, p) for i, p in enumerate(points)]
    return np.array(rows, dtype=REC)


def append(vault: ColumnVault, rank: int, name: str, points: list[Any]) -> None:
    col = vault.ensure(fmt.column_name(rank, name), fmt.SCALAR_COLUMN_DTYPE)
    rec = records(points)
    if len(rec):
        col.append_array(rec.view(np.uint8).reshape(-1, fmt.SCALAR_RECORD_SIZE))


def make_run(
    base: Path,
    project: str = "proj",
    run_id: str = "run1",
    metrics: dict[Any, list[Any]] | None = None,
    *,
    name: str | None = None,
    status: str = fmt.STATUS_FINISHED,
    config: dict[str, Any] | None = None,
    created_at: float = T0,
    format_version: int = fmt.FORMAT_VERSION,
    db_version: int | None = None,
    events: list[tuple[float, str, str]] = (),  # type: ignore[assignment]
    with_db: bool = True,
) -> Path:
    """Write {base}/{project}/{run_id} per format.py; ``metrics`` keys are a name (rank 0) or (rank, name)."""
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
            "finished_at": created_at + 60 if status != fmt.STATUS_RUNNING else None,
            "format_version": format_version,
        },
    )
    if metrics:
        vault = ColumnVault(str(path / fmt.SCALARS_DB), block_bytes=fmt.VAULT_BLOCK_BYTES)
        for key, points in metrics.items():
            rank, metric = key if isinstance(key, tuple) else (0, key)
            append(vault, rank, metric, points)
        vault.close()
    if with_db:
        db = sqlite3.connect(path / fmt.METADATA_DB)
        db.executescript(fmt.SCHEMA_SQL)
        db.execute("INSERT INTO meta(key, value) VALUES ('format_version', ?)", (str(db_version or format_version),))
        db.executemany("INSERT INTO events(wall, kind, detail) VALUES (?,?,?)", list(events))
        db.commit()
        db.close()
    return path


SPECIAL = [0.5, math.nan, math.inf, -math.inf, 5e-324, -0.0, 1.7976931348623157e308, 0.1]


def test_series_reads_back_every_field_exactly_including_nan_and_inf(tmp_path):
    """Every point comes back bit-for-bit: step, global_step, wall and value, NaN and +-inf included."""
    points = [(i + 3, 10 * i - 1, T0 + i / 4, v) for i, v in enumerate(SPECIAL)]
    path = make_run(tmp_path, metrics={"train/loss": points})
    with RunReader(path) as r:
        s = r.series("train/loss")
    expected = records(points)
    assert s.dtype.names == ("step", "global_step", "wall", "value")
    assert s.tobytes() == expected.tobytes()  # bit-exact, so -0.0 and NaN payloads too
    assert s["step"].tolist() == [3, 4, 5, 6, 7, 8, 9, 10]
    assert math.isnan(s["value"][1]) and s["value"][2] == math.inf and s["value"][3] == -math.inf


def test_series_is_a_read_only_array(tmp_path):
    """The returned series cannot be modified by accident (it is a view of the read buffer, not a copy)."""
    path = make_run(tmp_path, metrics={"loss": [1.0, 2.0]})
    with RunReader(path) as r:
        s = r.series("loss")
    assert s["value"].tolist() == [1.0, 2.0]  # still valid after the reader is closed
    with pytest.raises(ValueError):
        s["value"][0] = 3.0


def test_metric_names_ranks_and_point_counts(tmp_path):
    """Metrics logged by several ranks are listed per rank, and each rank's series is its own."""
    path = make_run(
        tmp_path,
        metrics={"loss": [1.0, 0.5], (1, "loss"): [2.0, 1.5, 1.0], (1, "grad_norm"): [9.0], "lr": [0.1]},
    )
    with RunReader(path) as r:
        assert r.list_metrics() == ["loss", "lr"]
        assert r.list_metrics(rank=1) == ["grad_norm", "loss"]
        assert r.list_metrics(rank=None) == ["grad_norm", "loss", "lr"]
        assert r.list_metrics(rank=7) == []
        assert r.ranks() == [0, 1]
        assert r.ranks("loss") == [0, 1]
        assert r.ranks("grad_norm") == [1]
        assert r.num_points("loss") == 2 and r.num_points("loss", rank=1) == 3
        assert r.num_points("grad_norm") == 0
        by_rank = r.series_by_rank("loss")
        assert {k: v["value"].tolist() for k, v in by_rank.items()} == {0: [1.0, 0.5], 1: [2.0, 1.5, 1.0]}
        assert r.series("grad_norm", rank=1)["value"].tolist() == [9.0]


def test_missing_metric_error_names_it_and_suggests_close_names(tmp_path):
    """Asking for a misspelt metric raises KeyError naming it and the metric the user probably meant."""
    path = make_run(tmp_path, metrics={"train/loss": [1.0], (2, "val/acc"): [0.5]})
    with RunReader(path) as r:
        with pytest.raises(KeyError) as exc:
            r.series("train/los")
        assert "train/los" in str(exc.value) and "train/loss" in str(exc.value)
        with pytest.raises(KeyError, match="rank"):
            r.series("val/acc")  # exists, but only on rank 2: the error says which ranks have it
        with pytest.raises(KeyError, match="nothing"):
            r.series_by_rank("nothing")


def test_metadata_properties(tmp_path):
    """name, run_id, project, status and config come from metadata.json."""
    path = make_run(
        tmp_path, "vision", "r42", name="resnet", status=fmt.STATUS_CRASHED, config={"lr": 0.1, "layers": [1, 2]}
    )
    with RunReader(path) as r:
        assert (r.name, r.run_id, r.project, r.status) == ("resnet", "r42", "vision", "crashed")
        assert r.config == {"lr": 0.1, "layers": [1, 2]}
        assert r.metadata["format_version"] == fmt.FORMAT_VERSION
        assert r.path == str(path.resolve())


def test_summary_has_counts_step_range_last_value_and_ranks(tmp_path):
    """summary() tells, per metric, how many points, which steps and the last value, and how many ranks logged."""
    path = make_run(
        tmp_path,
        metrics={"loss": [(5, 50, T0, 3.0), (9, 90, T0, 2.0), (7, 70, T0, math.nan)], (3, "loss"): [1.0], "empty": []},
        config={"lr": 0.1},
    )
    with RunReader(path) as r:
        summ = r.summary()
    assert summ["metadata"]["run_id"] == "run1" and summ["config"] == {"lr": 0.1}
    assert summ["num_ranks"] == 2 and summ["ranks"] == [0, 3]
    loss = summ["metrics"]["loss"]
    assert (loss["points"], loss["first_step"], loss["last_step"], loss["ranks"]) == (3, 5, 9, [0, 3])
    assert math.isnan(loss["last_value"])  # the last logged point, not the largest step
    assert summ["metrics"]["empty"]["points"] == 0


def test_events_are_returned_in_order(tmp_path):
    """The run's events table is readable, oldest first."""
    path = make_run(
        tmp_path, events=[(T0, "opened", "client a"), (T0 + 1, "client_finished", "a"), (T0 + 2, "finished", "")]
    )
    with RunReader(path) as r:
        events = r.events()
    assert [(e["kind"], e["detail"], e["wall"]) for e in events] == [
        ("opened", "client a", T0),
        ("client_finished", "a", T0 + 1),
        ("finished", "", T0 + 2),
    ]


def test_run_with_no_data_files_yet_has_no_metrics(tmp_path):
    """A run the daemon has only just created (metadata.json, no scalars.db or metadata.db) reads as empty."""
    path = make_run(tmp_path, status=fmt.STATUS_RUNNING, with_db=False)
    with RunReader(path) as r:
        assert r.list_metrics(rank=None) == [] and r.ranks() == []
        assert r.num_points("loss") == 0
        assert r.events() == []
        assert r.summary()["metrics"] == {}
        with pytest.raises(KeyError, match="loss"):
            r.series("loss")


def test_reader_sees_points_appended_while_it_is_open(tmp_path):
    """An open reader sees points and metrics a writer appends later (the daemon keeps writing a live run)."""
    path = make_run(tmp_path, status=fmt.STATUS_RUNNING, metrics={"loss": [1.0]})
    writer = ColumnVault(str(path / fmt.SCALARS_DB), block_bytes=fmt.VAULT_BLOCK_BYTES)
    try:
        with RunReader(path) as r:
            assert r.series("loss")["value"].tolist() == [1.0]
            append(writer, 0, "loss", [(1, 10, T0 + 1, 0.5), (2, 20, T0 + 2, 0.25)])
            append(writer, 0, "acc", [0.9])
            assert r.series("loss")["value"].tolist() == [1.0, 0.5, 0.25]
            assert r.num_points("loss") == 3
            assert r.list_metrics() == ["acc", "loss"]
            assert r.series("acc")["value"].tolist() == [0.9]
    finally:
        writer.close()


def test_million_point_series_reads_back_whole(tmp_path):
    """A 1,000,000-point series comes back complete and in order (one read, no per-point work)."""
    n = 1_000_000
    rec = np.zeros(n, dtype=REC)
    rec["step"] = np.arange(n)
    rec["global_step"] = np.arange(n) * 4
    rec["wall"] = T0 + np.arange(n) / 1000
    rec["value"] = np.sin(np.arange(n))
    path = make_run(tmp_path)
    vault = ColumnVault(str(path / fmt.SCALARS_DB), block_bytes=fmt.VAULT_BLOCK_BYTES)
    vault.ensure(fmt.column_name(0, "loss"), fmt.SCALAR_COLUMN_DTYPE).append_array(rec.view(np.uint8).reshape(-1, 32))
    vault.close()
    with RunReader(path) as r:
        s = r.series("loss")
        assert r.num_points("loss") == n
    assert s.shape == (n,)
    assert np.array_equal(s, rec)


def test_newer_format_version_is_refused_with_both_versions_named(tmp_path):
    """A run written by a newer KohakuBoard is refused with an error saying which versions are involved."""
    newer = fmt.FORMAT_VERSION + 1
    path = make_run(tmp_path, format_version=newer, metrics={"loss": [1.0]})
    with pytest.raises(FormatVersionError) as exc:
        RunReader(path)
    assert str(newer) in str(exc.value) and str(fmt.FORMAT_VERSION) in str(exc.value)


def test_newer_version_in_metadata_db_is_refused_too(tmp_path):
    """The meta table's format_version is checked as well, so a newer metadata.db is never misread."""
    path = make_run(tmp_path, run_id="mixed", db_version=fmt.FORMAT_VERSION + 1)
    with RunReader(path) as r:
        with pytest.raises(FormatVersionError, match=str(fmt.FORMAT_VERSION + 1)):
            r.events()


def test_missing_run_is_run_not_found(tmp_path):
    """A folder without metadata.json raises RunNotFound (a KoboError and a FileNotFoundError)."""
    (tmp_path / "empty").mkdir()
    for where in (tmp_path / "empty", tmp_path / "does-not-exist"):
        with pytest.raises(RunNotFound, match="metadata.json") as exc:
            RunReader(where)
        assert isinstance(exc.value, KoboError) and isinstance(exc.value, FileNotFoundError)


def test_corrupt_metadata_json_is_a_kobo_error(tmp_path):
    """A truncated metadata.json is a KoboError naming the file, not a raw JSON traceback."""
    path = make_run(tmp_path)
    (path / fmt.METADATA_JSON).write_text('{"name": "x", ')
    with pytest.raises(KoboError, match="metadata.json"):
        RunReader(path)


def test_folder_names_with_uri_characters_are_read(tmp_path):
    """A run under a directory whose name contains ?, # or % is read, metadata.db included."""
    base = tmp_path / "odd ?#%20 dir"
    path = make_run(base, metrics={"loss": [1.0]}, events=[(T0, "opened", "x")])
    with RunReader(path) as r:
        assert r.series("loss")["value"].tolist() == [1.0]
        assert [e["kind"] for e in r.events()] == ["opened"]


def test_list_runs_across_projects_skipping_broken_folders(tmp_path):
    """list_runs finds every run of every project, oldest first, and skips folders it cannot read."""
    make_run(tmp_path, "nlp", "b", created_at=T0 + 20, status=fmt.STATUS_RUNNING)
    make_run(tmp_path, "vision", "a", name="resnet", created_at=T0 + 10)
    make_run(tmp_path, "nlp", "c", created_at=T0 + 30, status=fmt.STATUS_CRASHED)
    (tmp_path / "nlp" / "not-a-run").mkdir()
    (tmp_path / "nlp" / "half-copied").mkdir()
    (tmp_path / "nlp" / "half-copied" / fmt.METADATA_JSON).write_text("{")
    (tmp_path / "vision" / "list").mkdir()
    (tmp_path / "vision" / "list" / fmt.METADATA_JSON).write_text("[1, 2]")
    (tmp_path / "stray-file.txt").write_text("x")
    runs = list_runs(tmp_path)
    assert [(r.project, r.run_id, r.name, r.status) for r in runs] == [
        # "b" says running but no daemon holds it open: reported stale
        ("vision", "a", "resnet", "finished"),
        ("nlp", "b", "b", "running?"),
        ("nlp", "c", "c", "crashed"),
    ]
    assert runs[0] == RunInfo(
        path=str(tmp_path / "vision" / "a"),
        project="vision",
        run_id="a",
        name="resnet",
        status="finished",
        created_at=T0 + 10,
        finished_at=T0 + 70,
    )
    assert runs[1].finished_at is None
    assert list_runs(tmp_path / "nowhere") == []


def test_find_run_by_path_project_slash_id_and_bare_id(tmp_path):
    """find_run accepts a folder path, project/run_id or a run id that is unique across projects."""
    a = make_run(tmp_path, "nlp", "abc123")
    b = make_run(tmp_path, "vision", "def456", name="resnet")
    assert find_run(str(a), base_dir=tmp_path / "elsewhere") == str(a)
    assert find_run("vision/def456", base_dir=tmp_path) == str(b)
    assert find_run("abc123", base_dir=tmp_path) == str(a)
    assert find_run("resnet", base_dir=tmp_path) == str(b)  # a unique run name works as well


def test_find_run_ambiguous_or_missing_is_a_clear_error(tmp_path):
    """An id present in two projects lists both candidates; an unknown id says it was not found."""
    make_run(tmp_path, "nlp", "same")
    make_run(tmp_path, "vision", "same")
    with pytest.raises(RunNotFound, match="ambiguous") as exc:
        find_run("same", base_dir=tmp_path)
    assert "nlp/same" in str(exc.value) and "vision/same" in str(exc.value)
    with pytest.raises(RunNotFound, match="no run 'ghost'"):
        find_run("ghost", base_dir=tmp_path)
