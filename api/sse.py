"""Server-sent events of a job: state changes and metric records, resumable.

Each event's `id` is its per-job sequence number, so a client that reconnects with
`Last-Event-ID: N` (or `?after=N`) gets exactly the events after N. Streams wake as soon as this
process commits a change (the store's listeners) and otherwise poll every half second, which also
covers changes made by another API replica. The poll is shared: all the streams of a job in this
process read its newest event number from one query per half second (`JobHeads`), and fetch
events only when there are new ones. The stream ends after the job's final state event."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from service.jobs import JobState
from service.store.repo import Store

POLL_SECONDS = 0.5
_READ_LOCKS = 64  # striped: one reader per job at a time, without a lock per job ever followed
_MAX_HEADS = 4096  # cached jobs before the stale ones are dropped


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


@dataclass(frozen=True)
class Head:
    seq: int  # the job's newest event number
    terminal: bool
    read_at: float  # time.monotonic()


class JobHeads:
    """Each followed job's newest event number and whether it has ended, read from the database
    at most once per `max_age` seconds for all the streams of the job in this process. Per-stream
    polling cost a query per stream per poll: 100 idle streams held 13% of a core (bench/load).
    `forget` (a store listener) drops a job's head when this process commits a change to it."""

    def __init__(self, store: Store, max_age: float = POLL_SECONDS):
        self.store, self.max_age = store, max_age
        self._heads: dict[str, Head] = {}
        self._generation: dict[str, int] = {}
        self._lock = threading.Lock()
        self._read_locks = [threading.Lock() for _ in range(_READ_LOCKS)]

    def fresh(self, job_id: str) -> Head | None:
        """The cached head if it is young enough; no I/O, so the event loop may call it."""
        head = self._heads.get(job_id)
        return head if head is not None and time.monotonic() - head.read_at < self.max_age else None

    def read(self, job_id: str) -> Head:
        """The head, from the cache or the database (blocking: call it in a thread). Streams of
        one job that find it stale at once wait for the first one's query and share its answer."""
        with self._read_locks[hash(job_id) % _READ_LOCKS]:
            head = self.fresh(job_id)
            if head is not None:
                return head
            with self._lock:
                generation = self._generation.get(job_id, 0)
            job = self.store.get_job(job_id)
            head = Head(job.event_seq, JobState(job.state).terminal, time.monotonic())
            with self._lock:
                # A change committed while we read may be newer than what we read: keep it out.
                if self._generation.get(job_id, 0) == generation:
                    self._heads[job_id] = head
                    if len(self._heads) > _MAX_HEADS:
                        self._drop_stale()
            return head

    def forget(self, job_id: str) -> None:
        with self._lock:
            self._heads.pop(job_id, None)
            self._generation[job_id] = self._generation.get(job_id, 0) + 1
            if len(self._generation) > _MAX_HEADS:
                # Bounded memory. A read in flight for a job dropped here may then cache what it
                # read: at worst a head `max_age` stale, which the next poll corrects.
                self._generation = {job_id: self._generation[job_id]}

    def _drop_stale(self) -> None:
        now = time.monotonic()
        self._heads = {j: h for j, h in self._heads.items() if now - h.read_at < self.max_age}


async def job_events(
    store: Store, heads: JobHeads, notifier: Notifier, job_id: str, after: int, poll: float = POLL_SECONDS
) -> AsyncIterator[dict]:
    last = after
    while True:
        head = heads.fresh(job_id) or await asyncio.to_thread(heads.read, job_id)
        if head.seq > last:
            events = await asyncio.to_thread(store.events_after, job_id, last)
            for e in events:
                last = e.seq
                yield {"id": str(e.seq), "event": e.type, "data": json.dumps(e.data, separators=(",", ":"))}
            if events:
                continue
        if head.terminal and last >= head.seq:
            return
        await notifier.wait(job_id, poll)
