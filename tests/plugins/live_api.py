"""A live API for contract and abuse tests: real uvicorn on loopback, SQLite, a real artifact
store (local folder or the S3 server), and a Ray stand-in whose drivers finish at once.

The tests that use it are about HTTP (what the API accepts, refuses and answers), not about Ray
or the timing of the background loops: each submission is admitted, "runs" and succeeds (with a
report and a model artifact) inside the request that submits it, by the service's own scheduler
and reconciler. So every job is over before its id is known to the client, which keeps the routes
that follow a job until it ends (server-sent events, `logs?follow=true`) finite under a fuzzer,
and what a client sees next never depends on how fast a loop ticked."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from api.app import create_app
from service.artifacts import ArtifactStore, JobArtifacts
from service.job_service import JobService
from service.settings import Settings
from tests.plugins.fake_ray import SUCCEEDED, FakeRay
from tests.plugins.server import serve_app

ALICE, BOB = "alice-token-0123456789", "bob-token-0123456789ab"
TOKENS = f"{ALICE}:alice,{BOB}:bob"
MODEL_BYTES = bytes(range(256)) * 16


@dataclass
class FinishingRay(FakeRay):
    """Each submission's driver succeeds at once, leaving what a real one leaves behind."""

    artifacts: ArtifactStore | None = None
    cpu: float = 1000.0
    gpu: float = 1000.0

    def submit(self, submission_id, entrypoint, env_vars, metadata) -> bool:
        created = super().submit(submission_id, entrypoint, env_vars, metadata)
        if created:
            arts = JobArtifacts(self.artifacts, metadata["slimtrain_job"])
            arts.put_bytes("model.safetensors", MODEL_BYTES)
            arts.put_bytes("metrics.jsonl", b'{"kind": "train", "step": 1, "loss": 0.5}\n')
            arts.put_json("report.json", {"accuracy": 0.5, "steps": 1})
            arts.write_manifest()
            self.set(submission_id, SUCCEEDED, "Job finished successfully.", log="driver: done\n")
        return created


@dataclass
class LiveApi:
    url: str
    ray: FinishingRay
    artifacts: ArtifactStore
    data_dir: Path
    clients: list[httpx.Client] = field(default_factory=list)

    def client(self, token: str | None = ALICE) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        c = httpx.Client(base_url=self.url, headers=headers, timeout=30)
        self.clients.append(c)
        return c


def _finish_on_submit(service: JobService) -> None:
    submit = service.submit

    def submit_and_run(*args, **kwargs):
        job, replayed = submit(*args, **kwargs)
        service.scheduler.tick()
        service.reconciler.tick()
        return job, replayed

    service.submit = submit_and_run

    # A sweep's jobs come from the sweep loop, not from a request: run the loops inside the
    # request until the sweep is over, so its jobs too are over before any id is known (a queued
    # one would hold `logs?follow=true` open past a fuzzer's read timeout).
    sweeps = service.sweeps
    submit_sweep = sweeps.submit

    def submit_sweep_and_run(tenant, body):
        sweep = submit_sweep(tenant, body)
        for _ in range(1000):
            service.scheduler.tick()
            service.reconciler.tick()
            sweeps.tick()
            if sweeps.get(tenant, sweep.id).sweep.state != "running":
                break
        return sweep

    sweeps.submit = submit_sweep_and_run


@contextlib.contextmanager
def live_api(data_dir: Path, artifacts: ArtifactStore, **settings) -> Iterator[LiveApi]:
    """The API on a free loopback port with tenants alice and bob."""
    config = Settings(
        data_dir=data_dir,
        api_tokens=TOKENS,
        run_scheduler=False,
        max_workers=8,
        max_epochs=100,
        **settings,
    )
    ray = FinishingRay(artifacts=artifacts)
    app = create_app(config, ray=ray, artifacts=artifacts)
    _finish_on_submit(app.state.service)
    with serve_app(app) as url:
        api = LiveApi(url, ray, artifacts, data_dir)
        try:
            yield api
        finally:
            for c in api.clients:
                c.close()
