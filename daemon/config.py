"""Every setting of the daemon, read once (environment included) into one immutable object.

:meth:`DaemonConfig.from_env` is the only place the daemon reads its
``KOBO_DAEMON_*`` environment variables (the table of every variable the
package reads is in ``docs/how-it-works.md``, "Environment variables"); the
``kobo-daemon`` command line overrides them.  Nothing else in the daemon looks
at the environment for a setting: the CLI has no automatic environment prefix.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..protocol.endpoint import Endpoint, resolve

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


@dataclass(frozen=True)
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
    Several nodes (see :mod:`.listen`, :mod:`.forward`, :mod:`.keys`): ``listen``:
    ``tcp://HOST:PORT`` addresses to accept forwarders on (data PORT, requests
    PORT+1); ``forward``: the head's ``tcp://HOST:PORT`` to relay everything to
    instead of writing; ``head_key``: the head's public key (or a file);
    ``key_dir``/``authorized``: where the keys are; ``insecure_plaintext``: TCP
    without CURVE.  ``system_metrics``: seconds between samples of this node
    (CPU, memory, disk and network I/O, NVIDIA GPUs) stored under ``sys/{host}/``
    in every run with a live client on this node (a ``forward`` node sends its
    samples to the head, which stores them); 0 turns it off.
    Limits of the TCP listener (see :mod:`.listen`): ``handshake_timeout``:
    seconds a TCP connection may take to authenticate before it is closed;
    ``max_connections``: open TCP connections in total (0: derived from the
    open file limit); ``max_per_address``: open TCP connections from one peer
    address; ``max_handshakes_per_address``: connections from one address still
    within their handshake time.  ``stale_run``: seconds after which the head
    marks a run crashed when none of its writers is known alive and nothing
    arrived for it (0: never).  ``compute_threads``: threads that do the CPU
    work of rich values (PNG encoding, histogram binning, KDE) for all runs, as
    messages arrive; 0: one per CPU this process may use.
    """

    endpoint: Endpoint = field(default_factory=lambda: resolve(None, os.environ))
    flush_interval: float = 0.2
    batch_messages: int = 8192
    graceful_timeout: float = 30.0
    idle_close: float = 30.0
    reap_interval: float = 0.5
    max_backlog_bytes: int = 32 << 20
    log_level: str = "INFO"
    listen: tuple[str, ...] = ()
    forward: str | None = None
    head_key: str | None = None
    key_dir: str | None = None
    authorized: str | None = None
    insecure_plaintext: bool = False
    system_metrics: float = 10.0
    handshake_timeout: float = 10.0
    max_connections: int = 0
    max_per_address: int = 256
    max_handshakes_per_address: int = 32
    stale_run: float = 600.0
    durability: str = "sync"
    compute_threads: int = 0

    def __post_init__(self) -> None:
        """Every DaemonConfig is a valid one: a value out of range raises ``ValueError``."""
        if not isinstance(self.listen, tuple):  # a list from the command line or the listener's JSON spec
            object.__setattr__(self, "listen", tuple(self.listen))
        if self.durability not in ("sync", "process"):
            raise ValueError(f"durability must be 'sync' or 'process', got {self.durability!r}")
        if self.log_level not in LOG_LEVELS:
            raise ValueError(f"log level {self.log_level!r} is not one of {', '.join(LOG_LEVELS)}")
        if not 0 < self.flush_interval <= 0.45:
            raise ValueError("flush_interval must be in (0, 0.45] seconds to keep the 0.5 s durability promise")
        if not (self.system_metrics == 0 or 0.05 <= self.system_metrics <= 86400):
            raise ValueError(
                f"system metrics interval must be 0 (off) or 0.05..86400 seconds, got {self.system_metrics}"
            )
        if not 0.1 <= self.handshake_timeout <= 3600:
            raise ValueError(f"handshake timeout must be 0.1..3600 seconds, got {self.handshake_timeout}")
        if self.max_connections < 0 or self.max_per_address < 1 or self.max_handshakes_per_address < 1:
            raise ValueError("connection limits must be positive (max_connections 0 means: from the open file limit)")
        if not 0 <= self.compute_threads <= 1024:
            raise ValueError(f"compute threads must be 0 (one per CPU) .. 1024, got {self.compute_threads}")
        if self.stale_run < 0:
            raise ValueError(f"stale run time must be >= 0 seconds (0: never), got {self.stale_run}")
        if self.listen and self.forward:
            raise ValueError("--listen and --forward cannot be combined: a forwarding node serves no other nodes")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: object) -> DaemonConfig:
        """Build the config from ``KOBO_*`` variables, then explicit overrides.

        ``KOBO_DAEMON_ENDPOINT``: the endpoint (see :mod:`kohakuboard.protocol.endpoint`).
        ``KOBO_DAEMON_FLUSH_INTERVAL``: seconds.  ``KOBO_DAEMON_LOG_LEVEL``: logging level.
        ``KOBO_DAEMON_LISTEN`` (addresses separated by spaces or commas),
        ``KOBO_DAEMON_FORWARD``, ``KOBO_DAEMON_HEAD_KEY``, ``KOBO_DAEMON_KEY_DIR``,
        ``KOBO_DAEMON_AUTHORIZED``, ``KOBO_DAEMON_INSECURE_PLAINTEXT`` (``1``).
        ``KOBO_DAEMON_SYSTEM_METRICS``: seconds between node samples, ``0`` or ``off`` for none.
        ``KOBO_DAEMON_COMPUTE_THREADS``: threads for rich values (0: one per CPU).
        ``KOBO_DAEMON_DURABILITY``: ``sync`` (default: acknowledged data survives power loss,
        see storage/format.py "Durability") or ``process`` (opt-in: it survives a crash of any
        process, not a power loss; no fsync).
        """
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {"endpoint": resolve(env.get("KOBO_DAEMON_ENDPOINT"), env)}
        if "KOBO_DAEMON_FLUSH_INTERVAL" in env:
            values["flush_interval"] = float(env["KOBO_DAEMON_FLUSH_INTERVAL"])
        if "KOBO_DAEMON_LOG_LEVEL" in env:
            values["log_level"] = env["KOBO_DAEMON_LOG_LEVEL"].upper()
        values["listen"] = tuple(env.get("KOBO_DAEMON_LISTEN", "").replace(",", " ").split())
        values["forward"] = env.get("KOBO_DAEMON_FORWARD") or None
        values["head_key"] = env.get("KOBO_DAEMON_HEAD_KEY") or None
        values["key_dir"] = env.get("KOBO_DAEMON_KEY_DIR") or None
        values["authorized"] = env.get("KOBO_DAEMON_AUTHORIZED") or None
        values["insecure_plaintext"] = env.get("KOBO_DAEMON_INSECURE_PLAINTEXT", "").strip().lower() in (
            "1",
            "true",
            "yes",
            "on",
        )
        values["durability"] = env.get("KOBO_DAEMON_DURABILITY", "sync").strip().lower() or "sync"
        sysm = env.get("KOBO_DAEMON_SYSTEM_METRICS", "").strip().lower()
        if sysm:
            try:
                values["system_metrics"] = 0.0 if sysm in ("off", "no", "false") else float(sysm)
            except ValueError:
                raise ValueError(f"KOBO_DAEMON_SYSTEM_METRICS={sysm!r} is not a number of seconds (or 'off')") from None
        for key, name, kind in (
            ("KOBO_DAEMON_HANDSHAKE_TIMEOUT", "handshake_timeout", float),
            ("KOBO_DAEMON_MAX_CONNECTIONS", "max_connections", int),
            ("KOBO_DAEMON_MAX_PER_ADDRESS", "max_per_address", int),
            ("KOBO_DAEMON_MAX_HANDSHAKES_PER_ADDRESS", "max_handshakes_per_address", int),
            ("KOBO_DAEMON_STALE_RUN", "stale_run", float),
            ("KOBO_DAEMON_COMPUTE_THREADS", "compute_threads", int),
        ):
            text = env.get(key, "").strip()
            if text:
                try:
                    values[name] = kind(text)
                except ValueError:
                    raise ValueError(f"{key}={text!r} is not a{'n integer' if kind is int else ' number'}") from None
        names = {f.name for f in dataclasses.fields(cls)}
        for key, value in overrides.items():
            if value is None:
                continue
            if key not in names:
                raise TypeError(f"DaemonConfig has no setting {key!r}")
            if key == "endpoint" and isinstance(value, str):
                value = resolve(value, env)
            values[key] = value
        cfg = cls(**values)
        return cfg
