"""`/v1/sweeps`: many trials of one base spec, each a normal job; their Pareto front. Thin: the
service layer (service/sweeps) validates, stores and advances sweeps."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Query, Request, Response
from pydantic import BaseModel, Field

from api.deps import CurrentTenant, ServiceDep, run_db
from api.errors import documented
from api.openapi import SWEEP_LINKS
from api.routes.jobs import read_body, spec_format, yaml_as_json
from service.artifacts import JOB_ID_RE
from service.store.models import Sweep
from service.sweeps.service import SweepNotFound, SweepView

router = APIRouter(prefix="/v1", tags=["sweeps"])


async def _sweep_id(
    sweep_id: Annotated[
        str,
        Path(
            description="The sweep's id (`POST /v1/sweeps` answers it).",
            json_schema_extra={"pattern": JOB_ID_RE.pattern},
        ),
    ],
    _tenant: CurrentTenant,  # authenticate first: a caller without a token learns nothing
) -> str:
    # Sweep ids are `sweep-<job id>`: an id no sweep can have is simply not found, as a job's is
    # (not a 422 the routes do not document), and never reaches the database (PostgreSQL refuses
    # NUL characters with an error of its own).
    if not JOB_ID_RE.fullmatch(sweep_id):
        raise SweepNotFound(f"no sweep {sweep_id!r}")
    return sweep_id


SweepId = Annotated[str, Depends(_sweep_id)]


def _ts(t: float | None) -> datetime | None:
    return datetime.fromtimestamp(t, UTC) if t is not None else None


class SweepCreated(BaseModel):
    id: str = Field(description="The sweep's id.")
    state: str = Field(description="running, succeeded, failed or cancelled.")


class SweepSummary(BaseModel):
    id: str = Field(description="The sweep's id.")
    name: str = Field(description="The request's `name`; trials are named `<name>-t000`, ...")
    state: str = Field(
        description="running, succeeded (every trial over, one at least succeeded), failed, cancelled."
    )
    method: str = Field(description="grid, random or tpe.")
    total_trials: int = Field(description="Trials the sweep runs in all.")
    reason: str | None = Field(description="What a running sweep is doing.")
    baseline_job: str | None = Field(
        description="The dense baseline's job id (every trial's compression.baseline_job)."
    )
    created_at: datetime = Field(description="When it was submitted (UTC).")
    finished_at: datetime | None = Field(description="When it ended (UTC).")

    @classmethod
    def of(cls, s: Sweep) -> SweepSummary:
        return cls(
            id=s.id,
            name=s.name,
            state=s.state,
            method=s.request.get("method", "grid"),
            total_trials=s.total_trials,
            reason=s.reason,
            baseline_job=s.baseline_job_id,
            created_at=_ts(s.created_at),
            finished_at=_ts(s.finished_at),
        )


class TrialOut(BaseModel):
    index: int = Field(description="0, 1, ... in the order trials were created.")
    job_id: str | None = Field(description="The trial's job (null when its spec was refused: see error).")
    params: dict[str, Any] = Field(description="Dotted spec path -> value of this trial.")
    state: str = Field(description="The job's state.")
    accuracy: float | None = Field(description="report.json `accuracy` (of the exported artifact).")
    size_ratio: float | None = Field(description="report.json `size.ratio`.")
    latency_ms: float | None = Field(description="report.json `latency_ms.compressed`.")
    values: dict[str, float | None] = Field(description="Every metric a sweep can optimise, from the report.")
    error: str | None = Field(description="Why the trial has no result, when it has none.")


class SweepOut(SweepSummary):
    objective: list[dict[str, str]] = Field(description="[{metric, direction}] the front is over.")
    max_concurrent: int = Field(description="Trials queued or running at once.")
    baseline_state: str | None = Field(description="The dense baseline job's state.")
    baseline_accuracy: float | None = Field(description="The dense baseline's accuracy, once measured.")
    trials: list[TrialOut] = Field(description="Trials created so far.")
    pareto: list[str] = Field(description="Job ids of the succeeded trials no other trial dominates.")
    best: str | None = Field(
        description="With `max_accuracy_drop`: the job id of the trial to pick (see the parameter)."
    )
    reference_accuracy: float | None = Field(
        description="What `max_accuracy_drop` counts from: the baseline's accuracy, or without one "
        "the most accurate trial's."
    )

    @classmethod
    def of_view(cls, v: SweepView) -> SweepOut:
        base = SweepSummary.of(v.sweep).model_dump()
        return cls(
            **base,
            objective=[o.model_dump() for o in v.request.objective],
            max_concurrent=v.request.max_concurrent,
            baseline_state=v.baseline_state,
            baseline_accuracy=v.baseline_accuracy,
            trials=[
                TrialOut(
                    index=t.index,
                    job_id=t.job_id,
                    params=t.params,
                    state=t.state,
                    accuracy=t.values.get("accuracy"),
                    size_ratio=t.values.get("size.ratio"),
                    latency_ms=t.values.get("latency_ms.compressed"),
                    values=t.values,
                    error=t.error,
                )
                for t in v.trials
            ],
            pareto=v.pareto,
            best=v.best,
            reference_accuracy=v.reference_accuracy,
        )


class SweepList(BaseModel):
    items: list[SweepSummary] = Field(description="Sweeps, newest first (at most 100).")


_BODY = {"schema": {"$ref": "#/components/schemas/SweepRequest"}}


@router.post(
    "/sweeps",
    status_code=201,
    response_model=SweepCreated,
    summary="Submit a sweep",
    operation_id="submit_sweep",
    openapi_extra={
        "requestBody": {
            "required": True,
            "description": "The sweep request, as JSON or YAML: `base` is a job spec; each grid or "
            "random path is a dotted path into it.",
            "content": {"application/json": _BODY, "application/yaml": _BODY},
        }
    },
    responses={
        201: {
            "description": "The sweep, created; its trials are created as it runs.",
            "headers": {
                "Location": {
                    "description": "The sweep's URL.",
                    "required": True,
                    "schema": {"type": "string"},
                }
            },
            "links": SWEEP_LINKS,
        },
        **documented(
            401,
            413,
            415,
            422,
            s422="Invalid request: the bad path or value named, or above the trial limit.",
        ),
    },
)
async def submit_sweep(
    request: Request, response: Response, service: ServiceDep, tenant: CurrentTenant
) -> SweepCreated:
    fmt = spec_format(request.headers.get("content-type"))
    body = await read_body(request, service.settings.max_body_bytes)
    if fmt == "yaml":
        body = yaml_as_json(body)
    sweep = await run_db(request, service.sweeps.submit, tenant, body)
    response.headers["Location"] = f"/v1/sweeps/{sweep.id}"
    return SweepCreated(id=sweep.id, state=sweep.state)


@router.get(
    "/sweeps",
    response_model=SweepList,
    summary="List sweeps",
    operation_id="list_sweeps",
    responses=documented(401),
)
async def list_sweeps(request: Request, service: ServiceDep, tenant: CurrentTenant) -> SweepList:
    return SweepList(items=[SweepSummary.of(s) for s in await run_db(request, service.sweeps.list, tenant)])


@router.get(
    "/sweeps/{sweep_id}",
    response_model=SweepOut,
    summary="Get a sweep: its trials, Pareto front and best trial",
    operation_id="get_sweep",
    responses=documented(401, 404, 422, s404="No such sweep for this tenant."),
)
async def get_sweep(
    sweep_id: SweepId,
    request: Request,
    service: ServiceDep,
    tenant: CurrentTenant,
    max_accuracy_drop: Annotated[
        float,
        Query(
            ge=0,
            le=100,
            description="Percentage points of accuracy the pick may lose against the dense "
            "baseline; `best` is then the qualifying trial best on the other objectives.",
        ),
    ] = None,
) -> SweepOut:
    view = await run_db(request, service.sweeps.get, tenant, sweep_id, max_accuracy_drop)
    return SweepOut.of_view(view)


@router.post(
    "/sweeps/{sweep_id}/cancel",
    response_model=SweepCreated,
    summary="Cancel a sweep and its queued and running trials",
    operation_id="cancel_sweep",
    responses=documented(401, 404, 409, s404="No such sweep for this tenant.", s409="The sweep is over."),
)
async def cancel_sweep(
    sweep_id: SweepId, request: Request, service: ServiceDep, tenant: CurrentTenant
) -> SweepCreated:
    sweep = await run_db(request, service.sweeps.cancel, tenant, sweep_id)
    return SweepCreated(id=sweep.id, state=sweep.state)
