"""The daemon samples its node (CPU, memory, disk and network I/O, NVIDIA GPUs) into every run
with a live client on it, under ``sys/{host}/``; training processes do nothing for it.  A
forwarding node's daemon sends its node's samples to the head, delivered like its clients' calls."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kohakuboard.client import Board
from kohakuboard.daemon.config import DaemonConfig
from kohakuboard.daemon.sysmetrics import NodeSampler
from kohakuboard.storage.reader import RunReader
from kohakuboard.storage.verify import verify_run
from kohakuboard.testing import daemon_status, wait_until

from .test_multinode import (
    HEAD_CODE,
    NODE,
    NODE_HOST,
    UTS,
    kobo_daemon,
    node_daemon,
    node_setup,
    ports_free,
    second_endpoint,  # noqa: F401  (a fixture of the tests with a forwarding node)
    start_head,
    stop_head,
)

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

        def samples() -> int:
            with RunReader(board.path) as run:
                return run.num_points(P + "memory/percent", 0)

        for i in range(12):
            board.step()
            board.log(loss=float(i))
            if i % 4 == 3:  # three samples at least, taken while the training is at different steps
                board.flush()
                before = samples()
                wait_until(lambda: samples() > before, message=f"no sample at step {i}")  # noqa: B023
    finished = time.time()
    time.sleep(0.6)  # nothing is sampled into a run nobody is attached to
    with RunReader(board.path) as run:
        assert run.series("loss")["step"].tolist() == list(range(12))  # the training's steps are its own
        assert run.series("loss")["global_step"].tolist() == list(range(1, 13))
        names = set(run.list_metrics())
        for name in (
            "cpu/percent",
            "cpu/load1",
            "memory/percent",
            "memory/used_gb",
            "disk/read_mb_s",
            "disk/write_mb_s",
            "net/recv_mb_s",
            "net/sent_mb_s",
        ):
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


def test_off_means_nothing_is_sampled(daemon, base_dir: Path):
    """The suite's daemons sample nothing (system metrics 0): a run has only what was logged."""
    with Board("nosys", base_dir=base_dir, capture_output=False) as board:
        board.log(x=1.0)
        time.sleep(0.5)  # an observation window: no sample may arrive in it (not a wait for anything)
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


# ------------------------------------------------ a forwarding node (--forward)
# Set up as in test_multinode.py: a head daemon listening on TCP (CURVE) and a
# node's forwarding daemon under a hostname of its own (``unshare --uts``).

# A training process of rank RANK on the node (or on the head): logs, flushes, and
# stays attached until the file GO exists.
TRAINS = r"""
import os, sys, time
from kohakuboard.client import Board
run_id, rank, go = sys.argv[1], int(sys.argv[2]), sys.argv[3]
b = Board(name=run_id, run_id=run_id, project="nodes", rank=rank, world_size=2, capture_output=False, timeout=30)
for i in range(10):
    b.step()
    b.log(loss=float(i))
b.flush(timeout=30)
print("flushed", flush=True)
while not os.path.exists(go):
    time.sleep(0.02)
b.finish(timeout=30)
print("DONE", flush=True)
"""

# The host name the node samples under (without UTS namespaces: this machine's,
# and the head is told it runs elsewhere, see test_multinode.REMOTE_HEAD).
NODE_SYS = f"sys/{NODE_HOST if UTS else HOST}/"


def _trains(endpoint, run_id: str, rank: int, tmp_path: Path, *, on_node: bool):
    script = tmp_path / "trains.py"
    script.write_text(TRAINS)
    go = tmp_path / f"go-{run_id}-{rank}"
    proc = subprocess.Popen(
        [*(NODE if on_node else ()), sys.executable, str(script), run_id, str(rank), str(go)],
        env={**os.environ, "KOBO_DAEMON_ENDPOINT": str(endpoint), "KOBO_DAEMON_AUTOSTART": "0"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    line = proc.stdout.readline().strip()
    if line != "flushed":
        proc.kill()
        raise AssertionError(f"training process did not start: {line}\n{proc.communicate()[1]}")
    return proc, go


def _finish(proc, go: Path) -> None:
    go.touch()
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0 and "DONE" in out, err


def _points(run: Path, name: str, rank: int) -> int:
    with RunReader(run) as r:
        return r.num_points(name, rank)


def _poll(cond, why, timeout: float = 30.0) -> None:
    """Wait until ``cond()`` holds; fail with ``why()`` after ``timeout`` seconds."""
    wait_until(cond, timeout, 0.05, why)


def _wait_points(run: Path, name: str, rank: int, n: int, why) -> None:
    _poll(lambda: _points(run, name, rank) >= n, lambda: f"fewer than {n} points of {name} (rank {rank})\n{why()}")


def _node_status(ep) -> dict:
    return daemon_status(ep)["forward"]


def test_forwarding_node_samples_itself_into_the_head_run(
    endpoint, second_endpoint, daemon_factory, base_dir, tmp_path
):
    """A worker node's forwarder samples its node; the samples reach the head's run under the node's host,
    at the rank and step of the node's client, each once and in order; the head (sampling too) adds none."""
    head_args, node_args = node_setup(tmp_path)
    head_log = tmp_path / "head.log"
    head = start_head(endpoint, [*head_args, "--system-metrics", "0.2"], head_log, code=HEAD_CODE)
    try:
        node = node_daemon(
            daemon_factory, second_endpoint, "--endpoint", str(second_endpoint), *node_args, "--system-metrics", "0.2"
        )
        client, go = _trains(second_endpoint, "sysnode", 1, tmp_path, on_node=True)
        run = base_dir / "nodes" / "sysnode"
        opened = time.time()
        _wait_points(run, NODE_SYS + "memory/percent", 1, 5, lambda: node.output() + head_log.read_text())
        _finish(client, go)
        finished = time.time()
        # the head confirms every sample durable (the node holds none): each sent one is stored, once
        _poll(lambda: _node_status(second_endpoint)["system_metrics"]["held"] == 0, lambda: node.output())
        with RunReader(run) as r:
            assert r.status == "finished"
            names = set(r.list_metrics(rank=None))
            for name in (
                "cpu/percent",
                "cpu/load1",
                "memory/percent",
                "memory/used_gb",
                "disk/read_mb_s",
                "disk/write_mb_s",
                "net/recv_mb_s",
                "net/sent_mb_s",
            ):
                assert NODE_SYS + name in names, (name, sorted(names))
            # only the node's own samples: the head samples runs with clients of its host, none here
            assert not [n for n in names if n.startswith("sys/") and not n.startswith(NODE_SYS)], sorted(names)
            assert r.ranks(NODE_SYS + "memory/percent") == [1]  # the rank of the node's client
            if UTS:
                assert {c["host"] for c in r.clients() if c["rank"] == 1} == {NODE_HOST}
            mem = r.series(NODE_SYS + "memory/percent", rank=1)
            cpu = r.series(NODE_SYS + "cpu/percent", rank=1)
            assert len(mem) >= 5
            assert all(0 <= v <= 100 for v in mem["value"].tolist() + cpu["value"].tolist())
            walls = mem["wall"].tolist()
            # each sample once, in order, taken while the client was attached
            assert all(a < b for a, b in zip(walls, walls[1:])), walls
            assert opened - 5 <= walls[0] and walls[-1] <= finished + 0.3
            # at the step the node's client had reached (its last call; (0, 0) for a sample right after it
            # opened the run, before its first call)
            last = r.series("loss", rank=1)[-1]
            at = list(zip(mem["step"].tolist(), mem["global_step"].tolist()))
            assert at[-1] == (last["step"], last["global_step"]) and set(at) <= {(0, 0), at[-1]}, at
            assert not [e for e in r.events() if e["kind"] == "gap"], r.events()
        assert verify_run(run).exit_code == 0
        st = _node_status(second_endpoint)["system_metrics"]
        assert st["interval"] == 0.2 and st["sent"] == st["durable"] == len(mem) and st["resent"] == 0, st
        assert (
            f"{len(mem)} stored in runs by the head" in kobo_daemon("status", "--endpoint", str(second_endpoint)).stdout
        )
        assert node.terminate() == 0, node.output()
    finally:
        stop_head(head, head_log)


def test_forwarding_node_with_system_metrics_off_sends_none(
    endpoint, second_endpoint, daemon_factory, base_dir, tmp_path
):
    """``--system-metrics 0`` on the node: no samples of it, while the head's own samples of the same run go on."""
    head_args, node_args = node_setup(tmp_path)
    head_log = tmp_path / "head.log"
    # An ordinary head (its own host name) with a client of its own in the run: it samples itself at rank 0.
    head = start_head(endpoint, [*head_args, "--system-metrics", "0.2"], head_log)
    try:
        node = node_daemon(
            daemon_factory, second_endpoint, "--endpoint", str(second_endpoint), *node_args, "--system-metrics", "0"
        )
        on_node, go_node = _trains(second_endpoint, "nosysnode", 1, tmp_path, on_node=True)
        on_head, go_head = _trains(endpoint, "nosysnode", 0, tmp_path, on_node=False)
        run = base_dir / "nodes" / "nosysnode"
        # 5 samples of the head at 0.2 s: the node, were it sampling, would have sent some meanwhile
        own = f"sys/{HOST}/"
        _wait_points(run, own + "memory/percent", 0, 5, lambda: node.output() + head_log.read_text())
        _finish(on_node, go_node)
        _finish(on_head, go_head)
        with RunReader(run) as r:
            sys_names = [n for n in r.list_metrics(rank=None) if n.startswith("sys/")]
            assert sys_names and all(n.startswith(own) for n in sys_names), sys_names
            assert all(r.ranks(n) == [0] for n in sys_names)  # none at the node's rank
            assert r.status == "finished"
        st = _node_status(second_endpoint)["system_metrics"]
        assert st["interval"] == 0 and st["samples"] == st["sent"] == 0, st
        assert node.terminate() == 0, node.output()
    finally:
        stop_head(head, head_log)


def test_node_samples_held_through_a_head_restart_arrive_once(
    endpoint, second_endpoint, daemon_factory, base_dir, tmp_path
):
    """The head is killed and restarted while the node samples: what the node sampled meanwhile arrives
    afterwards, and nothing in flight at the kill is lost twice or stored twice (forwarded delivery)."""
    head_args, node_args = node_setup(tmp_path)
    head_log = tmp_path / "head.log"
    head = start_head(endpoint, head_args, head_log, code=HEAD_CODE)
    try:
        node = node_daemon(
            daemon_factory, second_endpoint, "--endpoint", str(second_endpoint), *node_args, "--system-metrics", "0.2"
        )
        client, go = _trains(second_endpoint, "sysrestart", 1, tmp_path, on_node=True)
        run = base_dir / "nodes" / "sysrestart"
        name = NODE_SYS + "memory/percent"
        why = lambda: node.output() + head_log.read_text()  # noqa: E731
        _wait_points(run, name, 1, 3, why)
        head.kill()
        head.wait(10)
        down = time.time()
        taken = _node_status(second_endpoint)["system_metrics"]["samples"]
        _poll(lambda: _node_status(second_endpoint)["system_metrics"]["samples"] >= taken + 3, why)
        # The killed head's TCP listener (a child process, killed with it by PR_SET_PDEATHSIG) takes a moment to go.
        port = int(head_args[1].rsplit(":", 1)[1])
        _poll(lambda: ports_free(port), lambda: f"port {port} still taken after the head was killed\n{why()}")
        head = start_head(endpoint, head_args, head_log, code=HEAD_CODE)
        up = time.time()

        def walls() -> list[float]:
            with RunReader(run) as r:
                return r.series(name, rank=1)["wall"].tolist() if r.num_points(name, 1) else []

        _poll(lambda: (w := walls()) and w[-1] > up + 0.4, why)
        _finish(client, go)
        _poll(lambda: _node_status(second_endpoint)["system_metrics"]["held"] == 0, why)
        w = walls()
        assert all(a < b for a, b in zip(w, w[1:])), w  # each sample once, in order
        # every sample taken into the run arrived once: as many stored as the head confirmed
        st = _node_status(second_endpoint)["system_metrics"]
        assert st["durable"] == st["sent"] == len(w), (st, len(w))
        assert len([x for x in w if down < x < up]) >= 2, (down, up, w)  # sampled while the head was down
        with RunReader(run) as r:
            assert r.status == "finished"
            assert not [e for e in r.events() if e["kind"] == "gap"], r.events()
        assert verify_run(run).exit_code == 0
        assert node.terminate() == 0, node.output()
    finally:
        stop_head(head, head_log)
