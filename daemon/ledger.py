"""The daemon's ledger: per run, which calls of each client are new, duplicates, durable.

Every call a client makes carries a sequence number (``Envelope.seq``; a
``LogBatch`` one per call, a ``DropReport`` the range of the calls it stands
for).  One :class:`Ledger` per open run decides, per client:

* **new or duplicate** (:meth:`Ledger.claim`, :meth:`Ledger.claim_each`): a
  call whose number the run already holds, committed or staged, is a re-send
  (the client replays what a dead daemon never acknowledged, or a forwarder
  re-sends after a reconnection) and is dropped before storage sees it;
* **in sequence** (:meth:`Ledger.highest_seen`): ``daemon/ingest.py`` holds
  back a message that arrives after a gap until the re-sent ones fill it;
* **durable** (:meth:`Ledger.durable`): the largest ``n`` such that calls
  ``1..n`` are committed.  ``Acked``/``Finished`` replies carry it, and the
  client forgets what it covers.

What the ledger records reaches the disk with the data it describes: at each
commit the ledger hands storage its *marks* (:meth:`Ledger.marks`: per client
touched since the last commit, the ranges held and their prefix), which
``RunWriter.commit`` writes in the same SQLite transaction as the batch
(tables ``client_seqs`` and ``clients.durable_seq``); storage does not read
them.  After a restart the ledger is loaded back from them
(``RunWriter.delivery_marks``), so a call is stored once through any crash.
The whole protocol, its states and what survives which crash: ``docs/delivery.md``.

Threads: the claims, :meth:`marks` and :meth:`committed` run on the run's
writer thread (``RunIngest``, ``RunChannel._write``); :meth:`received` and
:meth:`durable` on the event loop.  The only state both touch is the
``_durable`` dict, written whole per key after a commit (atomic in CPython).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from .seqranges import SeqRanges

# What a commit records of one client: the ranges of its call numbers the run
# holds after the commit, and their contiguous prefix (its durable number).
Marks = tuple[list[tuple[int, int]], int]


class Ledger:
    """Per-client delivery state of one run (see the module docstring)."""

    def __init__(self, committed: Iterable[tuple[str, int, int]] = ()) -> None:
        """``committed``: the ``(client, lo, hi)`` ranges the run's commits recorded (see :meth:`load`)."""
        self._committed: dict[str, SeqRanges] = {}
        # committed plus staged: what a re-send is checked against
        self._seen: dict[str, SeqRanges] = {}
        self._touched: set[str] = set()  # clients claimed since the last commit
        self._durable: dict[str, int] = {}
        self._received: dict[str, int] = {}
        self.duplicates = 0  # calls dropped as re-sends
        self.load(committed)

    def load(self, committed: Iterable[tuple[str, int, int]]) -> None:
        """Take what the run's commits recorded (``RunWriter.delivery_marks``) when its writer
        opens, before any claim: the calls a previous daemon stored are durable, and duplicates."""
        done: dict[str, SeqRanges] = {}
        for client, lo, hi in committed:
            done.setdefault(client, SeqRanges()).add(int(lo), int(hi))
        self._committed = done
        self._seen = {c: r.copy() for c, r in done.items()}
        self._touched = set()
        self._durable = {c: r.prefix() for c, r in done.items()}

    # ------------------------------------------------------------ event loop

    def received(self, client: str, seq: int) -> None:
        """A data message of ``client`` numbered up to ``seq`` arrived (for status)."""
        if seq > self._received.get(client, 0):
            self._received[client] = seq

    def highest_received(self, client: str) -> int:
        return self._received.get(client, 0)

    def durable(self, client: str) -> int:
        """The largest ``n`` such that calls ``1..n`` of ``client`` are committed (0: none)."""
        return self._durable.get(client, 0)

    # --------------------------------------------------------- writer thread

    def highest_seen(self, client: str) -> int:
        """The highest number of ``client`` the run holds, committed or staged (0: none)."""
        r = self._seen.get(client)
        return r.highest() if r is not None else 0

    def claim(self, client: str, first: int, last: int) -> bool:
        """Claim calls ``first..last`` of ``client`` for the next commit.

        False (a duplicate: store nothing of them) if the run holds them all.
        """
        r = self._seen_of(client)
        if r.covers(first, last):
            self.duplicates += 1
            return False
        r.add(first, last)
        self._touched.add(client)
        return True

    def claim_each(self, client: str, seqs: np.ndarray) -> np.ndarray | None:
        """Claim the calls ``seqs`` (int64, ascending) of ``client`` for the next commit.

        None: all of them were new.  Otherwise the mask of the new ones (maybe
        none), which alone were claimed: store only those.
        """
        r = self._seen_of(client)
        keep = None
        lo, hi = int(seqs.min()), int(seqs.max())
        if r.overlaps(lo, hi):
            keep = np.fromiter((s not in r for s in seqs.tolist()), dtype=bool, count=len(seqs))
            self.duplicates += len(seqs) - int(keep.sum())
            if not keep.any():
                return keep
            seqs = seqs[keep]
        first, last = int(seqs[0]), int(seqs[-1])
        if last - first == len(seqs) - 1 and (len(seqs) < 3 or bool(np.all(np.diff(seqs) == 1))):
            r.add(first, last)  # the usual case: consecutive calls
        else:
            for s in seqs.tolist():
                r.add(s, s)
        self._touched.add(client)
        return keep

    def marks(self) -> dict[str, Marks]:
        """What the next commit must record: per client claimed since the last commit,
        every range of its calls the run then holds, and their prefix."""
        return {c: (self._seen[c].ranges(), self._seen[c].prefix()) for c in self._touched}

    def committed(self) -> dict[str, int]:
        """The commit that wrote :meth:`marks` succeeded: those calls are durable.

        Returns the new durable number of each client it covered.  Not called
        when the commit failed: the claims stay staged with their data, and the
        next commit's marks include them again.
        """
        out = {}
        for client in self._touched:
            r = self._seen[client]
            self._committed[client] = r.copy()
            out[client] = self._durable[client] = r.prefix()
        self._touched = set()
        return out

    def _seen_of(self, client: str) -> SeqRanges:
        r = self._seen.get(client)
        if r is None:
            r = self._seen[client] = SeqRanges()
        return r
