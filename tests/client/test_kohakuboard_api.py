"""KohakuBoard's Board API, drop-in: a script written only against it runs unchanged; every value is read back.

The script below uses every documented ``Board`` method and keyword of
KohakuBoard (``annotation=``, ``log_images``, ``log_video``, ``log_audio``,
``log_table``, ``log_histogram``, ``log_tensor``, ``log_kernel_density``, the
remote/sync/memory settings this design does not use) and runs in a fresh
interpreter with no daemon running (the first Board starts one).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from kohakuboard.cli.main import main as kobo
from kohakuboard.client import Board
from kohakuboard.client._words import ADJECTIVES, NOUNS
from kohakuboard.storage.reader import RunReader, find_run, list_runs

KOHAKUBOARD_SCRIPT = r"""
import struct, wave
import numpy as np
from kohakuboard.client import Board, Table

# media files a training script would have written
with wave.open("voice.wav", "wb") as w:
    w.setnchannels(1); w.setsampwidth(2); w.setframerate(8000)
    w.writeframes(struct.pack("<800h", *([0, 1000] * 400)))
mp4 = b"\x00\x00\x00\x18ftypisom\x00\x00\x02\x00isomiso2" + b"\x00\x00\x00\x08free"
open("clip.mp4", "wb").write(mp4)

board = Board(
    name="dropin",
    config={"lr": 0.001, "batch_size": 32},
    project="compat",
    capture_output=True,
    remote_url="https://board.example.com",
    remote_token="secret",
    remote_project="shared",
    sync_enabled=True,
    sync_interval=5,
    memory_mode=True,
    annotation="lr1e-3",
)
rng = np.random.default_rng(0)
for epoch in range(2):
    board.step()
    board.log(loss=1.0 / (epoch + 1), lr=0.001)
    images = [np.full((4, 4, 3), 10 * epoch + i, np.uint8) for i in range(3)]
    board.log_images("samples", images, caption=f"epoch {epoch}")
    board.log_images("first", images[0])
    board.log_images("captioned", images[:2], captions=["left", "right"])
    board.log_video("clip", "clip.mp4", caption="rollout")
    board.log_audio("voice", "voice.wav", caption="tts")
    board.log_table("metrics", [{"epoch": epoch, "acc": 0.5 + epoch / 10}])
    board.log_table("preds", Table([{"label": "cat", "p": 0.9}]))
    board.log_histogram("grads", rng.normal(size=1000), num_bins=32, precision="exact")
    board.log_tensor("weights", np.arange(6, dtype=np.float32).reshape(2, 3) + epoch, metadata={"epoch": epoch})
    board.log_tensor("attn", np.eye(2), namespace="layer3", metadata={"head": 2})
    board.log_kernel_density("logits", values=rng.normal(size=500), num_points=64)
    board.log_kernel_density("pre", grid=np.linspace(0, 1, 5), density=np.ones(5))
print("RUN", board.run_id, board.board_id, board.name)
board.flush()
"""


@pytest.fixture
def dropin_run(daemon, script, tmp_path, base_dir):
    r = script(KOHAKUBOARD_SCRIPT, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    m = re.search(r"^RUN (\S+) (\S+) dropin$", r.stdout, re.M)
    assert m, r.stdout
    return m.group(1), m.group(2), r.stderr


def test_a_kohakuboard_script_runs_unchanged_and_every_value_reads_back(dropin_run, base_dir):
    run_id, folder, stderr = dropin_run
    # the settings this design does not use: accepted, one warning saying what to use instead
    warned = [line for line in stderr.splitlines() if "Warning" in line]
    assert len(warned) == 1, stderr
    assert all(k in warned[0] for k in ("memory_mode", "remote_url", "remote_token", "sync_enabled", "kobo-daemon"))
    assert "secret" not in stderr  # the token is never printed
    # annotation: the folder is {run_id}_{annotation}, the run is still found by its bare id
    assert folder == f"{run_id}_lr1e-3"
    path = find_run(run_id, base_dir)
    assert path == str(base_dir / "compat" / folder)
    assert find_run(f"compat/{run_id}", base_dir) == path
    assert find_run(f"compat/{folder}", base_dir) == path
    with RunReader(path) as r:
        meta = r.metadata
        assert (meta["run_id"], meta["annotation"], meta["name"], r.status) == (run_id, "lr1e-3", "dropin", "finished")
        assert r.config == {"lr": 0.001, "batch_size": 32}
        # every log_* call is one log() call: a step of its own, global_step from step()
        calls_per_epoch = 13
        loss = r.series("loss")
        assert loss["value"].tolist() == [1.0, 0.5]
        assert loss["step"].tolist() == [0, calls_per_epoch]
        assert loss["global_step"].tolist() == [1, 2]
        assert r.series("lr")["value"].tolist() == [0.001, 0.001]

        samples = r.media("samples")
        assert [s["step"] for s in samples] == [1, 1, 1, 14, 14, 14]  # a list of images: one step
        assert [s["caption"] for s in samples] == ["epoch 0"] * 3 + ["epoch 1"] * 3
        pixels = [int(np.asarray(__import__("PIL.Image", fromlist=["x"]).open(s["path"]))[0, 0, 0]) for s in samples]
        assert pixels == [0, 1, 2, 10, 11, 12]
        assert [s["step"] for s in r.media("first")] == [2, 15]
        assert [s["caption"] for s in r.media("captioned")] == ["left", "right"] * 2
        clip = r.media("clip")
        assert [(c["media_type"], c["ext"], c["caption"]) for c in clip] == [("video", "mp4", "rollout")] * 2
        voice = r.media("voice")
        assert [(v["media_type"], v["ext"], v["caption"]) for v in voice] == [("audio", "wav", "tts")] * 2
        assert r.media_bytes(voice[0])[:4] == b"RIFF"

        metrics = r.tables("metrics")
        assert [t["rows"] for t in metrics] == [[[0, 0.5]], [[1, 0.6]]]
        assert metrics[0]["columns"] == ["epoch", "acc"]
        assert [t["rows"] for t in r.tables("preds")] == [[["cat", 0.9]]] * 2
        hists = r.histograms("grads")
        assert [int(h["counts"].sum()) for h in hists] == [1000, 1000] and len(hists[0]["counts"]) == 32
        weights = r.tensors("weights")
        assert [w["metadata"] for w in weights] == [{"epoch": 0}, {"epoch": 1}]
        assert np.array_equal(weights[1]["array"], np.arange(6, dtype=np.float32).reshape(2, 3) + 1)
        attn = r.tensors("attn")[0]
        assert attn["namespace"] == "layer3" and attn["metadata"] == {"head": 2}
        assert np.array_equal(attn["array"], np.eye(2))
        logits = r.kde("logits")
        assert [len(k["grid"]) for k in logits] == [64, 64] and all(k["count"] == 500 for k in logits)
        pre = r.kde("pre")[0]
        assert pre["grid"].tolist() == [0.0, 0.25, 0.5, 0.75, 1.0] and pre["density"].tolist() == [1.0] * 5
        assert "RUN " in r.read_output(0, 1 << 20)  # capture_output=True: the output is in the run


def test_kobo_list_and_show_name_the_annotation(dropin_run, base_dir):
    run_id, folder, _ = dropin_run
    out = CliRunner().invoke(kobo, ["list", str(base_dir)])
    assert out.exit_code == 0, out.output
    line = next(line for line in out.output.splitlines() if run_id in line)
    assert "lr1e-3" in line and "dropin" in line
    out = CliRunner().invoke(kobo, ["show", run_id, "--dir", str(base_dir)])
    assert out.exit_code == 0, out.output
    assert "annotation: lr1e-3" in out.output
    info = next(i for i in list_runs(base_dir) if i.run_id == folder)
    assert (info.id, info.annotation) == (run_id, "lr1e-3")


def test_resuming_by_bare_id_finds_the_annotated_run(daemon, base_dir):
    """Board(run_id=...) without the annotation resumes the {run_id}_{annotation} folder, not a new one."""
    with Board(run_id="r1", annotation="first try", capture_output=False) as b:
        b.log(x=1.0)
    assert Path(b.path).name == "r1_first try"
    with Board(run_id="r1", capture_output=False) as b2:
        b2.log(x=2.0)
    assert b2.path == b.path and b2.resumed
    with RunReader(b.path) as r:
        assert r.series("x")["value"].tolist() == [1.0, 2.0] and r.metadata["annotation"] == "first try"
    with pytest.raises(ValueError, match=r"annotation='a/b' cannot name the run's folder: it contains '/'"):
        Board(run_id="r2", annotation="a/b")


def test_default_name_is_two_readable_words_from_the_shipped_list(daemon, base_dir):
    names = set()
    for i in range(3):
        with Board(run_id=f"n{i}", capture_output=False) as b:
            adjective, noun = b.name.split(" ")
            assert adjective in ADJECTIVES and noun in NOUNS
            names.add(b.name)
        assert json.loads((Path(b.path) / "metadata.json").read_text())["name"] == b.name


def test_legacy_settings_at_their_defaults_are_silent(daemon):
    """A script passing KohakuBoard's defaults explicitly (sync off, no remote, no memory mode) hears nothing."""
    with Board(
        run_id="quiet",
        capture_output=False,
        sync_enabled=False,
        memory_mode=False,
        remote_url=None,
        remote_token=None,
        remote_project=None,
        sync_interval=10,
    ) as b:
        b.log(x=1.0)


def test_legacy_settings_warn_once(daemon):
    with pytest.warns(UserWarning, match=r"memory_mode=True.*ignored") as caught:
        with Board(run_id="legacy", capture_output=False, memory_mode=True) as b:
            b.log(x=1.0)
    assert len(caught) == 1


@pytest.mark.parametrize("module, prog", [("kohakuboard.cli.main", "kobo"), ("kohakuboard.daemon", "kobo-daemon")])
def test_version(module, prog):
    from importlib.metadata import version

    out = subprocess.run([sys.executable, "-m", module, "--version"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"{prog} {version('kohakuboard')}"
