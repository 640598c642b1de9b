"""One error tree for KohakuBoard.

::

    KoboError
    ├── ProtocolError            a message could not be understood
    │   ├── MalformedMessage     wrong shape, wrong types, truncated
    │   ├── MessageTooLarge      over a size limit (refused before allocation)
    │   └── VersionMismatch      unknown protocol major version
    ├── TransportError           the daemon could not be reached
    │   ├── DaemonUnavailable    no daemon answers and none could be started
    │   └── KoboTimeoutError     the daemon did not answer in time (also TimeoutError)
    ├── StorageError             a run folder could not be written or read
    │   ├── FormatVersionError   written by a newer, incompatible KohakuBoard
    │   └── RunNotFound          no run folder there
    └── BoardClosedError         a finished Board was used again (also RuntimeError)

``ERROR_CODES`` maps the classes that travel in daemon replies to the numeric
codes used on the wire; :func:`error_from_code` turns a reply back into the
matching exception on the client side.
"""

from __future__ import annotations

import sys


class KoboError(Exception):
    """Root of every error KohakuBoard raises on purpose."""


class ProtocolError(KoboError):
    """A message could not be understood."""


class MalformedMessage(ProtocolError):
    """A message has the wrong shape or types, or is truncated."""


class MessageTooLarge(ProtocolError):
    """A message or one of its parts is over a size limit."""


class VersionMismatch(ProtocolError):
    """The peer speaks a protocol major version this side does not know."""


class TransportError(KoboError):
    """The daemon could not be reached."""


class DaemonUnavailable(TransportError):
    """No daemon answers on the endpoint and none could be started."""


class KoboTimeoutError(TransportError, TimeoutError):
    """The daemon did not answer within the timeout."""


class StorageError(KoboError):
    """A run folder could not be written or read."""


class FormatVersionError(StorageError):
    """A run folder was written in a newer format than this reader understands."""


class RunNotFound(StorageError, FileNotFoundError):
    """There is no run folder at the given place."""


class BoardClosedError(KoboError, RuntimeError):
    """A Board was used after ``finish()``."""


# Numeric codes for errors carried in daemon replies (0 means success).
OK = 0
ERROR_CODES: dict[type[KoboError], int] = {
    KoboError: 1,
    ProtocolError: 10,
    MalformedMessage: 11,
    MessageTooLarge: 12,
    VersionMismatch: 13,
    TransportError: 20,  # a forwarding daemon could not reach the head
    DaemonUnavailable: 21,  # e.g. the head refused the forwarding node's key
    KoboTimeoutError: 22,
    StorageError: 30,
    FormatVersionError: 31,
    RunNotFound: 32,
}
_CLASSES = {code: cls for cls, code in ERROR_CODES.items()}


def code_for(exc: BaseException) -> int:
    """Return the wire code of the most specific known class of ``exc``.

    A timeout is :class:`KoboTimeoutError`, whatever raised it: on Python >= 3.11
    ``asyncio.TimeoutError`` is the builtin ``TimeoutError``, an ``OSError``,
    which must not travel as a :class:`StorageError` (``finish()`` raises those
    but only warns about timeouts).  Other OSErrors are storage errors.
    """
    for cls in type(exc).__mro__:
        if cls in ERROR_CODES:
            return ERROR_CODES[cls]
    aio = sys.modules.get("asyncio")  # never imported here: the client imports this module
    if isinstance(exc, TimeoutError) or (aio is not None and isinstance(exc, aio.TimeoutError)):
        return ERROR_CODES[KoboTimeoutError]
    if isinstance(exc, OSError):
        return ERROR_CODES[StorageError]
    return ERROR_CODES[KoboError]


def error_from_code(code: int, message: str) -> KoboError:
    """Build the client-side exception for an error reply."""
    return _CLASSES.get(code, KoboError)(message)
