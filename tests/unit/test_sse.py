"""Event streams share their reads: the streams of one job in a process read its newest event
number from one query per poll and its new events from one query per batch, serialised once,
wake at once on a change this process commits, and end after the final state event. A real
SQLite store; only the query counters are added."""

from __future__ import annotations

import asyncio
import json
import threading

import pytest

from api.sse import JobFeed, JobHeads, Notifier, RecentEvents, job_events
from service.ids import new_job_id
from service.jobs import JobEvent
from service.store.db import Database
from service.store.repo import NewJob, Store

STREAMS = 50


class CountingStore(Store):
    def __init__(self, db: Database):
        super().__init__(db)
        self.reads = self.event_reads = 0
        self._count_lock = threading.Lock()

    def get_job(self, job_id: str, tenant: str | None = None):
        with self._count_lock:
            self.reads += 1
        return super().get_job(job_id, tenant)

    def event_texts(self, job_id: str, after: int, limit: int = 500):
        with self._count_lock:
            self.event_reads += 1
        return super().event_texts(job_id, after, limit)


@pytest.fixture
def store(tmp_path):
    db = Database(f"sqlite:///{tmp_path / 'jobs.db'}")
    db.upgrade()
    yield CountingStore(db)
    db.dispose()


async def _follow(feed, notifier, job_id, poll, after=0) -> list[dict]:
    return [e async for batch in job_events(feed, notifier, job_id, after, poll=poll) for e in batch]


def _running_job(store):
    job, _ = store.create_job(NewJob(new_job_id(), "t", "j", {"name": "j"}, 0, 1))
    store.transition(job.id, JobEvent.ADMIT)
    store.transition(job.id, JobEvent.START)
    return job  # events 1-3: queued, starting, running


def _feed(store, max_age=0.2, keep=256):
    notifier, feed = Notifier(), JobFeed(store, max_age=max_age, keep=keep)
    store.listeners += [feed.heads.forget, notifier.publish]
    return notifier, feed


def test_streams_of_one_job_share_one_query_per_poll_and_end_with_it(store):
    job = _running_job(store)
    notifier, feed = _feed(store)

    async def scenario():
        streams = [asyncio.create_task(_follow(feed, notifier, job.id, 0.2)) for _ in range(STREAMS)]
        await asyncio.sleep(1.0)  # idle: about five polls
        idle_reads = store.reads
        await asyncio.to_thread(store.transition, job.id, JobEvent.SUCCEED)
        return idle_reads, await asyncio.wait_for(asyncio.gather(*streams), 5)

    idle_reads, results = asyncio.run(scenario())
    # Per-stream polling would have read the job STREAMS times per poll: 250 reads or more.
    assert idle_reads <= 10, idle_reads
    for events in results:
        assert [json.loads(e.data)["state"] for e in events] == [
            "queued",
            "starting",
            "running",
            "succeeded",
        ]
        assert [e.seq for e in events] == [1, 2, 3, 4]


def test_a_change_committed_during_a_read_is_not_hidden_by_it(store):
    job, _ = store.create_job(NewJob(new_job_id(), "t", "j", {"name": "j"}, 0, 1))
    heads = JobHeads(store, max_age=60)
    store.listeners.append(heads.forget)
    real_get = store.get_job

    def get_then_change(job_id, tenant=None):
        stale = real_get(job_id, tenant)
        store.transition(job_id, JobEvent.CANCEL)  # commits after the read, before it is cached
        return stale

    store.get_job = get_then_change
    assert heads.read(job.id).seq == 1
    store.get_job = real_get
    head = heads.read(job.id)  # not the stale head of the first read, cached for a minute
    assert (head.seq, head.terminal) == (2, True)


def test_streams_of_a_training_job_share_one_events_query_per_batch(store):
    """Each ingested batch wakes every stream of the job; they read its events with one query,
    serialised once (the very same dicts), and each gets every record once, in order."""
    job = _running_job(store)
    notifier, feed = _feed(store)
    batches, per_batch = 10, 7

    async def scenario():
        streams = [asyncio.create_task(_follow(feed, notifier, job.id, 0.2)) for _ in range(STREAMS)]
        await asyncio.sleep(0.3)  # every stream has sent the first three events
        before = store.event_reads
        for b in range(batches):
            records = [{"kind": "train", "step": b * per_batch + i} for i in range(per_batch)]
            await asyncio.to_thread(store.ingest, job.id, b * per_batch, records)
            await asyncio.sleep(0.05)
        await asyncio.to_thread(store.transition, job.id, JobEvent.SUCCEED)
        results = await asyncio.wait_for(asyncio.gather(*streams), 10)
        return store.event_reads - before, results

    reads, results = asyncio.run(scenario())
    n = 3 + batches * per_batch + 1
    # Per-stream reads would have been STREAMS per batch: 550 or more.
    assert reads <= 2 * (batches + 1), reads
    first = results[0]
    assert [e.seq for e in first] == list(range(1, n + 1))
    assert [json.loads(e.data)["step"] for e in first[3:-1]] == list(range(batches * per_batch))
    for events in results[1:]:
        assert len(events) == n and all(a is b for a, b in zip(events[3:], first[3:], strict=True))


def test_a_stream_behind_the_held_events_replays_them_from_the_store(store):
    """A client resuming from an old event id (or from the start) gets every event after it, in
    order, whatever the newest events held for the streams that keep up; and leaves those as
    they were."""
    job = _running_job(store)
    for b in range(3):
        store.ingest(job.id, b * 10, [{"kind": "train", "step": b * 10 + i} for i in range(10)])
    recent = RecentEvents(store, keep=3)
    assert [e.seq for e in recent.read(job.id, 30)] == [31, 32, 33]  # held: 31-33
    assert [e.seq for e in recent.held(job.id, 31)] == [32, 33]
    assert recent.held(job.id, 33) is None  # nothing newer held: a read is needed
    assert recent.held(job.id, 20) is None  # behind what is held
    reads = store.event_reads
    assert [e.seq for e in recent.read(job.id, 0)] == list(range(1, 34))
    assert store.event_reads == reads + 1
    assert [e.seq for e in recent.held(job.id, 30)] == [31, 32, 33]  # as it was

    store.ingest(job.id, 30, [{"kind": "train", "step": 30}])  # event 34
    assert [e.seq for e in recent.read(job.id, 33)] == [34]
    assert recent.held(job.id, 30) is None  # the newest three are held: 32-34
    assert [e.seq for e in recent.held(job.id, 31)] == [32, 33, 34]
    assert recent.read(job.id, 40) == []  # ahead of the job: nothing, and what is held stays
    assert [e.seq for e in recent.held(job.id, 31)] == [32, 33, 34]

    async def replay():
        notifier, feed = _feed(store)
        store.transition(job.id, JobEvent.SUCCEED)  # event 35
        return await asyncio.wait_for(_follow(feed, notifier, job.id, 0.2, after=10), 5)

    assert [e.seq for e in asyncio.run(replay())] == list(range(11, 36))


def test_held_events_are_bounded_by_job(store):
    jobs = [_running_job(store) for _ in range(4)]
    recent = RecentEvents(store, keep=2, max_jobs=3)
    for job in jobs:
        assert [e.seq for e in recent.read(job.id, 0)] == [1, 2, 3]
    assert recent.held(jobs[0].id, 1) is None  # the least recently read job was dropped
    assert [e.seq for e in recent.held(jobs[3].id, 1)] == [2, 3]  # the newest two


def test_a_stream_woken_by_a_change_does_not_share_a_read_begun_before_it(store):
    """The streams one commit wakes must see it: they do not join a head read that began before
    the commit (it may return the head without it), they start their own."""
    job = _running_job(store)
    notifier, feed = _feed(store, max_age=60)
    started, release = threading.Event(), threading.Event()
    real_get = store.get_job

    def slow_get(job_id, tenant=None):
        got = real_get(job_id, tenant)
        started.set()
        release.wait(5)
        return got

    async def scenario():
        store.get_job = slow_get
        early = asyncio.create_task(feed.head(job.id))
        await asyncio.to_thread(started.wait, 5)
        store.get_job = real_get
        await asyncio.to_thread(store.transition, job.id, JobEvent.CANCEL)  # event 4, after that read
        late = asyncio.create_task(feed.head(job.id))
        await asyncio.sleep(0.1)  # both reads are in flight (the late one waits for the early one)
        release.set()
        return await asyncio.wait_for(asyncio.gather(early, late), 5)

    early, late = asyncio.run(scenario())
    assert early.seq == 3 and (late.seq, late.terminal) == (4, True)
