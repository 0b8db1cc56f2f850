"""A stand-in for the Ray Jobs API, for tests about the API and the scheduling logic rather than
Ray (the end-to-end test uses a real cluster). It keeps submissions in memory and lets a test
move them through Ray's statuses, make the cluster unreachable, or forget everything (a head
restart)."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import pytest

from service.limits import Resources
from service.ray_jobs import (
    FAILED,
    PENDING,
    RUNNING,
    STOPPED,
    SUCCEEDED,
    ClusterUnavailable,
    NodeInfo,
    RayJobInfo,
    SubmissionRejected,
    capacity_of,
)


@dataclass
class FakeSubmission:
    submission_id: str
    entrypoint: str
    env_vars: dict
    metadata: dict
    status: str = PENDING
    message: str | None = None
    log: str = ""


@dataclass
class FakeRay:
    cpu: float = 2.0
    gpu: float = 0.0
    reachable: bool = True
    reject: bool = False
    jobs: dict[str, FakeSubmission] = field(default_factory=dict)
    stops: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def _check(self) -> None:
        if not self.reachable:
            raise ClusterUnavailable("Ray Jobs API at fake: ConnectionError: refused")

    @property
    def dashboard_url(self) -> str:
        self._check()
        return "http://fake-ray:8265"

    def submit(self, submission_id, entrypoint, env_vars, metadata) -> bool:
        self._check()
        if self.reject:
            raise SubmissionRejected(f"Ray refused submission {submission_id}: 400 bad runtime_env")
        with self.lock:
            if submission_id in self.jobs:
                return False
            self.jobs[submission_id] = FakeSubmission(submission_id, entrypoint, env_vars, metadata)
            return True

    def info(self, submission_id):
        self._check()
        j = self.jobs.get(submission_id)
        return None if j is None else RayJobInfo(j.status, j.message)

    def stop(self, submission_id) -> bool:
        self._check()
        self.stops.append(submission_id)
        j = self.jobs.get(submission_id)
        if j is None or j.status in (STOPPED, SUCCEEDED, FAILED):
            return False
        j.status, j.message = STOPPED, "Job was intentionally stopped."
        return True

    def logs(self, submission_id):
        self._check()
        j = self.jobs.get(submission_id)
        return None if j is None else j.log

    async def tail_logs(self, submission_id):
        self._check()
        j = self.jobs.get(submission_id)
        if j is None:
            raise ClusterUnavailable(f"following the log of {submission_id}: no such job")
        yield j.log

    def nodes(self):
        self._check()
        return [NodeInfo("fake-node", True, {"CPU": self.cpu, "GPU": self.gpu})]

    def capacity(self) -> Resources:
        return capacity_of(self.nodes())

    # --- test controls ---------------------------------------------------------------------------

    def set(self, submission_id: str, status: str, message: str | None = None, log: str | None = None):
        j = self.jobs[submission_id]
        j.status, j.message = status, message
        if log is not None:
            j.log = log

    def forget_all(self) -> None:
        """What a Ray head restart without GCS fault tolerance does to the Jobs API."""
        self.jobs.clear()


@pytest.fixture
def fake_ray() -> FakeRay:
    return FakeRay()


__all__ = ["FAILED", "PENDING", "RUNNING", "STOPPED", "SUCCEEDED", "FakeRay", "FakeSubmission"]
