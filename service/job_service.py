"""What the API does, without HTTP: submit, cancel, read jobs, their metrics, logs and artifacts,
and the cluster. It owns the background loops (scheduler, reconciler, metrics ingest)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

from service.artifacts import ArtifactStore, JobArtifacts, ObjectInfo, check_name
from service.background import Loop
from service.datasets import DatasetStore, resolve_sources
from service.errors import ArtifactKeyError, ArtifactNotFound, SpecError
from service.ids import new_job_id
from service.ingest import Ingester
from service.jobs import JobEvent, JobNotFound, JobState, RetryPolicy
from service.limits import Resources, check_limits
from service.ray_jobs import ClusterUnavailable, NodeInfo, RayJobs, capacity_of
from service.reconciler import Reconciler
from service.scheduler import Scheduler
from service.settings import Settings
from service.spec import JobSpec, parse_spec, streaming_unsupported
from service.store.job_rows import JobRow, JobRows, MetricRows, Read
from service.store.models import Job
from service.store.repo import NewJob, Page, Store, job_cursor, parse_job_cursor
from service.sweeps.service import SweepService
from service.tenant_files import field_error
from service.uploads import ModelStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClusterView:
    reachable: bool
    error: str | None
    dashboard_url: str | None
    nodes: list[NodeInfo]
    capacity: Resources
    reserved: Resources
    queue_length: int
    jobs: dict[str, int]


def _downloadable(name: str) -> bool:
    try:
        check_name(name)
    except ArtifactKeyError:
        return False
    return True


def body_digest(data) -> str:
    """Hash of a request body's meaning (key order and whitespace do not matter)."""
    return hashlib.sha256(json.dumps(data, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


class JobService:
    def __init__(self, settings: Settings, store: Store, ray: RayJobs, artifacts: ArtifactStore):
        self.settings, self.store, self.ray, self.artifacts = settings, store, ray, artifacts
        self.rows = JobRows(store.db)
        self.metric_rows = MetricRows(store.db)
        self.ingester = Ingester(store, artifacts)
        self.scheduler = Scheduler(store, ray, artifacts, settings)
        self.reconciler = Reconciler(
            store, ray, artifacts, self.scheduler, self.ingester, settings.heartbeat_timeout_s
        )
        self.loops: dict[str, Loop] = {}
        self.models = ModelStore(artifacts, settings.max_model_bytes, settings.data_dir / "uploads")
        self.datasets = DatasetStore(artifacts, settings.max_dataset_bytes, settings.data_dir / "uploads")
        self.sweeps = SweepService(self)

    # --- background ------------------------------------------------------------------------------

    def start_background(self) -> None:
        s = self.settings
        # Reconcile first: at start-up the record is put right before anything new is admitted.
        self.loops = {
            "reconciler": Loop("reconciler", self.reconciler.tick, s.reconcile_interval_s),
            "scheduler": Loop("scheduler", self.scheduler.tick, s.scheduler_interval_s),
            "ingest": Loop("ingest", self.ingester.tick, s.ingest_interval_s),
            "sweeps": Loop("sweeps", self.sweeps.tick, s.sweep_interval_s),
        }
        for loop in self.loops.values():
            loop.start()

    def stop_background(self) -> None:
        for loop in self.loops.values():
            loop.stop()

    def _wake(self, name: str) -> None:
        if name in self.loops:
            self.loops[name].wake()

    # --- jobs ------------------------------------------------------------------------------------

    def submit(self, tenant: str, body: bytes, idempotency_key: str | None = None) -> tuple[Job, bool]:
        """Validate and queue a job spec given as a JSON body. Returns (job, replayed)."""
        try:
            data = json.loads(body)
        except (ValueError, RecursionError) as e:  # RecursionError: nested too deeply
            raise SpecError(
                f"the body is not valid JSON: {e}", [{"field": "(body)", "message": str(e)}]
            ) from None
        spec = self.validate_spec(tenant, data)
        new = NewJob(
            job_id=new_job_id(),
            tenant=tenant,
            name=spec.name,
            spec=spec.model_dump(mode="json"),
            priority=spec.priority,
            max_attempts=RetryPolicy.for_retries(spec.retries).max_attempts,
        )
        digest = body_digest(data) if idempotency_key is not None else None
        job, replayed = self.store.create_job(new, idempotency_key, digest)
        if not replayed:
            self._wake("scheduler")
        return job, replayed

    def validate_spec(self, tenant: str, data) -> JobSpec:
        """Everything a submission checks of a decoded spec (also each sweep trial's)."""
        spec = parse_spec(data, submitted=True)
        check_limits(spec, self.settings)
        # model.init and the data become store keys (or allowed s3:// URIs) now, with the caller's
        # tenant: workers never see tenants.
        spec = resolve_sources(spec, tenant, self.artifacts, self.store, self.settings.s3_allowed_prefixes)
        # `streaming: on` is a promise the workers could only break at start: refuse it now.
        if spec.data.streaming == "on" and (why := streaming_unsupported(spec.data, spec.parallel.strategy)):
            raise field_error("data.streaming", f"on is not possible: {why}; use auto or off")
        return spec

    def get(self, tenant: str, job_id: str) -> Job:
        return self.store.get_job(job_id, tenant)

    # The API's reads of jobs: rows as stored (service/store/job_rows.py), read anew every time.
    # Each is a job_rows.Read, which the API runs where the database is best read (api.deps.read_db)
    # and anything else with job_rows.run.

    def job_row(self, tenant: str, job_id: str) -> Read[JobRow]:
        row = yield from self.rows.get(job_id)
        if row is None or row.tenant_id != tenant:
            raise JobNotFound(f"no job {job_id!r}")
        return row

    def job_rows(self, tenant: str, states: list[str] | None, cursor: str | None, limit: int) -> Read[Page]:
        """A page of the tenant's jobs as rows: the page, order and cursors of Store.list_jobs."""
        after = parse_job_cursor(cursor) if cursor else None
        rows = yield from self.rows.page(tenant, states, after, limit + 1)
        return Page.of(rows, limit, job_cursor)

    def cancel(self, tenant: str, job_id: str) -> Job:
        """Mark the job cancelled and stop its Ray job now; when Ray cannot be reached, the
        reconciler keeps trying (the attempt stays open until Ray confirms it is over)."""
        self.store.get_job(job_id, tenant)
        job = self.store.transition(job_id, JobEvent.CANCEL, reason="cancelled by the user")
        for att in self.store.attempts_of(job_id):
            if att.outcome is None:
                try:
                    self.ray.stop(att.submission_id)
                except ClusterUnavailable as e:
                    log.warning("cancel %s: cannot stop %s yet: %s", job_id, att.submission_id, e.message)
        self._wake("reconciler")
        self._wake("scheduler")
        return job

    def metric_page(
        self, tenant: str, job_id: str, after: int, kinds: list[str] | None, limit: int
    ) -> Read[Page]:
        """A page of the job's metric records as rows (MetricRows): the page, order and cursor of
        Store.metrics."""
        yield from self.job_row(tenant, job_id)
        rows = yield from self.metric_rows.page(job_id, after, kinds, limit + 1)
        return Page.of(rows, limit, lambda r: str(r[0]))

    def attempts(self, tenant: str, job_id: str):
        self.store.get_job(job_id, tenant)
        return self.store.attempts_of(job_id)

    # --- logs ------------------------------------------------------------------------------------

    def logs(self, tenant: str, job_id: str) -> str:
        """The driver's log of every attempt, each under a header line."""
        self.store.get_job(job_id, tenant)
        parts = []
        for att in self.store.attempts_of(job_id):
            parts.append(f"=== attempt {att.number} ({att.submission_id}) ===\n")
            text = self.ray.logs(att.submission_id)
            if text is None and att.submitted_at is not None:
                text = "(Ray no longer has this log)\n"
            # else: an attempt cancelled before the scheduler submitted it never ran: no log
            parts.append(text or "")
        return "".join(parts)

    async def follow_logs(self, tenant: str, job_id: str, poll: float = 1.0) -> AsyncIterator[str]:
        """The driver's log as it is written, attempt after attempt, until the job is over."""
        await asyncio.to_thread(self.store.get_job, job_id, tenant)
        done: set[int] = set()
        while True:
            job = await asyncio.to_thread(self.store.get_job, job_id)
            attempts = await asyncio.to_thread(self.store.attempts_of, job_id)
            for att in attempts:
                if att.number in done:
                    continue
                if att.submitted_at is None and att.outcome is None:
                    break  # not on Ray yet
                yield f"=== attempt {att.number} ({att.submission_id}) ===\n"
                try:
                    async for chunk in self.ray.tail_logs(att.submission_id):
                        yield chunk
                except ClusterUnavailable as e:
                    yield f"(log unavailable: {e.message})\n"
                done.add(att.number)
            if JobState(job.state).terminal and all(a.number in done for a in attempts):
                return
            await asyncio.sleep(poll)

    # --- artifacts -------------------------------------------------------------------------------

    def artifacts_of(self, tenant: str, job_id: str) -> JobArtifacts:
        self.store.get_job(job_id, tenant)
        return JobArtifacts(self.artifacts, job_id)

    def list_artifacts(
        self, tenant: str, job_id: str, prefix: str, cursor: str | None, limit: int
    ) -> tuple[list[tuple[str, ObjectInfo]], str | None]:
        arts = self.artifacts_of(tenant, job_id)
        sub = check_name(prefix.strip("/")) if prefix.strip("/") else ""
        # Only names a client can download (Ray's hidden marker files are not artifacts).
        items = [(n, o) for o in arts.list(sub) if _downloadable(n := arts.name_of(o.key))]
        if cursor:
            items = [x for x in items if x[0] > cursor]
        more = len(items) > limit
        items = items[:limit]
        return items, (items[-1][0] if more and items else None)

    def report(self, tenant: str, job_id: str) -> dict:
        arts = self.artifacts_of(tenant, job_id)
        try:
            return arts.get_verified_json("report.json")
        except ArtifactNotFound:
            job = self.store.get_job(job_id)
            raise ArtifactNotFound(f"job {job_id} has no report ({job.state})") from None

    # --- cluster ---------------------------------------------------------------------------------

    def cluster(self, tenant: str) -> ClusterView:
        reserved = self.store.reserved()
        counts = self.store.counts_by_state(tenant)
        queue = self.store.counts_by_state()[JobState.QUEUED.value]
        try:
            nodes = self.ray.nodes()
            url = self.ray.dashboard_url
            error = None
        except ClusterUnavailable as e:
            nodes, url, error = [], None, e.message
        return ClusterView(error is None, error, url, nodes, capacity_of(nodes), reserved, queue, counts)
