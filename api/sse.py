"""Server-sent events of a job: state changes and metric records, resumable.

Each event's `id` is its per-job sequence number, so a client that reconnects with
`Last-Event-ID: N` (or `?after=N`) gets exactly the events after N. Streams wake as soon as this
process commits a change (the store's listeners) and otherwise poll every half second, which also
covers changes made by another API replica. The reads are shared (`JobFeed`): all the streams of
a job in this process read its newest event number from one query per half second (`JobHeads`),
and new events from one query per batch (`RecentEvents`), each serialised once for all of them.
The stream ends after the job's final state event."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Hashable
from dataclasses import dataclass
from typing import TypeVar

from sse_starlette import ServerSentEvent

from service.jobs import JobState
from service.store.repo import Store

POLL_SECONDS = 0.5
_READ_LOCKS = 64  # striped: one reader per job at a time, without a lock per job ever followed
_MAX_HEADS = 4096  # cached jobs before the stale ones are dropped
KEEP_EVENTS = 256  # newest events held per job (RecentEvents)
_MAX_RUNS = 256  # jobs whose newest events are held; the least recently read go first
T = TypeVar("T")


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

    def generation(self, job_id: str) -> int:
        """How many changes this process has committed to the job: a read begun before a change
        may return what preceded it, so the streams it wakes must not share that read."""
        return self._generation.get(job_id, 0)

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


class RecentEvents:
    """The newest events of each followed job, as the streams send them, read from the database
    once for all the streams of the job in this process. Per-stream reads cost a query and a JSON
    encoding per stream per batch, all fired together by each ingested batch (bench/load: 200
    users on 3 jobs): bursts that kept the GIL from the event loop, where GET /v1/jobs/{id} reads
    its row. Events never change once committed and are numbered without gaps, so one
    contiguous run of them serves every stream whose position falls in it."""

    def __init__(self, store: Store, keep: int = KEEP_EVENTS, max_jobs: int = _MAX_RUNS):
        self.store, self.keep, self.max_jobs = store, keep, max_jobs
        self._runs: OrderedDict[str, tuple[int, list[Sent]]] = OrderedDict()  # job: (first seq, run)
        self._lock = threading.Lock()
        self._read_locks = [threading.Lock() for _ in range(_READ_LOCKS)]

    def held(self, job_id: str, after: int) -> list[Sent] | None:
        """The held events after `after`, if the run holds the next one; no I/O, so the event
        loop may call it."""
        with self._lock:
            first, run = self._runs.get(job_id, (0, []))
            if not first <= after + 1 < first + len(run):
                return None
            self._runs.move_to_end(job_id)
        return run[after + 1 - first :]

    def read(self, job_id: str, after: int) -> list[Sent]:
        """The events after `after`, up to the store's page (blocking: call it in a thread).
        Extends the held run when `after` falls in it or just past its end; a stream behind the
        run (a replay from the start) reads its own page and leaves the run as it is."""
        with self._read_locks[hash(job_id) % _READ_LOCKS]:
            with self._lock:
                first, run = self._runs.get(job_id, (0, []))
            end = first + len(run) - 1
            if run and first <= after + 1 <= end + 1:
                run = run + [message(*e) for e in self.store.event_texts(job_id, end)]
            else:
                page = [message(*e) for e in self.store.event_texts(job_id, after)]
                if run and after < end:
                    return page  # behind the run: not the newest events
                first, run = after + 1, page
            if run and (run[0].seq, run[-1].seq) != (first, first + len(run) - 1):
                # not contiguous (never, while events are numbered without gaps): serve, don't hold
                return [m for m in run if m.seq > after]
            out = run[max(0, after + 1 - first) :]
            if run:
                kept = run[-self.keep :]
                self._hold(job_id, first + len(run) - len(kept), kept)
            return out

    def _hold(self, job_id: str, first: int, run: list[Sent]) -> None:
        with self._lock:
            self._runs[job_id] = (first, run)
            self._runs.move_to_end(job_id)
            while len(self._runs) > self.max_jobs:
                self._runs.popitem(last=False)


@dataclass(frozen=True)
class Sent:
    """An event as the streams send it, encoded once: the same bytes go to every stream."""

    seq: int
    type: str
    data: str  # JSON
    wire: bytes  # with sse-starlette's default line separator, which the route keeps


def message(seq: int, type_: str, data: str) -> Sent:
    """`data` is the event's JSON as the database holds it, sent as it is."""
    return Sent(seq, type_, data, ServerSentEvent(data=data, event=type_, id=str(seq)).encode())


class JobFeed:
    """What this process's streams read (`JobHeads`, `RecentEvents`), with at most one read of a
    job's head, and of its events after a position, in flight on an event loop: the streams one
    commit wakes together await the same thread's query instead of each handing one to a thread."""

    def __init__(self, store: Store, max_age: float = POLL_SECONDS, keep: int = KEEP_EVENTS):
        self.heads = JobHeads(store, max_age)
        self.recent = RecentEvents(store, keep)
        self._flights: dict[Hashable, asyncio.Future] = {}

    async def head(self, job_id: str) -> Head:
        head = self.heads.fresh(job_id)
        if head is not None:
            return head
        # keyed by the generation: a stream woken by a change does not join a read begun before it
        return await self._once(("head", job_id, self.heads.generation(job_id)), self.heads.read, job_id)

    async def events_after(self, job_id: str, after: int) -> list[Sent]:
        held = self.recent.held(job_id, after)
        if held is not None:
            return held
        return await self._once(("events", job_id, after), self.recent.read, job_id, after)

    async def _once(self, key: Hashable, fn: Callable[..., T], *args) -> T:
        key = (asyncio.get_running_loop(), key)
        flight = self._flights.get(key)
        if flight is None:
            flight = asyncio.ensure_future(asyncio.to_thread(fn, *args))
            self._flights[key] = flight
            flight.add_done_callback(lambda f: self._landed(key, f))
        # shielded: a stream that disconnects does not cancel the read the others await
        return await asyncio.shield(flight)

    def _landed(self, key: Hashable, flight: asyncio.Future) -> None:
        self._flights.pop(key, None)
        if not flight.cancelled():
            flight.exception()  # retrieved: its waiters, if any are left, raise it themselves


async def job_events(
    feed: JobFeed, notifier: Notifier, job_id: str, after: int, poll: float = POLL_SECONDS
) -> AsyncIterator[list[Sent]]:
    """The job's events after `after`, in the batches they are read in."""
    last = after
    while True:
        head = await feed.head(job_id)
        if head.seq > last:
            events = await feed.events_after(job_id, last)
            if events:
                last = events[-1].seq
                yield events
                continue
        if head.terminal and last >= head.seq:
            return
        await notifier.wait(job_id, poll)


async def encoded(batches: AsyncIterator[list[Sent]]) -> AsyncIterator[bytes]:
    """One write per batch and stream, not one per event: an ingested batch of metric records
    reaches every stream of its job at once, and each write is a trip through the ASGI stack on
    the event loop."""
    async for batch in batches:
        yield b"".join(m.wire for m in batch)
