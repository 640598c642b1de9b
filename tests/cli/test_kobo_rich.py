"""kobo show and kobo export on a run with rich values, written through a real daemon."""

from __future__ import annotations

import csv
import io
import json

import numpy as np
from click.testing import CliRunner

from kohakuboard.cli.main import main as kobo
from kohakuboard.client import Board, Histogram, KernelDensity, Media, Table, TensorLog


def _make_run(base_dir) -> str:
    img = np.arange(4 * 4 * 3, dtype=np.uint8).reshape(4, 4, 3)
    with Board(name="richcli", run_id="richcli", capture_output=False, config={"lr": 0.1}) as b:
        for step in range(2):
            b.log(
                **{"train/loss": 1.0 / (step + 1), "val/acc": float("nan") if step == 0 else 0.5},
                sample=Media(img, caption="x"),
                preds=Table([{"img": Media(img), "label": "cat"}]),
                grads=Histogram(np.arange(100.0)),
                attn=TensorLog(np.eye(3)),
                logits=KernelDensity(values=np.arange(50.0)),
            )
    return b.path


def test_show_lists_every_kind_with_counts(daemon, base_dir):
    """kobo show names the scalars and each rich series with how many times it was logged."""
    _make_run(base_dir)
    res = CliRunner().invoke(kobo, ["show", "richcli", "--dir", str(base_dir)])
    assert res.exit_code == 0, res.output
    out = res.output
    assert "status:   finished" in out and "lr: 0.1" in out
    assert "train/loss" in out and "2 points" in out
    assert "media: sample (2)" in out
    assert "tables: preds (2)" in out
    assert "histograms: grads (2)" in out
    assert "tensors: attn (2)" in out
    assert "kernel densities: logits (2)" in out


def test_export_csv_and_media_files(daemon, base_dir, tmp_path):
    """kobo export writes every point (NaN kept) and, with --media-dir, every image including table cells."""
    path = _make_run(base_dir)
    media_dir = tmp_path / "media_out"
    res = CliRunner().invoke(kobo, ["export", path, "--format", "csv", "--media-dir", str(media_dir)])
    assert res.exit_code == 0, res.output
    lines = [ln for ln in res.output.splitlines() if not ln.startswith("wrote ")]
    rows = list(csv.DictReader(io.StringIO("\n".join(lines))))
    assert [(r["metric"], r["step"], r["value"]) for r in rows] == [
        ("train/loss", "0", "1.0"),
        ("train/loss", "1", "0.5"),
        ("val/acc", "0", "nan"),
        ("val/acc", "1", "0.5"),
    ]
    files = sorted(p.name for p in media_dir.iterdir())
    assert len(files) == 4  # sample x2 + the table's image cell x2
    assert any(f.startswith("sample_00000000_") and f.endswith(".png") for f in files)


def test_export_jsonl_nan_is_null(daemon, base_dir):
    """JSON lines export is valid JSON: NaN becomes null."""
    path = _make_run(base_dir)
    res = CliRunner().invoke(kobo, ["export", path, "--format", "jsonl", "--metric", "val/acc"])
    assert res.exit_code == 0, res.output
    points = [json.loads(line) for line in res.output.splitlines()]
    assert [p["value"] for p in points] == [None, 0.5]


def test_show_unknown_run_is_a_clear_error(base_dir):
    """Asking for a run that does not exist says so and exits non-zero."""
    res = CliRunner().invoke(kobo, ["show", "nope", "--dir", str(base_dir)])
    assert res.exit_code != 0 and "no run 'nope'" in res.output
