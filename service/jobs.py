"""The job state machine: states, the events that move a job, and the one function that decides
the next state. Pure: the store applies `next_state` under a compare-and-set, so a transition
that lost a race is re-decided against the state that won."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from service.errors import SlimtrainError


class JobState(StrEnum):
    QUEUED = "queued"
    STARTING = "starting"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL

    @property
    def live(self) -> bool:
        """A Ray job exists (or is being created) for it."""
        return self in (JobState.STARTING, JobState.RUNNING)


TERMINAL = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED})


class JobEvent(StrEnum):
    ADMIT = "admit"  # the scheduler found resources and submits a Ray job
    START = "start"  # Ray runs the driver
    SUCCEED = "succeed"  # the driver exited 0 and the report exists
    FAIL = "fail"  # the driver reported a failure, or no attempts are left
    CANCEL = "cancel"  # a user asked
    REQUEUE = "requeue"  # the driver was lost; attempts remain, so it goes back to the queue


_TABLE: dict[tuple[JobState, JobEvent], JobState] = {
    (JobState.QUEUED, JobEvent.ADMIT): JobState.STARTING,
    (JobState.QUEUED, JobEvent.CANCEL): JobState.CANCELLED,
    (JobState.QUEUED, JobEvent.FAIL): JobState.FAILED,
    (JobState.STARTING, JobEvent.START): JobState.RUNNING,
    (JobState.STARTING, JobEvent.SUCCEED): JobState.SUCCEEDED,
    (JobState.STARTING, JobEvent.FAIL): JobState.FAILED,
    (JobState.STARTING, JobEvent.CANCEL): JobState.CANCELLED,
    (JobState.STARTING, JobEvent.REQUEUE): JobState.QUEUED,
    (JobState.RUNNING, JobEvent.SUCCEED): JobState.SUCCEEDED,
    (JobState.RUNNING, JobEvent.FAIL): JobState.FAILED,
    (JobState.RUNNING, JobEvent.CANCEL): JobState.CANCELLED,
    (JobState.RUNNING, JobEvent.REQUEUE): JobState.QUEUED,
}


class InvalidTransition(SlimtrainError):
    """The event does not apply to the job's current state (e.g. cancelling a finished job)."""

    code = "invalid_state"

    def __init__(self, message: str, state: str | None = None):
        super().__init__(message)
        self.state = state

    def __reduce__(self):
        return (self.__class__, (self.message, self.state))


class JobNotFound(SlimtrainError):
    """No such job for this tenant (another tenant's job is reported the same way)."""

    code = "job_not_found"


class IdempotencyConflict(SlimtrainError):
    """An Idempotency-Key reused with a different request body."""

    code = "idempotency_conflict"


class LimitExceeded(SlimtrainError):
    """A valid spec that asks for more than this server allows. `errors` as in SpecError."""

    code = "limit_exceeded"

    def __init__(self, message: str, errors: list[dict] | None = None):
        super().__init__(message)
        self.errors = errors or []

    def __reduce__(self):
        return (self.__class__, (self.message, self.errors))


def next_state(state: JobState | str, event: JobEvent | str) -> JobState:
    """The state after `event`, or InvalidTransition naming the state and what it allows."""
    state, event = JobState(state), JobEvent(event)
    try:
        return _TABLE[(state, event)]
    except KeyError:
        allowed = sorted(e for (s, e) in _TABLE if s == state)
        hint = f"; allowed: {', '.join(allowed)}" if allowed else "; the job is finished"
        raise InvalidTransition(f"cannot {event} a job that is {state}{hint}", state) from None


@dataclass(frozen=True)
class RetryPolicy:
    """The job's one retry budget: 1 + the spec's `retries` attempts, each a Ray job. Under the
    service, Ray Train does not restart workers inside a driver (workers.entrypoint): a failed
    worker fails its attempt, so every failure is an attempt the user sees, with its reason. An
    attempt whose driver was lost (killed, its node or the Ray head gone) or that failed for a
    reason that may not recur is resubmitted from the last checkpoint while attempts remain; a
    `permanent` failure (a ConfigError, ranks whose masks disagree) never is."""

    max_attempts: int

    @classmethod
    def for_retries(cls, retries: int) -> RetryPolicy:
        return cls(max_attempts=retries + 1)

    def resubmit(self, attempts_used: int, permanent: bool) -> bool:
        return not permanent and attempts_used < self.max_attempts


def submission_id(job_id: str, attempt: int) -> str:
    """The Ray submission id of an attempt: the job id itself for the first (DESIGN.md), then
    `<job_id>-a<n>`, so every attempt is a distinct Ray job and a resubmission of the same
    attempt is refused by Ray as a duplicate instead of running twice."""
    if attempt < 1:
        raise ValueError("attempts count from 1")
    return job_id if attempt == 1 else f"{job_id}-a{attempt}"
