"""Sweeps, with the I/O: submit, read, cancel, and `tick`, which the service's background loop
runs to advance every running sweep.

Crash safety comes from keeping nothing in memory. A trial's row and its job are inserted in one
transaction, under the primary key (sweep_id, trial_index): after a kill -9 a trial either exists
with its job (which the scheduler and reconciler carry on like any job) or does not exist and is
created by the next tick; a second process advancing the same sweep hits the key and creates
nothing. What to do next is `next_step`, a pure function of the rows."""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError

from service.artifacts import JobArtifacts
from service.errors import SlimtrainError, SpecError
from service.ids import new_job_id
from service.jobs import InvalidTransition, JobState, RetryPolicy
from service.store.models import Job, Sweep, SweepTrial, Tenant
from service.store.repo import NewJob, add_job_rows
from service.sweeps import search
from service.sweeps.front import best_under_drop, metric_of, pareto_front
from service.sweeps.plan import (
    METRICS,
    SweepRequest,
    baseline_spec,
    check_request,
    parse_request,
    planned_params,
    trial_spec,
)
from service.sweeps.stopping import median_stop, trained

if TYPE_CHECKING:
    from service.job_service import JobService

log = logging.getLogger(__name__)

RUNNING, SUCCEEDED, FAILED, CANCELLED = "running", "succeeded", "failed", "cancelled"
PRUNED = "pruned"  # a trial stopped early by the sweep (its job is cancelled)
SWEEP_STATES = (RUNNING, SUCCEEDED, FAILED, CANCELLED)
_TERMINAL_JOB = {s.value for s in JobState if s.terminal}


class SweepNotFound(SlimtrainError):
    """No such sweep for this tenant (another tenant's sweep is reported the same way)."""

    code = "sweep_not_found"


# --- the decision ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    create: int  # trials to create now
    state: str | None = None  # the sweep's new state, when it changes


def next_step(
    state: str, total: int, max_concurrent: int, baseline: str | None, trials: Sequence[tuple[str, bool]]
) -> Step:
    """What a sweep does next. `baseline`: its job's state (None without one); `trials`: each
    created trial's (job state, result recorded). Trials wait for the baseline to end (their
    reports compare against its report); a failed baseline does not stop them."""
    if state != RUNNING:
        return Step(0)
    if baseline is not None and baseline not in _TERMINAL_JOB:
        return Step(0)
    live = sum(1 for s, _ in trials if s not in _TERMINAL_JOB)
    create = max(0, min(max_concurrent - live, total - len(trials)))
    if create == 0 and len(trials) >= total and live == 0 and all(rec for _, rec in trials):
        return Step(0, SUCCEEDED if any(s == JobState.SUCCEEDED for s, _ in trials) else FAILED)
    return Step(create)


def _while_running(s, sweep_id: str, **values) -> int:
    """Update the sweep only while it is running; the rows changed (0: it has ended). The update
    also locks the sweep's row until the transaction ends (PostgreSQL; SQLite locks the whole
    database), so a cancel racing with it either waits for it or is seen by it."""
    return s.execute(
        update(Sweep).where(Sweep.id == sweep_id, Sweep.state == RUNNING).values(**values)
    ).rowcount


# --- views -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrialView:
    index: int
    job_id: str | None
    params: dict[str, Any]
    state: str
    values: dict[str, float | None]
    error: str | None


@dataclass(frozen=True)
class SweepView:
    sweep: Sweep
    request: SweepRequest
    trials: list[TrialView]
    baseline_state: str | None
    baseline_accuracy: float | None
    pareto: list[str]
    best: str | None
    reference_accuracy: float | None


def _result(job_state: str, report: dict | None, error: str | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"state": job_state}
    if report is not None:
        out["values"] = {m: metric_of(report, m) for m in METRICS}
    if error:
        out["error"] = error
    return out


class SweepService:
    def __init__(self, jobs: JobService):
        self.jobs = jobs
        self.db = jobs.store.db

    @property
    def settings(self):
        return self.jobs.settings

    # --- submit ----------------------------------------------------------------------------------

    def submit(self, tenant: str, body: bytes) -> Sweep:
        try:
            data = json.loads(body)
        except (ValueError, RecursionError) as e:
            raise SpecError(
                f"the body is not valid JSON: {e}", [{"field": "(body)", "message": str(e)}]
            ) from None
        req = parse_request(data)
        total = check_request(
            req, lambda spec: self.jobs.validate_spec(tenant, spec), self.settings.max_sweep_trials
        )
        if req.method == "tpe":
            search.check_tpe(req)
        baseline = self.jobs.validate_spec(tenant, baseline_spec(req)) if req.baseline else None
        priority = int(req.base.get("priority", 0) or 0)
        now = time.time()
        sweep_id = "sweep-" + new_job_id()
        with self.db.write() as s:
            if s.get(Tenant, tenant) is None:
                s.add(Tenant(id=tenant, created_at=now))
                s.flush()
            sweep = Sweep(
                id=sweep_id,
                tenant_id=tenant,
                name=req.name,
                request=req.model_dump(mode="json"),
                state=RUNNING,
                priority=priority,
                total_trials=total,
                baseline_job_id=None,
                created_at=now,
                updated_at=now,
            )
            s.add(sweep)
            s.flush()
            if baseline is not None:
                job = add_job_rows(s, self._new_job(tenant, sweep_id, baseline), now)
                sweep.baseline_job_id = job.id
                sweep.reason = "running the dense baseline"
        if baseline is not None:
            self.jobs.store._changed(sweep.baseline_job_id)
        self.jobs._wake("scheduler")
        self.jobs._wake("sweeps")
        return sweep

    def _new_job(self, tenant: str, sweep_id: str, spec) -> NewJob:
        return NewJob(
            job_id=new_job_id(),
            tenant=tenant,
            name=spec.name,
            spec=spec.model_dump(mode="json"),
            priority=spec.priority,
            max_attempts=RetryPolicy.for_retries(spec.retries).max_attempts,
            sweep_id=sweep_id,
        )

    # --- read ------------------------------------------------------------------------------------

    def _sweep(self, sweep_id: str, tenant: str | None = None) -> Sweep:
        with self.db.read() as s:
            sweep = s.get(Sweep, sweep_id)
        if sweep is None or (tenant is not None and sweep.tenant_id != tenant):
            raise SweepNotFound(f"no sweep {sweep_id!r}")
        return sweep

    def list(self, tenant: str, limit: int = 100) -> list[Sweep]:
        q = (
            select(Sweep)
            .where(Sweep.tenant_id == tenant)
            .order_by(Sweep.created_at.desc(), Sweep.id.desc())
            .limit(limit)
        )
        with self.db.read() as s:
            return list(s.scalars(q))

    def _rows(self, sweep_id: str) -> list[tuple[SweepTrial, str | None]]:
        q = (
            select(SweepTrial, Job.state)
            .outerjoin(Job, Job.id == SweepTrial.job_id)
            .where(SweepTrial.sweep_id == sweep_id)
            .order_by(SweepTrial.trial_index)
        )
        with self.db.read() as s:
            return [(t, st) for t, st in s.execute(q)]

    def _job_state(self, job_id: str | None) -> str | None:
        if job_id is None:
            return None
        with self.db.read() as s:
            job = s.get(Job, job_id)
        return job.state if job is not None else JobState.FAILED.value

    def get(self, tenant: str, sweep_id: str, max_accuracy_drop: float | None = None) -> SweepView:
        sweep = self._sweep(sweep_id, tenant)
        req = SweepRequest.model_validate(sweep.request)
        trials = []
        for t, job_state in self._rows(sweep_id):
            res = t.result or {}
            values = res.get("values") or {}
            trials.append(
                TrialView(
                    index=t.trial_index,
                    job_id=t.job_id,
                    params=t.params,
                    state=PRUNED
                    if res.get("state") == PRUNED
                    else (job_state or res.get("state") or JobState.FAILED.value),
                    values=values,
                    error=t.error or res.get("error"),
                )
            )
        done = [
            (t.job_id, t.values) for t in trials if t.state == JobState.SUCCEEDED and t.job_id is not None
        ]
        pareto = pareto_front(done, req.objective)
        base_acc = ((sweep.baseline_result or {}).get("values") or {}).get("accuracy")
        reference = base_acc
        if reference is None and done:
            # No baseline measured: the drop is counted from the sweep's most accurate trial.
            accs = [v["accuracy"] for _, v in done if v.get("accuracy") is not None]
            reference = max(accs) if accs else None
        best = (
            best_under_drop(done, req.objective, reference, max_accuracy_drop)
            if max_accuracy_drop is not None
            else None
        )
        return SweepView(
            sweep=sweep,
            request=req,
            trials=trials,
            baseline_state=self._job_state(sweep.baseline_job_id),
            baseline_accuracy=base_acc,
            pareto=pareto,
            best=best,
            reference_accuracy=reference,
        )

    # --- cancel ----------------------------------------------------------------------------------

    def cancel(self, tenant: str, sweep_id: str) -> Sweep:
        """Stop creating trials and cancel the queued and running ones (and the baseline). The
        state is written first: if this process dies before every job is cancelled, `tick`
        cancels the rest."""
        sweep = self._sweep(sweep_id, tenant)
        with self.db.write() as s:
            n = _while_running(
                s,
                sweep_id,
                state=CANCELLED,
                reason="cancelled by the user",
                updated_at=time.time(),
                finished_at=time.time(),
            )
        if n == 0:
            raise InvalidTransition(f"cannot cancel a sweep that is {sweep.state}; it is over", sweep.state)
        self._cancel_live_jobs(sweep_id)
        return self._sweep(sweep_id)

    def _cancel_live_jobs(self, sweep_id: str) -> None:
        with self.db.read() as s:
            live = list(
                s.execute(
                    select(Job.id, Job.tenant_id).where(
                        Job.sweep_id == sweep_id, Job.state.notin_(sorted(_TERMINAL_JOB))
                    )
                )
            )
        for job_id, tenant in live:
            with contextlib.suppress(InvalidTransition):  # it ended meanwhile
                self.jobs.cancel(tenant, job_id)

    # --- advance ---------------------------------------------------------------------------------

    def tick(self) -> None:
        """Advance every running sweep (and finish cancelling cancelled ones); one sweep's
        failure is logged and does not hold up the others."""
        with self.db.read() as s:
            ids = list(s.scalars(select(Sweep.id).where(Sweep.state == RUNNING)))
            cancelled = list(
                s.scalars(
                    select(Sweep.id)
                    .join(Job, Job.sweep_id == Sweep.id)
                    .where(Sweep.state == CANCELLED, Job.state.notin_(sorted(_TERMINAL_JOB)))
                    .distinct()
                )
            )
        for sweep_id in cancelled:
            self._cancel_live_jobs(sweep_id)
        for sweep_id in ids:
            try:
                self.advance(sweep_id)
            except Exception:
                log.exception("sweep %s: advancing failed; the next tick retries", sweep_id)

    def advance(self, sweep_id: str) -> None:
        sweep = self._sweep(sweep_id)
        if sweep.state != RUNNING:
            return
        req = SweepRequest.model_validate(sweep.request)
        baseline_state = self._job_state(sweep.baseline_job_id)
        if baseline_state in _TERMINAL_JOB and sweep.baseline_result is None:
            self._record_baseline(sweep, baseline_state)
        rows = self._rows(sweep_id)
        for t, job_state in rows:
            if t.result is None and job_state in _TERMINAL_JOB:
                self._record(t, job_state)
        if req.early_stopping is not None:
            self._early_stop(req, self._rows(sweep_id))
        rows = self._rows(sweep_id)
        trials = [(st or (t.result or {}).get("state", FAILED), t.result is not None) for t, st in rows]
        step = next_step(sweep.state, sweep.total_trials, req.max_concurrent, baseline_state, trials)
        baseline_for_trials = sweep.baseline_job_id if baseline_state == JobState.SUCCEEDED else None
        created = 0
        for index in range(len(rows), len(rows) + step.create):
            if not self._create_trial(sweep, req, index, rows, baseline_for_trials):
                break  # another process created it, or the sweep was cancelled meanwhile
            created += 1
        if created:
            self.jobs._wake("scheduler")
        if step.state is not None:
            self._finish(sweep_id, step.state)
        else:
            waiting = baseline_state is not None and baseline_state not in _TERMINAL_JOB
            n = len(rows) + created
            reason = (
                "running the dense baseline" if waiting else f"{n} of {sweep.total_trials} trials created"
            )
            if reason != sweep.reason:
                self._set_reason(sweep_id, reason)

    def _record(self, t: SweepTrial, job_state: str) -> None:
        report, error = None, None
        if job_state == JobState.SUCCEEDED:
            try:
                report = JobArtifacts(self.jobs.artifacts, t.job_id).get_verified_json("report.json")
            except (OSError, SlimtrainError) as e:
                error = f"report unreadable: {e}"
        self._settle(t, _result(job_state, report, error))

    def _settle(self, t: SweepTrial, result: dict[str, Any]) -> None:
        """Record a trial's result once: a result already recorded (by another tick, or `pruned`
        before its job ended) stands."""
        with self.db.write() as s:
            s.execute(
                update(SweepTrial)
                .where(
                    SweepTrial.sweep_id == t.sweep_id,
                    SweepTrial.trial_index == t.trial_index,
                    SweepTrial.result.is_(None),
                )
                .values(result=result)
            )

    def _curve(self, job_id: str) -> list[tuple[int, float]]:
        page = self.jobs.store.metrics(job_id, kinds=["eval"], limit=100_000)
        return [
            (m.step, float(m.data["val_accuracy"]))
            for m in page.items
            if m.step is not None and isinstance(m.data.get("val_accuracy"), int | float)
        ]

    def _early_stop(self, req: SweepRequest, rows) -> None:
        """Median stopping: a running trial below the succeeded trials' median is recorded as
        `pruned` first, then its job cancelled; a crash in between is finished by the next tick
        (a pruned trial whose job is still live)."""
        es = req.early_stopping
        live = [(t, st) for t, st in rows if st is not None and st not in _TERMINAL_JOB]
        for t, _ in live:
            if (t.result or {}).get("state") == PRUNED:
                self._cancel_pruned(t)
        candidates = [t for t, st in live if t.result is None and st == JobState.RUNNING]
        if not candidates:
            return
        finished = [self._curve(t.job_id) for t, st in rows if st == JobState.SUCCEEDED]
        for t in candidates:
            curve = self._curve(t.job_id)
            if median_stop(curve, finished, es.min_trials, es.grace_steps):
                best = max(v for _, v in trained(curve))  # as median_stop judged it
                why = (
                    f"pruned: best val_accuracy {best:.4f} by step {curve[-1][0]} is below the "
                    "median of the finished trials'"
                )
                self._settle(t, {"state": PRUNED, "error": why})
                log.info("sweep %s: trial %d %s", t.sweep_id, t.trial_index, why)
                self._cancel_pruned(t)

    def _cancel_pruned(self, t: SweepTrial) -> None:
        with self.db.read() as s:
            tenant = s.get(Job, t.job_id).tenant_id
        with contextlib.suppress(InvalidTransition):
            self.jobs.cancel(tenant, t.job_id)

    def _record_baseline(self, sweep: Sweep, job_state: str) -> None:
        report = None
        if job_state == JobState.SUCCEEDED:
            with contextlib.suppress(OSError, SlimtrainError):
                report = JobArtifacts(self.jobs.artifacts, sweep.baseline_job_id).get_verified_json(
                    "report.json"
                )
        with self.db.write() as s:
            s.execute(
                update(Sweep)
                .where(Sweep.id == sweep.id, Sweep.baseline_result.is_(None))
                .values(baseline_result=_result(job_state, report))
            )

    def _params(self, req: SweepRequest, index: int, rows) -> dict[str, Any]:
        if req.method != "tpe":
            return planned_params(req, index)
        history = []
        for t, job_state in rows:
            values = ((t.result or {}).get("values")) or {}
            vals = [values.get(o.metric) for o in req.objective]
            ok = (t.result or {}).get("state") == JobState.SUCCEEDED and all(v is not None for v in vals)
            running = t.result is None and job_state not in _TERMINAL_JOB and job_state is not None
            history.append(search.Told(t.params, vals if ok else None, running))
        return search.ask(req, history, index)

    def _create_trial(
        self, sweep: Sweep, req: SweepRequest, index: int, rows, baseline_job: str | None
    ) -> bool:
        """Insert trial `index` and its job in one transaction; False when it exists already or
        the sweep is no longer running."""
        params = self._params(req, index, rows)
        spec, error = None, None
        try:
            spec = self.jobs.validate_spec(sweep.tenant_id, trial_spec(req, index, params, baseline_job))
        except SlimtrainError as e:  # a tpe draw the spec refuses: recorded, the sweep goes on
            error = e.message
        now = time.time()
        try:
            with self.db.write() as s:
                # Checked in the transaction that inserts: `advance` read the sweep as running
                # before it counted the live trials, and a cancel committed in between (which
                # made those trials end) must not be followed by a new trial.
                if not _while_running(s, sweep.id, updated_at=now):
                    return False
                job_id = None
                if spec is not None:
                    job_id = add_job_rows(s, self._new_job(sweep.tenant_id, sweep.id, spec), now).id
                s.add(
                    SweepTrial(
                        sweep_id=sweep.id,
                        trial_index=index,
                        job_id=job_id,
                        params=params,
                        created_at=now,
                        result=None if spec is not None else _result(FAILED, None, error),
                        error=error,
                    )
                )
                s.flush()
        except IntegrityError:
            log.info("sweep %s: trial %d exists already", sweep.id, index)
            return False
        if job_id is not None:
            self.jobs.store._changed(job_id)
        log.info("sweep %s: trial %d created as job %s %s", sweep.id, index, job_id, params)
        return True

    def _finish(self, sweep_id: str, state: str) -> None:
        now = time.time()
        with self.db.write() as s:
            _while_running(s, sweep_id, state=state, reason=None, updated_at=now, finished_at=now)

    def _set_reason(self, sweep_id: str, reason: str) -> None:
        with self.db.write() as s:
            _while_running(s, sweep_id, reason=reason, updated_at=time.time())
