"""``kobo-serve``: the KohakuBoard viewer for a team, with accounts.

``kobo-serve --data-dir DIR`` runs the server (:func:`~.serve.serve_team`);
``kobo-serve user ...`` and ``kobo-serve token ...`` manage who may look
(:class:`~.accounts.Accounts`, in ``--config-dir``); ``kobo-serve
install-systemd`` writes its unit (:mod:`.units`).  ``kobo serve ...`` is the
same command.

Exit codes: 0 fine, 1 an operation failed (no such user, ...), 2 bad usage or
an unsafe configuration (the server refuses to start; systemd does not restart
it either).
"""

from __future__ import annotations

import logging
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import click

from .accounts import Accounts, AccountsError, NoSuchToken, NoSuchUser, UserExists, default_config_dir

F = TypeVar("F", bound=Callable[..., Any])

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 48890


class Refused(click.ClickException):
    """Bad usage or an unsafe configuration: ``Error: <message>``, exit code 2."""

    exit_code = 2


# ---------------------------------------------------------------- validation


_BASE_URL_CHARS = re.compile(r"^[A-Za-z0-9._~!$&'()*+,;=:@/-]*$")


def normalize_base_url(value: str | None) -> str:
    """``--base-url``: an absolute path without ``.``/``..`` segments; ``/kobo/`` -> ``/kobo``, ``/`` stays."""
    if value is None or value == "":
        return "/"
    if not value.startswith("/"):
        raise Refused(f"--base-url must start with '/' (got {value!r})")
    if not _BASE_URL_CHARS.match(value):
        raise Refused(f"--base-url {value!r} holds characters a path prefix cannot have (?, #, %, spaces, \\ ...)")
    segments = [s for s in value.split("/") if s]
    if any(s in (".", "..") for s in segments):
        raise Refused(f"--base-url {value!r} must not contain '.' or '..' segments")
    return "/" + "/".join(segments)


def check_tls(certfile: str | None, keyfile: str | None) -> tuple[str | None, str | None]:
    """Both or neither, each a readable file; returned as absolute paths."""
    if bool(certfile) != bool(keyfile):
        raise Refused("give both --certfile and --keyfile, or neither")
    if not certfile or not keyfile:
        return None, None
    out = []
    for flag, path in (("--certfile", certfile), ("--keyfile", keyfile)):
        path = os.path.abspath(os.path.expanduser(path))
        if not os.path.isfile(path):
            raise Refused(f"{flag} {path} is not a file")
        try:
            with open(path, "rb") as f:
                f.read(1)
        except OSError as exc:
            raise Refused(f"{flag} {path} cannot be read: {exc.strerror}") from exc
        out.append(path)
    return out[0], out[1]


def check_data_dir(data_dir: str | None) -> str:
    if not data_dir:
        raise Refused(
            "missing --data-dir DIR (the folder of {project}/{run_id} runs to serve; env KOBO_SERVE_DATA_DIR)"
        )
    path = os.path.abspath(os.path.expanduser(data_dir))
    if not os.path.isdir(path):
        raise Refused(f"--data-dir {path} is not a directory")
    return path


def check_host(host: str) -> str:
    host = host.strip()
    if not host or any(c.isspace() or c in "/?#@" for c in host):
        raise Refused(f"--host {host!r} is not an address or host name")
    return host


def open_accounts(config_dir: str | None) -> Accounts:
    try:
        return Accounts(config_dir if config_dir else default_config_dir())
    except AccountsError as exc:
        raise Refused(str(exc)) from exc


def _projects(value: str | None) -> list[str] | None:
    if value is None:
        return None
    names = [p.strip() for p in value.split(",") if p.strip()]
    if not names:
        raise Refused("--projects needs at least one project name (leave it out for every project)")
    return names


def _when(ts: float) -> str:
    try:
        return time.strftime("%Y-%m-%d %H:%M", time.localtime(ts))
    except (OverflowError, OSError, ValueError):
        return "-"


def _table(rows: Sequence[tuple[str, ...]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        click.echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())


def _read_password(password_stdin: bool) -> str:
    """The new password: one line of stdin with --password-stdin, else typed twice without echo."""
    from .accounts import check_password

    if password_stdin:
        line = sys.stdin.readline()
        if not line:
            raise Refused("--password-stdin: nothing on standard input")
        password = line[:-1] if line.endswith("\n") else line
        password = password[:-1] if password.endswith("\r") else password
        try:
            return check_password(password)
        except ValueError as exc:
            raise Refused(str(exc)) from exc

    def valid(value: str) -> str:
        try:
            return check_password(value)
        except ValueError as exc:
            raise click.UsageError(str(exc)) from exc  # click says why and asks again

    return click.prompt("Password", hide_input=True, confirmation_prompt="Repeat the password", value_proc=valid)


def _change(fn: Callable[[], Any]) -> Any:
    """Run an accounts change; its errors become clean CLI errors."""
    try:
        return fn()
    except UserExists as exc:
        raise click.ClickException(str(exc)) from exc
    except ValueError as exc:
        raise Refused(str(exc)) from exc
    except (NoSuchUser, NoSuchToken) as exc:
        raise click.ClickException(str(exc)) from exc
    except AccountsError as exc:
        raise click.ClickException(str(exc)) from exc
    except PermissionError as exc:
        raise click.ClickException(f"cannot change the accounts: {exc}") from exc


def config_dir_option(fn: F) -> F:
    return click.option(
        "--config-dir",
        type=click.Path(file_okay=False),
        default=None,
        envvar="KOBO_SERVE_CONFIG",
        help="Where accounts.json lives (default $KOBO_SERVE_CONFIG or ~/.config/kohakuboard/serve).",
    )(fn)


def _config_dir(ctx: click.Context, local: str | None) -> str | None:
    """A subcommand's --config-dir, else the one given before the subcommand."""
    if local:
        return local
    return (ctx.find_root().params or {}).get("config_dir")


def _setup_logging(level: str) -> None:
    # under systemd (JOURNAL_STREAM set) the journal adds the time itself
    fmt = "%(levelname)s %(name)s: %(message)s"
    if not os.environ.get("JOURNAL_STREAM"):
        fmt = "%(asctime)s " + fmt
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(fmt))
    logger = logging.getLogger("kohakuboard")
    logger.addHandler(handler)
    logger.setLevel(level.upper())
    logger.propagate = False


# ---------------------------------------------------------------- the server


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("kohakuboard")
    except PackageNotFoundError:  # pragma: no cover - run from a source tree
        return "unknown"


@click.group(invoke_without_command=True, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--data-dir",
    envvar="KOBO_SERVE_DATA_DIR",
    default=None,
    type=click.Path(file_okay=False),
    help="The folder of {project}/{run_id} runs to serve (only read). Env: KOBO_SERVE_DATA_DIR.",
)
@click.option(
    "--host",
    default=DEFAULT_HOST,
    show_default=True,
    help="Address to listen on. Anything but loopback needs at least one user.",
)
@click.option("--port", default=DEFAULT_PORT, show_default=True, type=click.IntRange(0, 65535), help="Port.")
@click.option("--certfile", default=None, type=click.Path(dir_okay=False), help="TLS certificate (PEM) for HTTPS.")
@click.option("--keyfile", default=None, type=click.Path(dir_okay=False), help="TLS private key (PEM) for HTTPS.")
@click.option(
    "--base-url",
    default="/",
    show_default=True,
    help="Path prefix when a reverse proxy serves it under a sub-path, e.g. /kobo.",
)
@click.option(
    "--allowed-host",
    "allowed_hosts",
    multiple=True,
    metavar="NAME",
    help="A host name the server is reached by (Host header check against DNS rebinding); repeatable.",
)
@click.option(
    "--config-dir",
    type=click.Path(file_okay=False),
    default=None,
    envvar="KOBO_SERVE_CONFIG",
    help="Where accounts.json lives (default $KOBO_SERVE_CONFIG or ~/.config/kohakuboard/serve).",
)
@click.option("--browser", is_flag=True, help="Open the page in a web browser.")
@click.option(
    "--log-level",
    default="info",
    show_default=True,
    type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False),
    help="Logging level (access log and logins at info).",
)
@click.option(
    "--session-idle",
    default=12 * 3600,
    show_default=True,
    type=click.IntRange(1, None),
    metavar="SECONDS",
    help="A session unused this long ends (the user logs in again).",
)
@click.option(
    "--nice",
    "niceness",
    default=10,
    show_default=True,
    type=click.IntRange(0, 19),
    help="Lower the server's CPU priority by this much, so training on the same machine comes first (0: keep it).",
)
@click.option(
    "--sched-idle/--no-sched-idle",
    default=True,
    show_default=True,
    help="Run under the scheduler's idle policy (Linux SCHED_IDLE): the server uses only CPU time that "
    "nothing else wants, and training that wakes up takes the CPU from it at once.",
)
@click.option(
    "--session-max",
    default=7 * 24 * 3600,
    show_default=True,
    type=click.IntRange(1, None),
    metavar="SECONDS",
    help="A session ends this long after its login, used or not.",
)
@click.option(
    "--request-timeout",
    default=15,
    show_default=True,
    type=click.FloatRange(0.5, 3600),
    metavar="SECONDS",
    help="Close a connection whose request has not fully arrived this long after it opened (or after "
    "the --keep-alive wait that follows a response): slowloris and idle sockets.",
)
@click.option(
    "--keep-alive",
    default=30,
    show_default=True,
    type=click.FloatRange(1, 3600),
    metavar="SECONDS",
    help="How long a connection may stay idle between requests.",
)
@click.option(
    "--send-timeout",
    default=60,
    show_default=True,
    type=click.FloatRange(0.5, 86400),
    metavar="SECONDS",
    help="Abort a connection that has read nothing of its response for this long.",
)
@click.option(
    "--max-connections",
    default=1000,
    show_default=True,
    type=click.IntRange(1, 1_000_000),
    help="Open connections in all; one more is answered 503 and closed.",
)
@click.option(
    "--max-connections-per-client",
    default=128,
    show_default=True,
    type=click.IntRange(1, 1_000_000),
    help="Open connections from one client address (behind a reverse proxy: the proxy's; raise it "
    "there); one more is answered 503 and closed.",
)
@click.version_option(_version(), "--version", prog_name="kobo-serve", message="%(prog)s %(version)s")
@click.pass_context
def main(
    ctx: click.Context,
    data_dir: str | None,
    host: str,
    port: int,
    certfile: str | None,
    keyfile: str | None,
    base_url: str,
    allowed_hosts: tuple[str, ...],
    config_dir: str | None,
    browser: bool,
    log_level: str,
    session_idle: int,
    session_max: int,
    niceness: int,
    sched_idle: bool,
    request_timeout: float,
    keep_alive: float,
    send_timeout: float,
    max_connections: int,
    max_connections_per_client: int,
) -> None:
    """Serve the KohakuBoard viewer over DATA_DIR to a team, behind accounts.

    \b
      kobo-serve user add alice            # first: who may look
      kobo-serve --data-dir /data/kobo --host 0.0.0.0 --certfile c.pem --keyfile k.pem

    The server only reads DATA_DIR.  On a loopback address it starts without
    users (with a one-time token, like `kobo open`); anywhere else it refuses
    to start until a user exists.  Users and tokens changed with the commands
    below take effect at once, without a restart.
    """
    if ctx.invoked_subcommand is not None:
        return
    from .serve import ServeError, serve_team

    path = check_data_dir(data_dir)
    host = check_host(host)
    base = normalize_base_url(base_url)
    cert, key = check_tls(certfile, keyfile)
    accounts = open_accounts(config_dir)
    _setup_logging(log_level)
    try:
        serve_team(
            path,
            host=host,
            port=port,
            certfile=cert,
            keyfile=key,
            base_url=base,
            allowed_hosts=tuple(allowed_hosts),
            accounts=accounts,
            open_browser=browser,
            echo=click.echo,
            log_level=log_level.lower(),
            session_idle=session_idle,
            session_max=session_max,
            niceness=niceness,
            sched_idle=sched_idle,
            limits={
                "request_timeout": request_timeout,
                "send_timeout": send_timeout,
                "keep_alive": keep_alive,
                "max_connections": max_connections,
                "max_per_client": max_connections_per_client,
            },
        )
    except ServeError as exc:
        raise Refused(str(exc)) from exc


# ---------------------------------------------------------------- users


@main.group()
def user() -> None:
    """Add, remove, list users; change a password or the projects a user sees."""


@user.command("add")
@click.argument("name")
@click.option(
    "--projects", default=None, metavar="A,B", help="Only these projects (comma-separated); default every project."
)
@click.option("--password-stdin", is_flag=True, help="Read the password from one line of standard input.")
@config_dir_option
@click.pass_context
def user_add(ctx: click.Context, name: str, projects: str | None, password_stdin: bool, config_dir: str | None) -> None:
    """Add user NAME; the password is asked twice, without echo."""
    from .accounts import check_name, check_projects

    accounts = open_accounts(_config_dir(ctx, config_dir))
    plist = _projects(projects)
    _change(lambda: (check_name(name), check_projects(plist)))  # before asking for a password
    if accounts.get_user(name) is not None:
        raise click.ClickException(
            f"user {name!r} already exists (`kobo-serve user passwd {name}` changes the password)"
        )
    password = _read_password(password_stdin)
    u = _change(lambda: accounts.add_user(name, password, plist))
    seen = ", ".join(u.projects) if u.projects is not None else "every project"
    click.echo(f"added user {u.name} (sees {seen}) to {accounts.path}")


@user.command("remove")
@click.argument("name")
@config_dir_option
@click.pass_context
def user_remove(ctx: click.Context, name: str, config_dir: str | None) -> None:
    """Remove user NAME and revoke her API tokens; a running server ends her sessions and streams at once."""
    accounts = open_accounts(_config_dir(ctx, config_dir))
    n = _change(lambda: accounts.remove_user(name))
    click.echo(f"removed user {name}" + (f" and revoked {n} token{'s' if n != 1 else ''}" if n else ""))


@user.command("list")
@config_dir_option
@click.pass_context
def user_list(ctx: click.Context, config_dir: str | None) -> None:
    """List the users: name, projects, creation time, number of API tokens."""
    accounts = open_accounts(_config_dir(ctx, config_dir))
    users = accounts.users()
    if not users:
        click.echo(f"no users in {accounts.path} (add one with `kobo-serve user add NAME`)")
        return
    counts: dict[str, int] = {}
    for t in accounts.tokens():
        counts[t.user] = counts.get(t.user, 0) + 1
    rows = [("USER", "PROJECTS", "CREATED", "TOKENS")]
    rows += [
        (u.name, ",".join(u.projects) if u.projects is not None else "*", _when(u.created), str(counts.get(u.name, 0)))
        for u in users
    ]
    _table(rows)


@user.command("passwd")
@click.argument("name")
@click.option("--password-stdin", is_flag=True, help="Read the password from one line of standard input.")
@config_dir_option
@click.pass_context
def user_passwd(ctx: click.Context, name: str, password_stdin: bool, config_dir: str | None) -> None:
    """Change the password of NAME (asked twice, without echo); a running server ends her sessions."""
    accounts = open_accounts(_config_dir(ctx, config_dir))
    if accounts.get_user(name) is None:
        raise click.ClickException(f"no user named {name!r}")
    password = _read_password(password_stdin)
    _change(lambda: accounts.set_password(name, password))
    click.echo(f"changed the password of {name}")


@user.command("projects")
@click.argument("name")
@click.argument("projects", required=False)
@click.option("--all", "all_projects", is_flag=True, help="Let NAME see every project.")
@config_dir_option
@click.pass_context
def user_projects(
    ctx: click.Context, name: str, projects: str | None, all_projects: bool, config_dir: str | None
) -> None:
    """Limit NAME to PROJECTS (comma-separated), or let her see every project with --all."""
    if all_projects == (projects is not None):
        raise Refused("give either PROJECTS (a,b) or --all")
    accounts = open_accounts(_config_dir(ctx, config_dir))
    u = _change(lambda: accounts.set_projects(name, None if all_projects else _projects(projects)))
    click.echo(f"{u.name} sees {', '.join(u.projects) if u.projects is not None else 'every project'}")


# ---------------------------------------------------------------- tokens


@main.group()
def token() -> None:
    """API tokens for scripts (sent as `Authorization: Bearer <token>`)."""


@token.command("create")
@click.argument("user_name", metavar="USER")
@click.option("--label", default="", help="What the token is for (shown by `token list`).")
@config_dir_option
@click.pass_context
def token_create(ctx: click.Context, user_name: str, label: str, config_dir: str | None) -> None:
    """Create an API token for USER; it sees what USER sees.  Printed once, on stdout alone."""
    accounts = open_accounts(_config_dir(ctx, config_dir))
    tid, secret = _change(lambda: accounts.create_token(user_name, label))
    click.echo(secret)
    click.echo(
        f"token {tid} for {user_name}: copy it now, it will not be shown again "
        f"(`kobo-serve token revoke {tid}` revokes it). Scripts send it as "
        "`Authorization: Bearer <token>`.",
        err=True,
    )


@token.command("list")
@click.argument("user_name", metavar="[USER]", required=False)
@config_dir_option
@click.pass_context
def token_list(ctx: click.Context, user_name: str | None, config_dir: str | None) -> None:
    """List the API tokens (of USER): id, user, creation time, label.  Never the tokens themselves."""
    accounts = open_accounts(_config_dir(ctx, config_dir))
    if user_name is not None and accounts.get_user(user_name) is None:
        raise click.ClickException(f"no user named {user_name!r}")
    toks = accounts.tokens(user_name)
    if not toks:
        click.echo("no tokens" + (f" for {user_name}" if user_name else ""))
        return
    _table([("ID", "USER", "CREATED", "LABEL")] + [(t.id, t.user, _when(t.created), t.label) for t in toks])


@token.command("revoke")
@click.argument("token_id", metavar="ID")
@config_dir_option
@click.pass_context
def token_revoke(ctx: click.Context, token_id: str, config_dir: str | None) -> None:
    """Revoke the API token ID (as `token list` shows it); refused at once by a running server."""
    accounts = open_accounts(_config_dir(ctx, config_dir))
    t = _change(lambda: accounts.revoke_token(token_id))
    click.echo(f"revoked token {t.id} of {t.user}")


# ---------------------------------------------------------------- systemd


def _account_home(name: str) -> str | None:
    import pwd

    try:
        return pwd.getpwnam(name).pw_dir
    except KeyError:
        return None


def _account_uid(name: str) -> int | None:
    import pwd

    try:
        return pwd.getpwnam(name).pw_uid
    except KeyError:
        return None


@main.command("install-systemd")
@click.option(
    "--user",
    "user_unit",
    is_flag=True,
    help="A user unit (systemctl --user) instead of the system unit /etc/systemd/system/kobo-serve.service.",
)
@click.option(
    "--dest",
    type=click.Path(file_okay=False),
    default=None,
    help="Write into DIR instead of where systemd looks (packaging, tests).",
)
@click.option("--force", is_flag=True, help="Overwrite an existing unit file that differs.")
@click.option("--print", "to_stdout", is_flag=True, help="Print the unit to stdout and write nothing.")
@click.option(
    "--run-as",
    default=None,
    metavar="ACCOUNT",
    help="System unit: the account it runs as (default $SUDO_USER or you; never root). It must read "
    "DATA_DIR and own the accounts file.",
)
@click.option(
    "--data-dir",
    envvar="KOBO_SERVE_DATA_DIR",
    default=None,
    type=click.Path(file_okay=False),
    help="The folder of runs the service serves. Env: KOBO_SERVE_DATA_DIR.",
)
@click.option(
    "--config-dir",
    type=click.Path(file_okay=False),
    default=None,
    envvar="KOBO_SERVE_CONFIG",
    help="The service's accounts directory (default: the --run-as account's ~/.config/kohakuboard/serve, "
    "or $KOBO_SERVE_CONFIG).",
)
@click.option("--host", default=DEFAULT_HOST, show_default=True, help="Address the service listens on.")
@click.option(
    "--port",
    default=DEFAULT_PORT,
    show_default=True,
    type=click.IntRange(1024, 65535),
    help="Port (1024 or above: the system unit has no capabilities).",
)
@click.option("--certfile", default=None, type=click.Path(dir_okay=False), help="TLS certificate (PEM).")
@click.option("--keyfile", default=None, type=click.Path(dir_okay=False), help="TLS private key (PEM).")
@click.option("--base-url", default="/", show_default=True, help="Path prefix behind a reverse proxy.")
@click.option("--allowed-host", "allowed_hosts", multiple=True, metavar="NAME", help="Repeatable.")
def install_systemd(
    user_unit: bool,
    dest: str | None,
    force: bool,
    to_stdout: bool,
    run_as: str | None,
    data_dir: str | None,
    config_dir: str | None,
    host: str,
    port: int,
    certfile: str | None,
    keyfile: str | None,
    base_url: str,
    allowed_hosts: tuple[str, ...],
) -> None:
    """Write a systemd unit that runs this installation's kobo-serve over --data-dir.

    Without --user: /etc/systemd/system/kobo-serve.service (needs root), run as
    --run-as, sandboxed with a read-only file system.  With --user:
    ~/.config/systemd/user/kobo-serve.service.  The server options given here
    go into its ExecStart.
    """
    import getpass

    from ..protocol.systemd import UnitInstallError, install_unit
    from . import units

    path_data = check_data_dir(data_dir)
    host = check_host(host)
    base = normalize_base_url(base_url)
    cert, key = check_tls(certfile, keyfile)
    account: str | None = None
    if user_unit:
        if run_as:
            raise Refused("--run-as is for the system unit; a --user unit runs as you")
        cfg = os.path.abspath(os.path.expanduser(config_dir)) if config_dir else default_config_dir()
    else:
        account = run_as or os.environ.get("SUDO_USER") or getpass.getuser()
        if account == "root":
            raise Refused(
                "the system unit will not run the server as root: pass --run-as ACCOUNT, an account "
                "that can read --data-dir (and owns the accounts file)"
            )
        home = _account_home(account)
        if home is None:
            raise Refused(f"--run-as {account}: no such account on this machine")
        if account == "nobody" or _account_uid(account) in (0, 65534):
            raise Refused(
                f"--run-as {account}: systemd refuses to call that safe (whatever else runs as it "
                "could read the accounts file); create an account for the server, e.g. "
                "`useradd --system kohakuboard`"
            )
        if config_dir:
            cfg = os.path.abspath(os.path.expanduser(config_dir))
        else:
            cfg = os.path.join(home, ".config", "kohakuboard", "serve")
    args = ["--data-dir", path_data, "--config-dir", cfg]
    if host != DEFAULT_HOST:
        args += ["--host", host]
    if port != DEFAULT_PORT:
        args += ["--port", str(port)]
    if cert and key:
        args += ["--certfile", cert, "--keyfile", key]
    if base != "/":
        args += ["--base-url", base]
    for name in allowed_hosts:
        args += ["--allowed-host", name]
    try:
        text = units.render(units.exec_start(args), user=account)
    except ValueError as exc:
        raise Refused(str(exc)) from exc
    if to_stdout:
        click.echo(text, nl=False)
        return

    directory = dest if dest is not None else units.default_dir(user_unit)
    try:
        for line in install_unit(
            directory, units.UNIT, text, force=force, program="kobo-serve", systemd_dir=units.default_dir(user_unit)
        ):
            click.echo(line)
    except UnitInstallError as exc:
        raise click.ClickException(str(exc)) from exc

    # what will stop the service from working, said now rather than in the journal later
    if not user_unit:
        for what, p in (("--data-dir", path_data), ("--config-dir", cfg)):
            if p == "/tmp" or p.startswith(("/tmp/", "/var/tmp/")) or p == "/var/tmp":
                click.echo(
                    f"warning: {what} {p} is under /tmp, which the unit's PrivateTmp=yes hides from the "
                    "service: move it, or add PrivateTmp=no in a drop-in",
                    err=True,
                )
    try:
        has_users = Accounts(cfg).has_users()
    except (AccountsError, OSError):
        has_users = False
    who = f"sudo -u {account} " if account and account != getpass.getuser() else ""
    add = f"{who}kobo-serve --config-dir {cfg} user add NAME"
    if not has_users:
        from .serve import is_loopback

        need = " (the service refuses to start on a non-loopback --host without one)" if not is_loopback(host) else ""
        click.echo(f"add a user first{need}:")
        click.echo(f"  {add}")
    click.echo("enable and start it with:")
    ctl = "systemctl --user" if user_unit else "systemctl"
    click.echo(f"  {ctl} daemon-reload")
    click.echo(f"  {ctl} enable --now kobo-serve")
    click.echo(f"logs: journalctl{' --user' if user_unit else ''} -u kobo-serve")


if __name__ == "__main__":  # pragma: no cover
    main()
