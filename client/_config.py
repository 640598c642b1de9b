"""Every client setting, read once (environment included) into one object.

Environment variables (the only place the client reads them):

``KOBO_DAEMON_ENDPOINT``   daemon endpoint (default: per-user IPC socket)
``KOBO_DAEMON_AUTOSTART``  ``0`` to never start a daemon (default ``1``)
``KOBO_BASE_DIR``          default ``base_dir`` of new boards (default ``./kohakuboard``)
``RANK``                   this process's rank in a distributed launch (default 0)
``LOCAL_RANK``             its rank on this node (default: the rank)
``WORLD_SIZE``             how many ranks the launch has (default 1)
``KOBO_MAX_INFLIGHT_MB``   bound on log data not yet acknowledged as durable, queued
                           and sent (default 64)
``KOBO_QUEUE_POLICY``      what ``log()`` does at that bound: ``block`` (default) or
                           ``drop`` (discard the newest calls, counted in the run)
``TORCHELASTIC_RUN_ID``    set by torchrun, the same on every rank of one launch: the
                           run id of a distributed run is derived from it (see ``Board``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..protocol.endpoint import Endpoint, resolve

QUEUE_POLICIES = ("block", "drop")


@dataclass(frozen=True)
class ClientConfig:
    """Client settings; see the module docstring for the environment."""

    endpoint: Endpoint
    autostart: bool = True
    base_dir: str = "./kohakuboard"
    rank: int = 0
    local_rank: int | None = None
    world_size: int = 1
    elastic_run_id: str | None = None
    open_timeout: float = 30.0
    flush_timeout: float = 60.0
    finish_timeout: float = 10.0
    max_queue: int = 200_000
    max_inflight_bytes: int = 64 << 20
    queue_policy: str = "block"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ClientConfig:
        env = os.environ if environ is None else environ
        rank = _int_env(env, "RANK", 0, minimum=0)
        elastic = (env.get("TORCHELASTIC_RUN_ID") or "").strip()
        policy = (env.get("KOBO_QUEUE_POLICY") or "block").strip().lower()
        if policy not in QUEUE_POLICIES:
            raise ValueError(f"KOBO_QUEUE_POLICY={policy!r} must be one of {', '.join(QUEUE_POLICIES)}")
        return cls(
            endpoint=resolve(env.get("KOBO_DAEMON_ENDPOINT"), env),
            autostart=env.get("KOBO_DAEMON_AUTOSTART", "1").strip().lower() not in ("0", "false", "no", "off"),
            base_dir=env.get("KOBO_BASE_DIR") or "./kohakuboard",
            rank=rank,
            local_rank=_int_env(env, "LOCAL_RANK", None, minimum=0),
            world_size=_int_env(env, "WORLD_SIZE", 1, minimum=1),
            elastic_run_id=elastic or None,
            max_inflight_bytes=_int_env(env, "KOBO_MAX_INFLIGHT_MB", 64, minimum=1) << 20,
            queue_policy=policy,
        )


def _int_env(env: Mapping[str, str], key: str, default: Any, *, minimum: int) -> Any:
    text = (env.get(key) or "").strip()
    if not text:
        return default
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"{key}={text!r} is not an integer") from None
    if value < minimum:
        raise ValueError(f"{key}={text!r} must be at least {minimum}")
    return value
