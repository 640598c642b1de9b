"""The daemon samples its node (CPU, memory, disk and network I/O, NVIDIA GPUs) into every run
with a live client on it, under ``sys/{host}/``; training processes do nothing for it."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest

from kohakuboard.client import Board
from kohakuboard.daemon.config import DaemonConfig
from kohakuboard.daemon.sysmetrics import NodeSampler
from kohakuboard.storage.reader import RunReader
from kohakuboard.storage.verify import verify_run

HOST = socket.gethostname()
P = f"sys/{HOST}/"


def test_config_default_env_and_off():
    assert DaemonConfig.from_env({}).system_metrics == 10.0
    assert DaemonConfig.from_env({"KOBO_DAEMON_SYSTEM_METRICS": "2.5"}).system_metrics == 2.5
    assert DaemonConfig.from_env({"KOBO_DAEMON_SYSTEM_METRICS": "off"}).system_metrics == 0
    assert DaemonConfig.from_env({}, system_metrics=0.0).system_metrics == 0
    with pytest.raises(ValueError, match="not a number"):
        DaemonConfig.from_env({"KOBO_DAEMON_SYSTEM_METRICS": "often"})
    with pytest.raises(ValueError, match="0 .off. or 0.05"):
        DaemonConfig.from_env({"KOBO_DAEMON_SYSTEM_METRICS": "-1"})


def test_samples_reach_runs_with_a_live_client(endpoint, monkeypatch, daemon_factory, base_dir: Path):
    monkeypatch.setenv("KOBO_DAEMON_SYSTEM_METRICS", "0.2")
    d = daemon_factory()
    opened = time.time()
    with Board("sys", base_dir=base_dir, capture_output=False) as board:
        for i in range(12):
            board.step()
            board.log(loss=float(i))
            time.sleep(0.1)
    finished = time.time()
    time.sleep(0.6)  # nothing is sampled into a run nobody is attached to
    with RunReader(board.path) as run:
        assert run.series("loss")["step"].tolist() == list(range(12))  # the training's steps are its own
        assert run.series("loss")["global_step"].tolist() == list(range(1, 13))
        names = set(run.list_metrics())
        for name in ("cpu/percent", "cpu/load1", "memory/percent", "memory/used_gb",
                     "disk/read_mb_s", "disk/write_mb_s", "net/recv_mb_s", "net/sent_mb_s"):
            assert P + name in names, (name, sorted(names))
        cpu, mem = run.series(P + "cpu/percent"), run.series(P + "memory/percent")
        assert len(mem) >= 3
        assert all(0 <= v <= 100 for v in cpu["value"].tolist() + mem["value"].tolist())
        assert 0 < run.series(P + "memory/used_gb")["value"][0] < 1 << 20
        walls = mem["wall"].tolist()
        assert walls == sorted(walls) and opened <= walls[0] and walls[-1] <= finished + 0.3
        # at the run's latest step when sampled: they line up with training on the step axis
        assert all(0 <= s <= 11 for s in mem["step"].tolist())
        assert mem["step"].tolist() == sorted(mem["step"].tolist())
        assert run.status == "finished"
    assert verify_run(board.path).exit_code == 0
    assert d.proc.poll() is None


def test_off_means_nothing_is_sampled(endpoint, monkeypatch, daemon_factory, base_dir: Path):
    monkeypatch.setenv("KOBO_DAEMON_SYSTEM_METRICS", "0")
    daemon_factory()
    with Board("nosys", base_dir=base_dir, capture_output=False) as board:
        board.log(x=1.0)
        time.sleep(0.5)
    with RunReader(board.path) as run:
        assert run.list_metrics() == ["x"]


def test_gpu_metrics_through_nvml():
    sampler = NodeSampler()
    try:
        if sampler.gpus.nvml is None:
            pytest.skip(f"no NVIDIA GPU metrics here ({sampler.gpus.why})")
        time.sleep(0.1)
        values = sampler.sample()
        for i in range(len(sampler.gpus.handles)):
            assert f"{P}gpu{i}/memory_used_gb" in values
            assert 0 <= values[f"{P}gpu{i}/memory_percent"] <= 100
            if f"{P}gpu{i}/util_percent" in values:
                assert 0 <= values[f"{P}gpu{i}/util_percent"] <= 100
    finally:
        sampler.close()
