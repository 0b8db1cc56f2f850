"""Tables of the job store. Timestamps are float epoch seconds: one portable type on SQLite and
PostgreSQL, with no naive/aware datetime mix-ups; the API renders them as ISO 8601."""

from __future__ import annotations

from typing import Any

from sqlalchemy import (
    JSON,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


class Tenant(Base):
    __tablename__ = "tenants"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    created_at: Mapped[float] = mapped_column(Float)


class Job(Base):
    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(128), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"))
    name: Mapped[str] = mapped_column(String(128))
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    state: Mapped[str] = mapped_column(String(16))
    priority: Mapped[int] = mapped_column(Integer, default=0)
    reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    error_code: Mapped[str | None] = mapped_column(String(64), nullable=True)
    error_message: Mapped[str | None] = mapped_column(Text, nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[float] = mapped_column(Float)
    updated_at: Mapped[float] = mapped_column(Float)
    started_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    finished_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    heartbeat_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    # Last event sequence number given out; events of one job are numbered 1, 2, ... under
    # this row's lock, so a reader resuming after N never skips an event committed later.
    event_seq: Mapped[int] = mapped_column(Integer, default=0)
    # Lines of <job>/metrics.jsonl already ingested.
    metrics_lines: Mapped[int] = mapped_column(Integer, default=0)
    progress: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    # Optimistic concurrency: every state change is `UPDATE ... WHERE version = :seen`.
    version: Mapped[int] = mapped_column(Integer, default=1)
    # The sweep this job is a trial (or the dense baseline) of; NULL for a job submitted alone.
    sweep_id: Mapped[str | None] = mapped_column(String(128), nullable=True, default=None)

    __table_args__ = (
        Index("ix_jobs_state_priority", "state", "priority", "created_at"),
        Index("ix_jobs_tenant_created", "tenant_id", "created_at", "id"),
        Index("ix_jobs_sweep", "sweep_id"),
    )


class Attempt(Base):
    """One Ray submission of a job. Open (outcome NULL) until Ray reports it over, so a cancelled
    job's Ray job is stopped even when Ray was unreachable at the moment of the cancel."""

    __tablename__ = "attempts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"))
    number: Mapped[int] = mapped_column(Integer)
    submission_id: Mapped[str] = mapped_column(String(160), unique=True)
    cpu: Mapped[float] = mapped_column(Float, default=0.0)
    gpu: Mapped[float] = mapped_column(Float, default=0.0)
    created_at: Mapped[float] = mapped_column(Float)
    submitted_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    started_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    ended_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    outcome: Mapped[str | None] = mapped_column(String(16), nullable=True)
    message: Mapped[str | None] = mapped_column(Text, nullable=True)

    __table_args__ = (
        UniqueConstraint("job_id", "number", name="uq_attempts_job_number"),
        Index("ix_attempts_open", "outcome"),
    )


class Metric(Base):
    """One record of the driver's metrics.jsonl (train/eval/event), numbered by its line."""

    __tablename__ = "metrics"

    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"), primary_key=True)
    seq: Mapped[int] = mapped_column(Integer, primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))
    step: Mapped[int | None] = mapped_column(Integer, nullable=True)
    data: Mapped[dict[str, Any]] = mapped_column(JSON)


class Event(Base):
    """What the SSE stream replays: state changes and metric records, numbered per job."""

    __tablename__ = "events"

    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"), primary_key=True)
    seq: Mapped[int] = mapped_column(Integer, primary_key=True)
    type: Mapped[str] = mapped_column(String(16))
    data: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[float] = mapped_column(Float)


class IdempotencyKey(Base):
    __tablename__ = "idempotency_keys"

    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), primary_key=True)
    key: Mapped[str] = mapped_column(String(255), primary_key=True)
    body_sha256: Mapped[str] = mapped_column(String(64))
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"))
    created_at: Mapped[float] = mapped_column(Float)


class Sweep(Base):
    """A search over one base spec (service/sweeps). Its progress is derived from its trials'
    rows and their jobs, never kept in memory, so a restarted API carries on where it stopped."""

    __tablename__ = "sweeps"

    id: Mapped[str] = mapped_column(String(128), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"))
    name: Mapped[str] = mapped_column(String(128))
    request: Mapped[dict[str, Any]] = mapped_column(JSON)  # the validated SweepRequest
    state: Mapped[str] = mapped_column(String(16))
    priority: Mapped[int] = mapped_column(Integer, default=0)
    total_trials: Mapped[int] = mapped_column(Integer)
    baseline_job_id: Mapped[str | None] = mapped_column(String(128), nullable=True)
    # The baseline's measured values once its job ended (as SweepTrial.result); NULL before.
    baseline_result: Mapped[dict[str, Any] | None] = mapped_column(JSON(none_as_null=True), nullable=True)
    reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[float] = mapped_column(Float)
    updated_at: Mapped[float] = mapped_column(Float)
    finished_at: Mapped[float | None] = mapped_column(Float, nullable=True)

    __table_args__ = (
        Index("ix_sweeps_tenant_created", "tenant_id", "created_at", "id"),
        Index("ix_sweeps_state", "state"),
    )


class SweepTrial(Base):
    """Trial `trial_index` of a sweep. Inserted in the same transaction as its job, and the
    primary key (sweep_id, trial_index) refuses a second row for the same index: a trial is
    created once even when two processes advance the sweep or one dies half-way."""

    __tablename__ = "sweep_trials"

    sweep_id: Mapped[str] = mapped_column(ForeignKey("sweeps.id"), primary_key=True)
    trial_index: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[str | None] = mapped_column(String(128), nullable=True)
    params: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[float] = mapped_column(Float)
    # The measured values (service.sweeps.plan.METRICS) once its job ended; SQL NULL before
    # (none_as_null: not JSON 'null', so `IS NULL` finds the trials still to record).
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON(none_as_null=True), nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
