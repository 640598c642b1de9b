"""Warnings of the client for the user, through the ``kohakuboard`` logger.

Users route or silence them with :mod:`logging` (e.g.
``logging.getLogger("kohakuboard").setLevel(logging.ERROR)``).  When nobody
configured logging, Python's last-resort handler prints the bare message on
stderr, as before.  A message is never captured into the run's
``logs/output.log`` (it is about the run, not output of the training script),
and emitting one while the Board's lock is held (``log()`` at the queue's
bound) never re-enters the Board through the output capture.
"""

from __future__ import annotations

import logging

from ._capture import uncaptured

logger = logging.getLogger("kohakuboard")


def warn(message: str) -> None:
    """Log ``message`` at WARNING on the ``kohakuboard`` logger (any thread)."""
    with uncaptured():
        logger.warning("%s", message)


def error(message: str) -> None:
    """Log ``message`` at ERROR on the ``kohakuboard`` logger (any thread)."""
    with uncaptured():
        logger.error("%s", message)
