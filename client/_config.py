"""Every client setting, read once (environment included) into one object.

Environment variables (the only place the client reads them):

``KOBO_DAEMON_ENDPOINT``   daemon endpoint (default: per-user IPC socket)
``KOBO_DAEMON_AUTOSTART``  ``0`` to never start a daemon (default ``1``)
``KOBO_BASE_DIR``          default ``base_dir`` of new boards (default ``./kohakuboard``)
``RANK``                   this process's rank in a distributed launch (default 0)
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping

from ..protocol.endpoint import Endpoint, resolve


@dataclass(frozen=True)
class ClientConfig:
    """Client settings; see the module docstring for the environment."""

    endpoint: Endpoint
    autostart: bool = True
    base_dir: str = "./kohakuboard"
    rank: int = 0
    open_timeout: float = 30.0
    flush_timeout: float = 60.0
    finish_timeout: float = 10.0
    max_queue: int = 200_000

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "ClientConfig":
        env = os.environ if environ is None else environ
        rank_text = env.get("RANK", "0") or "0"
        try:
            rank = int(rank_text)
        except ValueError:
            raise ValueError(f"RANK={rank_text!r} is not an integer") from None
        return cls(
            endpoint=resolve(env.get("KOBO_DAEMON_ENDPOINT"), env),
            autostart=env.get("KOBO_DAEMON_AUTOSTART", "1").strip().lower() not in ("0", "false", "no", "off"),
            base_dir=env.get("KOBO_BASE_DIR") or "./kohakuboard",
            rank=rank,
        )
