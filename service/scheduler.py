"""Admission: queued jobs start, by priority then age, when the Ray cluster has room for them.

Room is counted against what our own open attempts hold, not against Ray's momentary
`available_resources`: a just-submitted driver takes seconds to claim its workers, and counting
on Ray's view would admit several jobs into the same free CPUs. A job that needs more than the
whole cluster stays queued with that reason (it may fit once nodes join); a job that fits the
cluster but not the free room blocks the jobs behind it, so big jobs are not starved by a stream
of small ones.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shlex
import sys
from dataclasses import dataclass

from pydantic import ValidationError

from service.artifacts import ArtifactStore, JobArtifacts
from service.errors import SlimtrainError
from service.jobs import InvalidTransition, JobEvent, submission_id
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


def plan(queue: list[tuple[str, Resources]], capacity: Resources, free: Resources) -> list[Decision]:
    """Decide for each queued job (in admission order) whether it starts now; pure."""
    out: list[Decision] = []
    blocked_by: str | None = None
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

    def tick(self) -> None:
        queued = self.store.queued_jobs()
        if not queued:
            return
        try:
            capacity = self.ray.capacity()
        except ClusterUnavailable as e:
            for job in queued:
                self.store.set_reason(job.id, f"waiting for the Ray cluster: {e.message}")
            return
        queue, jobs = [], {}
        for job in queued:
            try:
                spec = JobSpec.model_validate(job.spec)
            except ValidationError as e:  # a spec stored by an older version that no longer validates
                self._fail(
                    job, "invalid_spec", f"the stored spec no longer validates: {e.errors()[0]['msg']}"
                )
                continue
            queue.append((job.id, demand(spec)))
            jobs[job.id] = job
        free = capacity - self.store.reserved()
        needs = dict(queue)
        for d in plan(queue, capacity, free):
            if d.admit:
                self.start(jobs[d.job_id], needs[d.job_id])
            else:
                self.store.set_reason(d.job_id, d.reason)

    def start(self, job: Job, need: Resources) -> bool:
        if job.attempts >= 1:
            # The previous attempt was declared lost; if its driver lives on (Ray was only
            # unreachable), stop it before a second driver writes the same checkpoints.
            self._stop_quietly(submission_id(job.id, job.attempts))
        admitted = self.store.admit(job, submission_id(job.id, job.attempts + 1), need)
        if admitted is None:
            return False  # someone else admitted or cancelled it meanwhile
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
