"""Open run readers kept between requests, each lent to one request at a time.

Opening a run for a request costs more than most requests' reads: a
:class:`~kohakuboard.storage.reader.RunReader` opens each SQLite / ColumnVault
file it touches (~0.1-0.3 ms apiece) and closes them again at the end.  Pages
following a live run ask for its summary and its tails several times a second,
so the server kept opening the same files.  A reader here is returned to the
pool after its request instead, and lent to the next request for that run.

What keeps a kept reader correct:

* a reader sees every commit made before each read (see :class:`ReadOnlyFile`:
  files in place are read through SQLite, which sees new commits; a file read
  whole is reopened when it changes), so only ``metadata.json``, read once when
  the reader is made, could go stale: a reader is lent only while that file's
  identity, size and modification time are those it was read with;
* one request at a time: a reader is taken out of the pool while lent;
* a request that failed closes its reader (its files may be what failed);
* bounded: at most :data:`PER_RUN` idle readers per run and :data:`IDLE_MAX` in
  all (the least recently used are closed), and none kept idle longer than
  :data:`IDLE_SECONDS`, so a finished run's files are not held open for long.
"""

from __future__ import annotations

import collections
import contextlib
import os
import threading
import time
from collections.abc import Iterator
from typing import Any

from ..storage import format as fmt
from ..storage.reader import RunReader

PER_RUN = 4
IDLE_MAX = 16
IDLE_SECONDS = 30.0


def _meta_key(path: str) -> tuple[int, int, int, int] | None:
    try:
        st = os.stat(os.path.join(path, fmt.METADATA_JSON))
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


class ReaderPool:
    """``with pool.borrow(path) as reader:`` a :class:`RunReader` of the run folder ``path``."""

    def __init__(self, per_run: int = PER_RUN, idle_max: int = IDLE_MAX, idle_seconds: float = IDLE_SECONDS) -> None:
        self.per_run = per_run
        self.idle_max = idle_max
        self.idle_seconds = idle_seconds
        # path -> idle readers, most recently returned last: (metadata key, reader, returned at)
        self._idle: collections.OrderedDict[str, list[tuple[Any, RunReader, float]]] = collections.OrderedDict()
        self._count = 0
        self._lock = threading.Lock()
        self.opened = 0  # readers made (for /api/stats and tests)
        self.lent = 0  # requests served by a kept reader

    def take(self, path: str) -> tuple[RunReader, Any]:
        """A reader of the run folder ``path``, kept or new, and what :meth:`give` needs back."""
        key = _meta_key(path)
        reader, stale = None, []
        with self._lock:
            kept = self._idle.get(path)
            while kept:
                k, r, _ = kept.pop()
                self._count -= 1
                if k == key and key is not None:
                    reader = r
                    break
                stale.append(r)
            if kept is not None and not kept:
                del self._idle[path]
        for r in stale:
            r.close()
        if reader is not None:
            self.lent += 1
            reader.skipped = []
            return reader, key
        reader = RunReader(path)
        self.opened += 1
        if _meta_key(path) != key:  # metadata.json was replaced while it was read: do not keep
            key = None
        return reader, key

    def give(self, path: str, key: Any, reader: RunReader, ok: bool) -> None:
        """Take back a reader from :meth:`take`; ``ok``: its request did not fail."""
        if key is None or not ok:
            reader.close()
            return
        now = time.monotonic()
        closing = []
        with self._lock:
            kept = self._idle.setdefault(path, [])
            self._idle.move_to_end(path)
            kept.append((key, reader, now))
            self._count += 1
            if len(kept) > self.per_run:
                closing.append(kept.pop(0)[1])
                self._count -= 1
            # the least recently used runs' readers, and any idle too long
            for p in list(self._idle):
                rs = self._idle[p]
                while rs and (self._count > self.idle_max or now - rs[0][2] > self.idle_seconds):
                    closing.append(rs.pop(0)[1])
                    self._count -= 1
                if not rs:
                    del self._idle[p]
        for r in closing:
            r.close()

    def borrow(self, path: str) -> contextlib.AbstractContextManager[RunReader]:
        """``with pool.borrow(path) as reader:`` (a failure inside closes the reader).  The reader is
        taken at the call, so an error opening the run is raised there, before the ``with`` body."""
        reader, key = self.take(path)
        return self._lent(path, key, reader)

    @contextlib.contextmanager
    def _lent(self, path: str, key: Any, reader: RunReader) -> Iterator[RunReader]:
        ok = False
        try:
            yield reader
            ok = True
        finally:
            self.give(path, key, reader, ok)

    def idle(self) -> int:
        with self._lock:
            return self._count

    def close(self) -> None:
        """Close every idle reader (the server is stopping)."""
        with self._lock:
            readers = [r for rs in self._idle.values() for _, r, _ in rs]
            self._idle.clear()
            self._count = 0
        for r in readers:
            r.close()
