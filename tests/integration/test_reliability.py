"""Fault injection through the service, on the session's real Ray cluster and a real uvicorn API
process (SQLite, local artifact folder): a Ray Train worker killed with SIGKILL, a job that fails
on every attempt, jobs that cannot run as specified, and the API killed with SIGKILL while jobs
run and wait. The Ray head's own loss is tests/integration/test_reliability_head.py."""

from __future__ import annotations

import io
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open

from api.client import Client
from service.datasets import dataset_key
from tests.conftest import wait_for
from tests.plugins.faults import (
    TERMINAL,
    api_env,
    attempts,
    digits_spec,
    quick_spec,
    ray_submissions,
    start_api,
    starts,
    train_worker_pids,
    verified_checkpoint_step,
    wait_jobs,
)

pytestmark = pytest.mark.integration
TOKEN, OTHER = "reliability-token-0123456789", "reliability-apiloss-0123456789"


@pytest.fixture(scope="module")
def env(ray_cluster, tmp_path_factory):
    data = tmp_path_factory.mktemp("reliability")
    return api_env(data, ray_cluster, {TOKEN: "reliability", OTHER: "apiloss"})


@pytest.fixture(scope="module")
def api(env):
    server = start_api(env)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def artifacts(env) -> Path:
    return Path(env["SLIMTRAIN_DATA_DIR"]) / "artifacts"


def _weights(path: Path) -> tuple[dict[str, bytes], dict[str, str]]:
    with safe_open(path, "pt") as f:
        return {k: f.get_tensor(k).numpy().tobytes() for k in f.keys()}, f.metadata()  # noqa: SIM118


def test_a_killed_worker_fails_its_attempt_and_the_next_resumes_to_identical_weights(
    api, env, artifacts, ray_cluster
):
    """kill -9 of one rank's Ray Train worker process: attempt 1 fails with that reason, attempt 2
    (a new Ray job) resumes from the last verified checkpoint, and the exported weights are bit
    for bit those of an uninterrupted job of the same spec."""
    c = Client(api.url, TOKEN)
    spec = digits_spec("worker-loss", workers=2, epochs=8)  # 176 steps
    victim = c.submit(spec)["id"]
    reference = c.submit(spec)["id"]  # the same spec, uninterrupted; it runs after the victim
    dash = ray_cluster["dashboard_url"]
    wait_jobs(c, [victim], {"running"}, 180)
    pids = wait_for(lambda: len(p := train_worker_pids(dash, victim)) == 2 and p, 120, 0.5, "2 workers")
    step = wait_for(lambda: verified_checkpoint_step(artifacts, victim), 180, 0.1, "a checkpoint")
    os.kill(pids[-1], signal.SIGKILL)  # one rank's actor process, not the driver

    jobs = wait_jobs(c, [victim, reference], TERMINAL, 420)
    assert jobs[victim]["state"] == jobs[reference]["state"] == "succeeded", (jobs, api.log_tail())
    att = attempts(c, victim)
    assert [(a["number"], a["submission_id"], a["outcome"]) for a in att] == [
        (1, victim, "failed"),
        (2, f"{victim}-a2", "succeeded"),
    ]
    # the rank that died is blamed, not the peer whose collective it cut off
    assert att[0]["message"].startswith("training failed: rank "), att[0]["message"]
    assert "died" in att[0]["message"] and "Connection closed" not in att[0]["message"]
    assert jobs[victim]["attempts"] == 2 and jobs[victim]["error"] is None
    # the failure and the resubmission are in the job's own history, with the reason
    reasons = [e.data.get("reason") or "" for e in c.events(victim) if e.type == "state"]
    assert any(r.startswith("attempt 1 failed (training failed: rank ") for r in reasons), reasons
    began = starts(c, victim)
    assert [s["resumed_from"] is None for s in began] == [True, False]
    assert began[1]["resumed_from"] >= step  # the newest checkpoint at the kill, or a later one
    assert ray_submissions(dash, [victim])[victim] == sorted([victim, f"{victim}-a2"])

    got, got_meta = _weights(artifacts / victim / "model.safetensors")
    want, want_meta = _weights(artifacts / reference / "model.safetensors")
    assert got.keys() == want.keys()
    for name in want:
        assert got[name] == want[name], f"{name} differs bitwise"
    assert (got_meta, want_meta) == ({"job_id": victim}, {"job_id": reference})
    assert c.report(victim)["accuracy"] == c.report(reference)["accuracy"]


# A tiny gpt on the text corpus with plain SGD at lr 10 reaches NaN within ten steps, on every
# attempt: a mistake a user can make, which the engine treats as a (retryable) training failure.
DIVERGES = {
    "name": "diverges",
    "model": {"name": "gpt", "args": {"n_layer": 1, "n_embd": 32, "n_head": 2}},
    "data": {"name": "text"},
    "train": {"epochs": 1, "max_steps": 60, "batch_size": 16, "lr": 10.0, "log_every_steps": 5},
    "parallel": {"workers": 1},
    "precision": "fp32",
    "retries": 2,
}


def _npz(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def test_retry_budget_and_configuration_errors(api, artifacts, ray_cluster):
    """A job that fails on every attempt ends `failed` after exactly retries + 1 attempts (one
    Ray job each); a job that cannot run as specified fails once, with the reason."""
    c = Client(api.url, TOKEN)
    whole = _npz(X=np.zeros((40, 64), np.float32), y=np.zeros(40, np.int64))
    # vectors.npz: valid data, but 10 features are no image: lenet5 cannot be built for it
    for name, data in (
        ("truncated.npz", whole),
        ("vectors.npz", _npz(X=np.ones((400, 10), np.float32), y=np.arange(400) % 3)),
    ):
        (artifacts.parent / name).write_bytes(data)
        c.push("datasets", artifacts.parent / name, name)
    # an upload damaged in the store after its check: the first half of a valid .npz
    (artifacts / dataset_key("reliability", "truncated.npz", "npz")).write_bytes(whole[: len(whole) // 2])

    def uri_job(name: str, model: str, uri: str) -> str:
        spec = {"name": name, "model": {"name": model}, "data": {"uri": uri}, "parallel": {"workers": 1}}
        return c.submit({**spec, "retries": 2})["id"]

    diverging = c.submit(DIVERGES)["id"]
    corrupt = uri_job("corrupt-data", "mlp", "store://datasets/truncated.npz")
    unbuildable = uri_job("unbuildable", "lenet5", "store://datasets/vectors.npz")
    jobs = wait_jobs(c, [diverging, corrupt, unbuildable], TERMINAL, 420)

    d = jobs[diverging]
    assert (d["state"], d["attempts"], d["max_attempts"]) == ("failed", 3, 3), d
    assert d["error"]["code"] == "diverged"
    assert d["error"]["message"].startswith("training failed: rank 0: training diverged by step ")
    assert d["error"]["message"].endswith(
        "lower train.lr or set train.grad_clip_norm (attempt 3 of 3; no retries left)"
    )
    att = attempts(c, diverging)
    assert [(a["number"], a["outcome"]) for a in att] == [(1, "failed"), (2, "failed"), (3, "failed")]
    assert all("training diverged by step" in a["message"] for a in att)
    assert ray_submissions(ray_cluster["dashboard_url"], [diverging])[diverging] == sorted(
        a["submission_id"] for a in att
    )

    for job_id, says in (
        (corrupt, "data.uri: store://datasets/truncated.npz is not an .npz with arrays X and y"),
        (unbuildable, "model 'lenet5' cannot be built for dataset input"),
    ):
        j = jobs[job_id]
        assert (j["state"], j["attempts"], j["error"]["code"]) == ("failed", 1, "config_error"), j
        assert says in j["error"]["message"]
        assert [(a["number"], a["outcome"]) for a in attempts(c, job_id)] == [(1, "failed")]
    assert "lenet5 needs image-shaped input" in jobs[unbuildable]["error"]["message"]


def test_api_killed_with_jobs_running_and_queued_loses_and_duplicates_nothing(api, env, ray_cluster):
    """kill -9 of the API with 2 jobs running and 2 queued: after the restart every job ends,
    each with exactly one Ray job per attempt, and the tenant has exactly its 4 jobs. Two queued
    jobs, not one, so that the restarted scheduler admits several; not three, which would only
    add a third round of jobs on the session's 2 CPUs (a minute of CI) and prove nothing more."""
    c = Client(api.url, OTHER)
    specs = {f"apiloss-{i}": quick_spec(f"apiloss-{i}") for i in range(4)}
    ids = [c.submit(spec, idempotency_key=key)["id"] for key, spec in specs.items()]

    def two_running_two_queued():
        states = sorted(c.job(i)["state"] for i in ids)
        return states == ["queued"] * 2 + ["running"] * 2

    wait_for(two_running_two_queued, 180, 0.2, "2 jobs running, 2 queued")
    api.kill()  # SIGKILL: no shutdown hook runs
    time.sleep(1)
    api.start()
    c = Client(api.url, OTHER)
    # a client that never saw its answers retries with the same keys: the same jobs come back
    assert [c.submit(spec, idempotency_key=key)["id"] for key, spec in specs.items()] == ids
    jobs = wait_jobs(c, ids, TERMINAL, 480)
    assert all(j["state"] == "succeeded" for j in jobs.values()), (jobs, api.log_tail())

    listed = []
    page = c.jobs(limit=3)  # two pages, the second not full
    while True:
        listed += [j["id"] for j in page["items"]]
        if not page["next_cursor"]:
            break
        page = c.jobs(limit=3, cursor=page["next_cursor"])
    assert sorted(listed) == sorted(ids)  # none lost, none twice

    on_ray = ray_submissions(ray_cluster["dashboard_url"], ids)
    for job_id in ids:
        att = attempts(c, job_id)
        assert on_ray[job_id] == sorted(a["submission_id"] for a in att), (job_id, att)
        assert [a["outcome"] for a in att] == ["succeeded"]  # the Ray jobs outlived the API
        assert c.report(job_id)["steps"] == 44
