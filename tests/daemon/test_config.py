"""DaemonConfig: read once from the environment (and overrides) into an immutable object."""

from __future__ import annotations

import dataclasses

import pytest

from kohakuboard.daemon.config import DaemonConfig


def test_the_config_is_immutable():
    cfg = DaemonConfig.from_env({})
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.flush_interval = 0.1  # type: ignore[misc]


def test_environment_then_overrides_and_nothing_else():
    env = {
        "KOBO_DAEMON_ENDPOINT": "ipc:///tmp/kobo-config-test/kobo",
        "KOBO_DAEMON_FLUSH_INTERVAL": "0.1",
        "KOBO_DAEMON_LISTEN": "tcp://*:7000, tcp://*:7002",
        "KOBO_DAEMON_STALE_RUN": "60",
        "KOBO_DAEMON_STOP_TIMEOUT": "5",  # no such setting: not picked up
    }
    cfg = DaemonConfig.from_env(env, stale_run=30.0, graceful_timeout=None)
    assert cfg.endpoint.base == "/tmp/kobo-config-test/kobo"
    assert cfg.flush_interval == 0.1 and cfg.stale_run == 30.0 and cfg.graceful_timeout == 30.0
    assert cfg.listen == ("tcp://*:7000", "tcp://*:7002")
    assert DaemonConfig.from_env({}) == DaemonConfig.from_env({"KOBO_DAEMON_STOP_TIMEOUT": "5"})


def test_an_unknown_override_is_refused():
    with pytest.raises(TypeError, match="no setting 'stop_timeout'"):
        DaemonConfig.from_env({}, stop_timeout=5.0)


def test_a_listen_list_becomes_a_tuple():
    """The listener process rebuilds its config from JSON, where the addresses are a list."""
    assert DaemonConfig(listen=["tcp://*:7000"]).listen == ("tcp://*:7000",)  # type: ignore[arg-type]


def test_every_config_is_checked_however_it_is_made():
    with pytest.raises(ValueError, match="flush_interval"):
        DaemonConfig(flush_interval=1.0)
    with pytest.raises(ValueError, match="cannot be combined"):
        DaemonConfig.from_env({}, listen=["tcp://*:7000"], forward="tcp://head:7000")
