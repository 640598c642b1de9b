"""Authentication for ``kobo-serve``: accounts, sessions, CSRF, login throttling.

The team server is the ``kobo open`` app behind :class:`TeamAuth`, an ASGI
middleware that decides who may look:

* **Who**: a user logs in with a password (``POST api/login``) and gets a
  random session id, kept server-side (only its SHA-256), in an HttpOnly,
  SameSite=Strict cookie (``Secure`` and the ``__Host-`` prefix under HTTPS)
  with an idle and an absolute expiry; ``POST api/logout`` ends it.  Scripts
  send ``Authorization: Bearer <token>`` (``kobo-serve token create``).
  Accounts are read from :class:`~.accounts.Accounts`, re-read when the file
  changes, so ``kobo-serve user remove`` and ``token revoke`` take effect at
  once.
* **Only reading, no forged writes**: GET and HEAD never change anything.  The
  only other requests, login and logout, need a session cookie (a pre-login
  session from ``GET api/session`` for the login itself), an ``Origin`` (or
  ``Referer``) naming this server, and the session's CSRF token in
  ``X-Kobo-CSRF``.  Every other method is 405.  No CORS header is ever sent.
* **Guessing**: failed logins back off per client address (exponential, up
  to 5 minutes, answered 429 with ``Retry-After``) and are logged; passwords
  and tokens are compared in constant time (in :mod:`.accounts`).
* **Where**: the Host header must name this server (DNS rebinding); with
  ``base_url`` the app lives under that path (behind a reverse proxy).
* **What**: a user limited to some projects sees only those; the rest answer
  404 exactly as a project that does not exist (``scope["kobo_user"]`` tells
  the app who asks).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import secrets
import time
import urllib.parse
from dataclasses import dataclass, field
from typing import Any

from .auth import (
    LOOPBACK_HOSTS,
    SECURITY_HEADERS,
    Receive,
    Scope,
    Send,
    deny,
    refuse_foreign_host,
    request_headers,
    with_security_headers,
)

log = logging.getLogger("kohakuboard.serve")

SESSION_IDLE_S = 12 * 3600
SESSION_MAX_S = 7 * 24 * 3600
ANON_IDLE_S = 3600
MAX_ANON_SESSIONS = 10_000
MAX_BODY = 16 << 10
BACKOFF_FREE_FAILURES = 3
BACKOFF_MAX_S = 300.0
CSRF_HEADER = "x-kobo-csrf"
STREAM_CHECK_S = 1.0


@dataclass
class Session:
    user: str | None  # None: a pre-login session (it only carries the CSRF token for the login form)
    csrf: str
    credential: str = ""  # the user's User.credential at login: a new password ends the session
    created: float = field(default_factory=time.time)
    last_seen: float = field(default_factory=time.time)


class Sessions:
    """Server-side sessions by the SHA-256 of their id (a leaked table holds no usable id)."""

    def __init__(self, idle_s: float = SESSION_IDLE_S, max_s: float = SESSION_MAX_S) -> None:
        self.idle_s = idle_s
        self.max_s = max_s
        self._by_hash: dict[str, Session] = {}

    @staticmethod
    def _key(sid: str) -> str:
        return hashlib.sha256(sid.encode()).hexdigest()

    def create(self, user: str | None, credential: str = "") -> tuple[str, Session]:
        self._expire()
        if user is None:
            anon = [k for k, s in self._by_hash.items() if s.user is None]
            if len(anon) >= MAX_ANON_SESSIONS:  # bounded: the oldest pre-login sessions go first
                for k in sorted(anon, key=lambda k: self._by_hash[k].last_seen)[: len(anon) // 10 + 1]:
                    del self._by_hash[k]
        sid = secrets.token_urlsafe(32)
        session = Session(user=user, csrf=secrets.token_urlsafe(32), credential=credential)
        self._by_hash[self._key(sid)] = session
        return sid, session

    def get(self, sid: str, touch: bool = True) -> Session | None:
        """The live session ``sid`` (None if unknown or expired); ``touch``: count this as a use."""
        if not sid:
            return None
        s = self._by_hash.get(self._key(sid))
        if s is None:
            return None
        now = time.time()
        idle = ANON_IDLE_S if s.user is None else self.idle_s
        if now - s.last_seen > idle or now - s.created > self.max_s:
            self._by_hash.pop(self._key(sid), None)
            return None
        if touch:
            s.last_seen = now
        return s

    def end(self, sid: str) -> None:
        self._by_hash.pop(self._key(sid), None)

    def _expire(self) -> None:
        now = time.time()
        for k in [
            k
            for k, s in self._by_hash.items()
            if now - s.last_seen > (ANON_IDLE_S if s.user is None else self.idle_s) or now - s.created > self.max_s
        ]:
            del self._by_hash[k]

    def __len__(self) -> int:
        return len(self._by_hash)


class LoginThrottle:
    """Failed logins per client address: free for a few, then doubling waits up to :data:`BACKOFF_MAX_S`."""

    def __init__(self) -> None:
        self._fails: dict[str, tuple[int, float]] = {}

    def wait(self, addr: str) -> float:
        """Seconds ``addr`` must still wait before its next login attempt (0: may try now)."""
        count, last = self._fails.get(addr, (0, 0.0))
        if count < BACKOFF_FREE_FAILURES:
            return 0.0
        delay = min(BACKOFF_MAX_S, 2.0 ** (count - BACKOFF_FREE_FAILURES))
        return max(0.0, last + delay - time.monotonic())

    def failed(self, addr: str) -> int:
        count, _ = self._fails.get(addr, (0, 0.0))
        self._fails[addr] = (count + 1, time.monotonic())
        if len(self._fails) > 100_000:  # bounded memory: forget the oldest addresses
            for a, _ in sorted(self._fails.items(), key=lambda kv: kv[1][1])[:10_000]:
                del self._fails[a]
        return count + 1

    def succeeded(self, addr: str) -> None:
        self._fails.pop(addr, None)


class TeamAuth:
    """ASGI middleware in front of the viewer app for ``kobo-serve`` (see the module docstring)."""

    def __init__(
        self,
        app: Any,
        accounts: Any,
        allowed_hosts: tuple[str, ...] = (),
        base_url: str = "",
        https: bool = False,
        sessions: Sessions | None = None,
    ) -> None:
        self.app = app
        self.accounts = accounts
        self.allowed = {h.lower() for h in (*LOOPBACK_HOSTS, *allowed_hosts)}
        self.base = base_url.rstrip("/")
        self.https = https
        self.cookie = "__Host-kobo_session" if https else "kobo_session"
        self.sessions = sessions if sessions is not None else Sessions()
        self.throttle = LoginThrottle()

    # ------------------------------------------------------------- helpers

    def _cookie_header(self, sid: str, max_age: int | None = None) -> tuple[bytes, bytes]:
        parts = [f"{self.cookie}={sid}", "HttpOnly", "SameSite=Strict", "Path=/"]
        if self.https:
            parts.append("Secure")
        if max_age is not None:
            parts.append(f"Max-Age={max_age}")
        return (b"set-cookie", "; ".join(parts).encode())

    def _sid(self, headers: dict[str, str]) -> str:
        for part in headers.get("cookie", "").split(";"):
            k, _, v = part.strip().partition("=")
            if k == self.cookie:
                return v
        return ""

    def _same_origin(self, headers: dict[str, str]) -> bool:
        origin = headers.get("origin") or headers.get("referer") or ""
        parsed = urllib.parse.urlsplit(origin)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            return False
        if self.https and parsed.scheme != "https":
            return False
        return parsed.netloc.lower() == headers.get("host", "").lower()

    async def _json(self, send: Send, status: int, obj: Any, extra: list[tuple[bytes, bytes]] | None = None) -> None:
        body = json.dumps(obj).encode()
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"cache-control", b"no-store"),
                    *SECURITY_HEADERS,
                    *(extra or []),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})

    async def _redirect(self, send: Send, location: str) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": 303,
                "headers": [
                    (b"location", location.encode()),
                    (b"content-length", b"0"),
                    (b"cache-control", b"no-store"),
                    *SECURITY_HEADERS,
                ],
            }
        )
        await send({"type": "http.response.body", "body": b""})

    @staticmethod
    async def _body(receive: Receive) -> bytes | None:
        chunks, size = [], 0
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return None
            chunk = msg.get("body", b"")
            size += len(chunk)
            if size > MAX_BODY:
                return None
            chunks.append(chunk)
            if not msg.get("more_body"):
                return b"".join(chunks)

    def _user_from(self, headers: dict[str, str], touch: bool = True) -> tuple[Any, Session | None, str]:
        """(user, session, sid) of the request: a Bearer token or a logged-in session; user None if neither.

        ``touch=False``: a check that is not a use (the session's idle time keeps running).
        """
        auth = headers.get("authorization", "")
        if auth[:7].lower() == "bearer ":
            return self.accounts.verify_token(auth[7:].strip()), None, ""
        sid = self._sid(headers)
        session = self.sessions.get(sid, touch)
        if session is None or session.user is None:
            return None, session, sid
        user = self.accounts.get_user(session.user)
        if user is None or user.credential != session.credential:  # removed, or a new password, since the login
            self.sessions.end(sid)
            log.info(
                "ended a session of %r: %s",
                session.user,
                "the user was removed" if user is None else "the password changed",
            )
            return None, None, sid
        return user, session, sid

    # ------------------------------------------------------------ routing

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = request_headers(scope)
        if await refuse_foreign_host(headers, self.allowed, send, "kobo-serve"):
            return
        path = scope.get("path", "")
        if self.base:
            if path == self.base:
                await self._redirect(send, self.base + "/")
                return
            if not path.startswith(self.base + "/"):
                await deny(send, 404, f"not found: {path} (this server lives under {self.base}/)")
                return
            path = path[len(self.base) :]
            # ASGI: scope["path"] keeps the prefix, root_path names it (Starlette routes and
            # StaticFiles match on path minus root_path)
            scope = dict(scope, root_path=scope.get("root_path", "") + self.base)
        method = scope.get("method", "GET").upper()
        client = (scope.get("client") or ("?", 0))[0]
        send_secure = with_security_headers(send)

        if path.startswith("/static/") or path in ("/healthz", "/favicon.ico"):
            if method not in ("GET", "HEAD"):
                await deny(send, 405, "this server only reads")
                return
            await self.app(scope, receive, send_secure)
            return
        if path == "/login" and method in ("GET", "HEAD"):
            await self.app(scope, receive, send_secure)
            return
        if path == "/api/session" and method == "GET":
            await self._session_info(send, headers)
            return
        if path == "/api/login":
            await self._login(send, receive, headers, method, client)
            return
        if path == "/api/logout":
            await self._logout(send, headers, method)
            return
        if method not in ("GET", "HEAD"):
            await deny(send, 405, f"{method} is not allowed: this server only reads")
            return
        user, _, _ = self._user_from(headers)
        if user is None:
            if headers.get("authorization", "")[:7].lower() == "bearer ":
                await deny(send, 401, "invalid or revoked token")
            elif path == "/":
                await self._redirect(send, f"{self.base}/login")
            else:
                await deny(send, 401, "log in first (or send Authorization: Bearer <token>)")
            return
        scope = dict(scope, kobo_user=user)
        if path == "/api/events":  # a stream lasts: it ends when its credentials do (logout, user removed, ...)
            receive, send_secure = self._while_valid(headers, user, receive, send_secure)
        await self.app(scope, receive, send_secure)

    def _while_valid(self, headers: dict[str, str], user: Any, receive: Receive, send: Send) -> tuple[Receive, Send]:
        """``receive``/``send`` of a long response that end it once its token or session stops being valid.

        Checked at most every :data:`STREAM_CHECK_S` when the response sends (a live
        run's events) or asks whether the client left (an idle stream, every second).
        Then the response is finished (an empty last chunk) and the app sees a disconnect.
        """
        state = {"ended": False, "finished": False, "checked": time.monotonic()}

        def ended() -> bool:
            if not state["ended"] and time.monotonic() - state["checked"] >= STREAM_CHECK_S:
                state["checked"] = time.monotonic()
                now, _, _ = self._user_from(headers, touch=False)
                if now is None or now != user:  # logged out, expired, removed, new password, other projects
                    state["ended"] = True
                    log.info("ended an event stream of %r: its credentials are no longer valid", user.name)
            return bool(state["ended"])

        async def guarded_receive() -> dict[str, Any]:
            if ended():
                return {"type": "http.disconnect"}
            return await receive()

        async def guarded_send(message: dict[str, Any]) -> None:
            if state["finished"]:
                return
            if message["type"] == "http.response.body" and ended():
                state["finished"] = True
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                return
            await send(message)

        return guarded_receive, guarded_send

    async def _session_info(self, send: Send, headers: dict[str, str]) -> None:
        user, session, sid = self._user_from(headers)
        extra = []
        if session is None and user is None:
            sid, session = self.sessions.create(None)
            extra.append(self._cookie_header(sid))
        await self._json(
            send,
            200,
            {
                "user": getattr(user, "name", None),
                "csrf": session.csrf if session else None,
                "projects": getattr(user, "projects", None),
            },
            extra,
        )

    def _csrf_ok(self, headers: dict[str, str], session: Session | None) -> bool:
        token = headers.get(CSRF_HEADER, "")
        return bool(session and token and hmac.compare_digest(token.encode(), session.csrf.encode()))

    async def _login(self, send: Send, receive: Receive, headers: dict[str, str], method: str, client: str) -> None:
        if method != "POST":
            await deny(send, 405, "log in with POST")
            return
        session = self.sessions.get(self._sid(headers))
        if not self._same_origin(headers):
            await deny(send, 403, "cross-origin request refused")
            return
        if session is None or not self._csrf_ok(headers, session):
            await deny(send, 403, "missing or wrong CSRF token: reload the login page")
            return
        wait = self.throttle.wait(client)
        if wait > 0:
            await self._json(
                send,
                429,
                {"error": f"too many failed logins: try again in {int(wait) + 1} s"},
                [(b"retry-after", str(int(wait) + 1).encode())],
            )
            return
        body = await self._body(receive)
        try:
            data = json.loads(body or b"")
            name, password = data["user"], data["password"]
            if not isinstance(name, str) or not isinstance(password, str):
                raise TypeError
        except (ValueError, KeyError, TypeError):
            await deny(send, 400, 'send {"user": ..., "password": ...} as JSON')
            return
        # scrypt (~50 ms of CPU) in a worker thread: logins never hold up the event loop
        user = await asyncio.to_thread(self.accounts.verify_password, name, password)
        if user is None:
            n = self.throttle.failed(client)
            log.warning("failed login for %r from %s (%d in a row)", name[:64], client, n)
            await deny(send, 401, "wrong user name or password")
            return
        self.throttle.succeeded(client)
        self.sessions.end(self._sid(headers))  # a fresh id at login: no session fixation
        sid, new = self.sessions.create(user.name, user.credential)
        log.info("login %r from %s", user.name, client)
        await self._json(send, 200, {"user": user.name, "csrf": new.csrf}, [self._cookie_header(sid)])

    async def _logout(self, send: Send, headers: dict[str, str], method: str) -> None:
        if method != "POST":
            await deny(send, 405, "log out with POST")
            return
        sid = self._sid(headers)
        session = self.sessions.get(sid)
        if not self._same_origin(headers):
            await deny(send, 403, "cross-origin request refused")
            return
        if session is None or not self._csrf_ok(headers, session):
            await deny(send, 403, "missing or wrong CSRF token")
            return
        self.sessions.end(sid)
        log.info("logout %r", session.user)
        await self._json(send, 200, {"user": None}, [self._cookie_header("", max_age=0)])
