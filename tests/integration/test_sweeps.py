"""Sweeps through the live API (issue 18): uvicorn, SQLite, a local artifact store and the
service's own background loops (scheduler, reconciler, sweeps) at short intervals. Ray is the
stand-in of tests/plugins/fake_ray.py: these tests are about what the sweep does with its jobs,
not about training, so each driver "finishes" at once with a report whose numbers follow from
the trial's spec (`fake_report`), which makes the Pareto front known in advance. The real-Ray
path of a job is tests/integration/test_service_e2e.py; a sweep's trials are such jobs.

The kill -9 test runs the API as its own process (tests/plugins/server.py's ApiProcess) with
`app_factory` below, whose stand-in answers from the artifact store, so what Ray "knows"
survives the API's death as a real cluster's jobs would."""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass

import httpx
import pytest
import yaml

from api.app import create_app
from service.artifacts import ArtifactStore, JobArtifacts, LocalArtifactStore, open_store
from service.ray_jobs import RUNNING, SUCCEEDED, RayJobInfo
from service.settings import Settings, get_settings
from tests.conftest import wait_for
from tests.plugins.fake_ray import FakeRay
from tests.plugins.live_api import ALICE, BOB, TOKENS
from tests.plugins.server import ApiProcess, serve_app

pytestmark = pytest.mark.integration

BASE = {
    "name": "ignored",
    "model": {"name": "mlp"},
    "data": {"name": "digits"},
    "train": {"epochs": 1},
    "priority": 7,
    "compression": {
        "pruning": {"final_sparsity": 0.5, "start_step": 0, "end_step": 10, "frequency": 5},
        "quantization": {"mode": "ptq"},
    },
}
GRID = {"compression.pruning.final_sparsity": [0.5, 0.9], "compression.quantization.bits": [8, 4]}
FAST = {
    "scheduler_interval_s": 0.05,
    "reconcile_interval_s": 0.05,
    "ingest_interval_s": 0.2,
    "sweep_interval_s": 0.05,
}


def fake_report(spec: dict) -> dict:
    """Numbers a compressed model might have: sparsity and 4 bits cost accuracy, buy size."""
    comp = spec.get("compression") or {}
    s = ((comp.get("pruning") or {}).get("final_sparsity")) or 0.0
    q = comp.get("quantization") or {}
    bits = q.get("bits", 8) if q.get("mode", "none") != "none" else 32
    return {
        "accuracy": round(0.98 - 0.1 * s**4 - (0.08 if bits == 4 else 0.0), 5),
        "size": {"ratio": (32 / bits) / (1 - s)},
        "latency_ms": {"compressed": {32: 0.1, 8: 0.05, 4: 0.08}[bits]},
        "steps": 1,
    }


@dataclass
class ReportingRay(FakeRay):
    """Drivers succeed at once with `fake_report` of the job's spec.json (or keep running while
    `hold` is set). Submissions it did not see (before a restart) are answered from the store."""

    artifacts: ArtifactStore | None = None
    cpu: float = 1000.0
    hold: bool = False

    def submit(self, submission_id, entrypoint, env_vars, metadata) -> bool:
        created = super().submit(submission_id, entrypoint, env_vars, metadata)
        if created:
            if self.hold:
                self.set(submission_id, RUNNING)
            else:
                self._finish(submission_id, metadata["slimtrain_job"])
        return created

    def _finish(self, submission_id: str, job_id: str) -> None:
        arts = JobArtifacts(self.artifacts, job_id)
        report = fake_report(arts.get_json("spec.json"))
        # A validation curve ending at the report's accuracy (what early stopping compares).
        evals = [{"kind": "eval", "step": n, "val_accuracy": report["accuracy"] - 0.1 / n} for n in (10, 20)]
        arts.put_bytes("metrics.jsonl", "".join(json.dumps(e) + "\n" for e in evals).encode())
        arts.put_json("report.json", report)
        arts.write_manifest()
        self.set(submission_id, SUCCEEDED, "Job finished successfully.", log="driver: done\n")

    def info(self, submission_id):
        found = super().info(submission_id)
        if found is None and JobArtifacts(self.artifacts, re.sub(r"-a[0-9]+$", "", submission_id)).exists(
            "report.json"
        ):
            return RayJobInfo(SUCCEEDED, "Job finished successfully.")
        return found


def api_url(client: httpx.Client) -> str:
    return str(client.base_url).rstrip("/")


def app_factory():
    """`uvicorn --factory` entry of the kill -9 test's API process (settings from SLIMTRAIN_*)."""
    settings = get_settings()
    artifacts = open_store(settings.resolved_artifact_uri, None)
    return create_app(settings, ray=ReportingRay(artifacts=artifacts), artifacts=artifacts)


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("sweeps")
    artifacts = LocalArtifactStore(data_dir / "artifacts")
    ray = ReportingRay(artifacts=artifacts)
    settings = Settings(data_dir=data_dir, api_tokens=TOKENS, max_sweep_trials=6, **FAST)
    app = create_app(settings, ray=ray, artifacts=artifacts)
    with serve_app(app) as url:
        alice = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {ALICE}"}, timeout=30)
        bob = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {BOB}"}, timeout=30)
        yield alice, bob, ray
        alice.close()
        bob.close()


def sweep_body(name: str, **over) -> dict:
    return {"name": name, "base": BASE, "method": "grid", "grid": GRID, "max_concurrent": 2, **over}


def wait_state(client: httpx.Client, sweep_id: str, states: set[str], timeout: float = 30.0) -> dict:
    def done():
        body = client.get(f"/v1/sweeps/{sweep_id}").json()
        return body if body["state"] in states else None

    return wait_for(done, timeout, 0.1, f"sweep {sweep_id} to reach {states}")


def test_a_grid_sweep_runs_each_trial_as_a_job_and_answers_its_front(api):
    alice, _, _ = api
    r = alice.post("/v1/sweeps", json=sweep_body("digits-grid"))
    assert r.status_code == 201, r.text
    assert r.json()["state"] == "running" and r.headers["location"] == f"/v1/sweeps/{r.json()['id']}"
    sweep = wait_state(alice, r.json()["id"], {"succeeded", "failed"})
    assert sweep["state"] == "succeeded" and sweep["total_trials"] == 4
    trials = sweep["trials"]
    assert [t["index"] for t in trials] == [0, 1, 2, 3]
    assert [t["params"] for t in trials] == [
        {"compression.pruning.final_sparsity": 0.5, "compression.quantization.bits": 8},
        {"compression.pruning.final_sparsity": 0.5, "compression.quantization.bits": 4},
        {"compression.pruning.final_sparsity": 0.9, "compression.quantization.bits": 8},
        {"compression.pruning.final_sparsity": 0.9, "compression.quantization.bits": 4},
    ]
    assert [t["state"] for t in trials] == ["succeeded"] * 4
    assert [t["accuracy"] for t in trials] == [0.97375, 0.89375, 0.91439, 0.83439]
    assert [t["size_ratio"] for t in trials] == pytest.approx([8, 16, 40, 80])
    assert [t["latency_ms"] for t in trials] == [0.05, 0.08, 0.05, 0.08]
    ids = [t["job_id"] for t in trials]
    # (0.5, 4 bits) is dominated by (0.9, 8 bits): less accurate, larger and slower.
    assert sweep["pareto"] == [ids[0], ids[2], ids[3]]
    # The dense baseline ran once, first; every trial names it and is a normal job of the sweep.
    base_id = sweep["baseline_job"]
    assert sweep["baseline_state"] == "succeeded" and sweep["baseline_accuracy"] == 0.98
    jobs = {j["id"]: j for j in alice.get("/v1/jobs", params={"limit": 200}).json()["items"]}
    assert {i for i, j in jobs.items() if j["sweep_id"] == sweep["id"]} == {base_id, *ids}
    assert "compression" not in {k for k, v in jobs[base_id]["spec"].items() if v and k == "pruning"}
    assert jobs[base_id]["spec"]["compression"]["pruning"] is None
    for i, job_id in enumerate(ids):
        job = jobs[job_id]
        assert job["name"] == f"digits-grid-t00{i}" and job["priority"] == 7
        assert job["spec"]["compression"]["baseline_job"] == base_id
        assert job["created_at"] > jobs[base_id]["finished_at"]
        assert alice.get(f"/v1/jobs/{job_id}/report").json()["accuracy"] == trials[i]["accuracy"]
    # The best trial within an accuracy drop (percentage points) of the baseline's 0.98.
    best = {
        d: alice.get(f"/v1/sweeps/{sweep['id']}", params={"max_accuracy_drop": d}).json() for d in (0.5, 1, 7)
    }
    assert best[0.5]["best"] is None
    assert best[1]["best"] == ids[0] and best[7]["best"] == ids[2]
    assert best[1]["reference_accuracy"] == 0.98
    assert sweep["id"] in [s["id"] for s in alice.get("/v1/sweeps").json()["items"]]


@pytest.mark.parametrize(
    ("over", "field"),
    [
        ({"grid": {"compression.pruning.final_sparsty": [0.5]}}, "grid.compression.pruning.final_sparsty"),
        ({"grid": {"compression.quantization.bits": [8, 3]}}, "grid.compression.quantization.bits[1]"),
        ({"grid": {"train.epochs": [1, 2, 3, 4, 5, 6, 7]}}, "grid"),  # above max_sweep_trials (6)
        ({"method": "anneal"}, "method"),
        ({"base": {**BASE, "parallel": {"workers": 99}}}, "base"),  # above the server's max_workers
    ],
)
def test_a_bad_sweep_is_a_422_naming_the_path_or_value(api, over, field):
    alice, _, _ = api
    r = alice.post("/v1/sweeps", json=sweep_body("bad", **over))
    assert r.status_code == 422, r.text
    assert r.json()["error"]["fields"][0]["field"] == field


def test_another_tenants_sweep_is_not_found(api):
    alice, bob, _ = api
    sweep_id = alice.post("/v1/sweeps", json=sweep_body("mine", baseline=False)).json()["id"]
    for r in (bob.get(f"/v1/sweeps/{sweep_id}"), bob.post(f"/v1/sweeps/{sweep_id}/cancel")):
        assert r.status_code == 404 and r.json()["error"]["code"] == "sweep_not_found"
    assert sweep_id not in [s["id"] for s in bob.get("/v1/sweeps").json()["items"]]
    assert all(j["sweep_id"] != sweep_id for j in bob.get("/v1/jobs").json()["items"])
    wait_state(alice, sweep_id, {"succeeded"})


def test_cancel_stops_the_running_trials_and_creates_no_more(api):
    alice, _, ray = api
    ray.hold = True
    try:
        sweep_id = alice.post("/v1/sweeps", json=sweep_body("to-cancel", baseline=False)).json()["id"]

        def two_running():
            trials = alice.get(f"/v1/sweeps/{sweep_id}").json()["trials"]
            return trials if [t["state"] for t in trials] == ["running", "running"] else None

        trials = wait_for(two_running, 20, 0.1, "two running trials")  # max_concurrent 2 of 4
        r = alice.post(f"/v1/sweeps/{sweep_id}/cancel")
        assert r.status_code == 200 and r.json()["state"] == "cancelled"
        time.sleep(0.5)  # ten sweep ticks: none may create a trial
        sweep = alice.get(f"/v1/sweeps/{sweep_id}").json()
        assert [t["state"] for t in sweep["trials"]] == ["cancelled", "cancelled"]
        assert {t["job_id"] for t in trials} <= set(ray.stops)
        again = alice.post(f"/v1/sweeps/{sweep_id}/cancel")
        assert again.status_code == 409 and again.json()["error"]["state"] == "cancelled"
    finally:
        ray.hold = False


def test_no_trial_is_created_once_a_cancel_has_committed(tmp_path, monkeypatch):
    """The race the test above once lost under load: a tick read the sweep as running, the
    cancel committed and ended its trials, and the tick then filled the freed slots with new
    trials. Replayed here step by step: `advance` gets the sweep as read before the cancel."""
    artifacts = LocalArtifactStore(tmp_path / "artifacts")
    ray = ReportingRay(artifacts=artifacts)
    ray.hold = True
    settings = Settings(data_dir=tmp_path, api_tokens=TOKENS, max_sweep_trials=6, **FAST)
    app = create_app(settings, ray=ray, artifacts=artifacts)
    with (
        serve_app(app) as url,
        httpx.Client(base_url=url, headers={"Authorization": f"Bearer {ALICE}"}) as alice,
    ):
        sweep_id = alice.post("/v1/sweeps", json=sweep_body("stale", baseline=False)).json()["id"]
        sweeps = app.state.service.sweeps

        def two_running():
            states = [t["state"] for t in alice.get(f"/v1/sweeps/{sweep_id}").json()["trials"]]
            return states == ["running", "running"]

        wait_for(two_running, 20, 0.1, "two running trials")
        stale = sweeps._sweep(sweep_id)
        assert alice.post(f"/v1/sweeps/{sweep_id}/cancel").status_code == 200
        monkeypatch.setattr(sweeps, "_sweep", lambda _id, tenant=None: stale)
        sweeps.advance(sweep_id)  # sees the trials ended: two free slots of a "running" sweep
        monkeypatch.undo()
        assert len(sweeps._rows(sweep_id)) == 2
        assert [t["state"] for t in alice.get(f"/v1/sweeps/{sweep_id}").json()["trials"]] == ["cancelled"] * 2


class FactoryApi(ApiProcess):
    """ApiProcess running this module's app_factory instead of api.app:create_app."""

    factory = "tests.integration.test_sweeps:app_factory"


def test_kill_9_of_the_api_mid_sweep_loses_nothing_and_creates_no_trial_twice(tmp_path):
    env = {
        **os.environ,
        "SLIMTRAIN_DATA_DIR": str(tmp_path),
        "SLIMTRAIN_API_TOKENS": TOKENS,
        **{f"SLIMTRAIN_{k.upper()}": str(v) for k, v in FAST.items()},
        "SLIMTRAIN_SWEEP_INTERVAL_S": "0.3",  # slow enough to kill it between two trials
    }
    server = FactoryApi(env, tmp_path / "api.log").start()
    try:
        headers = {"Authorization": f"Bearer {ALICE}"}
        grid = {
            "compression.pruning.final_sparsity": [0.5, 0.7, 0.9],
            "compression.quantization.bits": [8, 4],
        }
        body = sweep_body("crash", grid=grid, max_concurrent=1)
        sweep_id = httpx.post(server.url + "/v1/sweeps", json=body, headers=headers).json()["id"]

        def trials():
            return httpx.get(f"{server.url}/v1/sweeps/{sweep_id}", headers=headers).json()["trials"]

        before = wait_for(lambda: len(t := trials()) >= 2 and t, 30, 0.05, "two trials")
        server.kill()  # SIGKILL: no shutdown hook runs
        assert len(before) < 6  # mid-sweep: trials were still to be created
        server.start()
        url = server.url
        sweep = wait_for(
            lambda: (
                (b := httpx.get(f"{url}/v1/sweeps/{sweep_id}", headers=headers).json())["state"] != "running"
                and b
            ),
            60,
            0.1,
            "the sweep to end after the restart",
        )
        assert sweep["state"] == "succeeded", server.log_tail()
        assert [t["index"] for t in sweep["trials"]] == list(range(6))
        assert [t["state"] for t in sweep["trials"]] == ["succeeded"] * 6
        jobs = httpx.get(f"{url}/v1/jobs", params={"limit": 200}, headers=headers).json()["items"]
        names = sorted(j["name"] for j in jobs if j["sweep_id"] == sweep_id)
        assert names == ["crash-dense"] + [f"crash-t00{i}" for i in range(6)]  # each exactly once
        assert len(sweep["pareto"]) >= 1
    finally:
        server.stop()


def test_a_tpe_sweep_asks_optuna_for_each_trial(api):
    alice, _, _ = api
    body = sweep_body(
        "digits-tpe",
        method="tpe",
        grid={"compression.quantization.bits": [8, 4]},
        random={"compression.pruning.final_sparsity": {"low": 0.5, "high": 0.95}},
        max_trials=4,
        baseline=False,
    )
    sweep_id = alice.post("/v1/sweeps", json=body).json()["id"]
    sweep = wait_state(alice, sweep_id, {"succeeded", "failed"})
    assert sweep["state"] == "succeeded" and len(sweep["trials"]) == 4
    for t in sweep["trials"]:
        assert t["params"]["compression.quantization.bits"] in (8, 4)
        assert 0.5 <= t["params"]["compression.pruning.final_sparsity"] <= 0.95
        assert t["accuracy"] == fake_report(alice.get(f"/v1/jobs/{t['job_id']}").json()["spec"])["accuracy"]
    assert sweep["pareto"] and sweep["baseline_job"] is None


def test_cli_submit_wait_shows_the_trials_and_front_marks_the_best(api, tmp_path, cli_width):
    from typer.testing import CliRunner

    from api.cli import app as cli

    cli_width(200)
    alice, _, _ = api
    runner, url = CliRunner(), ["--url", api_url(alice), "--token", ALICE]
    f = tmp_path / "sweep.yaml"
    f.write_text(yaml.safe_dump(sweep_body("cli-sweep")))
    r = runner.invoke(
        cli, ["sweep", "submit", str(f), "--wait", "--interval", "0.2", *url], env={"COLUMNS": "200"}
    )
    assert r.exit_code == 0, r.output
    assert (
        "succeeded, 4/4 trials over" in r.output and "0.8938" in r.output and "final_sparsity" in r.output
    ), r.output
    sweep_id = next(s["id"] for s in alice.get("/v1/sweeps").json()["items"] if s["name"] == "cli-sweep")
    r = runner.invoke(
        cli, ["sweep", "front", sweep_id, "--max-accuracy-drop", "7", *url], env={"COLUMNS": "200"}
    )
    assert r.exit_code == 0, r.output
    front_rows = [line for line in r.output.splitlines() if "*" in line]
    assert len(front_rows) == 3 and sum("best" in line for line in front_rows) == 1
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(sweep_body("x", grid={"compression.pruning.final_sparsty": [0.5]})))
    r = runner.invoke(cli, ["sweep", "submit", str(bad), *url], env={"COLUMNS": "200"})
    assert r.exit_code == 2 and "grid.compression.pruning.final_sparsty" in r.output


def test_median_stopping_prunes_a_trial_below_the_finished_ones(tmp_path, database_url):
    """In process, the loops ticked by hand: two trials finish with their validation curves, the
    third reports a curve below their median while running and is pruned (its job cancelled),
    and the sweep goes on to the fourth."""
    from service.job_service import JobService
    from service.store.db import Database
    from service.store.repo import Store

    db = Database(database_url)  # SQLite and PostgreSQL: the sweep's queries on both
    db.upgrade()
    artifacts = LocalArtifactStore(tmp_path / "artifacts")
    ray = ReportingRay(artifacts=artifacts)
    svc = JobService(Settings(data_dir=tmp_path), Store(db), ray, artifacts)
    grid = {"compression.pruning.final_sparsity": [0.5, 0.6, 0.7, 0.8]}
    body = sweep_body("es", grid=grid, baseline=False, max_concurrent=1, early_stopping={"min_trials": 2})
    sweep_id = svc.sweeps.submit("t", json.dumps(body).encode()).id

    def trials(tick=True):
        if tick:
            svc.reconciler.tick(), svc.scheduler.tick(), svc.ingester.tick(), svc.sweeps.tick()
        return svc.sweeps.get("t", sweep_id).trials

    # Trial 2 is created in the tick that records trial 1, and submitted in the next one.
    wait_for(lambda: [t.state for t in trials()][:2] == ["succeeded", "succeeded"], 20, 0.01, "two trials")
    ray.hold = True
    running = wait_for(
        lambda: len(t := trials()) == 3 and t[2].state == "running" and t[2], 20, 0.01, "trial 2"
    )
    low = [
        {"kind": "eval", "step": 10, "val_accuracy": 0.5},
        {"kind": "eval", "step": 20, "val_accuracy": 0.6},
    ]
    JobArtifacts(artifacts, running.job_id).put_bytes(
        "metrics.jsonl", "".join(json.dumps(e) + "\n" for e in low).encode()
    )
    pruned = wait_for(lambda: (t := trials()[2]).state == "pruned" and t, 20, 0.01, "trial 2 pruned")
    assert "below the median" in pruned.error and running.job_id in ray.stops
    assert svc.store.get_job(running.job_id).state == "cancelled"
    ray.hold = False

    def over():
        trials()  # one round of the loops
        return svc.sweeps.get("t", sweep_id).sweep.state == "succeeded"

    wait_for(over, 20, 0.01, "the sweep to end")
    assert [t.state for t in trials(tick=False)] == ["succeeded", "succeeded", "pruned", "succeeded"]
    db.dispose()
