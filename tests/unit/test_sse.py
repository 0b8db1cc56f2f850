"""Event streams share their poll: the streams of one job in a process read its newest event
number from one query per poll, wake at once on a change this process commits, and end after
the final state event. A real SQLite store; only the query counter is added."""

from __future__ import annotations

import asyncio
import json
import threading

import pytest

from api.sse import JobHeads, Notifier, job_events
from service.ids import new_job_id
from service.jobs import JobEvent
from service.store.db import Database
from service.store.repo import NewJob, Store

STREAMS = 50


class CountingStore(Store):
    def __init__(self, db: Database):
        super().__init__(db)
        self.reads = 0
        self._count_lock = threading.Lock()

    def get_job(self, job_id: str, tenant: str | None = None):
        with self._count_lock:
            self.reads += 1
        return super().get_job(job_id, tenant)


@pytest.fixture
def store(tmp_path):
    db = Database(f"sqlite:///{tmp_path / 'jobs.db'}")
    db.upgrade()
    yield CountingStore(db)
    db.dispose()


async def _follow(store, heads, notifier, job_id, poll) -> list[dict]:
    return [e async for e in job_events(store, heads, notifier, job_id, 0, poll=poll)]


def test_streams_of_one_job_share_one_query_per_poll_and_end_with_it(store):
    job, _ = store.create_job(NewJob(new_job_id(), "t", "j", {"name": "j"}, 0, 1))
    store.transition(job.id, JobEvent.ADMIT)
    store.transition(job.id, JobEvent.START)
    notifier, heads = Notifier(), JobHeads(store, max_age=0.2)
    store.listeners += [heads.forget, notifier.publish]

    async def scenario():
        streams = [asyncio.create_task(_follow(store, heads, notifier, job.id, 0.2)) for _ in range(STREAMS)]
        await asyncio.sleep(1.0)  # idle: about five polls
        idle_reads = store.reads
        await asyncio.to_thread(store.transition, job.id, JobEvent.SUCCEED)
        return idle_reads, await asyncio.wait_for(asyncio.gather(*streams), 5)

    idle_reads, results = asyncio.run(scenario())
    # Per-stream polling would have read the job STREAMS times per poll: 250 reads or more.
    assert idle_reads <= 10, idle_reads
    for events in results:
        assert [json.loads(e["data"])["state"] for e in events] == [
            "queued",
            "starting",
            "running",
            "succeeded",
        ]
        assert [int(e["id"]) for e in events] == [1, 2, 3, 4]


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
