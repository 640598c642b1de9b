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
from .keys import keys_command

_endpoint_option = click.option(
    "--endpoint",
    envvar="KOBO_DAEMON_ENDPOINT",
    default=None,
    help="Endpoint (ipc:///path/prefix); default: the per-user socket. Env: KOBO_DAEMON_ENDPOINT.",
)


def _config(endpoint: str | None, **overrides: object) -> DaemonConfig:
    try:
        return DaemonConfig.from_env(None, endpoint=endpoint, **overrides)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc


# No automatic environment prefix: the daemon reads exactly the KOBO_DAEMON_* variables documented
# in DaemonConfig (and the README), never KOBO_DAEMON_<COMMAND>_<OPTION> by accident.
@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="kohakuboard", prog_name="kobo-daemon", message="%(prog)s %(version)s")
def main() -> None:
    """The per-node KohakuBoard daemon: receives log messages and writes run folders."""


main.add_command(keys_command)  # kobo-daemon keys generate|show|authorize (keys.py)


@main.command()
@_endpoint_option
@click.option(
    "--flush-interval", type=float, default=None, help="Seconds a message may wait before it is written (<= 0.45)."
)
@click.option(
    "--log-level",
    default=None,
    type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
    help="DEBUG, INFO, WARNING or ERROR. Env: KOBO_DAEMON_LOG_LEVEL.",
)
@click.option(
    "--listen",
    multiple=True,
    metavar="tcp://HOST:PORT",
    help="Also accept forwarding nodes: data on PORT, requests on PORT+1, CURVE-authenticated "
    "(repeatable). Env: KOBO_DAEMON_LISTEN.",
)
@click.option(
    "--forward",
    default=None,
    metavar="tcp://HEAD:PORT",
    help="Write nothing here: relay every local client to the head daemon listening there. Env: KOBO_DAEMON_FORWARD.",
)
@click.option(
    "--head-key",
    default=None,
    metavar="KEY|FILE",
    help="With --forward: the head's public key (`kobo-daemon keys show` on the head). Env: KOBO_DAEMON_HEAD_KEY.",
)
@click.option(
    "--key-dir",
    default=None,
    type=click.Path(file_okay=False),
    help="Where this daemon's keys are (default ~/.config/kohakuboard/keys). Env: KOBO_DAEMON_KEY_DIR.",
)
@click.option(
    "--authorized",
    default=None,
    type=click.Path(),
    help="With --listen: directory or file of client keys allowed in (default KEY_DIR/authorized). "
    "Env: KOBO_DAEMON_AUTHORIZED.",
)
@click.option(
    "--insecure-plaintext",
    is_flag=True,
    default=None,
    help="TCP without encryption or authentication (trusted networks only). Env: KOBO_DAEMON_INSECURE_PLAINTEXT=1.",
)
@click.option(
    "--system-metrics",
    type=float,
    default=None,
    metavar="SECONDS",
    help="Sample this node (CPU, memory, disk/network I/O, NVIDIA GPUs) every SECONDS into the runs with a "
    "live client here, under sys/HOST/ (with --forward: sent to the head); 0 turns it off (default 10). "
    "Env: KOBO_DAEMON_SYSTEM_METRICS.",
)
@click.option(
    "--handshake-timeout",
    type=float,
    default=None,
    metavar="SECONDS",
    help="With --listen: seconds a TCP connection may take to authenticate (default 10). "
    "Env: KOBO_DAEMON_HANDSHAKE_TIMEOUT.",
)
@click.option(
    "--max-connections",
    type=int,
    default=None,
    metavar="N",
    help="With --listen: open TCP connections in total (default: from the open file limit). "
    "Env: KOBO_DAEMON_MAX_CONNECTIONS.",
)
@click.option(
    "--max-per-address",
    type=int,
    default=None,
    metavar="N",
    help="With --listen: open TCP connections from one address (default 256). Env: KOBO_DAEMON_MAX_PER_ADDRESS.",
)
@click.option(
    "--max-handshakes-per-address",
    type=int,
    default=None,
    metavar="N",
    help="With --listen: connections from one address still authenticating (default 32). "
    "Env: KOBO_DAEMON_MAX_HANDSHAKES_PER_ADDRESS.",
)
@click.option(
    "--stale-run",
    type=float,
    default=None,
    metavar="SECONDS",
    help="Mark a run crashed when no writer of it is known alive and nothing arrived for it this long "
    "(default 600; 0: never). Env: KOBO_DAEMON_STALE_RUN.",
)
@click.option(
    "--compute-threads",
    type=int,
    default=None,
    metavar="N",
    help="Threads that encode images, bin histograms and estimate KDEs for all runs (default 0: one per "
    "CPU). Env: KOBO_DAEMON_COMPUTE_THREADS.",
)
def run(
    endpoint: str | None,
    flush_interval: float | None,
    log_level: str | None,
    listen: tuple[str, ...],
    forward: str | None,
    head_key: str | None,
    key_dir: str | None,
    authorized: str | None,
    insecure_plaintext: bool | None,
    system_metrics: float | None,
    handshake_timeout: float | None,
    max_connections: int | None,
    max_per_address: int | None,
    max_handshakes_per_address: int | None,
    stale_run: float | None,
    compute_threads: int | None,
) -> None:
    """Run in the foreground (what systemd and autostart run). SIGTERM drains and exits 0."""
    from .server import Daemon

    cfg = _config(
        endpoint,
        flush_interval=flush_interval,
        log_level=log_level.upper() if log_level else None,
        listen=list(listen) or None,
        forward=forward,
        head_key=head_key,
        key_dir=key_dir,
        authorized=authorized,
        insecure_plaintext=insecure_plaintext or None,
        system_metrics=system_metrics,
        handshake_timeout=handshake_timeout,
        max_connections=max_connections,
        max_per_address=max_per_address,
        max_handshakes_per_address=max_handshakes_per_address,
        stale_run=stale_run,
        compute_threads=compute_threads,
    )
    logging.basicConfig(
        level=getattr(logging, cfg.log_level, logging.INFO),
        format="%(asctime)s %(levelname)s kobo-daemon: %(message)s",
        stream=sys.stderr,
    )
    if cfg.forward:
        from .forward import Forwarder

        sys.exit(Forwarder(cfg).run())
    sys.exit(Daemon(cfg).run())


@main.command()
@_endpoint_option
@click.option("--timeout", type=float, default=15.0, show_default=True, help="Seconds to wait for it to be ready.")
def start(endpoint: str | None, timeout: float) -> None:
    """Start a detached daemon (no-op if one is already running)."""
    from ..protocol.control import ensure_daemon

    cfg = _config(endpoint)
    try:
        started = ensure_daemon(cfg.endpoint, autostart=True, timeout=timeout)
    except KoboError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"kobo-daemon {'started' if started else 'already running'} on {cfg.endpoint}")


@main.command()
@_endpoint_option
@click.option("--timeout", type=float, default=60.0, show_default=True, help="Seconds to wait for it to exit.")
def stop(endpoint: str | None, timeout: float) -> None:
    """Ask the daemon to flush everything and exit; wait until it has."""
    from ..protocol import control

    cfg = _config(endpoint)
    if not daemon_alive(cfg.endpoint):
        click.echo(f"no kobo-daemon running on {cfg.endpoint}")
        return
    try:
        control.shutdown(cfg.endpoint, 5.0)
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
    from ..protocol import control

    cfg = _config(endpoint)
    if not daemon_alive(cfg.endpoint):
        if as_json:
            click.echo(json.dumps({"running": False, "endpoint": str(cfg.endpoint)}))
        else:
            click.echo(f"no kobo-daemon running on {cfg.endpoint}")
        sys.exit(1)
    try:
        info = control.status(cfg.endpoint, 5.0)
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
    if info.get("forward"):
        fwd = info["forward"]
        click.echo(
            f"forwarding to {fwd['head']} ({'CURVE' if fwd['secure'] else 'PLAINTEXT'}): {fwd['state']}, "
            f"{fwd['forwarded']} data messages, {fwd['requests']} requests, {fwd['clients']} client(s)"
        )
        sm = fwd.get("system_metrics") or {}
        if sm.get("interval"):
            click.echo(
                f"system metrics every {sm['interval']:g}s: {sm['samples']} node sample(s), "
                f"{sm['durable']} stored in runs by the head, {sm['held']} waiting for the head"
            )
    if info.get("listen"):
        tcp = info["listen"]
        click.echo(
            f"listening on {', '.join(tcp['addresses'])} ({'CURVE' if tcp['secure'] else 'PLAINTEXT'}): "
            f"{tcp['forwarded']} data messages, {tcp['requests']} requests relayed"
            + (f", {tcp['refused']} connection(s) refused" if tcp.get("refused") else "")
        )
        peers = tcp.get("peers") or {}
        if peers:
            lim = peers.get("limits") or {}
            click.echo(
                f"  TCP connections: {peers.get('open', 0)} open (at most {lim.get('max_connections')}, "
                f"{lim.get('max_per_address')} per address, {lim.get('max_handshakes_per_address')} "
                f"authenticating per address for at most {lim.get('handshake_timeout')}s), "
                f"{peers.get('handshakes', 0)} handshake(s) succeeded"
            )
            refused = peers.get("refused") or {}
            if refused:
                click.echo(f"  TCP peers refused or failed: {sum(refused.values())} {refused}")
                for ip, kinds in list((peers.get("by_address") or {}).items())[:10]:
                    click.echo(f"    {ip}: {kinds}")
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


@main.command("install-systemd")
@click.option(
    "--user",
    "user_unit",
    is_flag=True,
    help="A user unit (systemctl --user) instead of the system template kobo-daemon@.service.",
)
@click.option(
    "--dest",
    type=click.Path(file_okay=False),
    default=None,
    help="Write into DIR instead of where systemd looks (packaging, tests).",
)
@click.option("--force", is_flag=True, help="Overwrite an existing unit file that differs.")
@click.option("--print", "to_stdout", is_flag=True, help="Print the unit to stdout and write nothing.")
def install_systemd(user_unit: bool, dest: str | None, force: bool, to_stdout: bool) -> None:
    """Write a systemd unit that runs this installation's kobo-daemon.

    Without --user: the system template /etc/systemd/system/kobo-daemon@.service
    (needs root; `systemctl enable --now kobo-daemon@alice` runs alice's daemon).
    With --user: ~/.config/systemd/user/kobo-daemon.service.
    """
    import getpass

    from ..protocol.systemd import UnitInstallError, install_unit
    from . import units

    kind = units.USER if user_unit else units.SYSTEM
    try:
        text = units.render(kind, units.exec_start())
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc
    if to_stdout:
        click.echo(text, nl=False)
        return
    directory = dest if dest is not None else units.default_dir(kind)
    try:
        for line in install_unit(
            directory, kind.name, text, force=force, program="kobo-daemon", systemd_dir=units.default_dir(kind)
        ):
            click.echo(line)
    except UnitInstallError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo("enable and start it with:")
    if user_unit:
        click.echo("  systemctl --user daemon-reload")
        click.echo("  systemctl --user enable --now kobo-daemon")
        return
    who = os.environ.get("SUDO_USER") or getpass.getuser()
    if who == "root":
        who = "USER"  # the account whose runs it writes
    click.echo("  systemctl daemon-reload")
    click.echo(f"  systemctl enable --now kobo-daemon@{who}")
    click.echo(f"and in {who}'s shell profile, so that training scripts use that daemon:")
    click.echo(f"  export KOBO_DAEMON_ENDPOINT={units.system_endpoint(who if who != 'USER' else '$USER')}")
