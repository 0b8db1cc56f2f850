"""Response bodies of the REST API, each field described for the OpenAPI document."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, Field

from service.artifacts import ObjectInfo
from service.jobs import JobState
from service.store.models import Attempt, Job


def _ts(t: float | None) -> datetime | None:
    return datetime.fromtimestamp(t, UTC) if t is not None else None


class ErrorDetail(BaseModel):
    code: str = Field(description="Stable machine-readable error code, e.g. `invalid_spec`.")
    message: str = Field(description="What went wrong, for people.")
    fields: list[dict[str, str]] | None = Field(
        default=None, description="For invalid input: [{field, message}] naming each bad field."
    )
    state: str | None = Field(default=None, description="For `invalid_state`: the job's state now.")


class ErrorBody(BaseModel):
    error: ErrorDetail = Field(description="The error.")


class JobError(BaseModel):
    code: str = Field(description="Why the job failed, machine-readable (e.g. `training_failed`).")
    message: str | None = Field(description="Why the job failed, readable.")


class Progress(BaseModel):
    phase: str | None = Field(
        default=None,
        description="What the driver is doing: preparing, waiting_for_workers, training, exporting, "
        "verifying or done (null before the driver's first record).",
    )
    step: int | None = Field(default=None, description="Last optimizer step reported by the driver.")
    total_steps: int | None = Field(default=None, description="Steps the job runs in total.")
    epoch: float | None = Field(default=None, description="Fractional epoch at `step`.")
    loss: float | None = Field(default=None, description="Last training loss (mean over the log window).")
    lr: float | None = Field(default=None, description="Learning rate at `step`.")
    val_accuracy: float | None = Field(default=None, description="Last validation accuracy.")
    val_loss: float | None = Field(default=None, description="Last validation loss.")
    sparsity: float | None = Field(default=None, description="Current global weight sparsity.")
    target_sparsity: float | None = Field(default=None, description="The pruning schedule's target now.")
    samples_per_second: float | None = Field(default=None, description="Training throughput.")
    attempt: int | None = Field(
        default=None, description="How many times the job's training has started (1 on the first attempt)."
    )


class JobOut(BaseModel):
    id: str = Field(description="Job id: time-sortable; also the Ray submission id of attempt 1.")
    name: str = Field(description="The spec's `name`.")
    tenant: str = Field(description="The tenant owning the job.")
    state: JobState = Field(description="queued, starting, running, succeeded, failed or cancelled.")
    priority: int = Field(description="Higher is admitted first (then older first).")
    reason: str | None = Field(description="Why the job is in its state: what a queued job waits for, ...")
    error: JobError | None = Field(description="Set when the job failed.")
    attempts: int = Field(description="Driver submissions to Ray so far.")
    max_attempts: int = Field(description="Driver submissions allowed (1 + the spec's `retries`).")
    created_at: datetime = Field(description="When the job was submitted (UTC).")
    updated_at: datetime = Field(description="Last change of the record (UTC).")
    started_at: datetime | None = Field(description="When the driver first ran (UTC).")
    finished_at: datetime | None = Field(description="When the job reached a final state (UTC).")
    heartbeat_at: datetime | None = Field(description="Last time Ray confirmed the driver alive (UTC).")
    progress: Progress = Field(description="Latest values reported by the running job.")
    spec: dict[str, Any] = Field(description="The job spec, with every default filled in.")
    sweep_id: str | None = Field(
        default=None, description="The sweep this job is a trial (or the dense baseline) of."
    )

    @classmethod
    def of(cls, job: Job) -> JobOut:
        return cls(
            id=job.id,
            name=job.name,
            tenant=job.tenant_id,
            state=JobState(job.state),
            priority=job.priority,
            reason=job.reason,
            error=JobError(code=job.error_code, message=job.error_message) if job.error_code else None,
            attempts=job.attempts,
            max_attempts=job.max_attempts,
            created_at=_ts(job.created_at),
            updated_at=_ts(job.updated_at),
            started_at=_ts(job.started_at),
            finished_at=_ts(job.finished_at),
            heartbeat_at=_ts(job.heartbeat_at),
            progress=Progress.model_validate(
                {k: v for k, v in (job.progress or {}).items() if k in _PROGRESS}
            ),
            spec=job.spec,
            sweep_id=job.sweep_id,
        )


_PROGRESS = set(Progress.model_fields)


class JobPage(BaseModel):
    items: list[JobOut] = Field(description="Jobs, newest first.")
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page; null on the last page.")


class AttemptOut(BaseModel):
    number: int = Field(description="1 for the first submission to Ray, then 2, 3, ...")
    submission_id: str = Field(description="The Ray Jobs submission id of this attempt.")
    submitted_at: datetime | None = Field(description="When Ray accepted the submission (UTC).")
    started_at: datetime | None = Field(description="When Ray first reported the driver running (UTC).")
    ended_at: datetime | None = Field(description="When the attempt was closed (UTC).")
    outcome: str | None = Field(description="succeeded, failed, lost, stopped or cancelled; null while open.")
    message: str | None = Field(description="Why it ended so.")

    @classmethod
    def of(cls, a: Attempt) -> AttemptOut:
        return cls(
            number=a.number,
            submission_id=a.submission_id,
            submitted_at=_ts(a.submitted_at),
            started_at=_ts(a.started_at),
            ended_at=_ts(a.ended_at),
            outcome=a.outcome,
            message=a.message,
        )


class AttemptList(BaseModel):
    items: list[AttemptOut] = Field(description="Attempts, oldest first.")


class MetricRecord(BaseModel):
    seq: int = Field(description="Line number in the job's metrics.jsonl, from 0; use as `cursor`.")
    kind: str = Field(
        description="train (loss, lr, sparsity), eval (val_accuracy, ...), phase (what the driver "
        "is doing: `phase`, `step`/`total_steps` where known) or event."
    )
    step: int | None = Field(description="Optimizer step of the record, when it has one.")
    data: dict[str, Any] = Field(description="The record as the driver wrote it.")


class MetricPage(BaseModel):
    items: list[MetricRecord] = Field(description="Records in the order the driver wrote them.")
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page; null on the last page.")


class ArtifactOut(BaseModel):
    name: str = Field(
        description="Name inside the job, e.g. `report.json` or `checkpoints/step-00000200/state.pt`."
    )
    size: int = Field(description="Bytes.")

    @classmethod
    def of(cls, name: str, obj: ObjectInfo) -> ArtifactOut:
        return cls(name=name, size=obj.size)


class ArtifactPage(BaseModel):
    items: list[ArtifactOut] = Field(description="Artifacts by name.")
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page; null on the last page.")


class ResourcesOut(BaseModel):
    CPU: float = Field(description="CPUs.")
    GPU: float = Field(description="GPUs.")


class NodeOut(BaseModel):
    node_id: str = Field(description="Ray node id.")
    alive: bool = Field(description="Whether Ray sees the node alive.")
    resources: dict[str, float] = Field(description="The node's total resources as Ray reports them.")


class ClusterOut(BaseModel):
    reachable: bool = Field(description="Whether the Ray cluster answered.")
    error: str | None = Field(description="Why it did not, when it did not.")
    dashboard_url: str | None = Field(description="The Ray dashboard / Jobs API the service uses.")
    nodes: list[NodeOut] = Field(description="Ray nodes.")
    capacity: ResourcesOut = Field(description="Resources of the alive nodes.")
    reserved: ResourcesOut = Field(description="Resources held by slimtrain jobs' open attempts.")
    queue_length: int = Field(description="Queued jobs of all tenants.")
    jobs: dict[str, int] = Field(description="The caller's jobs by state.")


class Health(BaseModel):
    status: str = Field(description="`ok`, or what is not.")
    checks: dict[str, str] = Field(default_factory=dict, description="Each check and its result.")
    leader: bool | None = Field(
        default=None,
        description="(readyz) Whether this process leads: runs the scheduler, reconciler and "
        "metrics ingest for every API process on the database (docs/reliability.md).",
    )
