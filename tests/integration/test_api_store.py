"""The job store on SQLite and PostgreSQL: idempotent creation under concurrency, racing
transitions, per-job event numbering, keyset pagination, tenant isolation, the schema."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from sqlalchemy import inspect

from service.ids import new_job_id
from service.jobs import IdempotencyConflict, InvalidTransition, JobEvent, JobNotFound, JobState
from service.limits import Resources
from service.store.db import Database
from service.store.repo import BadCursor, NewJob, Store

pytestmark = pytest.mark.integration


@pytest.fixture
def store(database_url):
    db = Database(database_url)
    db.upgrade()
    yield Store(db)
    db.dispose()


def new(tenant="t", name="j", priority=0) -> NewJob:
    return NewJob(new_job_id(), tenant, name, {"name": name}, priority, 3)


def test_schema_is_at_head_and_upgrade_is_idempotent(store):
    db = store.db
    assert db.current_revision() == db.head_revision() == "0003_leader_lease"
    db.upgrade()
    tables = set(inspect(db.engine).get_table_names())
    assert {
        "tenants",
        "jobs",
        "attempts",
        "metrics",
        "events",
        "idempotency_keys",
        "sweeps",
        "sweep_trials",
        "leader_lease",
    } <= tables


def test_concurrent_duplicates_create_exactly_one_job(store):
    barrier = threading.Barrier(8)

    def create(_):
        barrier.wait()
        return store.create_job(new(), "key-1", "hash-a")

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(create, range(8)))
    ids = {job.id for job, _ in results}
    assert len(ids) == 1
    assert sorted(replayed for _, replayed in results) == [False] + [True] * 7
    assert len(store.list_jobs("t").items) == 1


def test_same_key_other_body_conflicts_and_keys_are_per_tenant(store):
    job, _ = store.create_job(new(), "k", "hash-a")
    with pytest.raises(IdempotencyConflict, match=job.id):
        store.create_job(new(), "k", "hash-b")
    other, replayed = store.create_job(new(tenant="u"), "k", "hash-b")
    assert not replayed and other.id != job.id


def test_racing_cancel_and_finish_let_exactly_one_win(store):
    for _ in range(5):
        job, _ = store.create_job(new())
        store.admit(job, job.id, Resources(cpu=1))
        barrier = threading.Barrier(2)
        outcomes = []

        def act(event, job_id=job.id, barrier=barrier, outcomes=outcomes):
            barrier.wait()
            try:
                outcomes.append(store.transition(job_id, event).state)
            except InvalidTransition:
                outcomes.append("refused")

        threads = [threading.Thread(target=act, args=(e,)) for e in (JobEvent.CANCEL, JobEvent.SUCCEED)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(outcomes) in (["cancelled", "refused"], ["refused", "succeeded"])
        final = store.get_job(job.id).state
        assert final in outcomes
        seqs = [seq for seq, _, _ in store.event_texts(job.id, 0)]
        assert seqs == [1, 2, 3]


def test_events_stay_numbered_under_concurrent_ingest_and_transitions(store):
    job, _ = store.create_job(new())
    store.admit(job, job.id, Resources(cpu=1))
    records = [{"kind": "train", "step": i} for i in range(50)]

    def ingest():
        for i in range(0, 50, 5):
            assert store.ingest(job.id, i, records[i : i + 5])

    t = threading.Thread(target=ingest)
    t.start()
    store.transition(job.id, JobEvent.START)
    t.join()
    seqs = [seq for seq, _, _ in store.event_texts(job.id, 0)]
    assert seqs == list(range(1, 54))  # created, starting, running + 50 metrics, no gaps
    assert store.get_job(job.id).event_seq == 53
    assert [m.seq for m in store.metrics(job.id, limit=100).items] == list(range(50))
    assert store.ingest(job.id, 0, records[:5]) is False  # already ingested: refused


def test_transition_checks_the_expected_state(store):
    job, _ = store.create_job(new())
    with pytest.raises(InvalidTransition, match="is queued, not running"):
        store.transition(job.id, JobEvent.FAIL, expect={JobState.RUNNING})
    with pytest.raises(JobNotFound):
        store.transition("nope", JobEvent.CANCEL)


def test_keyset_pagination_newest_first_without_gaps_or_repeats(store):
    made = []
    for i in range(7):
        job, _ = store.create_job(new(tenant="p", name=f"j{i}"))
        made.append(job.id)
        time.sleep(0.002)
    store.create_job(new(tenant="q"))  # another tenant's job never shows
    seen, cursor, pages = [], None, 0
    while True:
        page = store.list_jobs("p", cursor=cursor, limit=3)
        seen += [j.id for j in page.items]
        pages += 1
        cursor = page.next_cursor
        if cursor is None:
            break
    assert pages == 3 and seen == made[::-1]
    # a job created meanwhile does not shift later pages
    first = store.list_jobs("p", limit=3)
    store.create_job(new(tenant="p", name="late"))
    second = store.list_jobs("p", cursor=first.next_cursor, limit=3)
    assert [j.id for j in second.items] == made[::-1][3:6]
    with pytest.raises(BadCursor):
        store.list_jobs("p", cursor="garbage")


def test_state_filter_and_counts(store):
    a, _ = store.create_job(new(tenant="s"))
    b, _ = store.create_job(new(tenant="s"))
    store.transition(b.id, JobEvent.CANCEL)
    assert [j.id for j in store.list_jobs("s", states=["cancelled"]).items] == [b.id]
    assert [j.id for j in store.list_jobs("s", states=["queued", "running"]).items] == [a.id]
    counts = store.counts_by_state("s")
    assert counts["queued"] == 1 and counts["cancelled"] == 1 and counts["running"] == 0


def test_another_tenants_job_is_not_found(store):
    job, _ = store.create_job(new(tenant="alice"))
    assert store.get_job(job.id, "alice").id == job.id
    with pytest.raises(JobNotFound):
        store.get_job(job.id, "bob")
