"""Keeping the store's record and Ray's reality in agreement, at start-up and every few seconds.

For every job the store thinks is live, Ray is asked about its current attempt:
- running / pending: the heartbeat moves on (starting -> running once the driver runs);
- succeeded: the job succeeds when its report exists;
- failed with a `failed` outcome of this attempt: the driver failed for a reason no retry can
  fix -> failed;
- failed with a `retryable` outcome (a worker died, training diverged, an unexpected error): the
  attempt is closed `failed` with that reason -> resubmitted from the last checkpoint while
  attempts remain (`RetryPolicy`), failed with the reason otherwise;
- failed without an outcome, unknown to Ray (its head restarted), or silent for longer than
  the heartbeat timeout: the driver was lost -> the same, with the attempt closed `lost`.
Attempts of jobs that are over but whose Ray job may still run (a cancel while Ray was
unreachable) are stopped and closed.

Only the leader among API processes reconciles (service/leader.py): with a `lease`, each job is
looked at only while this process holds it. Every write here is a compare-and-set on the job's
state and version, so a decision made twice applies once.
"""

from __future__ import annotations

import contextlib
import logging
import time

from service.artifacts import ArtifactStore, JobArtifacts
from service.errors import SlimtrainError
from service.ingest import Ingester
from service.jobs import InvalidTransition, JobEvent, JobState, RetryPolicy
from service.leader import Lease
from service.outcome import read_outcome
from service.ray_jobs import FAILED, PENDING, RUNNING, STOPPED, SUCCEEDED, ClusterUnavailable, RayJobs
from service.scheduler import Scheduler
from service.store.models import Attempt, Job
from service.store.repo import Store

log = logging.getLogger(__name__)
_RAY_TERMINAL = {STOPPED, SUCCEEDED, FAILED}


class Reconciler:
    def __init__(
        self,
        store: Store,
        ray: RayJobs,
        artifacts: ArtifactStore,
        scheduler: Scheduler,
        ingester: Ingester,
        heartbeat_timeout: float,
    ):
        self.store, self.ray, self.artifacts = store, ray, artifacts
        self.scheduler, self.ingester = scheduler, ingester
        self.heartbeat_timeout = heartbeat_timeout
        self.lease: Lease | None = None  # None: this process alone reconciles

    def leading(self) -> bool:
        return self.lease is None or self.lease.holds()

    def tick(self) -> None:
        for job, attempt in self.store.live_jobs():
            if not self.leading():
                return
            # InvalidTransition: cancelled or finished by someone else meanwhile
            with contextlib.suppress(InvalidTransition):
                self.reconcile(job, attempt)
        for job, attempt in self.store.open_attempts_of_finished_jobs():
            if not self.leading():
                return
            self.reap(job, attempt)

    def reconcile(self, job: Job, attempt: Attempt | None) -> None:
        state = JobState(job.state)
        if attempt is None:  # cannot happen through admit(); repair rather than trust it
            self.lost(job, None, "the job has no attempt record")
            return
        try:
            info = self.ray.info(attempt.submission_id)
        except ClusterUnavailable as e:
            silent = time.time() - (job.heartbeat_at or job.updated_at)
            if silent > self.heartbeat_timeout:
                self.lost(job, attempt, f"no word from the Ray cluster for {silent:.0f}s: {e.message}")
            return
        if info is None:
            if state is JobState.STARTING:
                # Never reached Ray (a crash or an outage between admit and submit), or the Ray
                # head restarted before the driver ran: the same submission id is free again.
                self.scheduler.submit(job, attempt)
            else:
                self.lost(
                    job, attempt, f"Ray does not know submission {attempt.submission_id} (head restarted?)"
                )
            return
        if attempt.submitted_at is None:
            # Ray has it, but the API died between Ray's answer and recording it.
            self.store.attempt_submitted(attempt.id)
        if info.status in (PENDING, RUNNING):
            self.store.heartbeat(job.id)
            if info.status == RUNNING:
                self.store.attempt_started(attempt.id)
                if state is JobState.STARTING:
                    self.store.transition(job.id, JobEvent.START, reason=None, expect={JobState.STARTING})
            return
        self.ingester.ingest_job(job.id)  # every metric lands before the final state
        arts = JobArtifacts(self.artifacts, job.id)
        if info.status == SUCCEEDED:
            if _exists(arts, "report.json"):
                self.store.transition(
                    job.id, JobEvent.SUCCEED, expect={state}, attempt_outcome=("succeeded", info.message)
                )
            else:
                msg = "the driver exited without writing report.json"
                self.store.transition(
                    job.id,
                    JobEvent.FAIL,
                    expect={state},
                    error=("no_report", msg),
                    attempt_outcome=("failed", msg),
                )
        elif info.status == FAILED:
            outcome = read_outcome(arts, attempt.number)
            if outcome is not None and outcome.state == "failed":
                msg = outcome.message or "the driver failed"
                self.store.transition(
                    job.id,
                    JobEvent.FAIL,
                    expect={state},
                    error=(outcome.code or "driver_failed", msg),
                    attempt_outcome=("failed", msg),
                )
            elif outcome is not None:  # a failure that may not happen again
                self.failed_retryably(job, outcome.message or "the driver failed", outcome.code)
            else:
                self.lost(job, attempt, f"the driver died: {_first_line(info.message)}")
        elif info.status == STOPPED:
            msg = f"Ray job {attempt.submission_id} was stopped outside slimtrain"
            self.store.transition(
                job.id,
                JobEvent.FAIL,
                expect={state},
                error=("stopped", msg),
                attempt_outcome=("stopped", msg),
            )
        self.ingester.forget(job.id)

    def lost(self, job: Job, attempt: Attempt | None, why: str) -> None:
        """The driver is gone without a word: resubmit from the last checkpoint while attempts
        remain."""
        final = f"driver lost ({why}) after {job.attempts} of {job.max_attempts} attempts"
        self._retry_or_fail(job, "lost", why, f"driver lost ({why})", ("driver_lost", final))

    def failed_retryably(self, job: Job, why: str, code: str | None) -> None:
        """The driver reported a failure that may not recur: the attempt failed, and the job
        is resubmitted from the last checkpoint while attempts remain; the job's error is then
        the last attempt's own."""
        final = f"{why} (attempt {job.attempts} of {job.max_attempts}; no retries left)"
        self._retry_or_fail(
            job, "failed", why, f"attempt {job.attempts} failed ({why})", (code or "driver_error", final)
        )

    def _retry_or_fail(self, job: Job, outcome: str, why: str, what: str, error: tuple[str, str]) -> None:
        state = JobState(job.state)
        if RetryPolicy(job.max_attempts).resubmit(job.attempts, permanent=False):
            reason = (
                f"{what}; resubmitting from the last checkpoint "
                f"(attempt {job.attempts + 1} of {job.max_attempts})"
            )
            log.warning("job %s: %s", job.id, reason)
            self.store.transition(
                job.id, JobEvent.REQUEUE, reason=reason, expect={state}, attempt_outcome=(outcome, why)
            )
        else:
            log.warning("job %s: %s", job.id, error[1])
            self.store.transition(
                job.id, JobEvent.FAIL, expect={state}, error=error, attempt_outcome=(outcome, why)
            )

    def reap(self, job: Job, attempt: Attempt) -> None:
        try:
            info = self.ray.info(attempt.submission_id)
            if info is None or info.status in _RAY_TERMINAL:
                outcome = "cancelled" if job.state == JobState.CANCELLED.value else "stopped"
                self.store.close_attempt(attempt.id, outcome, info.message if info else "unknown to Ray")
            else:
                self.ray.stop(attempt.submission_id)
        except ClusterUnavailable as e:
            log.info("job %s: cannot stop %s yet: %s", job.id, attempt.submission_id, e.message)


def _exists(arts: JobArtifacts, name: str) -> bool:
    try:
        return arts.exists(name)
    except (OSError, SlimtrainError):
        return False


def _first_line(text: str | None) -> str:
    lines = (text or "").strip().splitlines()
    return lines[0][:300] if lines else "no message from Ray"
