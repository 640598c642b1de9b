"""Run the viewer app under uvicorn: bind, print the URL, serve until Ctrl-C."""

from __future__ import annotations

import errno
import ipaddress
import secrets
import socket
import sys
import webbrowser
from typing import Callable

DEFAULT_PORT = 48889


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
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
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


def serve(base_dir: str, host: str = "127.0.0.1", port: int = DEFAULT_PORT, token: str | None = "",
          allowed_hosts: tuple[str, ...] = (), open_browser: bool = False,
          echo: Callable[[str], None] = print, log_level: str = "warning") -> None:
    """Serve the viewer over ``base_dir`` until interrupted.

    ``token=""`` makes a random token; ``None`` turns the check off (refused
    unless ``host`` is a loopback address).
    """
    import uvicorn

    from .app import create_app

    if token is None and not is_loopback(host):
        raise ServeError(f"--no-token is only allowed on a loopback address, not {host}: anyone who can "
                         "reach the port could read every run")
    if token == "":
        token = secrets.token_urlsafe(32)
    extra_hosts = tuple(allowed_hosts)
    if not is_loopback(host) and host not in ("0.0.0.0", "::"):
        extra_hosts += (host.strip("[]"),)
    sock, note = bind(host, port)
    actual = sock.getsockname()[1]
    app = create_app(base_dir, token=token, allowed_hosts=extra_hosts)
    shown_host = host if is_loopback(host) or host not in ("0.0.0.0", "::") else socket.gethostname()
    if ":" in shown_host and not shown_host.startswith("["):
        shown_host = f"[{shown_host}]"
    url = f"http://{shown_host}:{actual}/" + (f"?token={token}" if token else "")
    if note:
        echo(note)
    echo(f"KohakuBoard viewer for {base_dir}")
    echo(f"    {url}")
    if not is_loopback(host):
        echo("warning: listening beyond this machine without TLS: the token travels in clear text. "
             "For a team, use kobo-serve behind HTTPS.")
    echo("Press Ctrl-C to stop.")
    sys.stdout.flush()
    config = uvicorn.Config(app, log_level=log_level, access_log=False, timeout_graceful_shutdown=2,
                            lifespan="off")
    server = uvicorn.Server(config)
    if open_browser:
        try:
            webbrowser.open(url)
        except Exception as exc:  # no browser: the URL is printed anyway
            echo(f"could not open a browser: {exc}")
    server.run(sockets=[sock])
