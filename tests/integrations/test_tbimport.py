"""``kobo import tensorboard``: event files written in the test by torch.utils.tensorboard and
tensorboardX become run folders; every value, step and wall time is checked, importing twice
creates no duplicates, damaged files are reported, and the runs pass ``kobo verify``."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

pytest.importorskip("tensorboard", reason="writing the test's event files needs tensorboard")
torch_tb = pytest.importorskip("torch.utils.tensorboard", reason="writing the test's event files needs torch")

from kohakuboard.cli.main import main  # noqa: E402
from kohakuboard.integrations import _tfevents  # noqa: E402
from kohakuboard.storage.reader import RunReader, list_runs  # noqa: E402
from kohakuboard.storage.verify import verify_run  # noqa: E402

T0 = 1_700_000_000.25  # wall times the writers are given, so they can be checked exactly
RNG = np.random.default_rng(0)
IMG = RNG.integers(0, 256, (3, 6, 5), dtype=np.uint8)
HIST = RNG.normal(size=200)


def _write(writer_cls, logdir: Path) -> dict:
    """Log a known set of values with explicit steps and wall times; return them."""
    w = writer_cls(str(logdir))
    expected: dict = {"loss": [], "acc": []}
    for step in range(5):
        loss, acc = 1.0 / (step + 1), step * 0.125
        w.add_scalar("loss", loss, step, walltime=T0 + step)
        w.add_scalar("acc", acc, step, walltime=T0 + step + 0.5)
        expected["loss"].append((step, T0 + step, loss))
        expected["acc"].append((step, T0 + step + 0.5, acc))
    w.add_image("img", IMG, 2, walltime=T0 + 10)
    w.add_histogram("h", HIST, 3, walltime=T0 + 11)
    w.add_text("t", "hello **world**", 4, walltime=T0 + 12)
    w.close()
    return expected


@pytest.fixture
def logdir(tmp_path: Path) -> Path:
    import tensorboardX

    root = tmp_path / "tb"
    _write(torch_tb.SummaryWriter, root / "torch_run")
    _write(tensorboardX.SummaryWriter, root / "tbx" / "run")
    hp = torch_tb.SummaryWriter(str(root / "hp"))
    hp.add_hparams({"lr": 0.01, "layers": 3, "opt": "adam", "bn": True}, {"final": 0.5})
    hp.close()
    return root


def _event_files(d: Path) -> list[Path]:
    return sorted(p for p in d.rglob("*") if "tfevents" in p.name)


def _check_run(path: str, *, image_bytes: bytes, histo) -> None:
    with RunReader(path) as run:
        assert run.status == "finished"
        for name in ("loss", "acc"):
            s = run.series(name)
            assert s["global_step"].tolist() == list(range(5))
            walls = [T0 + i + (0.5 if name == "acc" else 0) for i in range(5)]
            assert s["wall"].tolist() == walls  # exactly the writers' wall times
            values = [1.0 / (i + 1) if name == "loss" else i * 0.125 for i in range(5)]
            assert s["value"].tolist() == pytest.approx(values, rel=1e-7)  # TensorBoard keeps float32
        # values of one TensorBoard step share one step, so loss and acc have the same steps
        assert run.series("loss")["step"].tolist() == run.series("acc")["step"].tolist() == [0, 1, 2, 3, 4]
        (img,) = run.media("img")
        assert (img["global_step"], img["wall"], img["width"], img["height"]) == (2, T0 + 10, 5, 6)
        assert Path(img["path"]).read_bytes() == image_bytes  # the event file's PNG, byte for byte
        (h,) = run.histograms("h")
        assert (h["global_step"], h["wall"]) == (3, T0 + 11)
        assert int(np.sum(h["counts"])) == len(HIST) == histo.num
        assert h["edges"][0] <= HIST.min() and HIST.max() <= h["edges"][-1]
        # the event's buckets exactly (torch and tensorboardX put an empty bucket first: its limit is the left edge)
        assert histo.bucket[0] == 0
        assert h["edges"].tolist() == list(histo.bucket_limit)
        assert h["counts"].tolist() == list(histo.bucket)[1:]
        (t,) = run.tables("t")
        assert (t["global_step"], t["wall"], t["rows"]) == (4, T0 + 12, [["hello **world**"]])
        assert run.metadata["created_at"] <= T0 and run.metadata["finished_at"] == T0 + 12
    assert verify_run(path).exit_code == 0


def _value_of(event_dir: Path, tag: str):
    event_pb2, _ = _tfevents.protos()
    for f in _event_files(event_dir):
        for _, _, data, _ in _tfevents.read_records(str(f)):
            ev = event_pb2.Event.FromString(data)
            for v in ev.summary.value:
                if v.tag == tag:
                    return v
    raise AssertionError(f"no {tag} in the event files")


def _reference(event_dir: Path) -> dict:
    return {
        "image_bytes": _value_of(event_dir, "img").image.encoded_image_string,
        "histo": _value_of(event_dir, "h").histo,
    }


@pytest.mark.parametrize("source", ["tensorboard", "tensorboardX"])
def test_import_converts_every_value_and_twice_is_once(logdir: Path, base_dir: Path, monkeypatch, source):
    if source == "tensorboardX":  # the protobufs of the kohakuboard[tensorboard] extra
        from tensorboardX.proto import event_pb2, plugin_hparams_pb2

        monkeypatch.setattr(_tfevents, "protos", lambda: (event_pb2, plugin_hparams_pb2))
    runner = CliRunner()
    first = runner.invoke(main, ["import", "tensorboard", str(logdir), "--project", "old", "--dir", str(base_dir)])
    assert first.exit_code == 0, first.output
    # "hp" itself holds only an empty event file; add_hparams wrote into a sub-run of its own
    assert "3 imported, 0 replaced, 1 skipped, 0 failed" in first.output
    assert "skipped: hp (" in first.output and "no values to convert" in first.output
    assert "not converted" not in first.output
    runs = {r.name: r for r in list_runs(base_dir)}
    assert set(runs) - {"torch_run", "tbx/run"} == {n for n in runs if n.startswith("hp/")} and len(runs) == 3
    assert {r.project for r in runs.values()} == {"old"}
    for name, sub in (("torch_run", "torch_run"), ("tbx/run", "tbx/run")):
        _check_run(runs[name].path, **_reference(logdir / sub))
        names = [f.name for f in _event_files(logdir / sub)]
        assert runs[name].run_id == "tb_" + hashlib.sha256(names[0].encode()).hexdigest()[:12]
    # add_hparams: its sub-run holds the hyperparameters (config) and the metric
    (hp_run,) = [r for r in list_runs(base_dir) if r.name.startswith("hp/")]
    with RunReader(hp_run.path) as run:
        assert run.config == {"lr": 0.01, "layers": 3, "opt": "adam", "bn": True}
        assert run.series("final")["value"].tolist() == [0.5]
    # the second import finds every run and writes nothing
    before = {r.path: os.path.getmtime(Path(r.path) / "metadata.json") for r in list_runs(base_dir)}
    second = runner.invoke(main, ["import", "tensorboard", str(logdir), "--project", "old", "--dir", str(base_dir)])
    assert second.exit_code == 0, second.output
    assert "0 imported, 0 replaced, 4 skipped, 0 failed" in second.output
    assert second.output.count("already imported") == 3
    after = {r.path: os.path.getmtime(Path(r.path) / "metadata.json") for r in list_runs(base_dir)}
    assert after == before


def test_changed_damaged_and_interrupted_imports(logdir: Path, base_dir: Path):
    runner = CliRunner()
    args = ["import", "tensorboard", str(logdir / "torch_run"), "--dir", str(base_dir)]
    assert runner.invoke(main, args).exit_code == 0
    (info,) = list_runs(base_dir)
    meta = json.loads((Path(info.path) / "metadata.json").read_text())
    assert meta["imported_from"]["kind"] == "tensorboard"
    (event_file,) = _event_files(logdir / "torch_run")

    # the event file grew, and its last record is cut off (a writer still running): skipped until --replace
    data = event_file.read_bytes()
    event_file.write_bytes(data + data[: 12 + 5])  # a whole header, 5 bytes of its record
    out = runner.invoke(main, args)
    assert out.exit_code == 0 and "changed since" in out.output, out.output
    out = runner.invoke(main, [*args, "--replace"])
    assert out.exit_code == 0 and "0 imported, 1 replaced" in out.output, out.output
    assert "not converted:" in out.output and "1 unreadable record" in out.output
    assert "truncated record" in out.output
    (info2,) = list_runs(base_dir)
    assert info2.path == info.path
    _check_run(info.path, **_reference(logdir / "torch_run"))

    # a record whose data is damaged is skipped, the rest of the file is still read
    event_file.write_bytes(data)
    raw = bytearray(data)
    marker = raw.find(b"hello **world**")
    raw[marker] ^= 0xFF
    event_file.write_bytes(bytes(raw))
    out = runner.invoke(main, [*args, "--replace"])
    assert out.exit_code == 0 and "data CRC mismatch" in out.output, out.output
    with RunReader(info.path) as run:
        assert run.list_items()["table"] == [] and len(run.series("loss")) == 5

    # an import cut off half way (no imported_from yet) is redone
    event_file.write_bytes(data)
    meta = json.loads((Path(info.path) / "metadata.json").read_text())
    del meta["imported_from"]
    meta["status"] = "running"
    (Path(info.path) / "metadata.json").write_text(json.dumps(meta))
    out = runner.invoke(main, args)
    assert out.exit_code == 0 and "1 imported" in out.output, out.output
    _check_run(info.path, **_reference(logdir / "torch_run"))


def test_import_errors_are_clear(tmp_path: Path, base_dir: Path):
    runner = CliRunner()
    (tmp_path / "empty").mkdir()
    out = runner.invoke(main, ["import", "tensorboard", str(tmp_path / "empty"), "--dir", str(base_dir)])
    assert out.exit_code == 1 and "no TensorBoard event files" in out.output


def test_crc32c_pure_python_matches_known_vectors(monkeypatch):
    monkeypatch.setattr(_tfevents, "_crc32c_native", None)
    assert _tfevents.crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value
    assert _tfevents.crc32c(b"") == 0
    assert _tfevents.crc32c(bytes(32)) == 0x8A9136AA  # RFC 3720 B.4
