"""``kobo-daemon run|start|stop|status``: a thin layer over :class:`~.server.Daemon`."""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time

import click

from ..protocol.endpoint import daemon_alive
from ..protocol.errors import KoboError
from .config import DaemonConfig

_endpoint_option = click.option(
    "--endpoint",
    envvar="KOBO_DAEMON_ENDPOINT",
    default=None,
    help="Endpoint (ipc:///path/prefix); default: the per-user socket. Env: KOBO_DAEMON_ENDPOINT.",
)


def _config(endpoint: str | None, **overrides: object) -> DaemonConfig:
    try:
        return DaemonConfig.from_env(endpoint=endpoint, **overrides)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc


@click.group(context_settings={"auto_envvar_prefix": "KOBO_DAEMON", "help_option_names": ["-h", "--help"]})
def main() -> None:
    """The per-node KohakuBoard daemon: receives log messages and writes run folders."""


@main.command()
@_endpoint_option
@click.option("--flush-interval", type=float, default=None, help="Seconds a message may wait before it is written (<= 0.45).")
@click.option("--log-level", default=None, help="DEBUG, INFO, WARNING or ERROR.")
def run(endpoint: str | None, flush_interval: float | None, log_level: str | None) -> None:
    """Run in the foreground (what systemd and autostart run). SIGTERM drains and exits 0."""
    from .server import Daemon

    cfg = _config(endpoint, flush_interval=flush_interval, log_level=log_level.upper() if log_level else None)
    logging.basicConfig(
        level=getattr(logging, cfg.log_level, logging.INFO),
        format="%(asctime)s %(levelname)s kobo-daemon: %(message)s",
        stream=sys.stderr,
    )
    sys.exit(Daemon(cfg).run())


@main.command()
@_endpoint_option
@click.option("--timeout", type=float, default=15.0, show_default=True, help="Seconds to wait for it to be ready.")
def start(endpoint: str | None, timeout: float) -> None:
    """Start a detached daemon (no-op if one is already running)."""
    from ..client._spawn import ensure_daemon

    cfg = _config(endpoint)
    try:
        started = ensure_daemon(cfg.endpoint, autostart=True, timeout=timeout)
    except KoboError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"kobo-daemon {'started' if started else 'already running'} on {cfg.endpoint}")


def _request(cfg: DaemonConfig, kind: str, timeout: float) -> object:
    from ..client._transport import Connection
    from ..protocol import messages as m

    conn = Connection(cfg.endpoint)
    try:
        cls = m.StatusRequest if kind == "status" else m.ShutdownRequest
        return conn.request(cls, m.Envelope(), timeout)
    finally:
        conn.close()


@main.command()
@_endpoint_option
@click.option("--timeout", type=float, default=60.0, show_default=True, help="Seconds to wait for it to exit.")
def stop(endpoint: str | None, timeout: float) -> None:
    """Ask the daemon to flush everything and exit; wait until it has."""
    cfg = _config(endpoint)
    if not daemon_alive(cfg.endpoint):
        click.echo(f"no kobo-daemon running on {cfg.endpoint}")
        return
    try:
        _request(cfg, "shutdown", 5.0)
    except KoboError:
        pid = _pid(cfg)
        if pid:
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while daemon_alive(cfg.endpoint):
        if time.monotonic() > deadline:
            raise click.ClickException(f"kobo-daemon on {cfg.endpoint} did not exit within {timeout:g}s")
        time.sleep(0.05)
    click.echo(f"kobo-daemon on {cfg.endpoint} stopped")


@main.command()
@_endpoint_option
@click.option("--json", "as_json", is_flag=True, help="Print the raw status as JSON.")
def status(endpoint: str | None, as_json: bool) -> None:
    """Show whether the daemon runs, its runs, clients, queues and rejected messages."""
    cfg = _config(endpoint)
    if not daemon_alive(cfg.endpoint):
        if as_json:
            click.echo(json.dumps({"running": False, "endpoint": str(cfg.endpoint)}))
        else:
            click.echo(f"no kobo-daemon running on {cfg.endpoint}")
        sys.exit(1)
    try:
        info = _request(cfg, "status", 5.0).info  # type: ignore[attr-defined]
    except KoboError as exc:
        raise click.ClickException(str(exc)) from exc
    info["running"] = True
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    click.echo(f"kobo-daemon pid {info['pid']} on {info['endpoint']}, up {info['uptime']:.0f}s")
    click.echo(f"messages received: {info['received']}")
    rejected = info.get("rejected") or {}
    click.echo(f"messages rejected: {sum(rejected.values())} {rejected if rejected else ''}".rstrip())
    for run in info["runs"]:
        click.echo(
            f"  {run['path']}: {len(run['clients'])} client(s), {run['points']} points in "
            f"{run['batches']} batches, pending {run['pending']} (peak {run['peak_pending']})"
            + (f", ERROR: {run['error']}" if run["error"] else "")
        )


def _pid(cfg: DaemonConfig) -> int | None:
    try:
        with open(cfg.endpoint.pid_path) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None
