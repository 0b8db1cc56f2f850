"""`/v1` routes: jobs, their metrics, events, logs, artifacts and report, and the cluster.
Thin: each route checks HTTP-level input and calls the service layer."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import PlainTextResponse, StreamingResponse
from sse_starlette import EventSourceResponse

from api import params
from api.deps import CurrentTenant, ServiceDep, read_db, run_db
from api.errors import BadRequest, BodyTooLarge, UnsupportedMediaType, documented
from api.job_bodies import metric_page
from api.openapi import EVENT_STREAM, JOB_LINKS
from api.params import ArtifactName, JobId, JobIdPath, MetricKind, known_job_id
from api.routes.schemas import (
    ArtifactOut,
    ArtifactPage,
    AttemptList,
    AttemptOut,
    ClusterOut,
    JobOut,
    JobPage,
    MetricPage,
    NodeOut,
    ResourcesOut,
)
from api.sse import encoded, job_events
from service.artifacts import NAME_MAX_CHARS, check_name, iter_file_chunks
from service.errors import SpecError
from service.job_service import JobService
from service.jobs import JobState
from service.logtext import AnsiStripper, strip_ansi
from service.spec import decode_spec_text

router = APIRouter(prefix="/v1", tags=["jobs"])

# Downloads are served as one of these only: a type guessed from the name (text/html for
# `x.html`) would let a browser render an artifact on this origin.
_MEDIA_TYPES = {".json": "application/json", ".jsonl": "application/x-ndjson"}
_BINARY = "application/octet-stream"


def artifact_media_type(name: str) -> str:
    return next((m for ext, m in _MEDIA_TYPES.items() if name.endswith(ext)), _BINARY)


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refusing (413) one above `limit` before reading it when Content-Length
    says so, and while reading it otherwise (chunked uploads)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            too_big = int(declared) > limit
        except ValueError:
            raise BadRequest("Content-Length: not a number") from None
        if too_big:
            raise BodyTooLarge(f"the body is {int(declared)} bytes; the limit is {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(f"the body is larger than the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


# The spec as a YAML file is written (what `slimtrain submit` reads) may be sent as it is.
YAML_MEDIA_TYPES = ("application/yaml", "application/x-yaml", "text/yaml")
_JOB_SPEC = {"schema": {"$ref": "#/components/schemas/JobSpec"}}
_SPEC_BODY = {
    "requestBody": {
        "required": True,
        "description": "The job spec itself, as JSON or as YAML (aliases refused); unknown fields are "
        "rejected. No Content-Type reads as JSON.",
        "content": {"application/json": _JOB_SPEC, **{m: _JOB_SPEC for m in YAML_MEDIA_TYPES}},
    }
}


def spec_format(content_type: str | None) -> str:
    """`json` or `yaml`, from the body's Content-Type (none at all: JSON, as it always was)."""
    media = (content_type or "").split(";", 1)[0].strip().lower()
    if media in ("", "application/json") or media.endswith("+json"):
        return "json"
    if media in YAML_MEDIA_TYPES or media == "text/x-yaml" or media.endswith("+yaml"):
        return "yaml"
    raise UnsupportedMediaType(
        f"Content-Type {media}: send the job spec as JSON (application/json) or YAML (application/yaml)"
    )


def yaml_as_json(body: bytes) -> bytes:
    """A YAML body re-encoded as the JSON body the service validates, so both go through one
    path (same errors, same idempotency digest: of the decoded spec, not of its bytes)."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SpecError(
            f"body: not UTF-8 ({e.reason})", [{"field": "(body)", "message": "not UTF-8"}]
        ) from None
    data = decode_spec_text(text, source="body", field="(body)", aliases=False)
    # YAML has values JSON has not (dates, binary): as their text, which the spec then checks
    return json.dumps(data, default=str).encode()


_CREATED = {
    201: {
        "description": "The job, queued (or the one this Idempotency-Key created before).",
        "headers": {
            "Location": {
                "description": "The job's URL.",
                "required": True,
                "schema": {"type": "string"},
            },
            "Idempotent-Replayed": {
                "description": "`true` when this Idempotency-Key and body created the job before.",
                "schema": {"type": "string", "enum": ["true"]},
            },
        },
        "links": JOB_LINKS,
    }
}


@router.post(
    "/jobs",
    status_code=201,
    response_model=JobOut,
    summary="Submit a job",
    operation_id="submit_job",
    openapi_extra=_SPEC_BODY,
    responses={
        **_CREATED,
        **documented(
            401,
            409,
            413,
            415,
            422,
            s409="Idempotency-Key reused with another body.",
            s422="Invalid spec (each bad field named), or above the server's limits.",
        ),
    },
)
async def submit_job(
    request: Request,
    response: Response,
    service: ServiceDep,
    tenant: CurrentTenant,
    idempotency_key: Annotated[
        str,
        Header(
            alias="Idempotency-Key",
            min_length=1,
            max_length=255,
            description="Repeat a submission safely: the same key and body return the same job.",
        ),
    ] = None,
) -> JobOut:
    fmt = spec_format(request.headers.get("content-type"))
    body = await read_body(request, service.settings.max_body_bytes)
    if fmt == "yaml":
        body = yaml_as_json(body)
    job, replayed = await run_db(request, service.submit, tenant, body, idempotency_key)
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    if replayed:
        response.headers["Idempotent-Replayed"] = "true"
    return JobOut.of(job)


_CURSOR_DOC = "`next_cursor` of the previous page."
# Optional query and header parameters are typed `str` (or `int`) with a default, not `X | None`:
# the document would otherwise allow `null`, which no query string or header can carry.


@router.get(
    "/jobs",
    response_model=JobPage,
    summary="List jobs",
    operation_id="list_jobs",
    responses=documented(400, 401, 422),
)
async def list_jobs(
    request: Request,
    service: ServiceDep,
    tenant: CurrentTenant,
    state: Annotated[
        list[JobState] | None, Query(description="Only jobs in these states (repeatable).")
    ] = None,
    cursor: Annotated[
        str, Query(description=_CURSOR_DOC, json_schema_extra={"pattern": params.JOB_CURSOR_PATTERN})
    ] = None,
    limit: Annotated[int, Query(ge=1, le=200, description="Jobs per page.")] = 50,
) -> Response:
    states = [s.value for s in state] if state else None
    page = await read_db(request, service.job_rows, tenant, states, params.job_cursor(cursor), limit)
    return request.app.state.job_bodies.page(page)


@router.get(
    "/jobs/{job_id}",
    response_model=JobOut,
    summary="Get a job",
    operation_id="get_job",
    responses=documented(401, 404),
)
async def get_job(job_id: JobIdPath, request: Request, tenant: CurrentTenant) -> Response:
    # Flat, as api.params.JobId says why: the id checked here, after the tenant; the service
    # from the app's state, not a dependency.
    service: JobService = request.app.state.service
    job_id = known_job_id(job_id)
    return request.app.state.job_bodies.job(await read_db(request, service.job_row, tenant, job_id))


@router.post(
    "/jobs/{job_id}/cancel",
    response_model=JobOut,
    summary="Cancel a job",
    operation_id="cancel_job",
    responses=documented(401, 404, 409, s409="The job is already over; `state` says how it ended."),
)
def cancel_job(job_id: JobId, service: ServiceDep, tenant: CurrentTenant) -> JobOut:
    return JobOut.of(service.cancel(tenant, job_id))


@router.get(
    "/jobs/{job_id}/attempts",
    response_model=AttemptList,
    summary="Ray submissions of a job",
    operation_id="job_attempts",
    responses=documented(401, 404),
)
async def job_attempts(
    job_id: JobId, request: Request, service: ServiceDep, tenant: CurrentTenant
) -> AttemptList:
    return AttemptList(
        items=[AttemptOut.of(a) for a in await run_db(request, service.attempts, tenant, job_id)]
    )


@router.get(
    "/jobs/{job_id}/metrics",
    response_model=MetricPage,
    summary="Metric series of a job",
    operation_id="job_metrics",
    responses=documented(400, 401, 404, 422),
)
async def job_metrics(
    job_id: JobIdPath,
    request: Request,
    tenant: CurrentTenant,
    kind: Annotated[
        list[MetricKind] | None, Query(description="Only these kinds: train, eval, event.")
    ] = None,
    cursor: Annotated[
        str, Query(description=_CURSOR_DOC, json_schema_extra={"pattern": params.SEQ_PATTERN})
    ] = None,
    limit: Annotated[int, Query(ge=1, le=10_000, description="Records per page.")] = 1000,
) -> Response:
    job_id = known_job_id(job_id)  # flat, as get_job
    service: JobService = request.app.state.service
    after = -1 if (seq := params.sequence(cursor, "cursor")) is None else seq
    # On SQLite, a page of up to `limit` records is read off the event loop.
    page = await read_db(request, service.metric_page, tenant, job_id, after, kind, limit, on_loop=False)
    return metric_page(page)


@router.get(
    "/jobs/{job_id}/events",
    summary="Follow a job (server-sent events)",
    operation_id="job_events",
    response_class=EventSourceResponse,
    responses={
        200: {
            "content": {EVENT_STREAM["media_type"]: EVENT_STREAM["content"]},
            "description": "Events `state` and `metric`; `id` is the per-job sequence number. The "
            "stream ends after the job's final state.",
            "headers": {
                "Cache-Control": {
                    "description": "Never cached.",
                    "required": True,
                    "schema": {"type": "string", "enum": ["no-store"]},
                }
            },
        },
        **documented(400, 401, 404, 422),
    },
)
async def job_events_stream(
    job_id: JobId,
    request: Request,
    service: ServiceDep,
    tenant: CurrentTenant,
    after: Annotated[int, Query(ge=0, le=params.MAX_SEQ, description="Resume after this event id.")] = 0,
    last_event_id: Annotated[
        str,
        Header(
            alias="Last-Event-ID",
            description="Resume after this event id (EventSource).",
            json_schema_extra={"pattern": params.SEQ_PATTERN},
        ),
    ] = None,
):
    # The job first: an unknown job is a 404 whatever the header (the contract fuzz test counts
    # this route's 400 as an answer about a job it found).
    await read_db(request, service.job_row, tenant, job_id)
    start = max(after, params.sequence(last_event_id, "Last-Event-ID") or 0)
    state = request.app.state
    stream = encoded(job_events(state.feed, state.notifier, job_id, start))
    return EventSourceResponse(stream, ping=15, headers={"Cache-Control": "no-store"})


@router.get(
    "/jobs/{job_id}/logs",
    summary="The driver's log",
    operation_id="job_logs",
    response_class=PlainTextResponse,
    responses={200: {"content": {"text/plain": {}}}, **documented(401, 404, 422, 503)},
)
async def job_logs(
    job_id: JobId,
    service: ServiceDep,
    tenant: CurrentTenant,
    follow: Annotated[bool, Query(description="Keep streaming until the job is over.")] = False,
):
    # Plain text: Ray colours what it forwards, and this is read in pipes and the dashboard.
    if follow:
        await run_in_threadpool(service.get, tenant, job_id)
        gen = plain_chunks(service.follow_logs(tenant, job_id))
        return StreamingResponse(gen, media_type="text/plain; charset=utf-8")
    return PlainTextResponse(strip_ansi(await run_in_threadpool(service.logs, tenant, job_id)))


async def plain_chunks(chunks: AsyncIterator[str]) -> AsyncIterator[str]:
    stripper = AnsiStripper()
    async for chunk in chunks:
        if text := stripper.feed(chunk):
            yield text
    if text := stripper.close():
        yield text


@router.get(
    "/jobs/{job_id}/artifacts",
    response_model=ArtifactPage,
    summary="List artifacts",
    operation_id="list_artifacts",
    responses={
        200: {
            "links": {
                "DownloadFirstArtifact": {
                    "operationId": "get_artifact",
                    "parameters": {"job_id": "$request.path.job_id", "name": "$response.body#/items/0/name"},
                }
            }
        },
        **documented(400, 401, 404, 422),
    },
)
def list_artifacts(
    job_id: JobId,
    service: ServiceDep,
    tenant: CurrentTenant,
    prefix: Annotated[
        str,
        Query(
            description="Only names under this folder, e.g. `checkpoints`.",
            pattern=params.PREFIX_PATTERN,
            max_length=NAME_MAX_CHARS,
        ),
    ] = "",
    cursor: Annotated[
        str,
        Query(description=_CURSOR_DOC, json_schema_extra={"pattern": params.ARTIFACT_CURSOR_PATTERN}),
    ] = None,
    limit: Annotated[int, Query(ge=1, le=1000, description="Artifacts per page.")] = 200,
) -> ArtifactPage:
    items, nxt = service.list_artifacts(tenant, job_id, prefix, params.artifact_cursor(cursor), limit)
    return ArtifactPage(items=[ArtifactOut.of(n, o) for n, o in items], next_cursor=nxt)


@router.get(
    "/jobs/{job_id}/artifacts/{name:path}",
    summary="Download an artifact",
    operation_id="get_artifact",
    response_class=StreamingResponse,
    responses={
        200: {
            "description": "The artifact's bytes, as a download.",
            "content": {
                _BINARY: {"schema": {"type": "string", "format": "binary"}},
                **{m: {} for m in _MEDIA_TYPES.values()},
            },
            "headers": {
                "Content-Disposition": {
                    "description": "`attachment` with the artifact's file name.",
                    "required": True,
                    "schema": {"type": "string"},
                }
            },
        },
        **documented(400, 401, 404, s400="A name that is not allowed.", s404="No such job or artifact."),
    },
)
def get_artifact(job_id: JobId, name: ArtifactName, service: ServiceDep, tenant: CurrentTenant):
    check_name(name)
    f = service.artifacts_of(tenant, job_id).open_read(name)
    filename = name.rsplit("/", 1)[-1]
    return StreamingResponse(
        iter_file_chunks(f),
        media_type=artifact_media_type(name),
        headers={
            "Content-Disposition": f'attachment; filename="{filename}"',
            "X-Content-Type-Options": "nosniff",
        },
    )


@router.get(
    "/jobs/{job_id}/report",
    summary="The job's report.json",
    operation_id="job_report",
    responses=documented(401, 404, 502, s404="No such job, or it has no report yet."),
)
def job_report(job_id: JobId, service: ServiceDep, tenant: CurrentTenant) -> dict:
    return service.report(tenant, job_id)


@router.get(
    "/cluster",
    response_model=ClusterOut,
    summary="The Ray cluster and the queue",
    operation_id="cluster",
    tags=["cluster"],
    responses=documented(401),
)
def cluster(service: ServiceDep, tenant: CurrentTenant) -> ClusterOut:
    c = service.cluster(tenant)
    return ClusterOut(
        reachable=c.reachable,
        error=c.error,
        dashboard_url=c.dashboard_url,
        nodes=[NodeOut(node_id=n.node_id, alive=n.alive, resources=n.resources) for n in c.nodes],
        capacity=ResourcesOut(**c.capacity.to_dict()),
        reserved=ResourcesOut(**c.reserved.to_dict()),
        queue_length=c.queue_length,
        jobs=c.jobs,
    )
