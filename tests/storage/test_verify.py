"""Storage faults: ``kobo verify`` on real runs, the reader's commit point, live copies.

One run is logged through a real daemon by a real training script (scalars, a
repeated step, a histogram, an image, a TensorLog, captured output); the
daemon is then stopped, so every file is closed.  Each test works on a copy of
it, damaged the way disks, people and half-finished copies damage files.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from kohakuvault import ColumnVault

from kohakuboard.cli.main import main as kobo_main
from kohakuboard.storage import format as fmt
from kohakuboard.storage.reader import RunReader
from kohakuboard.storage.verify import verify_run

GOLDEN = """
import numpy as np
from kohakuboard.client import Board, Histogram, Media, TensorLog
rng = np.random.default_rng(0)
with Board(name="golden", run_id="golden", config={"lr": 0.1}) as b:
    for i in range(300):
        b.step()
        b.log(loss=1.0 / (i + 1), acc=i / 300)
        if i % 100 == 0:
            print(f"epoch {i // 100}: loss {1.0 / (i + 1):.4f}", flush=True)
    b.log(auto_step=False, loss=0.5)  # the same step again: legitimate, never damage
    b.log(weights=Histogram(rng.normal(size=1000)),
          sample=Media(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8), caption="noise"),
          emb=TensorLog(np.arange(12, dtype=np.float32).reshape(3, 4)))
print("done", flush=True)
"""


def _isolated_env(root: Path) -> tuple[dict[str, str], str]:
    sock_dir = tempfile.mkdtemp(prefix="kobo-", dir="/tmp")  # short: Unix socket paths are limited
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("KOBO_") and k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "TORCHELASTIC_RUN_ID")
    }
    env["KOBO_DAEMON_ENDPOINT"] = f"ipc://{sock_dir}/kobo"
    env["KOBO_BASE_DIR"] = str(root / "kohakuboard")
    return env, sock_dir


@pytest.fixture(scope="module")
def golden(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished run written by a real script through a real (autostarted) daemon, then closed."""
    root = tmp_path_factory.mktemp("golden")
    env, sock_dir = _isolated_env(root)
    try:
        res = subprocess.run(
            [sys.executable, "-c", GOLDEN], cwd=root, env=env, capture_output=True, text=True, timeout=120
        )
        assert res.returncode == 0, res.stdout + res.stderr
    finally:
        subprocess.run([sys.executable, "-m", "kohakuboard.daemon", "stop"], env=env, capture_output=True, timeout=90)
        shutil.rmtree(sock_dir, ignore_errors=True)
    path = root / "kohakuboard" / "default" / "golden"
    assert (path / fmt.METADATA_JSON).is_file()
    return path


@pytest.fixture
def run(golden: Path, tmp_path: Path) -> Path:
    """A private copy of the golden run, at {tmp_path}/kohakuboard/default/golden."""
    dest = tmp_path / "kohakuboard" / "default" / "golden"
    shutil.copytree(golden, dest)
    return dest


def kobo(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """The real ``kobo`` command line, in a fresh interpreter."""
    return subprocess.run(
        [sys.executable, "-m", "kohakuboard.cli.main", *args], capture_output=True, text=True, timeout=120, cwd=cwd
    )


def problem_files(res: subprocess.CompletedProcess[str]) -> list[str]:
    lines = res.stdout.strip().splitlines()
    return [ln.split(": ", 1)[0] for ln in lines[:-1] if ": note: " not in ln]


# ------------------------------------------------------------------ clean


def test_clean_run_verifies_clean(run: Path):
    """A run logged through the daemon (scalars with a repeated step, histogram, image, tensor,
    captured output) is intact: exit 0, no problem lines, a summary counting what was checked."""
    res = kobo("verify", str(run))
    assert res.returncode == 0, res.stdout + res.stderr
    lines = res.stdout.strip().splitlines()
    assert len(lines) == 1, res.stdout
    summary = lines[0]
    assert summary.startswith("ok: ") and str(run) in summary
    for part in ("2 metric columns (601 points)", "1 histogram record", "1 media file", "1 tensor", "output.log"):
        assert part in summary, summary

    js = kobo("verify", str(run), "--json")
    assert js.returncode == 0
    report = json.loads(js.stdout)
    assert report["ok"] is True and report["problems"] == [] and report["notes"] == []
    assert report["counts"]["points"] == 601 and report["counts"]["output_bytes"] > 0


def test_verify_resolves_run_like_show(run: Path, tmp_path: Path):
    """RUN may be project/run_id or a bare run id under --dir (or $KOBO_BASE_DIR), like `kobo show`."""
    base = str(tmp_path / "kohakuboard")
    for spec in ("default/golden", "golden"):
        res = kobo("verify", "--dir", base, spec)
        assert res.returncode == 0, res.stdout + res.stderr
        assert res.stdout.startswith("ok: ")


@pytest.mark.parametrize("spec", ["missing-run", "EMPTY_DIR", "A_FILE"])
def test_not_a_run_exits_2(spec: str, tmp_path: Path):
    """A name that matches no run, a folder that is no run and a plain file: exit 2 with a message."""
    (tmp_path / "empty").mkdir()
    (tmp_path / "file.txt").write_text("hello")
    spec = {"EMPTY_DIR": str(tmp_path / "empty"), "A_FILE": str(tmp_path / "file.txt")}.get(spec, spec)
    res = kobo("verify", "--dir", str(tmp_path), spec)
    assert res.returncode == 2, res.stdout + res.stderr
    assert "Traceback" not in res.stderr and res.stderr.strip()
    js = kobo("verify", "--dir", str(tmp_path), spec, "--json")
    assert js.returncode == 2 and json.loads(js.stdout)["run"] is False


# ----------------------------------------------------------------- damage


def _truncate(rel: str, fraction: float) -> Callable[[Path], str]:
    def damage(run: Path) -> str:
        p = run / rel
        os.truncate(p, int(p.stat().st_size * fraction))
        return rel

    return damage


def _garbage_middle(rel: str) -> Callable[[Path], str]:
    def damage(run: Path) -> str:
        p = run / rel
        size = p.stat().st_size
        rng = np.random.default_rng(1)
        with open(p, "r+b") as f:  # the middle half of the file
            f.seek(size // 4)
            f.write(rng.integers(0, 256, size // 2, dtype=np.uint8).tobytes())
        return rel

    return damage


def _media_file(run: Path) -> str:
    (name,) = [n for n in os.listdir(run / fmt.MEDIA_DIR)]
    return f"{fmt.MEDIA_DIR}/{name}"


def _delete_media(run: Path) -> str:
    rel = _media_file(run)
    os.unlink(run / rel)
    return rel


def _modify_media(run: Path) -> str:
    rel = _media_file(run)
    data = bytearray((run / rel).read_bytes())
    data[len(data) // 2] ^= 0x01  # one flipped bit
    (run / rel).write_bytes(bytes(data))
    return rel


def _delete(rel: str) -> Callable[[Path], str]:
    def damage(run: Path) -> str:
        os.unlink(run / rel)
        return rel

    return damage


DAMAGE = {
    "metadata.json truncated": (_truncate(fmt.METADATA_JSON, 0.5), "not valid JSON"),
    "metadata.json empty": (_truncate(fmt.METADATA_JSON, 0), "empty"),
    "metadata.json deleted": (_delete(fmt.METADATA_JSON), "missing"),
    "metadata.db truncated to half": (_truncate(fmt.METADATA_DB, 0.5), "damaged"),
    "metadata.db garbage in the middle": (_garbage_middle(fmt.METADATA_DB), "damaged"),
    "scalars.db truncated": (_truncate(fmt.SCALARS_DB, 0.5), "damaged"),
    "scalars.db garbage in the middle": (_garbage_middle(fmt.SCALARS_DB), "damaged"),
    "histograms truncated": (_truncate(fmt.HISTOGRAM_FILES["exact"], 0.5), "damaged"),
    "tensors.db deleted": (_delete(fmt.TENSORS_DB), "1 tensor"),
    "media file deleted": (_delete_media, "missing (logged as 'sample'"),
    "media file modified": (_modify_media, "sha256"),
    "output.log truncated": (_truncate(fmt.OUTPUT_LOG, 0.5), "committed: the last"),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_damage_is_reported_with_the_file(case: str, run: Path):
    """Each kind of damage: exit 1, a line naming the damaged file and what is wrong, a
    DAMAGED summary, no traceback, and the same through --json."""
    damage, what = DAMAGE[case]
    rel = damage(run)
    res = kobo("verify", str(run))
    assert res.returncode == 1, res.stdout + res.stderr
    assert "Traceback" not in res.stdout + res.stderr
    lines = res.stdout.strip().splitlines()
    assert lines[-1].startswith("DAMAGED: ") and str(run) in lines[-1], res.stdout
    mine = [ln for ln in lines[:-1] if ln.startswith(rel + ": ") and ": note: " not in ln]
    assert mine and any(what in ln for ln in mine), f"{rel} / {what!r} not reported:\n{res.stdout}"
    assert set(problem_files(res)) == {rel}, f"other files blamed too:\n{res.stdout}"

    js = CliRunner().invoke(kobo_main, ["verify", str(run), "--json"])
    assert js.exit_code == 1 and isinstance(js.exception, SystemExit), (js.output, js.exception)
    report = json.loads(js.output)
    assert report["ok"] is False and {p["file"] for p in report["problems"]} == {rel}


@pytest.mark.parametrize(
    "rel",
    [
        fmt.METADATA_JSON,
        fmt.METADATA_DB,
        fmt.SCALARS_DB,
        fmt.HISTOGRAM_FILES["exact"],
        fmt.TENSORS_DB,
        fmt.OUTPUT_LOG,
        "MEDIA",
    ],
)
def test_any_truncation_of_any_file_is_found_without_crashing(rel: str, run: Path):
    """Every file verify knows, cut at many lengths (1 byte .. all but one byte): never an exception,
    always that file reported as damaged."""
    rel = _media_file(run) if rel == "MEDIA" else rel
    path = run / rel
    original = path.read_bytes()
    for fraction in (0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 0.99):
        cut = max(1, int(len(original) * fraction)) if fraction else 0
        path.write_bytes(original[:cut])
        for leftover in ("-wal", "-shm"):  # what an earlier read-only open left next to it
            Path(str(path) + leftover).unlink(missing_ok=True)
        report = verify_run(run)
        assert report.exit_code == 1, f"{rel} cut to {cut}/{len(original)} bytes not found"
        assert rel in {p.file for p in report.problems}, [str(f) for f in report.findings]
    path.write_bytes(original)
    assert verify_run(run).exit_code == 0


def _rot(path: Path, record: bytes, offset: int, new: bytes) -> None:
    """Overwrite bytes of ``record`` where it sits in ``path`` (bit rot inside stored data,
    which SQLite's own checks cannot see)."""
    data = bytearray(path.read_bytes())
    at = data.find(record)
    assert at >= 0, "record not found in the file"
    while at >= 0:
        data[at + offset : at + offset + len(new)] = new
        at = data.find(record, at + 1)
    path.write_bytes(bytes(data))


def test_rotten_scalar_and_histogram_records_are_found(run: Path):
    """A scalar record whose step turned negative and a histogram record whose bin count no longer
    matches its size are reported with the column and the row."""
    with RunReader(run) as r:
        point = r.series("loss")[150].tobytes()
        h = r.histograms("weights")[0]
    hist = struct.pack(
        fmt.HISTOGRAM_HEADER,
        h["step"],
        h["global_step"],
        h["wall"],
        len(h["counts"]),
        h["nan"],
        h["posinf"],
        h["neginf"],
        h["total"],
        1.0,
    )
    _rot(run / fmt.SCALARS_DB, point, 7, b"\xff")  # top byte of the step
    _rot(run / fmt.HISTOGRAM_FILES["exact"], hist, 24, struct.pack("<q", len(h["counts"]) + 7))  # num_bins
    res = kobo("verify", str(run))
    assert res.returncode == 1, res.stdout + res.stderr
    assert (
        f"{fmt.SCALARS_DB}: column '0/loss': 1 record of 301 cannot be a logged point "
        "(negative step or impossible time), the first at row 150: corrupted"
    ) in res.stdout
    assert f"{fmt.HISTOGRAM_FILES['exact']}: column '0/weights': 1 histogram record of 1 does not parse" in res.stdout
    assert set(problem_files(res)) == {fmt.SCALARS_DB, fmt.HISTOGRAM_FILES["exact"]}


def test_damaged_metadata_db_still_checks_the_other_files(run: Path):
    """With metadata.db unreadable, a damaged scalars file is still found and named, and verify
    says which checks it could not make."""
    _truncate(fmt.METADATA_DB, 0.5)(run)
    _truncate(fmt.SCALARS_DB, 0.5)(run)
    report = verify_run(run)
    assert report.exit_code == 1
    assert {p.file for p in report.problems} == {fmt.METADATA_DB, fmt.SCALARS_DB}
    assert any(
        n.file == fmt.METADATA_DB and "media, tables, tensors, KDEs and commit points not checked" in n.message
        for n in report.notes
    )


# --------------------------------------------------- commit point (reader)


def _append_records(vault_path: Path, column: str, records: np.ndarray) -> None:
    vault = ColumnVault(str(vault_path), block_bytes=fmt.VAULT_BLOCK_BYTES)
    try:
        col = vault.ensure(column, fmt.SCALAR_COLUMN_DTYPE)
        col.append_array(records.view(np.uint8).reshape(-1, fmt.SCALAR_RECORD_SIZE))
    finally:
        vault.close()


def _die_before_commit(run: Path) -> None:
    """What a writer killed between its two phases leaves: rows appended, never committed."""
    rec = np.zeros(3, dtype=fmt.scalar_record_dtype())
    rec["step"] = [301, 302, 303]
    rec["wall"] = time.time()
    rec["value"] = [-1.0, -2.0, -3.0]
    _append_records(run / fmt.SCALARS_DB, "0/loss", rec)
    _append_records(run / fmt.SCALARS_DB, "0/ghost", rec[:2])
    vault = ColumnVault(str(run / fmt.HISTOGRAM_FILES["exact"]), block_bytes=fmt.VAULT_BLOCK_BYTES)
    try:
        dtype = {c: d for c, d, _ in vault.list_columns()}["0/weights"]
        col = vault.ensure("0/weights", dtype)
        col.append_array(np.asarray(col.read(0, 1)[0], np.uint8).reshape(1, -1))
    finally:
        vault.close()
    with open(run / fmt.OUTPUT_LOG, "ab") as f:
        f.write(b"half a batch of output\n")


def test_reader_ignores_rows_past_the_commit_point(run: Path, golden: Path):
    """Rows a dying writer appended but never committed are invisible: series, counts, metric
    names, histograms and the summary are exactly the committed run."""
    with RunReader(golden) as g:
        want_loss = g.series("loss").copy()
        want_summary = g.summary()["metrics"]
        n_hist = len(g.histograms("weights"))
    _die_before_commit(run)
    with RunReader(run) as r:
        assert np.array_equal(r.series("loss"), want_loss)
        assert r.num_points("loss") == len(want_loss)
        assert r.list_metrics() == ["acc", "loss"]
        with pytest.raises(KeyError, match="ghost"):
            r.series("ghost")
        assert r.summary()["metrics"] == want_summary
        assert len(r.histograms("weights")) == n_hist
        assert r.list_items()["histogram"] == ["weights"]


def test_uncommitted_tail_is_a_note_not_damage(run: Path):
    """verify names every uncommitted tail (column, new column, output.log) as a note; exit 0."""
    _die_before_commit(run)
    res = kobo("verify", str(run))
    assert res.returncode == 0, res.stdout + res.stderr
    out = res.stdout
    assert (
        f"{fmt.SCALARS_DB}: note: column '0/loss': uncommitted tail of 3 rows, "
        "will be removed when the run is next written"
    ) in out
    assert f"{fmt.SCALARS_DB}: note: column '0/ghost': 2 uncommitted rows (the column was never committed)" in out
    assert f"{fmt.HISTOGRAM_FILES['exact']}: note: column '0/weights': uncommitted tail of 1 row" in out
    assert f"{fmt.OUTPUT_LOG}: note: uncommitted tail of 23 bytes" in out
    assert out.strip().splitlines()[-1].startswith("ok: ")


def test_next_writer_removes_the_uncommitted_tail(run: Path, tmp_path: Path, daemon, script):
    """Resuming the run (a new writer) drops the uncommitted rows, as the note promises; what the
    script logs then follows the committed points and the run verifies without notes."""
    with RunReader(run) as r:
        before = r.series("loss")["value"].tolist()
    _die_before_commit(run)
    res = script(
        "from kohakuboard.client import Board\n"
        "b = Board(run_id='golden', capture_output=False)\n"
        "b.log(loss=42.0)\n"
        "b.finish()\n",
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr
    with RunReader(run) as r:
        assert r.series("loss")["value"].tolist() == before + [42.0]
        assert r.list_metrics() == ["acc", "loss"]
    vault = ColumnVault(str(run / fmt.SCALARS_DB), read_only=True)
    try:
        lengths = {n: ln for n, _, ln in vault.list_columns()}
    finally:
        vault.close()
    assert lengths.get("0/loss") == len(before) + 1 and lengths.get("0/ghost", 0) == 0
    report = verify_run(run)
    assert report.exit_code == 0 and report.findings == [], [str(f) for f in report.findings]


# ------------------------------------------------------- copies of a live run

LIVE = """
import os, sys, time
import numpy as np
from kohakuboard.client import Board, Histogram, Media
stop = sys.argv[1]
rng = np.random.default_rng(0)
b = Board(name="live", run_id="live")
i = 0
while not os.path.exists(stop):
    values = dict(loss=1.0 / (i + 1), acc=float(i))
    if i % 10 == 0:
        values["img"] = Media(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))
        values["h"] = Histogram(rng.normal(size=200))
        print("step", i, flush=True)
    b.log(**values)
    i += 1
    time.sleep(0.0005)
b.finish()
"""


def _copy_live(src: Path, dest: Path) -> None:
    """``cp -r`` of a folder that is being written: files the writer renames away
    mid-copy (temporary media and metadata.json files) are skipped, like cp reports them."""
    try:
        shutil.copytree(src, dest)
    except shutil.Error as exc:
        vanished = [e for e in exc.args[0] if ".tmp" in os.path.basename(e[0]) and "No such file" in e[2]]
        assert vanished == exc.args[0], f"copy failed: {exc.args[0]}"


def _copies_of_live_run(tmp_path: Path, base_dir: Path, n: int) -> tuple[list[Path], dict[str, np.ndarray]]:
    stop = tmp_path / "stop"
    proc = subprocess.Popen(
        [sys.executable, "-c", LIVE, str(stop)],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    src = base_dir / "default" / "live"
    copies = []
    try:
        deadline = time.monotonic() + 30
        while not (src / fmt.METADATA_JSON).exists():  # before it, the folder is no run yet
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.stderr else ""
            time.sleep(0.02)
        for k in range(n):
            time.sleep(0.05)
            dest = tmp_path / "copies" / f"copy{k}"
            _copy_live(src, dest)
            copies.append(dest)
    finally:
        stop.touch()
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    with RunReader(src) as r:
        assert r.status == "finished"
        final = {m: r.series(m).copy() for m in r.list_metrics()}
    assert set(final) == {"loss", "acc"} and len(final["loss"]) > 100
    return copies, final


def test_copy_of_a_live_run_reads_as_a_prefix(tmp_path: Path, base_dir: Path, daemon):
    """`cp -r` while a Board logs: every copy opens, and every series in it is a prefix of the
    final series (same points, same order); verify never crashes, and reports no corrupt
    file or record, only pieces the copy lacks because they were written after it was taken."""
    copies, final = _copies_of_live_run(tmp_path, base_dir, 12)
    behind = ("missing (logged as", "committed: the last")
    for copy in copies:
        with RunReader(copy) as r:
            assert set(r.list_metrics()) <= set(final)
            for name in r.list_metrics():
                s = r.series(name)
                assert np.array_equal(s, final[name][: len(s)]), f"{copy.name}: {name} is not a prefix"
            r.summary()
        report = verify_run(copy)
        assert report.exit_code in (0, 1)
        for p in report.problems:
            assert any(b in p.message for b in behind), f"{copy.name}: {p}"
        if report.damaged:  # and says why that may be
            assert "if this folder is a copy taken meanwhile, it missed the newest data" in report.summary()
