"""Noticing a dead daemon and starting a new one (the sender thread's revival check).

When the daemon does not answer acknowledgement requests for a while, the
sender thread asks :meth:`Revival.check` whether its process is still there.
If it is gone, a new daemon is started (unless autostart is off); the outbox
then asks the new one at once, learns its instance id and re-sends what the
dead one never made durable (:mod:`._outbox`).
"""

from __future__ import annotations

import time

from ..protocol.endpoint import Endpoint, daemon_alive
from ._notices import warn
from ._outbox import Outbox

ALIVE_CHECK = 1.0  # how often to check for a dead daemon while it does not answer


class Revival:
    """Watches the daemon process of one endpoint on behalf of one outbox."""

    def __init__(self, ep: Endpoint, outbox: Outbox, *, autostart: bool = True) -> None:
        self.ep = ep
        self.outbox = outbox
        self.autostart = autostart
        self._next_check = 0.0
        self._lost = False

    def connection_lost(self) -> None:
        """The daemon's connection dropped (it may have died): look at the next check, without waiting."""
        self._lost = True

    def check(self, now: float) -> None:
        """The daemon has not answered for a while (or its connection dropped): if its process is gone, start
        a new one.

        While it is down, look every 0.2 s, so that a daemon restarted by
        someone else (systemd, by hand, another client) is asked at once.
        Marks the outbox ``daemon_down`` (what ``flush()`` reports at its
        timeout) and records why starting one failed in ``revive_error``.
        """
        out = self.outbox
        since = out.unanswered_since
        lost, self._lost = self._lost, False
        if not lost and (since is None or now - since <= ALIVE_CHECK or now < self._next_check):
            return
        self._next_check = now + (0.2 if out.daemon_down else ALIVE_CHECK)
        if daemon_alive(self.ep):
            if out.daemon_down:  # it is back: ask now rather than after the retry interval
                out.daemon_down = False
                out.ask_now(now)
            return  # alive, maybe only slow (or stopped): keep waiting
        out.daemon_down = True
        if not self.autostart:
            return
        from ..protocol.control import ensure_daemon

        try:
            if ensure_daemon(self.ep, autostart=True):
                warn(f"kohakuboard: the kobo-daemon on {self.ep} had stopped; started a new one")
            out.daemon_down = False
            out.ask_now(time.monotonic())
        except Exception as exc:  # keep trying; flush()/finish() time out and say so
            out.revive_error = exc
