"""Admission: queued jobs start, by priority then age, when the Ray cluster has room for them.

Room is counted against what our own open attempts hold, not against Ray's momentary
`available_resources`: a just-submitted driver takes seconds to claim its workers, and counting
on Ray's view would admit several jobs into the same free CPUs. A job that needs more than the
whole cluster stays queued with that reason (it may fit once nodes join); a job that fits the
cluster but not the free room blocks the jobs behind it, so big jobs are not starved by a stream
of small ones.

A deep queue costs nothing while it waits: a tick reads the queue's size from its index, Ray's
capacity and what open attempts hold, and stops there when none of them changed. Otherwise it
reads the head of the queue page by page until the first job that must wait for resources
(everything behind it waits too), parses each job's spec once (cached by job id and version),
and writes a job's reason only when it changes. The rest of the queue is read only when what it
waits behind changes (another blocking job, another cluster size), and new jobs alone when
jobs were submitted.

With several API processes, only the leader schedules (service/leader.py): `lease`, when set,
is checked before each admission, and the admission itself (the conditional update that claims
a queued job) is fenced by it in the same transaction, so a deposed leader claims nothing.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shlex
import sys
import time
from dataclasses import dataclass

from pydantic import ValidationError

from service.artifacts import ArtifactStore, JobArtifacts
from service.errors import SlimtrainError
from service.jobs import InvalidTransition, JobEvent, submission_id
from service.leader import Lease
from service.limits import Resources, demand
from service.ray_jobs import ClusterUnavailable, RayJobs, SubmissionRejected
from service.settings import Settings
from service.spec import JobSpec
from service.store.models import Attempt, Job
from service.store.repo import Store

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Decision:
    job_id: str
    admit: bool
    reason: str | None = None


HEAD_PAGE = 32  # queued jobs read at a time from the head of the queue
REPLAN_S = 10.0  # the head is planned again at least this often, changed or not


def plan(
    queue: list[tuple[str, Resources]],
    capacity: Resources,
    free: Resources,
    blocked_by: str | None = None,
) -> list[Decision]:
    """Decide for each queued job (in admission order) whether it starts now; pure. `blocked_by`:
    the job the queue's earlier part waits for resources behind (deciding a queue's tail alone)."""
    out: list[Decision] = []
    for job_id, need in queue:
        if not need.fits(capacity):
            out.append(
                Decision(
                    job_id, False, f"cannot run on this cluster: needs {need}; it has {capacity} in total"
                )
            )
        elif blocked_by is not None:
            out.append(Decision(job_id, False, f"waiting behind higher-priority job {blocked_by}"))
        elif not need.fits(free):
            out.append(Decision(job_id, False, f"waiting for resources: needs {need}; {_nonneg(free)} free"))
            blocked_by = job_id
        else:
            out.append(Decision(job_id, True))
            free = free - need
    return out


def _nonneg(r: Resources) -> Resources:
    return Resources(max(r.cpu, 0.0), max(r.gpu, 0.0))


class Scheduler:
    def __init__(self, store: Store, ray: RayJobs, artifacts: ArtifactStore, settings: Settings):
        self.store, self.ray, self.artifacts, self.settings = store, ray, artifacts, settings
        # Per (job id, version): its demand (None: its spec no longer validates), and the reason
        # last written, so that a waiting job costs no parse and no write per tick.
        self._needs: dict[tuple[str, int], Resources | None] = {}
        self._reasons: dict[tuple[str, int], str] = {}
        self._seen: tuple | None = None  # the inputs of the last plan
        self._planned_at = 0.0
        self._tail: tuple | None = None  # (blocking job, capacity) the tail's reasons say
        self._newest: float | None = None  # created_at of the newest job the tail was given
        self.parses = 0  # specs parsed: the work follows new jobs, not the queue's length
        self.lease: Lease | None = None  # None: this process alone schedules (tests, one process)

    def leading(self) -> bool:
        return self.lease is None or self.lease.holds()

    def tick(self) -> None:
        if not self.leading():
            return
        count, newest = self.store.queue_signature()
        if not count:
            self._seen = None
            return
        try:
            capacity = self.ray.capacity()
        except ClusterUnavailable as e:
            self._seen = self._tail = None
            for job in self.store.queued_jobs():
                self._set_reason(job, f"waiting for the Ray cluster: {e.message}")
            return
        reserved = self.store.reserved()
        seen = (count, newest, capacity, reserved)
        if seen == self._seen and time.monotonic() - self._planned_at < REPLAN_S:
            return
        self._seen, self._planned_at = seen, time.monotonic()
        free = capacity - reserved
        queue: list[tuple[str, Resources]] = []
        jobs: dict[str, Job] = {}
        while True:  # the head, until a job must wait for resources (or the queue ends)
            page = self.store.queued_jobs(limit=HEAD_PAGE, offset=len(jobs))
            for job in page:
                jobs[job.id] = job
                if (need := self._need(job)) is not None:
                    queue.append((job.id, need))
            decisions = plan(queue, capacity, free)
            blocker = next(
                (d.job_id for d in decisions if d.reason and d.reason.startswith("waiting for resources")),
                None,
            )
            if blocker is not None or len(page) < HEAD_PAGE:
                break
        needs = dict(queue)
        admitted = 0
        for d in decisions:
            if not self.leading():
                self._seen = None  # what this tick planned was not carried out
                return
            if d.admit:
                admitted += self.start(jobs[d.job_id], needs[d.job_id])
                # The queue this plan saw is gone: a job that comes back to it (a lost driver,
                # requeued) would leave the signature as it was.
                self._seen = None
            else:
                self._set_reason(jobs[d.job_id], d.reason)
        if blocker is not None:
            self._decide_tail(blocker, capacity, len(jobs) - admitted, set(jobs), newest)
        else:  # the whole queue was read: forget the jobs that left it
            self._tail = None
            self._needs = {k: v for k, v in self._needs.items() if k[0] in jobs}
            self._reasons = {k: v for k, v in self._reasons.items() if k[0] in jobs}
        self._newest = newest

    def _decide_tail(self, blocker: str, capacity: Resources, offset: int, head: set[str], newest) -> None:
        """Reasons for the jobs behind the head: all of them when what they wait behind changed,
        else only those submitted since the last tick."""
        if self._tail != (blocker, capacity):
            tail = self.store.queued_jobs(offset=offset)
            self._tail = (blocker, capacity)
            keep = {(j.id, j.version) for j in tail} | {k for k in self._needs if k[0] in head}
            self._needs = {k: v for k, v in self._needs.items() if k in keep}
            self._reasons = {k: v for k, v in self._reasons.items() if k in keep}
        elif newest != self._newest:
            tail = [j for j in self.store.queued_jobs(created_after=self._newest) if j.id not in head]
        else:
            return
        queue, jobs = [], {}
        for job in tail:
            jobs[job.id] = job
            if (need := self._need(job)) is not None:
                queue.append((job.id, need))
        changed = {}
        for d in plan(queue, capacity, Resources(0.0, 0.0), blocked_by=blocker):
            key = (d.job_id, jobs[d.job_id].version)
            if self._reasons.get(key) != d.reason:
                changed[d.job_id] = self._reasons[key] = d.reason
        if changed:  # one transaction, not one per job: they change together
            self.store.set_reasons(changed)

    def _need(self, job: Job) -> Resources | None:
        key = (job.id, job.version)
        if key not in self._needs:
            self.parses += 1
            try:
                self._needs[key] = demand(JobSpec.model_validate(job.spec))
            except ValidationError as e:  # a spec stored by an older version that no longer validates
                self._needs[key] = None
                self._fail(
                    job, "invalid_spec", f"the stored spec no longer validates: {e.errors()[0]['msg']}"
                )
        return self._needs[key]

    def _set_reason(self, job: Job, reason: str) -> None:
        key = (job.id, job.version)
        if self._reasons.get(key) != reason:
            self.store.set_reason(job.id, reason)
            self._reasons[key] = reason

    def start(self, job: Job, need: Resources) -> bool:
        if job.attempts >= 1:
            # The previous attempt was declared lost; if its driver lives on (Ray was only
            # unreachable), stop it before a second driver writes the same checkpoints.
            self._stop_quietly(submission_id(job.id, job.attempts))
        fence = self.lease.fence if self.lease is not None else None
        admitted = self.store.admit(job, submission_id(job.id, job.attempts + 1), need, fence)
        if admitted is None:
            return False  # someone else admitted or cancelled it meanwhile, or the lease is gone
        self.submit(*admitted)
        return True

    def submit(self, job: Job, attempt: Attempt) -> None:
        """Write spec.json and submit the attempt's driver. Transient failures leave the job
        `starting`: the reconciler finds Ray does not know the submission and calls this again."""
        try:
            JobArtifacts(self.artifacts, job.id).put_json("spec.json", job.spec)
            self.ray.submit(
                attempt.submission_id,
                self.entrypoint(job.id),
                self.env_vars(attempt.number),
                {"slimtrain_job": job.id, "tenant": job.tenant_id, "attempt": attempt.number},
            )
        except ClusterUnavailable as e:
            log.warning("submitting %s: %s (will retry)", attempt.submission_id, e.message)
            return
        except SubmissionRejected as e:
            self._fail(job, e.code, e.message)
            return
        except (OSError, SlimtrainError) as e:
            log.warning("submitting %s: artifact store: %s (will retry)", attempt.submission_id, e)
            return
        self.store.attempt_submitted(attempt.id)
        log.info("job %s: submitted attempt %d as %s", job.id, attempt.number, attempt.submission_id)

    def entrypoint(self, job_id: str) -> str:
        python = self.settings.driver_python or sys.executable
        return f"{shlex.quote(python)} -m workers.entrypoint {shlex.quote(job_id)}"

    def env_vars(self, attempt: int) -> dict[str, str]:
        """Settings the driver needs. Credentials are never put here (Ray shows a job's
        runtime_env to anyone who can read its dashboard): nodes carry their own AWS_* env."""
        s = self.settings
        env = {"SLIMTRAIN_ARTIFACT_URI": s.resolved_artifact_uri, "SLIMTRAIN_ATTEMPT": str(attempt)}
        if s.s3_endpoint_url:
            env["SLIMTRAIN_S3_ENDPOINT_URL"] = s.s3_endpoint_url
        faults = os.environ.get("SLIMTRAIN_FAULTS")
        if faults:  # test-only fault injection (issue 8), set by operators, never by a spec
            json.loads(faults)
            env["SLIMTRAIN_FAULTS"] = faults
        return env

    def _fail(self, job: Job, code: str, message: str) -> None:
        # InvalidTransition: it was cancelled or finished meanwhile
        with contextlib.suppress(InvalidTransition):
            self.store.transition(
                job.id, JobEvent.FAIL, error=(code, message), attempt_outcome=("failed", message)
            )

    def _stop_quietly(self, sid: str) -> None:
        try:
            self.ray.stop(sid)
        except ClusterUnavailable as e:
            log.info("could not stop %s: %s", sid, e.message)
