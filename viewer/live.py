"""Live updates: one poller per watched run, shared by every page that watches it.

A page opens ``/api/events?runs=p/r,...`` (Server-Sent Events).  Each run being
watched by at least one page has one poller task that reads the run's commit
state (:meth:`RunReader.commit_state`: a few primary-key queries) every
:data:`POLL_S` and, when it changed, hands the new state to every subscriber's
queue.  A hundred pages on one live run cost one read per poll, not a hundred.
The run list (pages without ``runs=``) has one poller too.  A poller stops when
its last subscriber leaves.  A slow page only fills its own queue (bounded;
the oldest state is dropped since only the newest matters).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

POLL_S = 0.25
LIST_POLL_S = 1.0
PING_S = 15.0
QUEUE_MAX = 8

ListKey = ("", "")  # the run list's key among the watched runs


def _run_event(state: Any) -> str:
    """A run's SSE event for its commit ``state``."""
    return f"event: run\ndata: {json.dumps(state, separators=(',', ':'))}\n\n"


class _Topic:
    def __init__(self) -> None:
        self.subscribers: set[asyncio.Queue[Any]] = set()
        self.last: Any = None
        self.text: str | None = None  # the SSE text of ``last`` (a run's state)
        self.task: asyncio.Task[None] | None = None


class LiveHub:
    """Shared pollers; ``read(key)`` (blocking, run in a thread) returns a key's current state."""

    def __init__(self, read_run: Callable[[tuple[str, str]], dict[str, Any]], read_list: Callable[[], Any]) -> None:
        self._read_run = read_run
        self._read_list = read_list
        self._topics: dict[tuple[str, str], _Topic] = {}
        self.polls = 0  # reads made, for tests and the benchmark
        # Its own threads: polls keep their pace when page requests fill the default pool.
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=8, thread_name_prefix="kobo-live"
        )  # a hung run holds one

    def _publish(self, topic: _Topic, value: Any, text: str | None) -> None:
        """``text``: a run's SSE event for ``value``, encoded once for every page that watches it."""
        topic.last, topic.text = value, text
        for q in list(topic.subscribers):
            if q.full():
                with contextlib.suppress(asyncio.QueueEmpty):
                    q.get_nowait()
            q.put_nowait((value, topic.text))

    async def _poll(self, key: tuple[str, str], topic: _Topic) -> None:
        interval = LIST_POLL_S if key == ListKey else POLL_S
        while topic.subscribers:
            try:
                loop = asyncio.get_running_loop()
                if key == ListKey:
                    value = await loop.run_in_executor(self._executor, self._read_list)
                else:
                    value = await loop.run_in_executor(self._executor, self._read_run, key)
            except Exception as exc:  # a broken run must not end the stream of the others
                value = {"run": "/".join(key), "version": "error", "error": str(exc)}
            self.polls += 1
            if value != topic.last:
                text = None if key == ListKey else _run_event(value)
                self._publish(topic, value, text)
            await asyncio.sleep(interval)
        self._topics.pop(key, None)

    def stats(self) -> dict[str, Any]:
        """Watched runs, open streams and reads made so far."""
        return {
            "watched": len([k for k in self._topics if k != ListKey]),
            "subscribers": sum(len(t.subscribers) for t in self._topics.values()),
            "polls": self.polls,
        }

    def subscribe(self, key: tuple[str, str]) -> asyncio.Queue[Any]:
        topic = self._topics.get(key)
        if topic is None:
            topic = self._topics[key] = _Topic()
        q: asyncio.Queue[Any] = asyncio.Queue(QUEUE_MAX)
        topic.subscribers.add(q)
        if topic.last is not None:
            q.put_nowait((topic.last, topic.text))
        if topic.task is None or topic.task.done():
            topic.task = asyncio.get_running_loop().create_task(self._poll(key, topic))
        return q

    def unsubscribe(self, key: tuple[str, str], q: asyncio.Queue[Any]) -> None:
        topic = self._topics.get(key)
        if topic is not None:
            topic.subscribers.discard(q)

    async def stream(self, keys: list[tuple[str, str]], is_disconnected: Callable[[], Any]) -> AsyncIterator[str]:
        """The SSE text for one page: ``event: run`` per changed run, or ``event: runs`` for the list."""
        keys = keys or [ListKey]
        queues = {key: self.subscribe(key) for key in keys}
        merged: asyncio.Queue[tuple[tuple[str, str], Any]] = asyncio.Queue()

        async def pump(key: tuple[str, str], q: asyncio.Queue[Any]) -> None:
            while True:
                await merged.put((key, await q.get()))

        pumps = [asyncio.create_task(pump(k, q)) for k, q in queues.items()]
        first_list = True
        last_ping = time.monotonic()
        try:
            yield "retry: 1000\n\n"
            while True:
                try:
                    key, (value, text) = await asyncio.wait_for(merged.get(), timeout=1.0)
                except asyncio.TimeoutError:
                    if await is_disconnected():
                        return
                    if time.monotonic() - last_ping > PING_S:
                        last_ping = time.monotonic()
                        yield ": ping\n\n"
                    continue
                if key == ListKey:
                    payload = {"changed": not first_list, "count": len(value)}
                    first_list = False
                    yield f"event: runs\ndata: {json.dumps(payload)}\n\n"
                else:
                    yield text if text is not None else _run_event(value)
        finally:
            for p in pumps:
                p.cancel()
            for key, q in queues.items():
                self.unsubscribe(key, q)
