"""Tee Python-level stdout/stderr into the run's ``logs/output.log``.

The terminal sees exactly what it would without us: every write goes to the
original stream first.  Complete lines are forwarded to the daemon; a line
rewritten with carriage returns (progress bars) is forwarded as its last state
only.  The unfinished last line is forwarded when the board finishes, so the
traceback of a crash (printed by ``sys.excepthook`` before ``atexit`` runs) ends
up in the file.

In a distributed launch (world size > 1) every forwarded line is prefixed
with ``[rank N] `` so the ranks' output can be told apart in the one file;
every stderr line is marked ``[stderr] `` (after the rank); the terminal still
sees the line unchanged.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from typing import Any

_CHUNK = 1 << 20
_active: Capture | None = None
_active_lock = threading.Lock()
_quiet = threading.local()  # .depth > 0: this thread writes something that is not the script's output


class uncaptured:
    """``with uncaptured():`` what this thread writes meanwhile reaches the terminal only.

    Used for KohakuBoard's own messages (:mod:`._notices`): they are not the
    script's output, and may be written while the Board's lock is held.
    """

    def __enter__(self) -> None:
        _quiet.depth = getattr(_quiet, "depth", 0) + 1

    def __exit__(self, *exc: object) -> None:
        _quiet.depth -= 1


def collapse_carriage_returns(text: str) -> str:
    """Keep, for every line, only what was drawn after its last carriage return."""
    if "\r" not in text:
        return text
    out = []
    for line in text.replace("\r\n", "\n").split("\n"):
        if "\r" in line:
            parts = [p for p in line.split("\r") if p]
            line = parts[-1] if parts else ""
        out.append(line)
    return "\n".join(out)


class _Tee:
    """Stands in for ``sys.stdout``/``sys.stderr``; everything else is delegated."""

    def __init__(self, stream: Any, name: str, capture: Capture) -> None:
        self._stream = stream
        self._name = name
        self._capture = capture
        self._partial = ""
        self._lock = threading.Lock()

    def write(self, text: str) -> int:
        n = self._stream.write(text)
        if self._capture.active and isinstance(text, str) and text and not getattr(_quiet, "depth", 0):
            with self._lock:
                buf = self._partial + text
                cut = buf.rfind("\n")
                if cut < 0:
                    # Keep only the last state of a carriage-return line, bounded.
                    self._partial = buf[buf.rfind("\r") :] if len(buf) > _CHUNK else buf
                    return n
                done, self._partial = buf[: cut + 1], buf[cut + 1 :]
            self._capture.emit(self._name, collapse_carriage_returns(done))
        return n

    def flush_partial(self) -> None:
        with self._lock:
            rest, self._partial = self._partial, ""
        rest = collapse_carriage_returns(rest)
        if rest:
            self._capture.emit(self._name, rest + "\n")

    def flush(self) -> None:
        self._stream.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


STDERR_MARK = "[stderr] "  # as storage.format.STDERR_MARK (not imported: the client stays light)


def label_output(stream: str, text: str, prefix: str = "") -> str:
    """``text`` as it goes into ``logs/output.log``: rank ``prefix``, then the stderr mark, on every line."""
    if stream == "stderr":
        prefix += STDERR_MARK
    return label_lines(text, prefix) if prefix else text


def label_lines(text: str, prefix: str) -> str:
    """``text`` with ``prefix`` in front of every line (the final newline stays last)."""
    body = text[:-1] if text.endswith("\n") else text
    return prefix + body.replace("\n", "\n" + prefix) + text[len(body) :]


class Capture:
    """The installed tees of one board."""

    def __init__(self, emit: Callable[[str, str], None], prefix: str = "") -> None:
        self._emit = emit
        self._prefix = prefix
        self.active = True
        self.stdout = _Tee(sys.stdout, "stdout", self)
        self.stderr = _Tee(sys.stderr, "stderr", self)
        sys.stdout = self.stdout
        sys.stderr = self.stderr

    def emit(self, stream: str, text: str) -> None:
        text = label_output(stream, text, self._prefix)
        for i in range(0, len(text), _CHUNK):
            try:
                self._emit(stream, text[i : i + _CHUNK])
            except Exception:
                self.active = False  # the board is gone; keep the terminal working
                return

    def stop(self) -> None:
        global _active
        self.stdout.flush_partial()
        self.stderr.flush_partial()
        self.active = False
        if sys.stdout is self.stdout:
            sys.stdout = self.stdout._stream
        if sys.stderr is self.stderr:
            sys.stderr = self.stderr._stream
        with _active_lock:
            if _active is self:
                _active = None


def start_capture(emit: Callable[[str, str], None], prefix: str = "") -> Capture | None:
    """Install the tees unless another board of this process already captures.

    ``prefix`` (e.g. ``"[rank 3] "``) is put in front of every forwarded line.
    """
    global _active
    with _active_lock:
        if _active is not None:
            return None
        _active = Capture(emit, prefix)
        return _active


def reset_locks_after_fork() -> None:
    """In a forked child: replace locks another parent thread may have held at fork time."""
    global _active_lock
    _active_lock = threading.Lock()
    if _active is not None:
        _active.stdout._lock = threading.Lock()
        _active.stderr._lock = threading.Lock()
