"""The clients of a forwarding node, watched so that the head learns when one dies without finishing.

Only the node that ran a client can tell that its process died.  The
forwarder (:mod:`.forward`) hands :class:`CrashReports` each client attached
through it (from its ``open`` or ``ack_req`` request, once the head has
accepted it: :meth:`~CrashReports.watch`), the sequence numbers and steps of its
calls as they pass (:meth:`~CrashReports.seen`), and its ``finish``.  When a
watched process is gone without a ``finish``, the head gets a ``finish`` with
status ``crashed`` for it, after everything the client sent has gone upstream
(:meth:`~CrashReports.reap`), asked again until the head answers.  The watched
clients are kept in ``<endpoint>.clients.json``: a forwarder restarted (or
killed) while a client died still reports that client.

Everything here runs on the relay thread.
"""

from __future__ import annotations

import json
import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import zmq

from ..protocol import messages as m
from ..protocol.atomic import write_atomic
from ..protocol.peer import process_alive
from .relay import ControlLine

log = logging.getLogger("kohakuboard.daemon")

HOST = socket.gethostname()
MAX_TRACKED = 100_000  # clients remembered for reaping
_STEP_KINDS = (m.LogMessage.KIND, m.LogBatch.KIND)  # data whose envelope carries the call's step


@dataclass
class Client:
    """A client of this node attached to a run through the forwarder."""

    run: str
    client: str
    rank: int
    pid: int
    pid_start: int
    host: str
    last_seq: int = 0
    finishing: bool = False
    reap_id: int = 0
    reap_deadline: float = 0.0
    dead_since: float = 0.0
    reports: int = 0
    step: int = -1  # latest (step, global_step) of its calls seen here (-1: none yet); node samples go there
    global_step: int = 0


class CrashReports:
    """The watched clients of this node and the crash reports of the dead ones.

    ``open_socket(handler)`` makes an upstream control ``DEALER`` whose
    replies call ``handler`` (on the relay thread); ``close_socket`` undoes it.
    """

    def __init__(
        self,
        state_path: str,
        open_socket: Callable[[Callable[[], None]], zmq.Socket[Any]],
        close_socket: Callable[[zmq.Socket[Any]], None],
    ) -> None:
        self.clients: dict[tuple[str, str], Client] = {}
        self.reaped = 0
        self._state_path = state_path
        self._line = ControlLine(open_socket, close_socket, self._on_reply)
        self._reap_id = 0
        self._tracking_full = False
        self._dirty = False
        self._next_save = 0.0
        self._load()

    # ------------------------------------------------- what the relay sees

    def watch(self, c: Client) -> None:
        """The head accepted ``c``'s ``open`` or acknowledgement request: watch its process."""
        key = (c.run, c.client)
        if len(self.clients) >= MAX_TRACKED and key not in self.clients:
            if not self._tracking_full:
                self._tracking_full = True
                log.warning("watching %d clients: newer ones are not watched for crashes", MAX_TRACKED)
            return
        old = self.clients.get(key)
        if old is not None:
            c.last_seq = max(c.last_seq, old.last_seq)
            if old.step >= 0:  # its calls seen here are newer than what the head had committed
                c.step, c.global_step = old.step, old.global_step
        self.clients[key] = c
        if old is None or (old.pid, old.pid_start) != (c.pid, c.pid_start):
            self._dirty = True

    def finishing(self, key: tuple[str, str], yes: bool) -> None:
        """The client's ``finish`` went upstream (``yes``), or the head refused it."""
        c = self.clients.get(key)
        if c is not None:
            c.finishing = yes

    def finished(self, key: tuple[str, str]) -> None:
        """The head finished the client: nothing more to watch."""
        if self.clients.pop(key, None) is not None:
            self._dirty = True

    def seen(self, run: str, client: str, seq: int, kind: str, fields: list[Any]) -> None:
        """A data message of a client passed (its header ``fields``): remember how far it got."""
        c = self.clients.get((run, client))
        if c is not None and seq > c.last_seq:  # (not a re-send: those are older)
            c.last_seq = seq
            if kind in _STEP_KINDS:
                step, global_step = fields[7], fields[8]
                if type(step) is int and type(global_step) is int:
                    c.step, c.global_step = step, global_step

    def live_here(self) -> list[Client]:
        """The watched clients of this host (node samples go to their runs)."""
        return [c for c in self.clients.values() if c.host == HOST]

    # ------------------------------------------------------------ reports

    def save_if_changed(self, now: float) -> None:
        """Save the watched clients when they changed (at most every 0.5 s)."""
        if self._dirty and now >= self._next_save:
            self._next_save = now + 0.5
            self._save()

    def reap(self, now: float, data_waiting: Callable[[], bool]) -> None:
        """Report the watched clients whose process died (``data_waiting``: messages wait to go upstream)."""
        for c in list(self.clients.values()):
            if c.reap_id:
                if now > c.reap_deadline:
                    # No answer: the head (or the connection) restarted and lost
                    # the report.  Ask again; the report is kept on disk meanwhile.
                    self._report(c, now)
                continue
            if c.finishing or not c.pid or c.host != HOST or process_alive(c.pid, c.pid_start):
                continue
            if not c.dead_since:
                c.dead_since = now
            if now - c.dead_since < 2.0 and data_waiting():
                # Its last messages may still be here: first send them on (the
                # head waits a few seconds for what is in flight; a report never
                # waits on data only the dead client could re-send).
                continue
            self._report(c, now)

    def _report(self, c: Client, now: float) -> None:
        self._reap_id += 1
        env = m.Envelope(c.run, c.client, self._reap_id, c.rank, 0, 0, time.time())
        if not self._line.send(m.FinishRun(env, c.last_seq, "crashed")):
            return  # the head is not reachable: tried again on the next pass
        if not c.reports:
            log.warning("client pid %d of %s died without finishing: telling the head it crashed", c.pid, c.run)
        else:
            log.info("asking the head again to mark client pid %d of %s crashed", c.pid, c.run)
        c.reports += 1
        c.reap_id = self._reap_id
        c.reap_deadline = now + 10.0  # the head answers within ~5 s (its wait for in-flight data)

    def _on_reply(self, reply: Any) -> None:
        for key, c in list(self.clients.items()):
            if c.reap_id and c.reap_id == reply.env.seq:
                del self.clients[key]
                self._dirty = True
                if isinstance(reply, m.ErrorReply):
                    log.warning("could not mark client pid %d of %s crashed: %s", c.pid, c.run, reply.message)
                else:
                    self.reaped += 1
                    log.info("marked client pid %d of %s crashed", c.pid, c.run)

    def close_socket(self) -> None:
        """Close the report socket (the head refused us, or the relay stops); unanswered reports are asked again."""
        self._line.close()

    def close(self) -> None:
        """The relay stops: save what changed, close the socket."""
        if self._dirty:
            self._save()
        self.close_socket()

    # --------------------------------------------------------------- file

    def _load(self) -> None:
        try:
            with open(self._state_path) as f:
                entries = json.load(f)
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            log.warning("cannot read the clients a previous forwarder watched (%s): %s", self._state_path, exc)
            return
        n = 0
        for e in entries if isinstance(entries, list) else []:
            try:
                c = Client(
                    str(e["run"]),
                    str(e["client"]),
                    int(e["rank"]),
                    int(e["pid"]),
                    int(e["pid_start"]),
                    str(e["host"]),
                    int(e.get("last_seq", 0)),
                )
            except (KeyError, TypeError, ValueError):
                continue
            if c.host == HOST and len(self.clients) < MAX_TRACKED:
                self.clients[(c.run, c.client)] = c
                n += 1
        if n:
            log.info("watching %d client(s) a previous forwarder watched (dead ones are reported to the head)", n)

    def _save(self) -> None:
        self._dirty = False
        entries = [
            {
                "run": c.run,
                "client": c.client,
                "rank": c.rank,
                "pid": c.pid,
                "pid_start": c.pid_start,
                "host": c.host,
                "last_seq": c.last_seq,
            }
            for c in self.clients.values()
        ]
        try:
            # Not fsynced, as before: saved up to twice a second while clients come and go, and
            # only a power loss of the node could lose it, which ends its clients too.
            write_atomic(self._state_path, json.dumps(entries), mode=0o600, fsync=False)
        except OSError as exc:
            log.warning("cannot save the watched clients to %s: %s", self._state_path, exc)
