"""Every setting of the daemon, read once (environment included) into one object."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Mapping

from ..protocol.endpoint import Endpoint, resolve


@dataclass
class DaemonConfig:
    """Settings of one ``kobo-daemon``.

    ``flush_interval``: the longest a received message waits before it is
    written (the durability promise is 0.5 s; the default leaves room for the
    write itself).  ``batch_messages``: a run's batch is written as soon as it
    holds this many messages, whatever the time.  ``graceful_timeout``: how long
    shutdown may spend flushing before it gives up (the systemd units allow more).
    ``max_backlog_bytes``: received but unwritten data the daemon holds before it
    stops reading from its socket (backpressure to the clients).
    ``idle_close``: seconds after which a run with no attached client closes its
    files.  ``reap_interval``: how often dead client processes are looked for.
    """

    endpoint: Endpoint = field(default_factory=lambda: resolve(None, os.environ))
    flush_interval: float = 0.2
    batch_messages: int = 8192
    graceful_timeout: float = 30.0
    idle_close: float = 30.0
    reap_interval: float = 0.5
    max_backlog_bytes: int = 32 << 20
    log_level: str = "INFO"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: object) -> "DaemonConfig":
        """Build the config from ``KOBO_*`` variables, then explicit overrides.

        ``KOBO_DAEMON_ENDPOINT``: the endpoint (see :mod:`kohakuboard.protocol.endpoint`).
        ``KOBO_DAEMON_FLUSH_INTERVAL``: seconds.  ``KOBO_DAEMON_LOG_LEVEL``: logging level.
        """
        env = os.environ if environ is None else environ
        cfg = cls(endpoint=resolve(env.get("KOBO_DAEMON_ENDPOINT"), env))
        if "KOBO_DAEMON_FLUSH_INTERVAL" in env:
            cfg.flush_interval = float(env["KOBO_DAEMON_FLUSH_INTERVAL"])
        if "KOBO_DAEMON_LOG_LEVEL" in env:
            cfg.log_level = env["KOBO_DAEMON_LOG_LEVEL"].upper()
        for key, value in overrides.items():
            if value is None:
                continue
            if key == "endpoint" and isinstance(value, str):
                value = resolve(value, env)
            setattr(cfg, key, value)
        if not 0 < cfg.flush_interval <= 0.45:
            raise ValueError("flush_interval must be in (0, 0.45] seconds to keep the 0.5 s durability promise")
        return cfg
