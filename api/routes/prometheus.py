"""Prometheus metrics: jobs by state, queue length, per running job loss / accuracy / sparsity
(read from the job store at scrape time, so every API replica reports the same truth), and a
request latency histogram per route.

The per-job series carry every tenant's job ids, so `/metrics` is the operator's, behind a token
of its own (SLIMTRAIN_METRICS_TOKEN, Prometheus' `authorization.credentials_file`), not behind
any tenant's API token; tenants read their own jobs' metrics under /v1/jobs."""

from __future__ import annotations

import time
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from service.auth import check_metrics_token
from service.jobs import JobState
from service.store.repo import Store

_metrics_bearer = HTTPBearer(
    auto_error=False,
    scheme_name="MetricsToken",
    description="The metrics token from SLIMTRAIN_METRICS_TOKEN (not an API token).",
)


async def require_metrics_token(
    request: Request, creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_metrics_bearer)]
) -> None:
    expected = request.app.state.settings.metrics_token
    token = creds.credentials if creds else None
    check_metrics_token(expected.get_secret_value() if expected else None, token)


_PER_JOB = (
    ("loss", "slimtrain_job_loss", "Last training loss of a running job."),
    ("val_accuracy", "slimtrain_job_accuracy", "Last validation accuracy of a running job."),
    ("sparsity", "slimtrain_job_sparsity", "Current global weight sparsity of a running job."),
    ("step", "slimtrain_job_step", "Last optimizer step of a running job."),
)


class StoreCollector(Collector):
    def __init__(self, store: Store):
        self.store = store

    def collect(self):
        counts = self.store.counts_by_state()
        jobs = GaugeMetricFamily("slimtrain_jobs", "Jobs by state.", labels=["state"])
        for state in JobState:
            jobs.add_metric([state.value], counts.get(state.value, 0))
        yield jobs
        yield GaugeMetricFamily(
            "slimtrain_queue_length",
            "Jobs waiting for admission.",
            value=counts.get(JobState.QUEUED.value, 0),
        )
        families = {
            key: GaugeMetricFamily(name, doc, labels=["job_id", "tenant"]) for key, name, doc in _PER_JOB
        }
        for job_id, tenant, progress in self.store.running_progress():
            for key, fam in families.items():
                v = progress.get(key)
                if isinstance(v, int | float) and not isinstance(v, bool):
                    fam.add_metric([job_id, tenant], float(v))
        yield from families.values()


def request_latency(registry: CollectorRegistry) -> Histogram:
    return Histogram(
        "slimtrain_http_request_duration_seconds",
        "HTTP request latency.",
        ["method", "route", "status"],
        registry=registry,
        buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
    )


class RequestMetrics:
    """Pure ASGI middleware (no response buffering): latency by method, route template, status.
    Paths that match no route are counted as `unmatched`, so probing cannot blow up the label set."""

    def __init__(self, app, latency: Histogram):
        self.app, self.latency = app, latency

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = {"code": 500}

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        start = time.perf_counter()
        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", None) or "unmatched"
            self.latency.labels(scope["method"], path, str(status["code"])).observe(
                time.perf_counter() - start
            )
