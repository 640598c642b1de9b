"""RunReader, kobo show/export/verify on runs they may read but not write, creating and changing nothing.

Runs are written through a real daemon with every kind of value, so every database file
exists (metadata.db, scalars.db, both histogram files, tensors.db).  A finished run (its
daemon stopped, so SQLite removed every ``-wal`` and ``-shm``) is read by its owner and,
copied into root's 0755/0644 folders, by ``nobody``; a run whose daemon was killed (its
``-wal`` holds committed data) is made read-only (``chmod -R a-w``) and read by
``nobody``; a live run is read while the daemon writes it.  Every time, every file of the
run folder (name, size, mtime, sha256) is compared before and after.

The ``nobody`` readers start as root, import everything they will use (this
interpreter's files may be unreadable for ``nobody``, see
``tests/daemon/test_security.py``), then drop to ``nobody`` with ``setgroups``,
``setresgid`` and ``setresuid``.  They skip when the tests do not run as root.
"""

from __future__ import annotations

import hashlib
import json
import os
import pwd
import shutil
import sqlite3
import stat
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner
from kohakuvault import ColumnVault

from kohakuboard.cli.main import main as kobo
from kohakuboard.client import Board, Histogram, KernelDensity, Media, Table, TensorLog
from kohakuboard.storage import format as fmt
from kohakuboard.storage.reader import ReadOnlyFile, RunReader

try:
    NOBODY = pwd.getpwnam("nobody")
except KeyError:  # pragma: no cover - every Debian has it
    NOBODY = None

needs_root = pytest.mark.skipif(
    os.geteuid() != 0 or NOBODY is None,
    reason="needs root and a 'nobody' user: the run is read by a second uid (nobody) that may not write it",
)

DATABASES = [fmt.METADATA_DB, fmt.SCALARS_DB, *fmt.HISTOGRAM_FILES.values(), fmt.TENSORS_DB]
IMG = np.arange(4 * 4 * 3, dtype=np.uint8).reshape(4, 4, 3)


# ------------------------------------------------------------------ helpers


def log_step(b: Board, i: int) -> None:
    """Step ``i``: two scalars and one of every rich kind (both histogram precisions)."""
    b.log(
        loss=1.0 / (i + 1),
        acc=i / 10,
        sample=Media(IMG + i, caption=f"c{i}"),
        preds=Table([{"img": Media(IMG), "label": f"l{i}"}]),
        grads=Histogram(np.arange(100.0) * (i + 1)),
        small=Histogram(np.arange(10.0), num_bins=4, precision="compact"),
        attn=TensorLog(np.eye(3) * i),
        logits=KernelDensity(values=np.arange(50.0) + i, grid_size=16),
    )


def write_run(base: Path, run_id: str, steps: int) -> Path:
    with Board(name=run_id, run_id=run_id, base_dir=base, capture_output=False, config={"lr": 0.1}) as b:
        for i in range(steps):
            log_step(b, i)
    return Path(b.path)


def snapshot(path: Path) -> dict[str, tuple[int, int, str]]:
    """Every file under ``path``: size, mtime and sha256."""
    out = {}
    for root, _, files in os.walk(path):
        for name in files:
            p = os.path.join(root, name)
            st = os.stat(p)
            with open(p, "rb") as f:
                out[os.path.relpath(p, path)] = (st.st_size, st.st_mtime_ns, hashlib.sha256(f.read()).hexdigest())
    return out


def sidecars(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.name.endswith(("-wal", "-shm")))


def read_everything(path: str) -> dict[str, Any]:
    """What RunReader returns for every kind of value, as JSON-able values (also run as nobody)."""
    with RunReader(path) as r:
        out = {
            "summary": {k: v for k, v in r.summary()["metrics"].items()},
            "items": r.list_items(),
            "loss": r.series("loss").tolist(),
            "loss_1_3": r.series("loss", start=1, end=3).tolist(),
            "num_points": r.num_points("loss"),
            "media": [
                (m["step"], m["caption"], hashlib.sha256(r.media_bytes(m)).hexdigest()) for m in r.media("sample")
            ],
            "tables": [
                [[c["hash"] if isinstance(c, dict) else c for c in row] for row in t["rows"]] for t in r.tables("preds")
            ],
            "grads": [(h["step"], h["edges"].tolist(), h["counts"].tolist()) for h in r.histograms("grads")],
            "small": [(h["step"], h["counts"].tolist()) for h in r.histograms("small")],
            "tensors": [(t["step"], t["array"].tolist(), str(t["array"].dtype)) for t in r.tensors("attn")],
            "kde": [(k["step"], k["grid"].tolist(), k["density"].tolist()) for k in r.kde("logits")],
            "steps": r.steps().tolist(),
            "modes": {os.path.relpath(f.path, r.path): f.mode for f in r._files.values()},
        }
    return out


def run_cli(path: str, tmp: str) -> dict[str, Any]:
    """kobo show, export (with --media-dir outside the run) and verify: exit codes and output."""
    out = {}
    runner = CliRunner()
    for key, args in (
        ("show", ["show", path]),
        ("show_json", ["show", path, "--json"]),
        ("export", ["export", path, "--format", "csv", "--rank", "all", "--media-dir", os.path.join(tmp, "media")]),
        ("verify", ["verify", path, "--json"]),
    ):
        res = runner.invoke(kobo, args)
        out[key] = (res.exit_code, res.output, repr(res.exception) if res.exception and res.exit_code != 1 else None)
    out["exported_media"] = sorted(os.listdir(os.path.join(tmp, "media")))
    return out


def check_values(got: dict[str, Any], steps: int) -> None:
    """What was logged by :func:`log_step` for ``steps`` steps."""
    assert [p[3] for p in got["loss"]] == [1.0 / (i + 1) for i in range(steps)]
    assert [p[0] for p in got["loss"]] == list(range(steps))
    assert got["loss_1_3"] == got["loss"][1:3]
    assert got["num_points"] == steps
    assert got["summary"]["loss"]["points"] == steps and got["summary"]["acc"]["last_value"] == (steps - 1) / 10
    assert got["items"] == {
        "media": ["sample"],
        "table": ["preds"],
        "tensor": ["attn"],
        "kde": ["logits"],
        "histogram": ["grads", "small"],
    }
    assert [(s, c) for s, c, _ in got["media"]] == [(i, f"c{i}") for i in range(steps)]
    assert len({h for _, _, h in got["media"]}) == steps  # a different image each step
    assert [len(rows) for rows in got["tables"]] == [1] * steps
    assert [rows[0][1] for rows in got["tables"]] == [f"l{i}" for i in range(steps)]
    assert [s for s, _, _ in got["grads"]] == list(range(steps))
    assert all(sum(counts) == 100 for _, _, counts in got["grads"])
    assert [edges[-1] for _, edges, _ in got["grads"]] == [99.0 * (i + 1) for i in range(steps)]
    assert len(got["small"]) == steps and all(len(c) == 4 for _, c in got["small"])
    assert [(s, a) for s, a, _ in got["tensors"]] == [(i, (np.eye(3) * i).tolist()) for i in range(steps)]
    assert [len(g) for _, g, _ in got["kde"]] == [16] * steps


def check_cli(out: dict[str, Any], steps: int) -> None:
    code, text, exc = out["show"]
    assert code == 0, (text, exc)
    assert f"loss  {steps} points" in text and f"media: sample ({steps})" in text and f"tensors: attn ({steps})" in text
    code, text, exc = out["show_json"]
    assert code == 0 and json.loads(text)["metrics"]["loss"]["points"] == steps, (text, exc)
    code, text, exc = out["export"]
    assert code == 0, (text, exc)
    lines = [ln for ln in text.splitlines() if not ln.startswith("wrote ")]
    assert lines[0] == "metric,rank,step,global_step,wall,value" and len(lines) == 1 + 2 * steps
    assert len(out["exported_media"]) == 2 * steps  # the sample and the table's image cell, each step
    code, text, exc = out["verify"]
    report = json.loads(text)
    assert code == 0 and report["ok"] and report["problems"] == [], (report, exc)
    assert report["counts"]["points"] == 2 * steps and report["counts"]["tensors"] == steps


# Run by the nobody child as root first: everything the reader, kobo and the checks
# below import, lazily included; then the switch to nobody.
_PRELUDE = """
import csv, difflib, hashlib, io, json, operator, os, re, shutil, sqlite3, struct, sys, tempfile, threading, weakref
import numpy as np
import click, click.testing
import kohakuvault, kohakuvault.column_codec, kohakuvault.errors
from kohakuvault import ColumnVault, KVault, NotFound
from kohakuboard.protocol import errors
from kohakuboard.storage import export, format, reader, verify
from kohakuboard.cli import main as cli_main
sys.path.insert(0, {tests!r})
import test_reader_readonly as t
click.testing.CliRunner().invoke(cli_main.main, ["--help"])
os.chdir("/")
os.setgroups([])
os.setresgid({gid}, {gid}, {gid})
os.setresuid({uid}, {uid}, {uid})
assert os.getresuid() == ({uid}, {uid}, {uid}) and os.getgroups() == []
"""


def nobody_script(code: str) -> str:
    assert NOBODY is not None
    return _PRELUDE.format(tests=os.path.dirname(__file__), uid=NOBODY.pw_uid, gid=NOBODY.pw_gid) + code


def as_nobody(code: str, timeout: float = 60, tmpdir: str | None = None) -> Any:
    """Run ``code`` as nobody (with ``TMPDIR``, if given); it prints its result as ``RESULT <json>``."""
    env = dict(os.environ, **({"TMPDIR": tmpdir} if tmpdir else {}))
    proc = subprocess.run(
        [sys.executable, "-c", nobody_script(code)], capture_output=True, text=True, timeout=timeout, env=env
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, f"child failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return json.loads(lines[-1][len("RESULT ") :])


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A folder of root's that nobody may read (0755), outside tmp_path (whose parents are 0700)."""
    d = tempfile.mkdtemp(prefix="kobo-ro-", dir="/tmp")
    os.chmod(d, 0o755)
    try:
        yield Path(d)
    finally:
        for root, dirs, _ in os.walk(d):  # undo chmod -R a-w so it can be removed
            for name in dirs:
                os.chmod(os.path.join(root, name), 0o755)
        shutil.rmtree(d, ignore_errors=True)


def copy_for_others(src: Path, dst: Path, skip: tuple[str, ...] = ()) -> None:
    """Copy a run folder as root: dirs 0755, files 0644 (what another user sees of root's runs)."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(*skip) if skip else None)
    for root, dirs, files in os.walk(dst):
        for name in dirs:
            os.chmod(os.path.join(root, name), 0o755)
        for name in files:
            os.chmod(os.path.join(root, name), 0o644)
    os.chmod(dst.parent, 0o755)


# -------------------------------------------------------------------- tests


@pytest.mark.own_daemon
def test_finished_run_read_by_its_owner_creates_and_changes_no_file(daemon, base_dir, tmp_path):
    """A finished run (no -wal/-shm left) read through every reader call and kobo show, export and
    verify: every database is opened immutable, and no file is created, removed or changed."""
    run = write_run(base_dir, "done", 3)
    assert daemon.terminate() == 0  # the daemon closes the run: SQLite removes every -wal and -shm
    assert all((run / rel).exists() for rel in DATABASES)
    assert sidecars(run) == []
    before = snapshot(run)
    got = read_everything(str(run))
    check_values(got, 3)
    assert got["modes"] == {rel: "immutable" for rel in DATABASES}
    check_cli(run_cli(str(run), str(tmp_path)), 3)
    with RunReader(run) as r:  # the rest of the reader's calls
        r.events(), r.clients(), r.dropped(), r.series_by_rank("loss"), r.ranks(), r.list_metrics(rank=None)
    assert snapshot(run) == before


@needs_root
@pytest.mark.own_daemon
def test_root_run_copied_into_0755_folders_is_read_by_nobody(daemon, base_dir, shared_dir, tmp_path):
    """root's run in 0755/0644 folders (its own copy of a finished run, in a folder whose name needs
    URI quoting): nobody reads every value and runs kobo show, export and verify, exactly as the
    owner does, and nothing in the folder changes."""
    run = write_run(base_dir, "shared", 3)
    assert daemon.terminate() == 0
    copy = shared_dir / "odd ?#%20 name" / "shared"
    copy_for_others(run, copy)
    before = snapshot(copy)
    owner = read_everything(str(run))
    got = as_nobody(f"""
out = t.read_everything({str(copy)!r})
out["cli"] = t.run_cli({str(copy)!r}, tempfile.mkdtemp())
print("RESULT " + json.dumps(out))
""")
    check_values(got, 3)
    check_cli(got.pop("cli"), 3)
    assert got["modes"] == {rel: "immutable" for rel in DATABASES}
    assert json.loads(json.dumps(owner)) == got  # the same values as the owner reads
    assert snapshot(copy) == before


@needs_root
@pytest.mark.own_daemon
def test_killed_daemon_run_made_read_only_reads_every_committed_point(daemon, shared_dir, monkeypatch):
    """The daemon is killed with the run open (its -wal holds committed data) and the folder made
    read-only (chmod -R a-w): nobody reads every committed point through the -wal; so it does, and
    so does the owner, from a copy that left the -shm files out (read from a private copy of each
    database, as SQLite would create the -shm)."""
    monkeypatch.setenv("KOBO_DAEMON_AUTOSTART", "0")  # no new daemon may recover the run
    b = Board(name="killed", run_id="killed", base_dir=shared_dir, capture_output=False, timeout=5)
    for i in range(4):
        log_step(b, i)
    b.flush()
    daemon.kill()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        b.finish(timeout=0.1)  # (closes the board: the daemon is gone, the run stays open)
    run = Path(b.path)
    assert os.path.getsize(run / (fmt.METADATA_DB + "-wal")) > 32  # committed data only in the -wal
    assert os.path.getsize(run / (fmt.SCALARS_DB + "-wal")) > 32
    copy = shared_dir / "noshm" / "killed"
    copy_for_others(run, copy, skip=("*-shm",))
    before_copy = snapshot(copy)
    by_owner = read_everything(str(copy))  # SQLite would create the -shm files: private copies are read
    check_values(by_owner, 4)
    assert set(by_owner["modes"].values()) == {"copy"} and snapshot(copy) == before_copy
    subprocess.run(["chmod", "-R", "go+rX", str(shared_dir)], check=True)
    subprocess.run(["chmod", "-R", "a-w", str(shared_dir)], check=True)
    before, before_copy = snapshot(run), snapshot(copy)
    tmp = tempfile.mkdtemp(prefix="kobo-tmp-", dir="/tmp")  # the child's TMPDIR: its private copies go there
    os.chown(tmp, NOBODY.pw_uid, NOBODY.pw_gid)
    try:
        got = as_nobody(
            f"""
out = [t.read_everything(p) for p in ({str(run)!r}, {str(copy)!r})]
out.append(t.run_cli({str(run)!r}, tempfile.mkdtemp())["verify"])
print("RESULT " + json.dumps(out))
""",
            tmpdir=tmp,
        )
        assert not [p for p in os.listdir(tmp) if p.startswith("kobo-read-")]  # the copies were removed
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    in_place, from_copy, verify = got
    check_values(in_place, 4)
    check_values(from_copy, 4)
    assert set(in_place["modes"].values()) == {"shared"}
    assert set(from_copy["modes"].values()) == {"copy"}
    code, text, exc = verify
    assert code == 0 and json.loads(text)["problems"] == [], (text, exc)
    assert snapshot(run) == before and snapshot(copy) == before_copy


@pytest.mark.own_daemon
def test_live_run_reader_sees_later_commits(daemon, daemon_factory, base_dir, endpoint):
    """A reader opened while the daemon writes sees each later commit (series, num_points, the
    column table, rich values).  A reader of the finished run (immutable files) sees the commits
    of a daemon that resumes the run: its files are reopened through their -wal."""
    b = Board(name="live", run_id="live", base_dir=base_dir, capture_output=False)
    for i in range(3):
        log_step(b, i)
    b.flush()
    r = RunReader(b.path)
    try:
        assert r.num_points("loss") == 3 and len(r.series("loss")) == 3
        assert r._column_table(refresh=True)["0/loss"][1] == 3
        assert {f.mode for f in r._files.values()} == {"shared"}
        for i in range(3, 5):
            log_step(b, i)
        b.flush()
        assert r.num_points("loss") == 5
        assert r._column_table(refresh=True)["0/loss"][1] == 5
        assert r.series("loss")["value"].tolist() == [1.0 / (i + 1) for i in range(5)]
        tail = r.series("loss", start=3)  # only the new points
        assert tail["step"].tolist() == [3, 4] and tail.tobytes() == r.series("loss")[3:].tobytes()
        assert len(r.media("sample")) == len(r.histograms("grads")) == len(r.tensors("attn")) == 5
    finally:
        r.close()
    b.finish()
    assert daemon.terminate() == 0
    assert sidecars(Path(b.path)) == []

    r = RunReader(b.path)
    try:
        assert r.num_points("loss") == 5 and len(r.tensors("attn")) == 5
        assert {f.mode for f in r._files.values()} == {"immutable"}
        daemon_factory(endpoint)
        with Board(name="live", run_id="live", base_dir=base_dir, capture_output=False) as b2:
            assert b2.resumed
            for i in range(5, 7):
                log_step(b2, i)
            b2.flush()
            # The daemon holds the files open now: they read through the -wal.
            assert r.num_points("loss") == 7
            assert r.series("loss", start=5)["value"].tolist() == [1.0 / 6, 1.0 / 7]
            assert [t["step"] for t in r.tensors("attn")] == list(range(7))
            assert r.list_items()["histogram"] == ["grads", "small"] and len(r.histograms("small")) == 7
            assert {f.mode for f in r._files.values()} == {"shared"}
    finally:
        r.close()


@needs_root
def test_live_run_read_by_nobody_sees_later_commits(daemon, shared_dir):
    """The server case: nobody polls a run root's daemon is writing (0755/0644 folders, so it may
    not write the -shm either) and sees every new commit, reading through the -wal."""
    b = Board(name="polled", run_id="polled", base_dir=shared_dir, capture_output=False)
    for i in range(2):
        log_step(b, i)
    b.flush()
    subprocess.run(["chmod", "-R", "go+rX", str(shared_dir)], check=True)
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            nobody_script(f"""
r = reader.RunReader({b.path!r})
for line in sys.stdin:
    n = r.num_points("loss")
    s = r.series("loss", start=int(line))
    print("RESULT " + json.dumps([n, s["step"].tolist(), len(r.tensors("attn")), sorted({{f.mode for f in r._files.values()}})]), flush=True)
"""),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:

        def ask(start: int) -> Any:
            child.stdin.write(f"{start}\n")
            child.stdin.flush()
            line = child.stdout.readline()
            assert line.startswith("RESULT "), line
            return json.loads(line[len("RESULT ") :])

        assert ask(0) == [2, [0, 1], 2, ["shared"]]
        for i in range(2, 5):
            log_step(b, i)
        b.flush()
        assert ask(1) == [5, [1, 2, 3, 4], 5, ["shared"]]
        assert ask(5) == [5, [], 5, ["shared"]]
    finally:
        child.stdin.close()
        child.wait(10)
        child.stdout.close()
        b.finish()
    assert child.returncode == 0


# ---------------------------------------------------------- series(start, end)

T0 = 1_700_000_000.0
N = 5000  # three 64 KiB blocks of 32-byte records


def _hand_run(path: Path, committed: int, total: int) -> None:
    """A run of ``total`` loss points of which ``committed`` are committed (the rest: an uncommitted tail)."""
    (path / fmt.METRICS_DIR).mkdir(parents=True)
    fmt.write_json_atomic(
        str(path / fmt.METADATA_JSON),
        {
            "name": "slices",
            "project": "p",
            "run_id": "slices",
            "config": {},
            "status": fmt.STATUS_FINISHED,
            "created_at": T0,
            "format_version": fmt.FORMAT_VERSION,
        },
    )
    rec = np.zeros(total, dtype=fmt.scalar_record_dtype())
    rec["step"] = np.arange(total)
    rec["global_step"] = np.arange(total) * 2
    rec["wall"] = T0 + np.arange(total)
    rec["value"] = np.sin(np.arange(total))
    vault = ColumnVault(str(path / fmt.SCALARS_DB), block_bytes=fmt.VAULT_BLOCK_BYTES)
    vault.ensure("0/loss", fmt.SCALAR_COLUMN_DTYPE).append_array(rec.view(np.uint8).reshape(-1, 32))
    vault.close()
    db = sqlite3.connect(path / fmt.METADATA_DB)
    db.executescript(fmt.SCHEMA_SQL)
    db.execute("PRAGMA journal_mode=WAL")
    db.executemany("INSERT INTO meta(key, value) VALUES (?, ?)", [("format_version", "1"), ("commit_lengths", "1")])
    db.execute("INSERT INTO committed(file, name, length) VALUES (?, '0/loss', ?)", (fmt.SCALARS_DB, committed))
    db.commit()
    db.close()


SLICES = [
    (0, None),
    (0, 0),
    (0, 1),
    (1, 3),
    (2047, 2049),
    (2048, 4096),
    (100, 4800),
    (4799, None),
    (4800, None),
    (4800, 4800),
    (4900, 6000),
    (6000, None),
    (6000, 7000),
    (0, 10**9),
]


def test_series_start_end_is_exactly_that_slice_of_the_committed_points(tmp_path):
    """series(start=, end=) returns rows [start, end) clamped to the committed points, across block
    boundaries, in both ways a file is opened (immutable; through the -wal while a writer has it)."""
    path = tmp_path / "p" / "slices"
    _hand_run(path, committed=4800, total=N)  # 200 uncommitted rows stay invisible
    with RunReader(path) as r:
        whole = r.series("loss")
        assert len(whole) == 4800 and r.num_points("loss") == 4800
        assert r._files[fmt.SCALARS_DB].mode == "immutable"
        for start, end in SLICES:
            s = r.series("loss", start=start, end=end)
            assert s.tobytes() == whole[start:end].tobytes(), (start, end)
            assert not s.flags.writeable
        assert r.series("loss", 0, 2, 3).tobytes() == whole[2:3].tobytes()  # positional, rank 0
        assert r.series("loss", start=np.int64(3), end=np.int32(5)).tobytes() == whole[3:5].tobytes()
    assert sidecars(path) == []

    writer = ColumnVault(str(path / fmt.SCALARS_DB), block_bytes=fmt.VAULT_BLOCK_BYTES)
    try:
        writer["0/loss"].append_array(np.zeros((1, 32), dtype=np.uint8))  # a writer: the -wal has frames
        with RunReader(path) as r:
            assert r.series("loss").tobytes() == whole.tobytes()
            assert r._files[fmt.SCALARS_DB].mode == "shared"
            for start, end in SLICES:
                assert r.series("loss", start=start, end=end).tobytes() == whole[start:end].tobytes(), (start, end)
    finally:
        writer.close()


def test_series_rejects_bad_start_and_end_naming_the_parameter(tmp_path):
    """Negative, non-integer or reversed bounds raise ValueError naming the parameter, before the
    metric is looked up; series(name, rank) is unchanged."""
    path = tmp_path / "p" / "slices"
    _hand_run(path, committed=10, total=10)
    with RunReader(path) as r:
        for kwargs, param in (
            ({"start": -1}, "start"),
            ({"end": -1}, "end"),
            ({"start": 1.5}, "start"),
            ({"end": "3"}, "end"),
            ({"start": True}, "start"),
            ({"start": None}, "start"),
            ({"start": 5, "end": 4}, "end"),
        ):
            with pytest.raises(ValueError, match=param):
                r.series("loss", **kwargs)
            with pytest.raises(ValueError, match=param):
                r.series("no-such-metric", **kwargs)
        assert len(r.series("loss", 0)) == 10
        with pytest.raises(KeyError, match="rank"):
            r.series("loss", 1)


def test_read_only_file_modes_follow_the_wal(tmp_path):
    """ReadOnlyFile: no -wal or an empty one is immutable and creates nothing; a -wal with frames is
    read in place; a change under an immutable reader (a writer appears) reopens it."""
    path = tmp_path / "p" / "slices"
    _hand_run(path, committed=10, total=10)
    db_path = str(path / fmt.METADATA_DB)
    f = ReadOnlyFile(db_path, "sql")
    try:
        assert f.mode == "immutable"
        assert f.read(lambda db: db.execute("SELECT length FROM committed").fetchall()) == [(10,)]
        assert sidecars(path) == []
        writer = sqlite3.connect(db_path, isolation_level=None)
        writer.execute("UPDATE committed SET length = 7")
        assert os.path.getsize(db_path + "-wal") > 32
        assert f.read(lambda db: db.execute("SELECT length FROM committed").fetchall()) == [(7,)]
        assert f.mode == "shared"
        writer.close()
    finally:
        f.close()
    with pytest.raises(ValueError, match="kind"):
        ReadOnlyFile(db_path, "nope")
    assert stat.S_ISREG(os.stat(db_path).st_mode)
