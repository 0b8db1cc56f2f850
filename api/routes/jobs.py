"""`/v1` routes: jobs, their metrics, events, logs, artifacts and report, and the cluster.
Thin: each route checks HTTP-level input and calls the service layer."""

from __future__ import annotations

import mimetypes
import re
from typing import Annotated

from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import PlainTextResponse, StreamingResponse
from sse_starlette import EventSourceResponse

from api.deps import CurrentTenant, ServiceDep, run_db
from api.errors import BadRequest, BodyTooLarge
from api.routes.schemas import (
    ArtifactOut,
    ArtifactPage,
    AttemptList,
    AttemptOut,
    ClusterOut,
    ErrorBody,
    JobOut,
    JobPage,
    MetricPage,
    MetricRecord,
    NodeOut,
    ResourcesOut,
)
from api.sse import job_events
from service.artifacts import check_name, iter_file_chunks
from service.jobs import JobState

router = APIRouter(prefix="/v1", tags=["jobs"])

_ERRORS = {
    401: {"model": ErrorBody, "description": "Missing or invalid bearer token."},
    404: {"model": ErrorBody, "description": "No such job for this tenant."},
}
_CURSOR = re.compile(r"^[A-Za-z0-9._=/-]{1,1024}$")


def _cursor(value: str | None) -> str | None:
    if value is not None and not _CURSOR.fullmatch(value):
        raise BadRequest("cursor: not a cursor this API returned")
    return value


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


_SPEC_BODY = {
    "requestBody": {
        "required": True,
        "description": "The job spec itself (JSON); unknown fields are rejected.",
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/JobSpec"}}},
    }
}


@router.post(
    "/jobs",
    status_code=201,
    response_model=JobOut,
    summary="Submit a job",
    openapi_extra=_SPEC_BODY,
    responses={
        401: _ERRORS[401],
        409: {"model": ErrorBody, "description": "Idempotency-Key reused with another body."},
        413: {"model": ErrorBody, "description": "Body above the server's limit."},
        422: {"model": ErrorBody, "description": "Invalid spec, or above the server's limits."},
    },
)
async def submit_job(
    request: Request,
    response: Response,
    service: ServiceDep,
    tenant: CurrentTenant,
    idempotency_key: Annotated[
        str | None,
        Header(
            alias="Idempotency-Key",
            min_length=1,
            max_length=255,
            description="Repeat a submission safely: the same key and body return the same job.",
        ),
    ] = None,
) -> JobOut:
    body = await read_body(request, service.settings.max_body_bytes)
    job, replayed = await run_db(request, service.submit, tenant, body, idempotency_key)
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    if replayed:
        response.headers["Idempotent-Replayed"] = "true"
    return JobOut.of(job)


@router.get("/jobs", response_model=JobPage, summary="List jobs", responses={401: _ERRORS[401]})
async def list_jobs(
    request: Request,
    service: ServiceDep,
    tenant: CurrentTenant,
    state: Annotated[
        list[JobState] | None, Query(description="Only jobs in these states (repeatable).")
    ] = None,
    cursor: Annotated[str | None, Query(description="`next_cursor` of the previous page.")] = None,
    limit: Annotated[int, Query(ge=1, le=200, description="Jobs per page.")] = 50,
) -> JobPage:
    page = await run_db(
        request, service.list, tenant, [s.value for s in state] if state else None, _cursor(cursor), limit
    )
    return JobPage(items=[JobOut.of(j) for j in page.items], next_cursor=page.next_cursor)


@router.get("/jobs/{job_id}", response_model=JobOut, summary="Get a job", responses=_ERRORS)
async def get_job(job_id: str, request: Request, service: ServiceDep, tenant: CurrentTenant) -> JobOut:
    return JobOut.of(await run_db(request, service.get, tenant, job_id))


@router.post(
    "/jobs/{job_id}/cancel",
    response_model=JobOut,
    summary="Cancel a job",
    responses={**_ERRORS, 409: {"model": ErrorBody, "description": "The job is already finished."}},
)
def cancel_job(job_id: str, service: ServiceDep, tenant: CurrentTenant) -> JobOut:
    return JobOut.of(service.cancel(tenant, job_id))


@router.get(
    "/jobs/{job_id}/attempts",
    response_model=AttemptList,
    summary="Ray submissions of a job",
    responses=_ERRORS,
)
async def job_attempts(
    job_id: str, request: Request, service: ServiceDep, tenant: CurrentTenant
) -> AttemptList:
    return AttemptList(
        items=[AttemptOut.of(a) for a in await run_db(request, service.attempts, tenant, job_id)]
    )


@router.get(
    "/jobs/{job_id}/metrics", response_model=MetricPage, summary="Metric series of a job", responses=_ERRORS
)
async def job_metrics(
    job_id: str,
    request: Request,
    service: ServiceDep,
    tenant: CurrentTenant,
    kind: Annotated[list[str] | None, Query(description="Only these kinds: train, eval, event.")] = None,
    cursor: Annotated[str | None, Query(description="`next_cursor` of the previous page.")] = None,
    limit: Annotated[int, Query(ge=1, le=10_000, description="Records per page.")] = 1000,
) -> MetricPage:
    after = -1
    if cursor is not None:
        if not cursor.isdigit():
            raise BadRequest("cursor: not a cursor this API returned")
        after = int(cursor)
    page = await run_db(request, service.metrics, tenant, job_id, after, kind, limit)
    return MetricPage(items=[MetricRecord.of(m) for m in page.items], next_cursor=page.next_cursor)


@router.get(
    "/jobs/{job_id}/events",
    summary="Follow a job (server-sent events)",
    response_class=EventSourceResponse,
    responses={
        200: {
            "content": {"text/event-stream": {}},
            "description": "Events `state` and `metric`; `id` is the per-job sequence number. The "
            "stream ends after the job's final state.",
        },
        **_ERRORS,
    },
)
async def job_events_stream(
    job_id: str,
    request: Request,
    service: ServiceDep,
    tenant: CurrentTenant,
    after: Annotated[int | None, Query(ge=0, description="Resume after this event id.")] = None,
    last_event_id: Annotated[
        str | None, Header(alias="Last-Event-ID", description="Resume after this event id (EventSource).")
    ] = None,
):
    await run_db(request, service.get, tenant, job_id)
    start = after or 0
    if last_event_id is not None:
        if not last_event_id.strip().isdigit():
            raise BadRequest("Last-Event-ID: must be an event id this stream sent")
        start = max(start, int(last_event_id))
    stream = job_events(service.store, request.app.state.notifier, job_id, start)
    return EventSourceResponse(stream, ping=15, headers={"Cache-Control": "no-store"})


@router.get(
    "/jobs/{job_id}/logs",
    summary="The driver's log",
    response_class=PlainTextResponse,
    responses={200: {"content": {"text/plain": {}}}, **_ERRORS},
)
async def job_logs(
    job_id: str,
    service: ServiceDep,
    tenant: CurrentTenant,
    follow: Annotated[bool, Query(description="Keep streaming until the job is over.")] = False,
):
    if follow:
        await run_in_threadpool(service.get, tenant, job_id)
        gen = service.follow_logs(tenant, job_id)
        return StreamingResponse(gen, media_type="text/plain; charset=utf-8")
    return PlainTextResponse(await run_in_threadpool(service.logs, tenant, job_id))


@router.get(
    "/jobs/{job_id}/artifacts", response_model=ArtifactPage, summary="List artifacts", responses=_ERRORS
)
def list_artifacts(
    job_id: str,
    service: ServiceDep,
    tenant: CurrentTenant,
    prefix: Annotated[str, Query(description="Only names under this folder, e.g. `checkpoints`.")] = "",
    cursor: Annotated[str | None, Query(description="`next_cursor` of the previous page.")] = None,
    limit: Annotated[int, Query(ge=1, le=1000, description="Artifacts per page.")] = 200,
) -> ArtifactPage:
    items, nxt = service.list_artifacts(tenant, job_id, prefix, _cursor(cursor), limit)
    return ArtifactPage(items=[ArtifactOut.of(n, o) for n, o in items], next_cursor=nxt)


@router.get(
    "/jobs/{job_id}/artifacts/{name:path}",
    summary="Download an artifact",
    response_class=StreamingResponse,
    responses={
        200: {"content": {"application/octet-stream": {}}},
        400: {"model": ErrorBody, "description": "A name that is not allowed."},
        **_ERRORS,
    },
)
def get_artifact(job_id: str, name: str, service: ServiceDep, tenant: CurrentTenant):
    check_name(name)
    f = service.artifacts_of(tenant, job_id).open_read(name)
    media = "application/x-ndjson" if name.endswith(".jsonl") else mimetypes.guess_type(name)[0]
    filename = name.rsplit("/", 1)[-1]
    return StreamingResponse(
        iter_file_chunks(f),
        media_type=media or "application/octet-stream",
        headers={"Content-Disposition": f'attachment; filename="{filename}"'},
    )


@router.get("/jobs/{job_id}/report", summary="The job's report.json", responses=_ERRORS)
def job_report(job_id: str, service: ServiceDep, tenant: CurrentTenant) -> dict:
    return service.report(tenant, job_id)


@router.get("/cluster", response_model=ClusterOut, summary="The Ray cluster and the queue", tags=["cluster"])
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
