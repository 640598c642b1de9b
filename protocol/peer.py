"""How the daemon identifies a client's process: pid plus its start time.

A client sends both in :class:`~.messages.OpenRun`; the daemon checks them to
tell a client that died without finishing (SIGKILL, OOM) from a live one, and a
reused pid from the original process.
"""

from __future__ import annotations

import os


def process_alive(pid: int, start_ticks: int) -> bool:
    """True if process ``pid`` exists, is not a zombie, and started at ``start_ticks``.

    The start time (field 22 of ``/proc/PID/stat``) guards against pid reuse.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    fields_after = data[data.rfind(b")") + 2 :].split()
    state = fields_after[0]
    if state in (b"Z", b"X"):
        return False
    if start_ticks and int(fields_after[19]) != start_ticks:
        return False
    return True


def process_start_ticks(pid: int | None = None) -> int:
    """Start time of a process in clock ticks since boot (0 where /proc is missing)."""
    try:
        with open(f"/proc/{pid or os.getpid()}/stat", "rb") as f:
            data = f.read()
        return int(data[data.rfind(b")") + 2 :].split()[19])
    except (OSError, ValueError, IndexError):
        return 0
