"""Parameters of the `/v1` routes, each documented exactly as it is checked: a value the OpenAPI
document calls valid is accepted, any other is refused with a 4xx that names the parameter.

Where the answer is our own status (400 for a cursor or an artifact name, 404 for a job id that
cannot exist) the check runs here and the document carries the pattern through
`json_schema_extra`; elsewhere FastAPI enforces the constraint itself (422)."""

from __future__ import annotations

import re
from typing import Annotated

from fastapi import Depends, Path
from pydantic import StringConstraints

from api.deps import CurrentTenant
from api.errors import BadRequest
from service.artifacts import JOB_ID_RE, NAME_MAX_CHARS, NAME_PATTERN, check_job_id
from service.errors import ArtifactKeyError
from service.jobs import JobNotFound
from service.store.repo import BadCursor

# Event and metric sequence numbers: ASCII digits (str.isdigit also takes '²', which int()
# refuses), below what the database's 32-bit integer columns hold (PostgreSQL refuses a larger
# value in a comparison with one of them: "integer out of range").
SEQ_PATTERN = r"^[0-9]{1,9}$"
MAX_SEQ = 10**9 - 1
# A page of jobs ends at `<created_at as a float>_<job id>` (service.store.repo.job_cursor).
JOB_CURSOR_PATTERN = r"^[0-9]{1,20}\.[0-9]{1,20}_" + JOB_ID_RE.pattern.removeprefix("^")
# A page of artifacts ends at a name; any string in this alphabet orders against names.
ARTIFACT_CURSOR_PATTERN = r"^[A-Za-z0-9._=/-]{1,1024}$"
# The `prefix` filter of artifacts: a folder name, with or without slashes around it.
PREFIX_PATTERN = "^/*(" + NAME_PATTERN[1:-1] + ")?/*$"
METRIC_KIND_PATTERN = r"^[A-Za-z0-9_-]{1,16}$"


def _documented(pattern: str, max_length: int | None = None) -> dict:
    extra: dict = {"pattern": pattern}
    if max_length is not None:
        extra["maxLength"] = max_length
    return extra


def matches(pattern: str, value: str) -> bool:
    return re.fullmatch(pattern, value) is not None


# The path parameter alone, unchecked: for a route that checks it with `known_job_id` itself.
JobIdPath = Annotated[
    str,
    Path(
        description="A job id as `POST /v1/jobs` returned it.",
        json_schema_extra=_documented(JOB_ID_RE.pattern),
    ),
]


def known_job_id(job_id: str) -> str:
    """`job_id`, or JobNotFound for an id no job can have: it never reaches the database
    (PostgreSQL refuses NUL characters with an error of its own)."""
    try:
        return check_job_id(job_id)
    except ArtifactKeyError:
        raise JobNotFound(f"no job {job_id!r}") from None


async def _job_id(
    job_id: JobIdPath,
    _tenant: CurrentTenant,  # authenticate first: a caller without a token learns nothing
) -> str:
    return known_job_id(job_id)


# A checked job id, after authentication. The routes a dashboard polls every second (GET job, a
# page of metrics) take `JobIdPath` and call `known_job_id` after their tenant instead: FastAPI
# solves every dependency node on every request, and these two nodes less (this one and the
# service's) took GET /v1/jobs/{id} from 141 to 118 us of CPU in one process
# (bench/api/profile_get.py; bench/README.md, API).
JobId = Annotated[str, Depends(_job_id)]

ArtifactName = Annotated[
    str,
    Path(
        description="Name inside the job, e.g. `report.json` or `checkpoints/step-00000200/state.pt`.",
        json_schema_extra=_documented(NAME_PATTERN, NAME_MAX_CHARS),
    ),
]

MetricKind = Annotated[str, StringConstraints(pattern=METRIC_KIND_PATTERN)]


def job_cursor(value: str | None) -> str | None:
    if value is None:
        return None
    if not matches(ARTIFACT_CURSOR_PATTERN, value):
        raise BadRequest("cursor: not a cursor this API returned")
    if not matches(JOB_CURSOR_PATTERN, value):
        raise BadCursor("cursor: not a cursor this API returned")
    return value


def artifact_cursor(value: str | None) -> str | None:
    if value is not None and not matches(ARTIFACT_CURSOR_PATTERN, value):
        raise BadRequest("cursor: not a cursor this API returned")
    return value


def sequence(value: str | None, name: str) -> int | None:
    """A metric cursor or a Last-Event-ID: a sequence number this API sent."""
    if value is None:
        return None
    if not matches(SEQ_PATTERN, value):
        raise BadRequest(f"{name}: must be a sequence number this API sent (digits)")
    return int(value)
