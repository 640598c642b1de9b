"""Connection limits for ``kobo-serve``: slow or hostile clients cost the others nothing.

uvicorn already keeps a slow client from blocking anyone else (one event loop,
back-pressure on each connection's writes: a response a client does not read
waits in its own task).  What it does not bound is how long and how many
connections a client may hold, and every connection is a file descriptor: a
flood of idle sockets (or slowloris, a request head sent a byte at a time)
would end in ``EMFILE`` for everyone.  :func:`guarded_protocol` makes a
subclass of uvicorn's HTTP protocol that adds:

* **request timeout**: a request (head and body) must have arrived within
  ``request_timeout`` s of the connection opening, or of the end of the keep-alive
  wait after the previous response; otherwise the connection is closed (uvicorn
  closes idle keep-alive connections after ``timeout_keep_alive``, but not a fresh
  connection that never sends, nor one that trickles);
* **send timeout**: a connection whose writes stay blocked (the client does
  not read; the kernel's and asyncio's buffers are full) for ``send_timeout``
  s is aborted, which frees the response held for it (as nginx's
  ``send_timeout``);
* **connections per client address** and **in total**: one more is answered
  ``503`` with ``Retry-After`` and closed at once, before anything is read.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import time
from typing import Any

log = logging.getLogger("kohakuboard.serve")

REQUEST_TIMEOUT_S = 15.0
KEEP_ALIVE_S = 30.0  # uvicorn's timeout_keep_alive for kobo-serve (its default, 5 s, races clients that pause)
SEND_TIMEOUT_S = 60.0
MAX_CONNECTIONS = 1000
MAX_PER_CLIENT = 128
FD_HEADROOM = 256  # descriptors kept for the run files, the accounts file and the worker threads


class _Quiet:
    """At most one log line per kind every :data:`LOG_EVERY_S`, with how many were folded into it
    (a flood of connections must not become a flood of journal lines)."""

    def __init__(self) -> None:
        self._last: dict[str, float] = {}
        self._folded: dict[str, int] = {}

    def __call__(self, level: int, kind: str, msg: str, *args: Any) -> None:
        now = time.monotonic()
        if now - self._last.get(kind, -LOG_EVERY_S) < LOG_EVERY_S:
            self._folded[kind] = self._folded.get(kind, 0) + 1
            return
        folded = self._folded.pop(kind, 0)
        self._last[kind] = now
        log.log(level, msg + (f" (and {folded} more like it in the last {LOG_EVERY_S:g} s)" if folded else ""), *args)


LOG_EVERY_S = 10.0

_BUSY = (
    b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain; charset=utf-8\r\n"
    b"retry-after: 5\r\nconnection: close\r\ncontent-length: 30\r\n\r\ntoo many connections: try again"
)


def fit_to_fd_limit(max_connections: int) -> int:
    """Raise the soft ``RLIMIT_NOFILE`` so ``max_connections`` fit (up to the hard limit); return what fits.

    systemd starts services with a soft limit of 1024.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = max_connections + FD_HEADROOM
    if soft != resource.RLIM_INFINITY and soft < want:
        new = want if hard == resource.RLIM_INFINITY else min(want, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
            soft = new
        except (ValueError, OSError):
            pass
    if soft != resource.RLIM_INFINITY and soft < want:
        fitted = max(16, soft - FD_HEADROOM)
        log.warning("only %d file descriptors allowed: at most %d connections (not %d)", soft, fitted, max_connections)
        return fitted
    return max_connections


def guarded_protocol(
    request_timeout: float = REQUEST_TIMEOUT_S,
    send_timeout: float = SEND_TIMEOUT_S,
    max_connections: int = MAX_CONNECTIONS,
    max_per_client: int = MAX_PER_CLIENT,
    keep_alive: float = KEEP_ALIVE_S,
) -> type:
    """A uvicorn HTTP protocol class (for ``uvicorn.Config(http=...)``) with the limits above.

    ``keep_alive`` is the ``timeout_keep_alive`` uvicorn runs with: after a response, a
    connection may stay idle that long, and then has ``request_timeout`` more to send its request.
    """
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    per_client: dict[str, int] = {}
    total = [0]
    quiet = _Quiet()

    class GuardedProtocol(AutoHTTPProtocol):  # type: ignore[misc, valid-type]
        _kobo_counted: str | None = None
        _kobo_request_timer: asyncio.TimerHandle | None = None
        _kobo_send_timer: asyncio.TimerHandle | None = None
        _kobo_armed_cycle: Any = None

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            addr = self.client[0] if self.client else "?"
            n = per_client.get(addr, 0)
            if total[0] >= max_connections or n >= max_per_client:
                quiet(
                    logging.WARNING,
                    "refused",
                    "refused a connection from %s: %s",
                    addr,
                    f"{n} open from that address (--max-connections-per-client {max_per_client})"
                    if n >= max_per_client
                    else f"{total[0]} open (--max-connections {max_connections})",
                )
                transport.write(_BUSY)
                transport.close()
                return
            per_client[addr] = n + 1
            total[0] += 1
            self._kobo_counted = addr
            self._kobo_arm_request_timer()

        def connection_lost(self, exc: Exception | None) -> None:
            addr = self._kobo_counted
            if addr is not None:
                self._kobo_counted = None
                total[0] -= 1
                left = per_client.get(addr, 1) - 1
                if left > 0:
                    per_client[addr] = left
                else:
                    per_client.pop(addr, None)
            for timer in (self._kobo_request_timer, self._kobo_send_timer):
                if timer is not None:
                    timer.cancel()
            super().connection_lost(exc)

        # ------------------------------------------------ request timeout

        def _kobo_arm_request_timer(self, after_response: bool = False) -> None:
            if self._kobo_request_timer is not None:
                self._kobo_request_timer.cancel()
            self._kobo_armed_cycle = self.cycle
            delay = request_timeout + (keep_alive if after_response else 0.0)
            self._kobo_request_timer = self.loop.call_later(delay, self._kobo_request_timed_out)

        def _kobo_request_timed_out(self) -> None:
            self._kobo_request_timer = None
            cycle = self.cycle
            waiting = cycle is None or cycle is self._kobo_armed_cycle or cycle.response_complete
            if not waiting and not getattr(cycle, "more_body", False):
                return  # the request is in; its response is the app's (and the send timeout's) business
            # abort, not close: close() would first wait to flush whatever a client that does not
            # read still has buffered
            quiet(
                logging.INFO,
                "request",
                "closed a connection from %s: no complete request in time (--request-timeout %g)",
                self.client[0] if self.client else "?",
                request_timeout,
            )
            self.transport.abort()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing() and not getattr(self, "pipeline", None):
                self._kobo_arm_request_timer(after_response=True)

        # ------------------------------------------------ send timeout

        def pause_writing(self) -> None:
            super().pause_writing()
            if self._kobo_send_timer is None:
                self._kobo_send_timer = self.loop.call_later(send_timeout, self._kobo_send_timed_out)

        def resume_writing(self) -> None:
            super().resume_writing()
            if self._kobo_send_timer is not None:
                self._kobo_send_timer.cancel()
                self._kobo_send_timer = None

        def _kobo_send_timed_out(self) -> None:
            self._kobo_send_timer = None
            if self.flow.write_paused:
                quiet(
                    logging.INFO,
                    "send",
                    "aborted a connection from %s: it read nothing for %g s (--send-timeout)",
                    self.client[0] if self.client else "?",
                    send_timeout,
                )
                self.transport.abort()

    GuardedProtocol.__name__ = GuardedProtocol.__qualname__ = f"Guarded{AutoHTTPProtocol.__name__}"
    return GuardedProtocol
