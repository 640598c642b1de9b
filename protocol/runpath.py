"""The longest path a run folder may have: one rule for the client that names the run and the daemon that creates it.

A client names its run by the absolute path of its folder (``Board`` refuses a
path that is too long at the call, before anything is sent); the daemon checks
it again before a writer creates the folder (``daemon/security.py``).
"""

from __future__ import annotations

import os

# SQLite opens files by paths of at most 512 bytes (its unix VFS's limit, the
# "-wal" suffix included): measured, data/metadata.db fails to open beyond ~504.
# The longest database path inside a run is data/histograms/compact_u8.db (+30).
MAX_RUN_PATH_BYTES = 460


def run_path_too_long(path: str) -> str | None:
    """Why ``path`` is too long to hold a run (its databases could not be opened); None if it is not."""
    n = len(os.fsencode(path))
    if n > MAX_RUN_PATH_BYTES:
        return (
            f"the run folder's path is {n} bytes long; a run's databases (SQLite) need it to be at most "
            f"{MAX_RUN_PATH_BYTES} bytes: use a shorter base_dir"
        )
    return None
