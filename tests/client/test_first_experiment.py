"""The guide's "Your First Experiment", run as written with a stand-in training loop."""

from __future__ import annotations

import json
import os
from pathlib import Path

from click.testing import CliRunner

from kohakuboard.protocol.endpoint import daemon_alive

FIRST_EXPERIMENT = """
import random
from kohakuboard.client import Board

class _Opt:
    param_groups = [{"lr": 0.001}]

optimizer = _Opt()
train_loader = [(i, i % 10) for i in range(20)]

def train_step(data, target):
    return 1.0 / (1 + data) + random.random() * 1e-3

# Create a board (auto-creates directory structure)
board = Board(
    name="my-first-experiment",
    config={
        "learning_rate": 0.001,
        "batch_size": 32,
        "model": "ResNet-50"
    }
)

# Training loop
for epoch in range(10):
    for batch_idx, (data, target) in enumerate(train_loader):
        loss = train_step(data, target)

        # Increment ONCE per optimizer/batch update
        board.step()

        # Log metrics (non-blocking!)
        board.log(
            loss=loss,
            lr=optimizer.param_groups[0]['lr']
        )

# Auto-saves on exit (via atexit hook)
print(board.path)
"""


def _daemon_pid(endpoint) -> int:
    return int(Path(endpoint.pid_path).read_text())


def test_first_experiment_runs_without_a_daemon_started_by_hand(endpoint, tmp_path, script):
    """The first example starts a daemon itself, saves every step, and the daemon outlives it."""
    os.environ.pop("KOBO_BASE_DIR")  # the guide's default: ./kohakuboard under the cwd
    assert not daemon_alive(endpoint)
    first = script(FIRST_EXPERIMENT, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    run_path = Path(first.stdout.strip().splitlines()[-1])
    assert run_path.parent.parent == tmp_path / "kohakuboard"
    assert daemon_alive(endpoint), "the daemon must outlive the training script"
    pid = _daemon_pid(endpoint)

    meta = json.loads((run_path / "metadata.json").read_text())
    assert meta["status"] == "finished"
    assert meta["config"] == {"learning_rate": 0.001, "batch_size": 32, "model": "ResNet-50"}

    from kohakuboard.cli.main import main as kobo

    shown = CliRunner().invoke(kobo, ["show", str(run_path)])
    assert shown.exit_code == 0, shown.output
    assert "loss" in shown.output and "lr" in shown.output
    assert "200" in shown.output  # 10 epochs x 20 batches, every step

    from kohakuboard.storage.reader import RunReader

    with RunReader(run_path) as r:
        loss = r.series("loss")
        lr = r.series("lr")
    assert list(loss["step"]) == list(range(200))
    assert list(loss["global_step"]) == list(range(1, 201))
    assert (lr["value"] == 0.001).all()

    second = script(FIRST_EXPERIMENT, cwd=tmp_path)
    assert second.returncode == 0, second.stderr
    assert _daemon_pid(endpoint) == pid, "a second script must reuse the running daemon"
    assert Path(second.stdout.strip().splitlines()[-1]) != run_path
