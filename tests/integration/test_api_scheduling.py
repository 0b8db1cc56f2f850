"""Scheduler, reconciler and metrics ingest on a real database (SQLite and PostgreSQL), against a
stand-in for the Ray Jobs API that the tests drive through Ray's statuses. The real Ray path is
tests/integration/test_service_e2e.py."""

from __future__ import annotations

import json
import time

import pytest

from service.artifacts import JobArtifacts, LocalArtifactStore
from service.job_service import JobService
from service.jobs import InvalidTransition, JobState
from service.limits import Resources
from service.outcome import Outcome, write_outcome
from service.settings import Settings
from service.store.db import Database
from service.store.repo import Store
from tests.plugins.fake_ray import FAILED, PENDING, RUNNING, STOPPED, SUCCEEDED

pytestmark = pytest.mark.integration


@pytest.fixture
def svc(database_url, tmp_path, fake_ray):
    settings = Settings(
        data_dir=tmp_path, database_url=database_url, heartbeat_timeout_s=30, driver_python="py"
    )
    db = Database(database_url)
    db.upgrade()
    service = JobService(settings, Store(db), fake_ray, LocalArtifactStore(tmp_path / "artifacts"))
    yield service
    db.dispose()


def submit(svc, tenant="t", **over) -> str:
    spec = {"name": "j", "model": {"name": "mlp"}, "data": {"name": "digits"}, "parallel": {"workers": 2}}
    spec.update(over)
    job, _ = svc.submit(tenant, json.dumps(spec).encode())
    return job.id


def state(svc, job_id):
    job = svc.store.get_job(job_id)
    return job.state, job.reason


def tick(svc):
    svc.reconciler.tick()
    svc.scheduler.tick()


def events(svc, job_id):
    return [(seq, type_, json.loads(d).get("state")) for seq, type_, d in svc.store.event_texts(job_id, 0)]


def test_admission_by_priority_then_age_within_free_resources(svc, fake_ray):
    low = submit(svc, priority=0)
    high = submit(svc, priority=10)
    other = submit(svc, priority=10)
    tick(svc)
    assert state(svc, high) == ("starting", f"submitted to Ray as {high}")
    assert state(svc, other) == ("queued", "waiting for resources: needs 2 CPU; 0 CPU free")
    assert state(svc, low) == ("queued", f"waiting behind higher-priority job {other}")
    sub = fake_ray.jobs[high]
    assert sub.entrypoint == f"py -m workers.entrypoint {high}"
    assert sub.env_vars["SLIMTRAIN_ATTEMPT"] == "1"
    assert sub.env_vars["SLIMTRAIN_ARTIFACT_URI"].startswith("file://")
    assert JobArtifacts(svc.artifacts, high).get_json("spec.json")["priority"] == 10
    assert svc.store.reserved().cpu == 2
    # the first one finishes: the next in line starts
    JobArtifacts(svc.artifacts, high).put_json("report.json", {"accuracy": 1.0})
    fake_ray.set(high, SUCCEEDED)
    tick(svc)
    assert state(svc, high)[0] == "succeeded"
    assert state(svc, other)[0] == "starting" and state(svc, low)[0] == "queued"


def test_a_job_bigger_than_the_cluster_stays_queued_with_the_reason(svc, fake_ray):
    big = submit(svc, parallel={"workers": 4})
    small = submit(svc, parallel={"workers": 1}, train={"batch_size": 64})
    for _ in range(2):
        tick(svc)
    assert state(svc, big) == ("queued", "cannot run on this cluster: needs 4 CPU; it has 2 CPU in total")
    assert state(svc, small)[0] == "starting"
    fake_ray.cpu = 4  # a node joined
    fake_ray.set(small, SUCCEEDED)
    JobArtifacts(svc.artifacts, small).put_json("report.json", {})
    tick(svc)
    assert state(svc, big)[0] == "starting"


def test_lifecycle_metrics_and_events(svc, fake_ray):
    job = submit(svc)
    tick(svc)
    tick(svc)  # PENDING: still starting
    assert state(svc, job)[0] == "starting"
    fake_ray.set(job, RUNNING)
    tick(svc)
    assert state(svc, job) == ("running", None)
    arts = JobArtifacts(svc.artifacts, job)
    recs = [
        {"kind": "event", "event": "start", "step": 0, "total_steps": 40, "attempt": 1},
        {"kind": "train", "step": 10, "loss": 1.5, "sparsity": 0.2},
        {"kind": "eval", "step": 20, "val_accuracy": 0.8},
    ]
    arts.put_bytes("metrics.jsonl", "".join(json.dumps(r) + "\n" for r in recs).encode())
    assert svc.ingester.ingest_job(job) == 3
    assert svc.ingester.ingest_job(job) == 0  # nothing new
    progress = svc.store.get_job(job).progress
    assert progress == {
        "step": 20,
        "total_steps": 40,
        "attempt": 1,
        "loss": 1.5,
        "sparsity": 0.2,
        "val_accuracy": 0.8,
    }
    fake_ray.set(job, SUCCEEDED, "Job finished successfully.")
    tick(svc)  # no report.json: the driver did not finish its work
    st, _ = state(svc, job)
    assert st == "failed" and svc.store.get_job(job).error_code == "no_report"
    seqs = [e[0] for e in events(svc, job)]
    assert seqs == list(range(1, len(seqs) + 1))  # every event numbered, none skipped
    assert [e[1:] for e in events(svc, job)] == [
        ("state", "queued"),
        ("state", "starting"),
        ("state", "running"),
        ("metric", None),
        ("metric", None),
        ("metric", None),
        ("state", "failed"),
    ]
    att = svc.store.attempts_of(job)
    assert [(a.number, a.outcome) for a in att] == [(1, "failed")] and att[0].started_at is not None


def test_final_metrics_are_ingested_before_the_final_state(svc, fake_ray):
    job = submit(svc)
    tick(svc)
    fake_ray.set(job, RUNNING)
    tick(svc)
    arts = JobArtifacts(svc.artifacts, job)
    arts.put_bytes("metrics.jsonl", b'{"kind": "train", "step": 10, "loss": 1.0}\n')
    arts.put_json("report.json", {"accuracy": 0.9})
    fake_ray.set(job, SUCCEEDED)
    svc.reconciler.tick()  # no ingest tick in between
    assert [e[1:] for e in events(svc, job)][-2:] == [("metric", None), ("state", "succeeded")]


def test_a_lost_driver_is_resubmitted_as_a_new_attempt_until_none_remain(svc, fake_ray):
    job = submit(svc, retries=1)
    tick(svc)
    fake_ray.set(job, RUNNING)
    tick(svc)
    fake_ray.set(job, FAILED, "Job entrypoint command failed with exit code -9")
    svc.reconciler.tick()
    st, reason = state(svc, job)
    assert st == "queued"
    assert reason == (
        "driver lost (the driver died: Job entrypoint command failed with exit code -9); "
        "resubmitting from the last checkpoint (attempt 2 of 2)"
    )
    svc.scheduler.tick()
    second = f"{job}-a2"
    assert state(svc, job)[0] == "starting" and fake_ray.jobs[second].env_vars["SLIMTRAIN_ATTEMPT"] == "2"
    assert job in fake_ray.stops  # the lost one is stopped before the next one starts
    fake_ray.set(second, RUNNING)
    tick(svc)
    fake_ray.set(second, FAILED, "exit code -9")
    tick(svc)
    j = svc.store.get_job(job)
    assert j.state == "failed" and j.error_code == "driver_lost"
    assert j.error_message == "driver lost (the driver died: exit code -9) after 2 of 2 attempts"
    assert [(a.number, a.outcome) for a in svc.store.attempts_of(job)] == [(1, "lost"), (2, "lost")]
    assert svc.store.reserved().cpu == 0


def test_a_failure_the_driver_reports_is_final(svc, fake_ray):
    job = submit(svc, retries=3)
    tick(svc)
    fake_ray.set(job, RUNNING)
    tick(svc)
    arts = JobArtifacts(svc.artifacts, job)
    write_outcome(
        arts, Outcome(1, "failed", "training_failed", "training failed after 4 attempt(s): rank 1: boom")
    )
    fake_ray.set(job, FAILED, "exit code 1")
    tick(svc)
    j = svc.store.get_job(job)
    assert (j.state, j.error_code, j.attempts) == ("failed", "training_failed", 1)
    assert "rank 1: boom" in j.error_message


def test_an_outcome_of_an_earlier_attempt_is_not_this_ones(svc, fake_ray):
    job = submit(svc, retries=3)
    tick(svc)
    arts = JobArtifacts(svc.artifacts, job)
    write_outcome(arts, Outcome(7, "failed", "training_failed", "old"))
    fake_ray.set(job, FAILED, "exit code -9")
    tick(svc)
    assert state(svc, job)[0] == "starting" and f"{job}-a2" in fake_ray.jobs


def test_a_retryable_driver_error_is_resubmitted(svc, fake_ray):
    job = submit(svc)
    tick(svc)
    write_outcome(JobArtifacts(svc.artifacts, job), Outcome(1, "retryable", "driver_error", "OSError: disk"))
    fake_ray.set(job, FAILED, "exit code 1")
    svc.reconciler.tick()
    assert state(svc, job) == (
        "queued",
        "attempt 1 failed (OSError: disk); resubmitting from the last checkpoint (attempt 2 of 3)",
    )
    assert [(a.outcome, a.message) for a in svc.store.attempts_of(job)] == [("failed", "OSError: disk")]


def test_retryable_failures_spend_the_budget_then_fail_with_the_last_reason(svc, fake_ray):
    job = submit(svc, retries=1)
    why = "training failed: rank 0: training diverged by step 10"
    for number in (1, 2):
        tick(svc)
        sid = job if number == 1 else f"{job}-a{number}"
        write_outcome(JobArtifacts(svc.artifacts, job), Outcome(number, "retryable", "diverged", why))
        fake_ray.set(sid, FAILED, "exit code 1")
        svc.reconciler.tick()
    j = svc.store.get_job(job)
    assert (j.state, j.error_code, j.attempts) == ("failed", "diverged", 2)
    assert j.error_message == f"{why} (attempt 2 of 2; no retries left)"
    assert [(a.number, a.outcome) for a in svc.store.attempts_of(job)] == [(1, "failed"), (2, "failed")]


def test_a_ray_head_restart_resubmits(svc, fake_ray):
    starting, running = submit(svc, parallel={"workers": 1}), submit(svc, parallel={"workers": 1})
    tick(svc)
    fake_ray.set(running, RUNNING)
    svc.reconciler.tick()
    assert state(svc, running)[0] == "running" and state(svc, starting)[0] == "starting"
    fake_ray.forget_all()
    svc.reconciler.tick()
    # never ran: the same submission goes to the new head, no attempt spent
    assert starting in fake_ray.jobs and svc.store.get_job(starting).attempts == 1
    st, reason = state(svc, running)
    assert st == "queued" and f"Ray does not know submission {running}" in reason


def test_silence_from_ray_beyond_the_heartbeat_timeout_loses_the_driver(svc, fake_ray):
    job = submit(svc)
    tick(svc)
    fake_ray.set(job, RUNNING)
    tick(svc)
    fake_ray.reachable = False
    tick(svc)
    assert state(svc, job)[0] == "running"  # a short outage changes nothing
    svc.store.heartbeat(job, time.time() - 31)
    svc.reconciler.tick()
    st, reason = state(svc, job)
    assert st == "queued" and "no word from the Ray cluster for 3" in reason
    assert reason.endswith("(attempt 2 of 3)")
    svc.scheduler.tick()  # the reason now says what the job waits for; the event log keeps why
    assert state(svc, job)[1].startswith("waiting for the Ray cluster: Ray Jobs API at fake")
    assert "no word from the Ray cluster" in json.loads(svc.store.event_texts(job, 0)[-1][2])["reason"]
    assert svc.store.attempts_of(job)[0].outcome == "lost"


def test_cancel_while_ray_is_unreachable_stops_the_ray_job_later(svc, fake_ray):
    job = submit(svc)
    tick(svc)
    fake_ray.set(job, RUNNING)
    tick(svc)
    fake_ray.reachable = False
    assert svc.cancel("t", job).state == "cancelled"
    assert svc.store.reserved().cpu == 2  # Ray still runs it as far as we know
    tick(svc)
    fake_ray.reachable = True
    svc.reconciler.tick()  # stops it
    assert fake_ray.jobs[job].status == STOPPED
    svc.reconciler.tick()  # sees it stopped: closes the attempt
    assert [(a.outcome) for a in svc.store.attempts_of(job)] == ["cancelled"]
    assert svc.store.reserved().cpu == 0 and state(svc, job)[0] == "cancelled"


def test_cancel_stops_the_ray_job_at_once(svc, fake_ray):
    job = submit(svc)
    tick(svc)
    svc.cancel("t", job)
    assert fake_ray.jobs[job].status == STOPPED and fake_ray.stops == [job]


def test_a_submission_ray_refuses_fails_the_job(svc, fake_ray):
    fake_ray.reject = True
    job = submit(svc)
    tick(svc)
    j = svc.store.get_job(job)
    assert (j.state, j.error_code) == ("failed", "submission_rejected")
    assert svc.store.reserved().cpu == 0


def test_a_submission_that_never_reached_ray_is_retried_with_the_same_id(svc, fake_ray):
    fake_ray.reachable = False
    job = submit(svc)
    svc.store.admit(svc.store.get_job(job), job, Resources(cpu=2))
    svc.scheduler.submit(svc.store.get_job(job), svc.store.attempts_of(job)[0])  # Ray unreachable
    assert job not in fake_ray.jobs and state(svc, job)[0] == "starting"
    fake_ray.reachable = True
    svc.reconciler.tick()
    assert fake_ray.jobs[job].status == PENDING and svc.store.get_job(job).attempts == 1


def test_a_submission_ray_took_before_the_api_died_is_recorded_as_submitted(svc, fake_ray):
    job = submit(svc)
    admitted, attempt = svc.store.admit(svc.store.get_job(job), job, Resources(cpu=2))
    fake_ray.submit(job, "entry", {}, {})  # Ray accepted; the API died before writing it down
    assert svc.store.attempts_of(job)[0].submitted_at is None
    svc.reconciler.tick()
    first = svc.store.attempts_of(job)[0].submitted_at
    assert first is not None and list(fake_ray.jobs) == [job]
    svc.store.attempt_submitted(attempt.id)  # a later report keeps when Ray first had it
    assert svc.store.attempts_of(job)[0].submitted_at == first


def test_a_ray_job_stopped_behind_our_back_fails_the_job(svc, fake_ray):
    job = submit(svc)
    tick(svc)
    fake_ray.set(job, STOPPED, "stopped")
    tick(svc)
    j = svc.store.get_job(job)
    assert (j.state, j.error_code) == ("failed", "stopped")


def test_two_ingesters_store_each_record_once(svc):
    job = submit(svc)
    arts = JobArtifacts(svc.artifacts, job)
    arts.put_bytes("metrics.jsonl", b'{"kind": "train", "step": 1}\n{"kind": "train", "step": 2}\n')
    other = type(svc.ingester)(svc.store, svc.artifacts)
    assert svc.ingester.ingest_job(job, 0) == 2
    assert other.ingest_job(job, 0) == 0  # stale offset: the conditional update refuses
    assert other.ingest_job(job) == 0
    page = svc.store.metrics(job)
    assert [m.seq for m in page.items] == [0, 1]


def test_queued_job_cancel_and_terminal_cancel(svc):
    job = submit(svc)
    assert svc.cancel("t", job).state == JobState.CANCELLED
    with pytest.raises(InvalidTransition):
        svc.cancel("t", job)


def test_the_log_of_an_attempt_cancelled_before_submission_is_empty(svc, fake_ray):
    """An attempt recorded but cancelled before the scheduler submitted it never ran: its log is
    its header alone, not "Ray no longer has this log" (which stays for one Ray has lost)."""
    never = submit(svc, name="never")
    svc.store.admit(svc.store.get_job(never), never, Resources(1, 0))  # recorded, not submitted
    svc.cancel("t", never)
    assert svc.logs("t", never) == f"=== attempt 1 ({never}) ===\n"

    lost = submit(svc, name="lost")
    _, attempt = svc.store.admit(svc.store.get_job(lost), lost, Resources(1, 0))
    svc.store.attempt_submitted(attempt.id)  # Ray took it, and has since forgotten it
    assert svc.logs("t", lost) == f"=== attempt 1 ({lost}) ===\n(Ray no longer has this log)\n"
