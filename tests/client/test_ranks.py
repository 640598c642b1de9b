"""Ranks from the environment: one run per launch, rank 0 owns the metadata, output labelled by rank."""

from __future__ import annotations

import json
import re

import pytest

from kohakuboard.client import Board
from kohakuboard.storage.reader import RunReader


def test_world_size_without_run_id_or_launch_id_is_refused(endpoint, base_dir, monkeypatch):
    """WORLD_SIZE > 1 with neither run_id nor a torchrun launch id raises a ValueError asking for run_id=."""
    monkeypatch.setenv("KOBO_DAEMON_AUTOSTART", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(ValueError, match=r"pass run_id=\.\.\. \(the same string on every rank"):
        Board(name="exp")
    # torchrun's static rendezvous without --rdzv-id: the id is 'none' in every launch
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")
    with pytest.raises(ValueError, match="--rdzv-id"):
        Board(name="exp")
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.delenv("RANK")
    with pytest.raises(ValueError, match="run_id"):
        Board(name="exp", world_size=4, rank=2)
    with pytest.raises(ValueError, match="not below world_size"):
        Board(name="exp", run_id="x", world_size=2, rank=2)
    assert not base_dir.exists()  # refused before anything was created


def test_ranks_of_one_launch_share_a_run_and_rank_0_owns_its_metadata(daemon, base_dir, monkeypatch):
    """Ranks with the same TORCHELASTIC_RUN_ID get one ddp_ run; name, config and world size come from rank 0 only."""
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "launch-a")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    first = Board(name="exp", config={"set_by": "rank 1"}, capture_output=False)  # rank 1 creates the run
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    zero = Board(name="exp", config={"lr": 0.1}, capture_output=False)
    assert (first.rank, first.local_rank, first.world_size) == (1, 1, 2)
    assert (zero.rank, zero.local_rank, zero.world_size) == (0, 0, 2)
    assert first.run_id == zero.run_id and re.fullmatch(r"ddp_[0-9a-f]{12}", zero.run_id)
    for i in range(3):
        first.log(loss=10 + i)
        zero.log(loss=i)
    first.finish()
    zero.finish()
    # a rank other than 0 resuming with its own name and config changes neither
    with Board(
        name="renamed", run_id=zero.run_id, config={"set_by": "rank 1 again"}, rank=1, capture_output=False
    ) as again:
        again.log(loss=13)

    meta = json.loads((base_dir / "default" / zero.run_id / "metadata.json").read_text())
    assert (meta["name"], meta["config"], meta["world_size"]) == ("exp", {"lr": 0.1}, 2)
    with RunReader(zero.path) as r:
        assert r.series("loss")["value"].tolist() == [0, 1, 2]
        assert r.series("loss", rank=1)["value"].tolist() == [10, 11, 12, 13]
    # another launch, project or name is another run
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "launch-b")
    with Board(name="exp", capture_output=False) as other:
        assert other.run_id != zero.run_id and other.run_id.startswith("ddp_")


RANK_SCRIPT = """
import sys
from kohakuboard.client import Board
board = Board(name="labels", run_id="labels")
print("line a\\nline b")
print("to stderr", file=sys.stderr)
board.log(x=1)
sys.stdout.write("tail without newline")
"""


def test_captured_output_is_labelled_by_rank(daemon, base_dir, tmp_path, script):
    """With WORLD_SIZE=2 every line in logs/output.log starts with [rank N]; the terminal and 1-process runs are unchanged."""
    for rank in (0, 1):
        res = script(RANK_SCRIPT, cwd=tmp_path, env={"WORLD_SIZE": "2", "RANK": str(rank)})
        assert res.returncode == 0, res.stderr
        assert res.stdout == "line a\nline b\ntail without newline"  # the terminal sees no labels
    lines = (base_dir / "default" / "labels" / "logs" / "output.log").read_text().splitlines(keepends=True)
    for rank in (0, 1):
        mine = [line for line in lines if line.startswith(f"[rank {rank}] ")]
        assert sorted(mine) == sorted(
            f"[rank {rank}] {text}\n" for text in ("line a", "line b", "[stderr] to stderr", "tail without newline")
        )
    assert len(lines) == 8

    res = script(RANK_SCRIPT.replace('"labels"', '"single"'), cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    single = (base_dir / "default" / "single" / "logs" / "output.log").read_text()
    assert sorted(single.splitlines()) == ["[stderr] to stderr", "line a", "line b", "tail without newline"]
