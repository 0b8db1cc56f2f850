"""The FastAPI application: `/v1` behind bearer auth, `/healthz`, `/readyz`, `/metrics`; `/` is
left to the dashboard. `create_app` wires settings -> database (schema upgraded at start-up) ->
artifact store -> Ray Jobs -> the job service and its background loops, which run only while
this process leads (the database lease of service/leader.py): any number of API processes may
serve one database."""

from __future__ import annotations

import contextlib
import gc
import logging
import os
from concurrent.futures import ThreadPoolExecutor

from fastapi import FastAPI
from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from api import errors, openapi
from api.job_bodies import JobBodies
from api.routes import dashboard, datasets, docs, jobs, models, sweeps, system
from api.routes.prometheus import RequestMetrics, StoreCollector, request_latency
from api.sse import JobFeed, Notifier
from service.artifacts import ArtifactStore, open_store
from service.auth import TokenAuth, load_auth
from service.job_service import JobService
from service.leader import Leadership, Lease
from service.ray_jobs import RayJobs
from service.settings import Settings, get_settings
from service.store.async_reads import AsyncReads
from service.store.db import Database
from service.store.repo import Store

log = logging.getLogger(__name__)


def ray_address(settings: Settings) -> str | None:
    """Where the Jobs API is: the configured dashboard URL, or the cluster address (an http(s)
    URL is used as is; a GCS address is resolved to the dashboard through the cluster)."""
    return settings.ray_dashboard_url or settings.ray_address


class LeaderCollector(Collector):
    def __init__(self, leadership: Leadership | None):
        self.leadership = leadership

    def collect(self):
        leads = self.leadership is not None and self.leadership.leading
        yield GaugeMetricFamily(
            "slimtrain_leader",
            "1 while this API process leads (runs the scheduler, reconciler and ingest), else 0.",
            value=1.0 if leads else 0.0,
        )


def leadership_of(settings: Settings, db: Database, service: JobService) -> Leadership | None:
    """The campaign for the lease, whose winner runs the service's loops; None when this process
    never schedules (`run_scheduler` off)."""
    if not settings.run_scheduler:
        return None
    lease = Lease(db, settings.leader_lease_ttl_s, takeover_dead_local=settings.leader_takeover_dead_local)
    service.scheduler.lease = service.reconciler.lease = service.ingester.lease = lease

    def elected() -> None:
        service.start_background()
        for loop in service.loops.values():
            loop.gate = lease.holds

    def deposed() -> None:
        service.stop_background()
        service.loops = {}

    return Leadership(lease, settings.leader_renew_interval_s, elected, deposed)


def create_app(
    settings: Settings | None = None,
    *,
    ray: RayJobs | None = None,
    artifacts: ArtifactStore | None = None,
    auth: TokenAuth | None = None,
    freeze_gc: bool = False,
) -> FastAPI:
    """The API app. `freeze_gc`: the process is this app's alone (`slimtrain serve`), so once
    it has started, every object alive then (modules, Ray's, SQLAlchemy's and pydantic's state)
    moves out of the cyclic collector's reach (`gc.freeze`). Each full collection otherwise
    walks them all with the event loop stopped, and every request in flight waits: the longest
    stalls of GET /v1/jobs/{id} under bench/load's 200 users (bench/README.md, "Load and soak").
    Off for apps that share their process (tests, embedded uses): objects frozen there are never
    collected if they later become garbage in a cycle."""
    settings = settings or get_settings()
    auth = auth or load_auth(settings)[0]
    db = Database(settings.resolved_database_url)
    store = Store(db)
    artifacts = artifacts or open_store(settings.resolved_artifact_uri, settings.s3_endpoint_url)
    service = JobService(settings, store, ray or RayJobs(ray_address(settings)), artifacts)
    notifier, feed = Notifier(), JobFeed(store)
    registry = CollectorRegistry()
    registry.register(StoreCollector(store))
    leadership = leadership_of(settings, db, service)
    registry.register(LeaderCollector(leadership))

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        threads = settings.request_threads or os.cpu_count() or 2
        app.state.db_pool = ThreadPoolExecutor(threads, thread_name_prefix="slimtrain-db")
        # PostgreSQL's reads on this loop (api.deps.read_db); a pool belongs to the loop it opened on.
        app.state.async_reads = None if db.is_sqlite else AsyncReads(db.url)
        db.upgrade()
        store.ensure_tenants(auth.tenants)
        store.listeners += [feed.heads.forget, notifier.publish]  # forget first: a woken stream reads anew
        if leadership is not None:
            leadership.start()
        if app.state.async_reads is not None:
            await app.state.async_reads.open()
        if freeze_gc:
            gc.collect()  # garbage now is not frozen with the rest
            gc.freeze()
        try:
            yield
        finally:
            if leadership is not None:
                leadership.stop()  # stops the loops, then releases the lease for a quick handover
            service.stop_background()
            app.state.db_pool.shutdown(wait=True)  # requests' work done before the engine goes
            if app.state.async_reads is not None:
                await app.state.async_reads.close()
            db.dispose()

    app = FastAPI(
        title="slimtrain",
        version="1",
        summary="Compression-aware distributed training service.",
        lifespan=lifespan,
        # FastAPI's pages load their scripts from a CDN: ours serves Swagger UI itself (api/routes/docs.py).
        docs_url=None,
        redoc_url=None,
    )
    app.state.settings, app.state.service, app.state.auth = settings, service, auth
    app.state.notifier, app.state.feed, app.state.registry = notifier, feed, registry
    app.state.leadership = leadership
    app.state.job_bodies = JobBodies()
    app.state.inline_reads = db.inline is not None  # api.deps.read_db
    app.state.async_reads = None  # PostgreSQL's, opened by the lifespan
    errors.install(app)
    app.include_router(system.router)
    app.include_router(jobs.router)
    app.include_router(models.router)
    app.include_router(datasets.router)
    app.include_router(sweeps.router)
    dashboard.install(app)
    docs.install(app)
    app.add_middleware(RequestMetrics, latency=request_latency(registry))
    app.openapi = lambda: openapi.document(app)
    return app
