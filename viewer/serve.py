"""Run the viewer app under uvicorn: bind, print the URL, serve until Ctrl-C."""

from __future__ import annotations

import errno
import ipaddress
import os
import secrets
import socket
import sys
import webbrowser
from collections.abc import Callable
from typing import Any

DEFAULT_PORT = 48889
DEFAULT_TEAM_PORT = 48890


class ServeError(Exception):
    """The viewer cannot start (bad host, no port, unsafe options); the message says why."""


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def bind(host: str, port: int, fallback: bool = True) -> tuple[socket.socket, str | None]:
    """A listening socket on ``host:port``; if the port is taken (and ``fallback``), on a free port.

    Returns the socket and a message to print when the port differs from the one asked for.
    """
    try:
        infos = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ServeError(f"cannot listen on {host!r}: {exc.strerror}") from exc
    family, _, _, _, addr = infos[0]

    def listen(p: int) -> socket.socket:
        # IPPROTO_TCP and TCP_NODELAY (inherited by accepted connections): asyncio sets
        # TCP_NODELAY only on sockets it knows are TCP, and without it every response on a
        # kept-alive connection (headers, then body) waits ~40 ms for a delayed ACK.
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            sock.bind((addr[0], p, *addr[2:]))
            sock.listen(128)
        except OSError:
            sock.close()
            raise
        sock.setblocking(False)
        return sock

    try:
        return listen(port), None
    except OSError as exc:
        if exc.errno != errno.EADDRINUSE or not fallback or port == 0:
            raise ServeError(f"cannot listen on {host}:{port}: {exc.strerror}") from exc
    sock = listen(0)
    return sock, f"port {port} is in use; using port {sock.getsockname()[1]} instead"


def serve(
    base_dir: str,
    host: str = "127.0.0.1",
    port: int = DEFAULT_PORT,
    token: str | None = "",
    allowed_hosts: tuple[str, ...] = (),
    open_browser: bool = False,
    echo: Callable[[str], None] = print,
    log_level: str = "warning",
) -> None:
    """Serve the viewer over ``base_dir`` until interrupted.

    ``token=""`` makes a random token; ``None`` turns the check off (refused
    unless ``host`` is a loopback address).
    """
    from .app import create_app

    if token is None and not is_loopback(host):
        raise ServeError(
            f"--no-token is only allowed on a loopback address, not {host}: anyone who can "
            "reach the port could read every run"
        )
    if token == "":
        token = secrets.token_urlsafe(32)
    extra_hosts = tuple(allowed_hosts)
    if not is_loopback(host) and host not in ("0.0.0.0", "::"):
        extra_hosts += (host.strip("[]"),)
    app = create_app(base_dir, token=token, allowed_hosts=extra_hosts)
    _run(app, base_dir, host, port, token, "", open_browser, echo, log_level, None, None)


def _return_memory_to_the_os() -> None:
    """glibc only: large temporaries of a chart request go back to the OS when freed.

    A 1M-point chart allocates ~45 MB of numpy temporaries; with glibc's
    dynamic mmap threshold they end up in arenas the server then keeps (its RSS
    grew from 45 MB to 400 MB under load).  A fixed 1 MiB threshold and two
    arenas keep it near what it holds.
    """
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
        libc.mallopt(-8, 2)  # M_ARENA_MAX
    except (OSError, AttributeError):  # not glibc: nothing to tune
        pass


def _run(
    app: Any,
    base_dir: str,
    host: str,
    port: int,
    token: str | None,
    base_url: str,
    open_browser: bool,
    echo: Callable[[str], None],
    log_level: str,
    certfile: str | None,
    keyfile: str | None,
    access_log: bool = False,
    fallback: bool = True,
    limits: dict[str, Any] | None = None,
) -> None:
    import uvicorn

    _return_memory_to_the_os()
    sock, note = bind(host, port, fallback=fallback)
    actual = sock.getsockname()[1]
    shown_host = host if is_loopback(host) or host not in ("0.0.0.0", "::") else socket.gethostname()
    if ":" in shown_host and not shown_host.startswith("["):
        shown_host = f"[{shown_host}]"
    scheme = "https" if certfile else "http"
    url = f"{scheme}://{shown_host}:{actual}{base_url}/" + (f"?token={token}" if token else "")
    if note:
        echo(note)
    echo(f"KohakuBoard viewer for {base_dir}")
    echo(f"    {url}")
    if not is_loopback(host) and not certfile:
        echo(
            "warning: listening beyond this machine without TLS: passwords, tokens and session cookies "
            "travel in clear text. Use --certfile/--keyfile, or a reverse proxy that terminates HTTPS."
        )
    echo("Press Ctrl-C to stop.")
    sys.stdout.flush()
    extra: dict[str, Any] = {}
    if limits is not None:  # kobo-serve: bounded connections (see .guard)
        from .guard import KEEP_ALIVE_S, MAX_CONNECTIONS, fit_to_fd_limit, guarded_protocol

        limits = dict(limits, max_connections=fit_to_fd_limit(limits.get("max_connections", MAX_CONNECTIONS)))
        limits.setdefault("keep_alive", KEEP_ALIVE_S)
        extra["http"] = guarded_protocol(**limits)
        extra["timeout_keep_alive"] = limits["keep_alive"]
    config = uvicorn.Config(
        app,
        log_level=log_level,
        access_log=access_log,
        timeout_graceful_shutdown=2,
        lifespan="off",
        ssl_certfile=certfile,
        ssl_keyfile=keyfile,
        server_header=False,
        **extra,
    )
    server = uvicorn.Server(config)
    if open_browser:
        try:
            webbrowser.open(url)
        except Exception as exc:  # no browser: the URL is printed anyway
            echo(f"could not open a browser: {exc}")
    server.run(sockets=[sock])


def yield_cpu(niceness: int, sched_idle: bool) -> str:
    """Lower this process's CPU priority so that training sharing the machine comes first.

    ``niceness`` (0-19) is added to the nice value.  ``sched_idle`` (Linux) puts the process
    under the scheduler's idle policy (``SCHED_IDLE``): it runs on CPU time that nothing else
    wants, and a task of normal priority that wakes up takes the CPU from it at once.  A nice
    value alone does not give that: a niced task keeps the CPU for its time slice while a
    training thread that was woken (by its data, by an acknowledgement) waits, and a training
    loop with a daemon and a writer thread waits like that several times per step.

    Linux keeps both settings per thread; every thread of the process is changed, and threads
    started later inherit them.  Returns what was applied, for the start-up message.
    """
    done = []
    tids = [0]
    try:
        tids = [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:
        pass
    if niceness > 0:
        for tid in tids:
            try:
                os.setpriority(os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + niceness)
            except OSError:
                pass
        done.append(f"nice +{niceness}")
    if sched_idle and hasattr(os, "SCHED_IDLE"):
        try:
            for tid in tids:
                os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))
            done.append("SCHED_IDLE")
        except OSError as exc:
            done.append(f"SCHED_IDLE refused ({exc.strerror})")
    return ", ".join(done) or "normal priority"


def serve_team(
    data_dir: str,
    *,
    accounts: Any,
    host: str = "127.0.0.1",
    port: int = DEFAULT_TEAM_PORT,
    certfile: str | None = None,
    keyfile: str | None = None,
    base_url: str = "",
    allowed_hosts: tuple[str, ...] = (),
    open_browser: bool = False,
    echo: Callable[[str], None] = print,
    log_level: str = "info",
    session_idle: float = 12 * 3600,
    session_max: float = 7 * 24 * 3600,
    niceness: int = 10,
    sched_idle: bool = True,
    limits: dict[str, Any] | None = None,
) -> None:
    """``kobo-serve``: the viewer over ``data_dir`` for a team, behind accounts (see :mod:`.team`).

    ``niceness`` and ``sched_idle``: how the server gives way to training on the same machine
    (:func:`yield_cpu`).

    Refuses a non-loopback address unless at least one user exists (there is
    no default account and no way to turn authentication off there).  On
    loopback with no user yet, it falls back to ``kobo open``'s one-time token.
    ``limits``: :func:`.guard.guarded_protocol`'s keyword arguments (default: its defaults).
    """
    from .app import create_app, create_team_app

    if not os.path.isdir(data_dir):
        raise ServeError(f"--data-dir {data_dir} is not a directory")
    if bool(certfile) != bool(keyfile):
        raise ServeError("give both --certfile and --keyfile, or neither")
    base_url = base_url.rstrip("/")
    extra_hosts = tuple(allowed_hosts)
    if not is_loopback(host) and host not in ("0.0.0.0", "::"):
        extra_hosts += (host.strip("[]"),)
    if accounts.has_users():
        app = create_team_app(
            data_dir,
            accounts,
            extra_hosts,
            base_url=base_url,
            https=bool(certfile),
            session_idle=session_idle,
            session_max=session_max,
        )
        token = None
    elif is_loopback(host):
        token = secrets.token_urlsafe(32)
        echo("no users yet (kobo-serve user add NAME): using a one-time token as kobo open does")
        app = create_app(data_dir, token=token, allowed_hosts=extra_hosts)
        if base_url:
            raise ServeError("--base-url needs accounts: run `kobo-serve user add NAME` first")
    else:
        raise ServeError(
            f"refusing to listen on {host} without authentication: no users are configured in "
            f"{accounts.path}. Run `kobo-serve user add NAME` first."
        )
    echo(f"CPU priority: {yield_cpu(niceness, sched_idle)} (training on this machine comes first)")
    _run(
        app,
        data_dir,
        host,
        port,
        token,
        base_url,
        open_browser,
        echo,
        log_level,
        certfile,
        keyfile,
        access_log=True,
        fallback=False,
        limits=limits if limits is not None else {},
    )
