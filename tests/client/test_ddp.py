"""Real DDP: 4 torchrun ranks (gloo, CPU) log into one run without being told a run id."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from kohakuboard.cli.main import main as kobo
from kohakuboard.storage.reader import RunReader, list_runs

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")

STEPS = 6
WORLD = 4

TRAIN = """
import sys
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from kohakuboard.client import Board, Histogram

steps = int(sys.argv[1])
dist.init_process_group("gloo")
rank = dist.get_rank()
torch.manual_seed(0)
model = DDP(torch.nn.Linear(8, 1))
opt = torch.optim.SGD(model.parameters(), lr=0.05)
board = Board(name="ddp-tiny", config={"lr": 0.05, "set_by_rank": rank})
print(f"hello from rank {rank}", flush=True)
data = torch.Generator().manual_seed(100 + rank)
for _ in range(steps):
    x = torch.randn(16, 8, generator=data)
    loss = torch.nn.functional.mse_loss(model(x), x.sum(dim=1, keepdim=True))
    opt.zero_grad()
    loss.backward()
    opt.step()
    board.step()
    board.log(loss=loss.item(), weight_grad=Histogram(model.module.weight.grad))
board.finish()
dist.destroy_process_group()
"""


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="torch without gloo")
def test_torchrun_ranks_log_into_one_run(daemon, base_dir, tmp_path):
    """torchrun with 4 DDP ranks and no run_id gives one finished run with every rank's points, histograms and output."""
    script = tmp_path / "train.py"
    script.write_text(TRAIN)
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={WORLD}",
            str(script),
            str(STEPS),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]

    runs = list_runs(base_dir)
    assert len(runs) == 1, [r.run_id for r in runs]
    run = runs[0]
    assert run.run_id.startswith("ddp_") and run.name == "ddp-tiny"
    with RunReader(run.path) as r:
        assert r.status == "finished"
        assert r.config == {"lr": 0.05, "set_by_rank": 0}  # rank 0's config, whoever opened first
        assert r.metadata["world_size"] == WORLD
        assert r.ranks("loss") == [0, 1, 2, 3]
        for rank, s in r.series_by_rank("loss").items():
            assert s["step"].tolist() == list(range(STEPS)), rank
            assert s["global_step"].tolist() == list(range(1, STEPS + 1)), rank
            assert np.isfinite(s["value"]).all()
            hists = r.histograms("weight_grad", rank=rank)
            assert [h["step"] for h in hists] == list(range(STEPS)), rank
            assert all(h["total"] == 8 for h in hists)  # the 1x8 weight's grad, every element binned
        assert sorted(c["rank"] for c in r.clients()) == [0, 1, 2, 3]
        assert {c["status"] for c in r.clients()} == {"finished"}

    out = CliRunner().invoke(kobo, ["show", run.path])
    assert out.exit_code == 0, out.output
    assert f"ranks:    4 (0, 1, 2, 3), world size {WORLD}" in out.output
    loss_line = next(line for line in out.output.splitlines() if line.strip().startswith("loss"))
    assert f"ranks 0,1,2,3 (points {STEPS},{STEPS},{STEPS},{STEPS})" in loss_line

    output = (Path(run.path) / "logs" / "output.log").read_text()
    for rank in range(WORLD):
        assert f"[rank {rank}] hello from rank {rank}\n" in output
