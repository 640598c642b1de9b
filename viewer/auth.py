"""Who may talk to the viewer: a Host allowlist and a token exchanged for a session cookie.

``kobo open`` binds loopback, but every user of a shared node can reach a
loopback port, so the page needs a secret: the URL the server prints carries
a random token; ``GET /?token=...`` answers with a redirect to the same URL
without it and sets ``kobo_session`` (a random session id kept in memory,
HttpOnly, SameSite=Strict) so the token leaves the address bar and the
history.  Scripts send ``Authorization: Bearer <token>``.  The Host header
must name a loopback address or an allowed host, which defeats DNS
rebinding.  Comparisons are constant-time.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import re
import secrets
import time
import urllib.parse
from collections.abc import Awaitable, Callable
from typing import Any

COOKIE = "kobo_session"
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
SESSION_IDLE_S = 7 * 24 * 3600

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


def inline_script_hashes(html: bytes) -> list[bytes]:
    """``'sha256-...'`` of each inline ``<script>`` of a page, for its ``script-src``.

    index.html has one: the boot script that asks for a run's first data before the
    modules load.  The CSP allows exactly that text and no other inline script.
    """
    return [
        b"'sha256-" + base64.b64encode(hashlib.sha256(body).digest()) + b"'"
        for body in re.findall(rb"<script>(.*?)</script>", html, re.S)
    ]


def _page_script_hashes() -> bytes:
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "static", "index.html"), "rb") as f:
        return b"".join(b" " + h for h in inline_script_hashes(f.read()))


SECURITY_HEADERS = [
    (
        b"content-security-policy",
        b"default-src 'self'; img-src 'self' data: blob:; media-src 'self' blob:; style-src 'self'; "
        b"script-src 'self'" + _page_script_hashes() + b"; connect-src 'self'; object-src 'none'; base-uri 'none'; "
        b"frame-ancestors 'none'; form-action 'self'",
    ),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
]


def host_name(host_header: str) -> str:
    """The host part of a Host header (``[::1]:8080`` -> ``::1``), lower-cased."""
    h = host_header.strip().lower()
    if h.startswith("["):
        return h[1 : h.find("]")] if "]" in h else h
    return h.rsplit(":", 1)[0] if h.count(":") == 1 else h


def request_headers(scope: Scope) -> dict[str, str]:
    return {k.decode("latin-1"): v.decode("latin-1") for k, v in scope.get("headers", [])}


async def refuse_foreign_host(headers: dict[str, str], allowed: set[str], send: Send, program: str) -> bool:
    """Answer 403 (and return True) when the Host header names no allowed host: DNS rebinding."""
    host = host_name(headers.get("host", ""))
    if host in allowed:
        return False
    await deny(send, 403, f"host {host!r} is not allowed (start {program} with --allowed-host {host})")
    return True


def with_security_headers(send: Send) -> Send:
    """``send`` adding :data:`SECURITY_HEADERS` to the response start."""

    async def send_secure(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            message = dict(message, headers=[*message.get("headers", []), *SECURITY_HEADERS])
        await send(message)

    return send_secure


class Sessions:
    """Session ids handed out in exchange for the token; idle ones expire."""

    def __init__(self, idle_s: float = SESSION_IDLE_S) -> None:
        self.idle_s = idle_s
        self._last_seen: dict[str, float] = {}

    def new(self) -> str:
        sid = secrets.token_urlsafe(32)
        self._last_seen[sid] = time.monotonic()
        return sid

    def valid(self, sid: str) -> bool:
        now = time.monotonic()
        for known, seen in list(self._last_seen.items()):
            if now - seen > self.idle_s:
                del self._last_seen[known]
        for known in self._last_seen:
            if hmac.compare_digest(known.encode(), sid.encode()):
                self._last_seen[known] = now
                return True
        return False


class AuthMiddleware:
    """ASGI middleware: Host check, token/session check, security headers on every response."""

    def __init__(self, app: Any, token: str | None, allowed_hosts: tuple[str, ...] = ()) -> None:
        self.app = app
        self.token = token
        self.allowed = {h.lower() for h in (*LOOPBACK_HOSTS, *allowed_hosts)}
        self.sessions = Sessions()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = request_headers(scope)
        if await refuse_foreign_host(headers, self.allowed, send, "kobo open"):
            return
        send_secure = with_security_headers(send)
        path = scope.get("path", "")
        if self.token is None or path.startswith("/static/") or path in ("/favicon.ico", "/healthz"):
            await self.app(scope, receive, send_secure)
            return
        query = urllib.parse.parse_qs(scope.get("query_string", b"").decode("latin-1"))
        if path == "/" and "token" in query:
            if not hmac.compare_digest(query["token"][0].encode(), self.token.encode()):
                await deny(send_secure, 403, "wrong token: open the URL `kobo open` printed", html=True)
                return
            rest = urllib.parse.urlencode([(k, v) for k, vs in query.items() if k != "token" for v in vs], doseq=True)
            cookie = f"{COOKIE}={self.sessions.new()}; HttpOnly; SameSite=Strict; Path=/"
            if scope.get("scheme") == "https":
                cookie += "; Secure"
            await send_secure(
                {
                    "type": "http.response.start",
                    "status": 303,
                    "headers": [
                        (b"location", ("/" + (f"?{rest}" if rest else "")).encode()),
                        (b"set-cookie", cookie.encode()),
                        (b"cache-control", b"no-store"),
                        (b"content-length", b"0"),
                    ],
                }
            )
            await send_secure({"type": "http.response.body", "body": b""})
            return
        verdict = self._check(headers)
        if verdict is not None:
            status, msg = verdict
            await deny(send_secure, status, msg, html=path == "/")
            return
        await self.app(scope, receive, send_secure)

    def _check(self, headers: dict[str, str]) -> tuple[int, str] | None:
        """None if the request carries a valid session or token, else (status, message)."""
        assert self.token is not None
        auth = headers.get("authorization", "")
        if auth.lower().startswith("bearer "):
            if hmac.compare_digest(auth[7:].strip().encode(), self.token.encode()):
                return None
            return 403, "wrong token in the Authorization header"
        cookies = {}
        for part in headers.get("cookie", "").split(";"):
            k, _, v = part.strip().partition("=")
            cookies[k] = v
        if COOKIE in cookies:
            if self.sessions.valid(cookies[COOKIE]):
                return None
            return 403, "session expired or unknown: open the URL `kobo open` printed (with ?token=)"
        return (
            401,
            "authentication required: open the URL `kobo open` printed (with ?token=) or send Authorization: Bearer <token>",
        )


async def deny(send: Send, status: int, message: str, html: bool = False) -> None:
    if html:
        body = (
            f"<!doctype html><meta charset=utf-8><title>KohakuBoard</title>"
            f"<p style='font:16px system-ui;margin:3em'>{_escape(message)}</p>"
        ).encode()
        ctype = b"text/html; charset=utf-8"
    else:
        body = json.dumps({"error": message}).encode()
        ctype = b"application/json"
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", ctype),
                (b"content-length", str(len(body)).encode()),
                (b"cache-control", b"no-store"),
                *SECURITY_HEADERS,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def _escape(s: str) -> str:
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
