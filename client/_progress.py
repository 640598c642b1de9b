"""The progress line ``finish()`` shows while the daemon writes a backlog.

Shown only when writing takes more than ``DELAY`` seconds: calls written out of
the backlog ``finish()`` found, the rate, and the time left.  On a terminal it is
one line rewritten in place (carriage return); in a log file (stderr not a
terminal) a line every ``LOG_EVERY`` seconds and a last one, never a
carriage return.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from typing import Any, TextIO

DELAY = 1.0
TTY_EVERY = 0.25
LOG_EVERY = 10.0


class FinishProgress:
    """``with FinishProgress(unwritten, path):`` around the wait of ``finish()``.

    ``unwritten()`` returns the calls not yet acknowledged as durable; it is read
    from a background thread every few tenths of a second.
    """

    def __init__(
        self, unwritten: Callable[[], int], what: str, stream: TextIO | None = None, delay: float = DELAY
    ) -> None:
        self._unwritten = unwritten
        self._what = what
        self._stream = stream or sys.__stderr__ or sys.stderr
        self._delay = delay
        self._done = threading.Event()
        self._thread: threading.Thread | None = None
        self._shown = False
        self._tty = False
        self._total = 0
        self._started = 0.0

    def __enter__(self) -> FinishProgress:
        self._total = max(0, self._unwritten())
        if self._total == 0:
            return self
        try:
            self._tty = bool(self._stream.isatty())
        except (AttributeError, ValueError):
            self._tty = False
        self._started = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="kohakuboard-finish-progress", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._thread is None:
            return
        self._done.set()
        self._thread.join(1.0)
        if self._shown:
            self._write(self._line(final=True), final=True)

    def _run(self) -> None:
        if self._done.wait(self._delay):
            return
        every = TTY_EVERY if self._tty else LOG_EVERY
        while True:
            self._write(self._line(final=False), final=False)
            self._shown = True
            if self._done.wait(every):
                return

    def _line(self, final: bool) -> str:
        left = max(0, self._unwritten())
        written = max(0, self._total - left)
        elapsed = max(1e-9, time.monotonic() - self._started)
        rate = written / elapsed
        text = f"kohakuboard: {self._what}: {written:,}/{self._total:,} log() calls written, {rate:,.0f}/s"
        if final:
            return text + f", {elapsed:.1f} s" + ("" if left == 0 else f" ({left:,} not written)")
        if rate > 0:
            return text + f", {left / rate:.0f} s left"
        return text

    def _write(self, line: str, final: bool) -> None:
        try:
            if self._tty:
                self._stream.write("\r\x1b[K" + line + ("\n" if final else ""))
            else:
                self._stream.write(line + "\n")
            self._stream.flush()
        except (OSError, ValueError):  # stderr closed at interpreter exit
            pass
