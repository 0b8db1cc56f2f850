"""The job store's operations. The store is the source of truth: every state change goes through
`transition` (the state machine's `next_state` under a compare-and-set on the row's version), and
every event gets the next per-job sequence number under the job row's lock."""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from service.errors import SlimtrainError
from service.jobs import (
    IdempotencyConflict,
    InvalidTransition,
    JobEvent,
    JobNotFound,
    JobState,
    next_state,
)
from service.limits import Resources
from service.store.db import Database
from service.store.job_rows import EventRows
from service.store.models import Attempt, Event, IdempotencyKey, Job, Metric, Tenant

log = logging.getLogger(__name__)

_CAS_TRIES = 8
# Progress fields a job row keeps from its newest metric records (for lists, /metrics, the CLI).
_PROGRESS_KEYS = {
    "train": ("step", "epoch", "loss", "lr", "sparsity", "target_sparsity", "samples_per_second"),
    "eval": ("val_accuracy", "val_loss", "val_perplexity"),
    "phase": ("phase", "total_steps"),  # service.records: what the driver is doing
}


@dataclass(frozen=True)
class NewJob:
    job_id: str
    tenant: str
    name: str
    spec: dict[str, Any]
    priority: int
    max_attempts: int
    sweep_id: str | None = None  # a trial of this sweep (service/sweeps)


def add_job_rows(s: Session, new: NewJob, now: float) -> Job:
    """A queued job and its first event, in the caller's transaction (the sweep service creates
    a trial's job in the same transaction as the trial's row)."""
    job = Job(
        id=new.job_id,
        tenant_id=new.tenant,
        name=new.name,
        spec=new.spec,
        state=JobState.QUEUED.value,
        priority=new.priority,
        reason="waiting for the scheduler",
        attempts=0,
        max_attempts=new.max_attempts,
        created_at=now,
        updated_at=now,
        event_seq=1,
        metrics_lines=0,
        progress={},
        version=1,
        sweep_id=new.sweep_id,
    )
    s.add(job)
    s.flush()  # the job row before rows that reference it
    s.add(Event(job_id=job.id, seq=1, type="state", data=_state_event(job), created_at=now))
    return job


@dataclass(frozen=True)
class Page:
    items: list
    next_cursor: str | None

    @classmethod
    def of(cls, rows: list, limit: int, cursor_of: Callable[[Any], str]) -> Page:
        """The page of `limit` items from `limit + 1` rows read: the extra row only says that a
        next page exists, whose cursor names the page's last item."""
        items = rows[:limit]
        return cls(items, cursor_of(items[-1]) if len(rows) > limit and items else None)


class Store:
    def __init__(self, db: Database):
        self.db = db
        self._event_rows = EventRows(db)
        # Called with a job id after a commit that changed its state or added events (SSE wake-up).
        self.listeners: list[Callable[[str], None]] = []

    def _changed(self, job_id: str) -> None:
        for fn in self.listeners:
            try:
                fn(job_id)
            except Exception:  # a listener must never undo or fail a committed change
                log.exception("store listener failed")

    # --- tenants ---------------------------------------------------------------------------------

    def ensure_tenants(self, names: list[str]) -> None:
        with self.db.write() as s:
            have = set(s.scalars(select(Tenant.id).where(Tenant.id.in_(names))))
            for n in sorted(set(names) - have):
                s.add(Tenant(id=n, created_at=time.time()))

    # --- jobs ------------------------------------------------------------------------------------

    def create_job(
        self, new: NewJob, idempotency_key: str | None = None, body_sha256: str | None = None
    ) -> tuple[Job, bool]:
        """Insert a queued job; with an idempotency key, in the same transaction as the key's row,
        so concurrent duplicates create exactly one job. Returns (job, replayed)."""
        job, replayed = self._create_job(new, idempotency_key, body_sha256)
        if not replayed:
            self._changed(job.id)
        return job, replayed

    def _create_job(
        self, new: NewJob, idempotency_key: str | None, body_sha256: str | None
    ) -> tuple[Job, bool]:
        now = time.time()
        try:
            with self.db.write() as s:
                self._ensure_tenant(s, new.tenant, now)
                if idempotency_key is not None:
                    existing = self._replay(s, new.tenant, idempotency_key, body_sha256)
                    if existing is not None:
                        return existing, True
                job = add_job_rows(s, new, now)
                if idempotency_key is not None:
                    s.add(
                        IdempotencyKey(
                            tenant_id=new.tenant,
                            key=idempotency_key,
                            body_sha256=body_sha256,
                            job_id=job.id,
                            created_at=now,
                        )
                    )
                s.flush()
                return job, False
        except IntegrityError:
            if idempotency_key is None:
                raise
            # A concurrent request with the same key committed first: answer with its job.
            with self.db.read() as s:
                existing = self._replay(s, new.tenant, idempotency_key, body_sha256)
            if existing is None:
                raise
            return existing, True

    def _ensure_tenant(self, s: Session, tenant: str, now: float) -> None:
        if s.get(Tenant, tenant) is None:
            s.add(Tenant(id=tenant, created_at=now))
            s.flush()

    def _replay(self, s: Session, tenant: str, key: str, body_sha256: str | None) -> Job | None:
        row = s.get(IdempotencyKey, (tenant, key))
        if row is None:
            return None
        if row.body_sha256 != body_sha256:
            raise IdempotencyConflict(
                "Idempotency-Key: this key was already used with a different request body "
                f"(job {row.job_id}); use a new key for a new job"
            )
        return s.get(Job, row.job_id)

    def get_job(self, job_id: str, tenant: str | None = None) -> Job:
        with self.db.read() as s:
            job = s.get(Job, job_id)
        if job is None or (tenant is not None and job.tenant_id != tenant):
            raise JobNotFound(f"no job {job_id!r}")
        return job

    def list_jobs(
        self, tenant: str, states: list[str] | None = None, cursor: str | None = None, limit: int = 50
    ) -> Page:
        """Newest first. Keyset pagination on (created_at, id): `cursor` names the last job of
        the previous page, so pages neither skip nor repeat jobs while new ones arrive."""
        q = select(Job).where(Job.tenant_id == tenant)
        if states:
            q = q.where(Job.state.in_(states))
        if cursor:
            created, last_id = parse_job_cursor(cursor)
            q = q.where(or_(Job.created_at < created, and_(Job.created_at == created, Job.id < last_id)))
        q = q.order_by(Job.created_at.desc(), Job.id.desc()).limit(limit + 1)
        with self.db.read() as s:
            rows = list(s.scalars(q))
        return Page.of(rows, limit, job_cursor)

    def transition(
        self,
        job_id: str,
        event: JobEvent,
        *,
        reason: str | None = None,
        error: tuple[str, str] | None = None,
        expect: set[JobState] | None = None,
        attempt_outcome: tuple[str, str | None] | None = None,
    ) -> Job:
        """Apply `event` to the job: next_state decides, a compare-and-set on `version` applies.
        `expect` refuses (InvalidTransition) when the job has meanwhile left those states.
        `attempt_outcome` closes the job's open attempts in the same transaction."""
        job = self._transition(job_id, event, reason, error, expect, attempt_outcome)
        self._changed(job_id)
        return job

    def _transition(self, job_id, event, reason, error, expect, attempt_outcome) -> Job:
        for _ in range(_CAS_TRIES):
            now = time.time()
            with self.db.write() as s:
                job = s.get(Job, job_id)
                if job is None:
                    raise JobNotFound(f"no job {job_id!r}")
                current = JobState(job.state)
                if expect is not None and current not in expect:
                    raise InvalidTransition(f"job {job_id} is {current}, not {_names(expect)}", current)
                new = next_state(current, event)
                values: dict[str, Any] = {
                    "state": new.value,
                    "version": job.version + 1,
                    "updated_at": now,
                    "reason": reason,
                    "event_seq": Job.event_seq + 1,
                }
                if new is JobState.RUNNING and job.started_at is None:
                    values["started_at"] = now
                if new.terminal:
                    values["finished_at"] = now
                if error is not None:
                    values["error_code"], values["error_message"] = error
                res = s.execute(
                    update(Job)
                    .where(Job.id == job_id, Job.version == job.version)
                    .values(**values)
                    .returning(Job.event_seq)
                )
                seq = res.scalar_one_or_none()
                if seq is None:
                    continue  # lost a race; decide again against the state that won
                if attempt_outcome is not None:
                    self._close_open_attempts(s, job_id, *attempt_outcome, now=now)
                s.refresh(job)
                s.add(
                    Event(
                        job_id=job_id, seq=seq, type="state", data=_state_event(job, current), created_at=now
                    )
                )
                return job
        raise InvalidTransition(f"job {job_id}: too much contention to apply {event}")

    def set_reason(self, job_id: str, reason: str, state: JobState = JobState.QUEUED) -> bool:
        """Update a waiting job's visible reason; no version bump (not a state change)."""
        with self.db.write() as s:
            res = s.execute(
                update(Job)
                .where(
                    Job.id == job_id,
                    Job.state == state.value,
                    or_(Job.reason.is_(None), Job.reason != reason),
                )
                .values(reason=reason, updated_at=time.time())
            )
            return res.rowcount > 0

    def set_reasons(self, reasons: dict[str, str]) -> int:
        """`set_reason` for many queued jobs in one transaction (a deep queue's reasons change
        together when the job they wait behind changes); returns how many changed."""
        now, changed = time.time(), 0
        with self.db.write() as s:
            for job_id, reason in reasons.items():
                res = s.execute(
                    update(Job)
                    .where(
                        Job.id == job_id,
                        Job.state == JobState.QUEUED.value,
                        or_(Job.reason.is_(None), Job.reason != reason),
                    )
                    .values(reason=reason, updated_at=now)
                )
                changed += res.rowcount
        return changed

    def heartbeat(self, job_id: str, now: float | None = None) -> None:
        with self.db.write() as s:
            s.execute(update(Job).where(Job.id == job_id).values(heartbeat_at=now or time.time()))

    def queued_jobs(
        self, limit: int | None = None, offset: int = 0, created_after: float | None = None
    ) -> list[Job]:
        """In admission order: priority (higher first), then age. `limit`/`offset`: a slice of
        that order (the scheduler reads the head of a deep queue, not all of it);
        `created_after`: only jobs queued since then."""
        q = select(Job).where(Job.state == JobState.QUEUED.value)
        if created_after is not None:
            q = q.where(Job.created_at > created_after)
        q = q.order_by(Job.priority.desc(), Job.created_at.asc(), Job.id.asc()).offset(offset).limit(limit)
        with self.db.read() as s:
            return list(s.scalars(q))

    def queue_signature(self) -> tuple[int, float | None]:
        """(queued jobs, newest created_at among them), from the state index alone: what tells
        the scheduler that the queue changed without reading its rows."""
        with self.db.read() as s:
            n, newest = s.execute(
                select(func.count(), func.max(Job.created_at)).where(Job.state == JobState.QUEUED.value)
            ).one()
        return int(n), newest

    def live_jobs(self) -> list[tuple[Job, Attempt | None]]:
        """Jobs in starting/running, each with its newest attempt."""
        with self.db.read() as s:
            jobs = list(
                s.scalars(select(Job).where(Job.state.in_([JobState.STARTING.value, JobState.RUNNING.value])))
            )
            out = []
            for job in jobs:
                att = s.scalars(
                    select(Attempt).where(Attempt.job_id == job.id).order_by(Attempt.number.desc()).limit(1)
                ).first()
                out.append((job, att))
            return out

    def ingesting_jobs(self) -> list[Job]:
        """Jobs whose metrics may still grow: live ones and those with an open attempt."""
        with self.db.read() as s:
            open_ids = select(Attempt.job_id).where(Attempt.outcome.is_(None))
            return list(
                s.scalars(
                    select(Job).where(
                        or_(
                            Job.state.in_([JobState.STARTING.value, JobState.RUNNING.value]),
                            Job.id.in_(open_ids),
                        )
                    )
                )
            )

    def counts_by_state(self, tenant: str | None = None) -> dict[str, int]:
        q = select(Job.state, func.count()).group_by(Job.state)
        if tenant is not None:
            q = q.where(Job.tenant_id == tenant)
        with self.db.read() as s:
            counts = dict(s.execute(q).all())
        return {st.value: int(counts.get(st.value, 0)) for st in JobState}

    def running_progress(self) -> list[tuple[str, str, dict]]:
        """(job id, tenant, progress) of running jobs, for Prometheus."""
        with self.db.read() as s:
            rows = s.execute(
                select(Job.id, Job.tenant_id, Job.progress).where(Job.state == JobState.RUNNING.value)
            ).all()
        return [(r[0], r[1], r[2] or {}) for r in rows]

    # --- attempts --------------------------------------------------------------------------------

    def admit(
        self,
        job: Job,
        submission_id: str,
        need: Resources,
        fence: Callable[[Session], bool] | None = None,
    ) -> tuple[Job, Attempt] | None:
        """`fence`: checked first inside the transaction (the leader lease, service/leader.py);
        when it says no, nothing is written and the answer is None."""
        out = self._admit(job, submission_id, need, fence)
        if out is not None:
            self._changed(job.id)
        return out

    def _admit(self, job: Job, submission_id: str, need: Resources, fence) -> tuple[Job, Attempt] | None:
        """queued -> starting with a new attempt row, if nobody changed the job since `job` was
        read (None otherwise). The caller submits to Ray after this commits, so a crash in
        between leaves a `starting` job whose submission Ray does not know: the reconciler
        submits it then."""
        now = time.time()
        new = next_state(job.state, JobEvent.ADMIT)
        with self.db.write() as s:
            if fence is not None and not fence(s):
                return None
            res = s.execute(
                update(Job)
                .where(Job.id == job.id, Job.version == job.version)
                .values(
                    state=new.value,
                    version=job.version + 1,
                    updated_at=now,
                    reason=f"submitted to Ray as {submission_id}",
                    attempts=Job.attempts + 1,
                    heartbeat_at=now,
                    event_seq=Job.event_seq + 1,
                )
                .returning(Job.event_seq, Job.attempts)
            )
            row = res.one_or_none()
            if row is None:
                return None
            seq, number = row
            att = Attempt(
                job_id=job.id,
                number=number,
                submission_id=submission_id,
                cpu=need.cpu,
                gpu=need.gpu,
                created_at=now,
            )
            s.add(att)
            fresh = s.get(Job, job.id)
            s.refresh(fresh)
            s.add(
                Event(
                    job_id=job.id,
                    seq=seq,
                    type="state",
                    data=_state_event(fresh, JobState(job.state)),
                    created_at=now,
                )
            )
            s.flush()
            return fresh, att

    def attempt_submitted(self, attempt_id: int) -> None:
        """Record when Ray accepted the attempt (the first time it is known to have)."""
        with self.db.write() as s:
            s.execute(
                update(Attempt)
                .where(Attempt.id == attempt_id, Attempt.submitted_at.is_(None))
                .values(submitted_at=time.time())
            )

    def attempt_started(self, attempt_id: int) -> None:
        with self.db.write() as s:
            s.execute(
                update(Attempt)
                .where(Attempt.id == attempt_id, Attempt.started_at.is_(None))
                .values(started_at=time.time())
            )

    def close_attempt(self, attempt_id: int, outcome: str, message: str | None = None) -> None:
        with self.db.write() as s:
            s.execute(
                update(Attempt)
                .where(Attempt.id == attempt_id, Attempt.outcome.is_(None))
                .values(outcome=outcome, message=message, ended_at=time.time())
            )

    def _close_open_attempts(self, s: Session, job_id: str, outcome: str, message: str | None, now: float):
        s.execute(
            update(Attempt)
            .where(Attempt.job_id == job_id, Attempt.outcome.is_(None))
            .values(outcome=outcome, message=message, ended_at=now)
        )

    def attempts_of(self, job_id: str) -> list[Attempt]:
        with self.db.read() as s:
            return list(s.scalars(select(Attempt).where(Attempt.job_id == job_id).order_by(Attempt.number)))

    def open_attempts_of_finished_jobs(self) -> list[tuple[Job, Attempt]]:
        """Ray jobs that may still run although their job is over (cancelled, or failed by the
        reconciler): they must be stopped and closed."""
        terminal = [s.value for s in JobState if s.terminal]
        with self.db.read() as s:
            rows = s.execute(
                select(Job, Attempt)
                .join(Attempt, Attempt.job_id == Job.id)
                .where(and_(Attempt.outcome.is_(None), Job.state.in_(terminal)))
            ).all()
        return [(r[0], r[1]) for r in rows]

    def reserved(self) -> Resources:
        """What open attempts hold: admission never counts on resources promised to them."""
        with self.db.read() as s:
            cpu, gpu = s.execute(
                select(
                    func.coalesce(func.sum(Attempt.cpu), 0.0), func.coalesce(func.sum(Attempt.gpu), 0.0)
                ).where(Attempt.outcome.is_(None))
            ).one()
        return Resources(float(cpu), float(gpu))

    # --- metrics and events ----------------------------------------------------------------------

    def ingest(self, job_id: str, first_line: int, records: list[dict]) -> bool:
        done = self._ingest(job_id, first_line, records)
        if done:
            self._changed(job_id)
        return done

    def _ingest(self, job_id: str, first_line: int, records: list[dict]) -> bool:
        """Store metric records read from lines [first_line, first_line + n) of metrics.jsonl,
        exactly once: the update is conditional on `metrics_lines == first_line`."""
        if not records:
            return False
        records = [json_finite(rec) for rec in records]
        now = time.time()
        n = len(records)
        with self.db.write() as s:
            job = s.get(Job, job_id)
            if job is None or job.metrics_lines != first_line:
                return False
            progress = dict(job.progress or {})
            for rec in records:
                _update_progress(progress, rec)
            res = s.execute(
                update(Job)
                .where(Job.id == job_id, Job.metrics_lines == first_line)
                .values(
                    metrics_lines=first_line + n,
                    event_seq=Job.event_seq + n,
                    progress=progress,
                    heartbeat_at=now,
                )
                .returning(Job.event_seq)
            )
            last = res.scalar_one_or_none()
            if last is None:
                return False
            for i, rec in enumerate(records):
                kind = str(rec.get("kind") or "event")[:16]
                step = rec.get("step") if isinstance(rec.get("step"), int) else None
                s.add(Metric(job_id=job_id, seq=first_line + i, kind=kind, step=step, data=rec))
                s.add(
                    Event(
                        job_id=job_id,
                        seq=last - n + 1 + i,
                        type="metric",
                        data={**rec, "seq": first_line + i},
                        created_at=now,
                    )
                )
            return True

    def metrics(
        self, job_id: str, after: int = -1, kinds: list[str] | None = None, limit: int = 1000
    ) -> Page:
        q = select(Metric).where(Metric.job_id == job_id, Metric.seq > after)
        if kinds:
            q = q.where(Metric.kind.in_(kinds))
        q = q.order_by(Metric.seq).limit(limit + 1)
        with self.db.read() as s:
            rows = list(s.scalars(q))
        return Page.of(rows, limit, lambda m: str(m.seq))

    def event_texts(self, job_id: str, after: int, limit: int = 500) -> list[tuple[int, str, str]]:
        """(seq, type, data as its stored JSON text) of the events after `after`: what the SSE
        streams send (api/sse.py), read as the API's other reads are (job_rows.EventRows)."""
        return self._event_rows.after(job_id, after, limit)


def json_finite(value: Any) -> Any:
    """`value` with every NaN and infinity in it replaced by None. JSON has no such numbers:
    PostgreSQL's json type refuses a batch holding one, so a diverged job's records (its loss is
    NaN) stopped there, and the ingest tick failed on it every time, before the jobs after it;
    and a browser's JSON.parse fails on the `NaN` Python writes, which SQLite kept as text. The
    API's JSON already rendered them as null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [json_finite(v) for v in value]
    return value


class BadCursor(SlimtrainError):
    code = "invalid_cursor"


def job_cursor(job: Job) -> str:
    return f"{job.created_at!r}_{job.id}"


def parse_job_cursor(cursor: str) -> tuple[float, str]:
    created, sep, job_id = cursor.partition("_")
    try:
        if not sep or not job_id:
            raise ValueError
        return float(created), job_id
    except ValueError:
        raise BadCursor("cursor: not a cursor this API returned") from None


def _names(states: set[JobState]) -> str:
    return " or ".join(sorted(s.value for s in states))


def _state_event(job: Job, previous: JobState | None = None) -> dict:
    data = {"state": job.state, "reason": job.reason, "attempts": job.attempts}
    if previous is not None:
        data["previous"] = previous.value
    if job.error_code:
        data["error"] = {"code": job.error_code, "message": job.error_message}
    return data


def _update_progress(progress: dict, rec: dict) -> None:
    kind = rec.get("kind")
    for key in _PROGRESS_KEYS.get(kind, ()):
        if key in rec and _is_json_scalar(rec[key]):
            progress[key] = rec[key]
    if rec.get("event") == "start":
        progress["total_steps"] = rec.get("total_steps")
        progress["step"] = rec.get("step")
        progress["attempt"] = rec.get("attempt")
    if isinstance(rec.get("step"), int):
        progress["step"] = rec["step"]  # records arrive in order; a resume may go back


def _is_json_scalar(v: Any) -> bool:
    try:
        json.dumps(v)
    except (TypeError, ValueError):
        return False
    return not isinstance(v, (dict, list))
