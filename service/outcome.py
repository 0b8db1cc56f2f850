"""`<job>/outcome.json`: how a driver attempt ended, in its own words. Written by the Ray Job
entrypoint, read by the reconciler. A driver that exits non-zero *with* an outcome for its
attempt failed for a reason it knows (not retried by resubmission); one without an outcome was
lost (killed, its node gone) and may be resubmitted from the last checkpoint."""

from __future__ import annotations

import time
from dataclasses import dataclass

from service.artifacts import JobArtifacts
from service.errors import ArtifactNotFound

OUTCOME = "outcome.json"


@dataclass(frozen=True)
class Outcome:
    attempt: int
    state: str  # succeeded | failed
    code: str | None = None
    message: str | None = None


def write_outcome(arts: JobArtifacts, outcome: Outcome) -> None:
    arts.put_json(
        OUTCOME,
        {
            "attempt": outcome.attempt,
            "state": outcome.state,
            "code": outcome.code,
            "message": outcome.message,
            "time": time.time(),
        },
    )


def read_outcome(arts: JobArtifacts, attempt: int) -> Outcome | None:
    """The outcome of that attempt, or None (none written, or one of an earlier attempt)."""
    try:
        d = arts.get_json(OUTCOME)
    except (ArtifactNotFound, ValueError):
        return None
    if not isinstance(d, dict) or d.get("attempt") != attempt:
        return None
    return Outcome(attempt, str(d.get("state")), d.get("code"), d.get("message"))
