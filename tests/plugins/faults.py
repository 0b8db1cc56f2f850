"""Fault injection for the reliability tests (tests/integration/test_reliability*.py): the API as a
process on a chosen Ray cluster, the processes of a job's Ray Train workers, the Ray jobs Ray holds
for a job, its newest verified checkpoint on disk, and waits on job states."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from api.client import Client
from service.artifacts import LocalArtifactStore
from tests.conftest import wait_for
from tests.plugins.server import ApiProcess
from workers.checkpoint import load_latest

TERMINAL = {"succeeded", "failed", "cancelled"}


def api_env(data_dir: Path, ray: dict, tokens: dict[str, str], **settings) -> dict[str, str]:
    """Environment of an API process on the Ray cluster `ray` ({"address", "dashboard_url"}),
    with short loop intervals; `settings` are more SLIMTRAIN_ variables, by lower-case name."""
    env = {
        **os.environ,
        "SLIMTRAIN_DATA_DIR": str(data_dir),
        "SLIMTRAIN_RAY_ADDRESS": ray["address"],
        "SLIMTRAIN_RAY_DASHBOARD_URL": ray["dashboard_url"],
        "SLIMTRAIN_API_TOKENS": ",".join(f"{t}:{tenant}" for t, tenant in tokens.items()),
        "SLIMTRAIN_DRIVER_PYTHON": sys.executable,
        "SLIMTRAIN_SCHEDULER_INTERVAL_S": "0.2",
        "SLIMTRAIN_RECONCILE_INTERVAL_S": "0.5",
        "SLIMTRAIN_INGEST_INTERVAL_S": "0.25",
    }
    env.update({f"SLIMTRAIN_{k.upper()}": str(v) for k, v in settings.items()})
    return env


def start_api(env: dict[str, str]) -> ApiProcess:
    return ApiProcess(env, Path(env["SLIMTRAIN_DATA_DIR"]) / "api.log").start()


def digits_spec(name: str, *, workers: int = 2, epochs: int = 10, retries: int = 2) -> dict:
    """LeNet-5 on digits with a pruning schedule and a checkpoint every 40 of its 22*epochs
    steps: small, but long enough to be caught mid-run."""
    return {
        "name": name,
        "model": {"name": "lenet5"},
        "data": {"name": "digits"},
        "train": {"epochs": epochs, "batch_size": 64, "lr": 0.05, "seed": 0},
        "parallel": {"workers": workers},
        "precision": "fp32",
        "compression": {
            "pruning": {"final_sparsity": 0.5, "start_step": 20, "end_step": 100, "frequency": 10}
        },
        "checkpoint": {"every_steps": 40, "keep": 2},
        "retries": retries,
    }


def quick_spec(name: str) -> dict:
    """A one-worker job that does little more than start, train 44 steps and export."""
    return {
        "name": name,
        "model": {"name": "mlp", "args": {"hidden": [32]}},
        "data": {"name": "digits"},
        "train": {"epochs": 2, "batch_size": 64},
        "parallel": {"workers": 1},
    }


def wait_jobs(c: Client, ids: list[str], states: set[str], timeout: float) -> dict[str, dict]:
    """Every job of `ids` in one of `states` at once; returns them by id."""

    def all_there():
        jobs = {i: c.job(i) for i in ids}
        return jobs if all(j["state"] in states for j in jobs.values()) else None

    return wait_for(all_there, timeout, 0.5, f"{ids} in {states}")


def attempts(c: Client, job_id: str) -> list[dict]:
    r = c.http.get(f"/v1/jobs/{job_id}/attempts")
    r.raise_for_status()
    return r.json()["items"]


def starts(c: Client, job_id: str) -> list[dict]:
    """The `start` records of a job: one per time its worker group began (or resumed) training."""
    return [m["data"] for m in c.metrics(job_id, kinds=["event"]) if m["data"].get("event") == "start"]


def ray_submissions(dashboard_url: str, job_ids: list[str]) -> dict[str, list[str]]:
    """The submission ids of the Ray jobs the cluster holds for each slimtrain job (found by the
    `slimtrain_job` metadata the scheduler sets), sorted."""
    from ray.job_submission import JobSubmissionClient

    out: dict[str, list[str]] = {j: [] for j in job_ids}
    for info in JobSubmissionClient(dashboard_url).list_jobs():
        owner = (info.metadata or {}).get("slimtrain_job")
        if owner in out:
            out[owner].append(info.submission_id)
    return {j: sorted(s) for j, s in out.items()}


def train_worker_pids(dashboard_url: str, submission_id: str) -> list[int]:
    """PIDs of the live Ray Train worker actors (one per rank) of a Ray job."""
    from ray.job_submission import JobSubmissionClient
    from ray.util.state import list_actors

    ray_job = JobSubmissionClient(dashboard_url).get_job_info(submission_id).job_id
    if ray_job is None:  # the driver has not connected yet
        return []
    actors = list_actors(
        address=dashboard_url,
        filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE"), ("job_id", "=", ray_job)],
    )
    return sorted(int(a.pid) for a in actors if a.pid)


def verified_checkpoint_step(artifacts_root: Path, job_id: str) -> int | None:
    """Step of the job's newest checkpoint that verifies against its manifest, or None."""
    loaded = load_latest(LocalArtifactStore(artifacts_root), job_id)
    return loaded.step if loaded is not None else None
