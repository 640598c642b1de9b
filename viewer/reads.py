"""Blocking reads of runs in worker threads, a few at a time per run.

The viewer reads runs (SQLite, numpy) in threads so the event loop never
waits on a disk.  A run whose files hang (a stale network mount, a FIFO where
a database should be) would keep every thread it gets forever; with one shared
pool, a handful of requests for that run would leave none for the others.  So
each run gets at most :data:`PER_RUN` threads at once: further requests for it
wait (in the event loop, costing nothing) until one finishes, and every other
run keeps the rest of a pool of :data:`THREADS`.  A slot is given back when the
read really ends, not when the request that asked for it is cancelled.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Callable
from typing import Any

THREADS = 16
PER_RUN = 4


class RunReads:
    """``await reads.run(fn, *args)``: ``fn(*args)`` in a worker thread; ``args[:2]`` = (project, run_id)
    of a run read (any other call, e.g. the run list, is not limited per run)."""

    def __init__(self, threads: int = THREADS, per_run: int = PER_RUN) -> None:
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=threads, thread_name_prefix="kobo-read")
        self.per_run = per_run
        self._slots: dict[tuple[str, str], list[Any]] = {}  # run -> [semaphore, requests holding or waiting]

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        key = (args[0], args[1]) if len(args) >= 2 and isinstance(args[0], str) and isinstance(args[1], str) else None
        if key is None:
            return await asyncio.wrap_future(self.pool.submit(fn, *args))
        slot = self._slots.get(key)
        if slot is None:
            slot = self._slots[key] = [asyncio.Semaphore(self.per_run), 0]
        slot[1] += 1
        try:
            await slot[0].acquire()
        except BaseException:
            self._leave(key, slot)
            raise
        loop = asyncio.get_running_loop()

        def done(_: Any) -> None:  # in the worker thread, when the read has really ended
            loop.call_soon_threadsafe(self._release, key, slot)

        fut = self.pool.submit(fn, *args)
        fut.add_done_callback(done)
        return await asyncio.wrap_future(fut)

    def _release(self, key: tuple[str, str], slot: list[Any]) -> None:
        slot[0].release()
        self._leave(key, slot)

    def _leave(self, key: tuple[str, str], slot: list[Any]) -> None:
        slot[1] -= 1
        if slot[1] == 0 and self._slots.get(key) is slot:
            del self._slots[key]

    def busy(self) -> dict[str, int]:
        """Runs with reads in flight or waiting (for /api/stats)."""
        return {f"{k[0]}/{k[1]}": v[1] for k, v in self._slots.items()}
