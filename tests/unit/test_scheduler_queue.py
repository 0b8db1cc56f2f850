"""A deep queue costs the scheduler nothing while it waits (issue 17): with 1,000 jobs queued
behind a running one, a tick that finds nothing changed parses no spec and reads no queued row;
a submission costs the head of the queue and the new job, not the queue."""

from __future__ import annotations

import pytest

from service.artifacts import LocalArtifactStore
from service.scheduler import HEAD_PAGE, Scheduler
from service.settings import Settings
from service.store.db import Database
from service.store.repo import NewJob, Store, add_job_rows
from tests.plugins.fake_ray import FakeRay

SPEC = {"name": "j", "model": {"name": "mlp"}, "data": {"name": "digits"}, "parallel": {"workers": 2}}


class CountingStore(Store):
    """Counts the queued rows the scheduler reads."""

    rows = 0

    def queued_jobs(self, *args, **kwargs):
        out = super().queued_jobs(*args, **kwargs)
        self.rows += len(out)
        return out


@pytest.fixture
def store(tmp_path):
    db = Database(f"sqlite:///{tmp_path / 'slimtrain.db'}")
    db.upgrade()
    yield CountingStore(db)
    db.dispose()


def add(store: Store, i: int, priority: int = 0) -> str:
    job, _ = store.create_job(NewJob(f"job-{i:05d}", "t", "j", SPEC, priority, 1))
    return job.id


def add_many(store: Store, n: int) -> list[str]:
    """n queued jobs in one transaction (what n submissions leave, minus n commits)."""
    with store.db.write() as s:
        store._ensure_tenant(s, "t", 0.0)
        return [add_job_rows(s, NewJob(f"job-{i:05d}", "t", "j", SPEC, 0, 1), 1.0 + i).id for i in range(n)]


def test_a_waiting_queue_is_not_read_again_until_something_changes(store, tmp_path):
    ray = FakeRay(cpu=2.0)
    sched = Scheduler(store, ray, LocalArtifactStore(tmp_path / "artifacts"), Settings(data_dir=tmp_path))
    ids = add_many(store, 1001)
    sched.tick()  # the first job fills the cluster; every other one learns why it waits
    assert store.get_job(ids[0]).state == "starting"
    assert store.get_job(ids[1]).reason.startswith("waiting for resources")
    assert store.get_job(ids[-1]).reason == f"waiting behind higher-priority job {ids[1]}"
    assert sched.parses == 1001
    sched.tick()  # after an admission the head is planned once more (the queue it saw is gone)

    store.rows, parses = 0, sched.parses
    for _ in range(5):
        sched.tick()
    assert store.rows == 0 and sched.parses == parses  # idle: no row, no parse

    late = add(store, 2000)
    urgent = add(store, 2001, priority=5)
    sched.tick()
    assert sched.parses == parses + 2  # the new jobs alone
    assert store.rows <= 2 * HEAD_PAGE + len(ids)  # the head, then (new blocker) the tail once
    assert store.get_job(late).reason == f"waiting behind higher-priority job {urgent}"
    assert store.get_job(urgent).reason.startswith("waiting for resources")

    store.rows = 0
    add(store, 2002)
    sched.tick()  # same blocker: the head and the one new job
    assert store.rows <= HEAD_PAGE + 1
    assert store.get_job("job-02002").reason == f"waiting behind higher-priority job {urgent}"


def test_jobs_that_cannot_run_do_not_block_and_the_walk_goes_past_them(store, tmp_path):
    ray = FakeRay(cpu=2.0)
    sched = Scheduler(store, ray, LocalArtifactStore(tmp_path / "artifacts"), Settings(data_dir=tmp_path))
    big = {**SPEC, "parallel": {"workers": 8}}
    for i in range(HEAD_PAGE + 3):  # more than a page of jobs too big for the cluster
        store.create_job(NewJob(f"big-{i:03d}", "t", "j", big, 1, 1))
    small = add(store, 0)
    sched.tick()
    assert store.get_job(small).state == "starting"
    assert store.get_job("big-000").reason.startswith("cannot run on this cluster")
