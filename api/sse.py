"""Server-sent events of a job: state changes and metric records, resumable.

Each event's `id` is its per-job sequence number, so a client that reconnects with
`Last-Event-ID: N` (or `?after=N`) gets exactly the events after N. Streams wake as soon as this
process commits a change (the store's listeners) and otherwise poll the database every half
second, which also covers changes made by another API replica. The stream ends after the job's
final state event."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from collections.abc import AsyncIterator

from service.jobs import JobState
from service.store.repo import Store

POLL_SECONDS = 0.5


class Notifier:
    """Wakes the event streams of one job; `publish` may be called from any thread."""

    def __init__(self):
        self._lock = threading.Lock()
        self._waiters: dict[str, set[tuple[asyncio.AbstractEventLoop, asyncio.Event]]] = {}

    def publish(self, job_id: str) -> None:
        with self._lock:
            waiters = list(self._waiters.get(job_id, ()))
        for loop, ev in waiters:
            with contextlib.suppress(RuntimeError):  # RuntimeError: that loop is closed
                loop.call_soon_threadsafe(ev.set)

    async def wait(self, job_id: str, timeout: float) -> None:
        ev = asyncio.Event()
        key = (asyncio.get_running_loop(), ev)
        with self._lock:
            self._waiters.setdefault(job_id, set()).add(key)
        try:
            await asyncio.wait_for(ev.wait(), timeout)
        except TimeoutError:
            pass
        finally:
            with self._lock:
                ws = self._waiters.get(job_id)
                if ws is not None:
                    ws.discard(key)
                    if not ws:
                        del self._waiters[job_id]


async def job_events(
    store: Store, notifier: Notifier, job_id: str, after: int, poll: float = POLL_SECONDS
) -> AsyncIterator[dict]:
    last = after
    while True:
        events = await asyncio.to_thread(store.events_after, job_id, last)
        for e in events:
            last = e.seq
            yield {"id": str(e.seq), "event": e.type, "data": json.dumps(e.data, separators=(",", ":"))}
        if events:
            continue
        job = await asyncio.to_thread(store.get_job, job_id)
        if JobState(job.state).terminal and last >= job.event_seq:
            return
        await notifier.wait(job_id, poll)
