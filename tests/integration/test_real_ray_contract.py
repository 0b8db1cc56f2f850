"""What the Ray stand-in of the API tests (tests/plugins/fake_ray.py, and live_api.py whose
drivers finish inside the request that submits them) cannot show, on the session's real Ray head:

- how `service.ray_jobs` reads Ray's real answers: a duplicate submission id (which Ray 2.60
  answers with a 500 and a traceback), a submission Ray refuses, ids Ray does not know;
- the abuse and fuzzing of tests/integration/test_abuse.py and test_contract_fuzz.py aimed at
  jobs that are really `running` on Ray and really `queued` behind them (the stand-in's jobs are
  over before a client learns their ids): another tenant's requests, bad tokens, malformed ids,
  every read route, streams that follow a live job, cancel twice and concurrently, and an
  idempotency key replayed after its job was cancelled. Then each job must end in the right
  state with exactly one Ray job per attempt.

The API is a real uvicorn process on the session's Ray head (2 CPUs): a one-worker job holds one
CPU and keeps training, two-worker jobs wait behind it. No job trains to the end: each is
cancelled, which keeps the module to about two minutes on an idle machine."""

from __future__ import annotations

import shlex
import sys
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest
import schemathesis
from schemathesis.engine import events

from service.ray_jobs import ClusterUnavailable, RayJobs, SubmissionRejected
from tests.conftest import wait_for
from tests.plugins.faults import TERMINAL, api_env, quick_spec, ray_submissions, start_api
from tests.plugins.server import ApiProcess

pytestmark = pytest.mark.integration

ALICE, BOB = "contract-alice-0123456789", "contract-bob-0123456789ab"
ENTRY = f"{shlex.quote(sys.executable)} -c pass"


# --- the Ray Jobs API as service.ray_jobs reads it ------------------------------------------


@pytest.fixture(scope="module")
def ray_jobs(ray_cluster) -> RayJobs:
    return RayJobs(ray_cluster["dashboard_url"])


def _sid(tag: str) -> str:
    return f"contract-{tag}-{uuid.uuid4().hex[:8]}"


def _held(dashboard_url: str, sid: str) -> list:
    from ray.job_submission import JobSubmissionClient

    return [j for j in JobSubmissionClient(dashboard_url).list_jobs() if j.submission_id == sid]


def test_a_duplicate_submission_id_is_recognised_and_the_first_stands(ray_jobs, ray_cluster):
    sid = _sid("dup")
    assert ray_jobs.submit(sid, ENTRY, {"WHICH": "first"}, {"which": "first"}) is True
    assert ray_jobs.submit(sid, ENTRY, {"WHICH": "second"}, {"which": "second"}) is False
    held = _held(ray_cluster["dashboard_url"], sid)
    assert len(held) == 1 and held[0].metadata["which"] == "first", held


def test_ray_answers_a_duplicate_with_a_server_error(ray_jobs):
    """Why `submit` asks Ray whether it holds the id instead of trusting the status code: Ray
    2.60's head wraps its agent's refusal into a 500, the status of a broken cluster. If this
    fails, Ray answers otherwise now: update the docstring of service/ray_jobs.py."""
    sid = _sid("raw")
    assert ray_jobs.submit(sid, ENTRY, {}, {}) is True
    r = ray_jobs._c()._do_request("POST", "/api/jobs/", json_data={"entrypoint": ENTRY, "submission_id": sid})
    assert r.status_code == 500, (r.status_code, r.text[-300:])
    assert f"Job with submission_id {sid} already exists" in r.text


class _Reworded(RayJobs):
    """Ray as a later version might answer a duplicate: the same refusal, other words."""

    def _request(self, method, endpoint, **kw):
        r = super()._request(method, endpoint, **kw)
        if method == "POST" and endpoint == "/api/jobs/" and r.status_code != 200:
            r._content = b"Internal Server Error"
        return r


def test_a_duplicate_is_recognised_whatever_ray_calls_it(ray_cluster):
    ray_jobs = _Reworded(ray_cluster["dashboard_url"])
    sid = _sid("reworded")
    assert ray_jobs.submit(sid, ENTRY, {}, {}) is True
    assert ray_jobs.submit(sid, ENTRY, {}, {}) is False


def test_a_submission_ray_refuses_is_rejected_not_a_duplicate(ray_jobs, ray_cluster):
    sid = _sid("refused")
    with pytest.raises(SubmissionRejected, match="entrypoint"):
        ray_jobs.submit(sid, None, {}, {})  # type: ignore[arg-type]  # Ray's 400: entrypoint
    assert ray_jobs.info(sid) is None and _held(ray_cluster["dashboard_url"], sid) == []


def test_a_submission_ray_does_not_know(ray_jobs):
    sid = _sid("unknown")
    assert ray_jobs.info(sid) is None
    assert ray_jobs.stop(sid) is False
    assert ray_jobs.logs(sid) is None


def test_an_unreachable_cluster_is_unavailable_not_a_refusal():
    from tests.raycluster import free_port

    with pytest.raises(ClusterUnavailable):
        RayJobs(f"http://127.0.0.1:{free_port()}", timeout=2).submit(_sid("nowhere"), ENTRY, {}, {})


# --- the live API with jobs running and queued on real Ray ------------------------------------


@dataclass
class Live:
    api: ApiProcess
    dashboard_url: str
    doc: dict
    running: str  # alice's one-worker job, training
    queued: str  # alice's two-worker job, waiting for the CPU the running one holds
    keyed: dict  # alice's two-worker job submitted with an Idempotency-Key, queued too
    key: str

    def client(self, token: str | None = ALICE, timeout: float | httpx.Timeout = 30) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.api.url, headers=headers, timeout=timeout)


def _long_spec() -> dict:
    # ~22,000 steps of a small MLP: it trains for as long as the test needs, then is cancelled.
    return {**quick_spec("contract-running"), "train": {"epochs": 1000, "batch_size": 64}}


def _two_workers(name: str) -> dict:
    return {**quick_spec(name), "parallel": {"workers": 2}}


@pytest.fixture(scope="module")
def live(ray_cluster, tmp_path_factory) -> Iterator[Live]:
    data = tmp_path_factory.mktemp("real-ray-contract")
    api = start_api(api_env(data, ray_cluster, {ALICE: "alice", BOB: "bob"}))
    try:
        with httpx.Client(base_url=api.url, headers={"Authorization": f"Bearer {ALICE}"}, timeout=30) as c:
            running = c.post("/v1/jobs", json=_long_spec()).json()["id"]
            wait_for(lambda: c.get(f"/v1/jobs/{running}").json()["state"] == "running", 180, 0.5, "running")
            queued = c.post("/v1/jobs", json=_two_workers("contract-queued")).json()["id"]
            key = f"contract-{uuid.uuid4().hex}"
            r = c.post("/v1/jobs", json=_two_workers("contract-keyed"), headers={"Idempotency-Key": key})
            assert r.status_code == 201, r.text
            live = Live(
                api,
                ray_cluster["dashboard_url"],
                c.get("/openapi.json").json(),
                running,
                queued,
                r.json(),
                key,
            )
        yield live
    finally:
        with httpx.Client(base_url=api.url, headers={"Authorization": f"Bearer {ALICE}"}, timeout=30) as c:
            for j in c.get("/v1/jobs", params={"limit": 200}).json().get("items", []):
                if j["state"] not in TERMINAL:
                    c.post(f"/v1/jobs/{j['id']}/cancel")
        api.stop()


def _job_routes(doc: dict) -> list[tuple[str, str]]:
    return [
        (method.upper(), path) for path, item in doc["paths"].items() if "{job_id}" in path for method in item
    ]


def _url(path: str, job_id: str, name: str = "report.json") -> str:
    return path.replace("{job_id}", job_id).replace("{name}", name)


def _request(c: httpx.Client, method: str, url: str, **kw) -> httpx.Response:
    """A request whose answer may be a stream that follows a live job: status and headers, then
    at most the first line (a stream of a queued job may send nothing yet)."""
    with c.stream(method, url, **kw) as r:
        if "text/event-stream" in r.headers.get("content-type", "") or "follow=true" in url:
            try:
                for line in r.iter_lines():
                    if line.strip():
                        break
            except httpx.ReadTimeout:
                pass
        else:
            r.read()
    return r


def _states(live: Live) -> dict[str, str]:
    with live.client() as c:
        return {
            j: c.get(f"/v1/jobs/{j}").json()["state"] for j in (live.running, live.queued, live.keyed["id"])
        }


def _error_code(r: httpx.Response) -> str:
    return r.json()["error"]["code"]


def test_the_jobs_are_running_and_queued_on_ray(live):
    assert _states(live) == {live.running: "running", live.queued: "queued", live.keyed["id"]: "queued"}
    held = ray_submissions(live.dashboard_url, [live.running, live.queued, live.keyed["id"]])
    assert held == {live.running: [live.running], live.queued: [], live.keyed["id"]: []}


def test_another_tenant_and_bad_tokens_reach_no_live_job(live):
    routes = _job_routes(live.doc)
    assert len(routes) >= 9  # the walk found the job routes, not an empty document
    with live.client(BOB, timeout=httpx.Timeout(30, read=5)) as bob, live.client(None) as anon:
        for job in (live.running, live.queued):
            for method, path in routes:
                r = _request(bob, method, _url(path, job))
                assert r.status_code == 404, (method, path, r.status_code)
                assert _error_code(r) == "job_not_found"
                for headers in (
                    {},
                    {"Authorization": "Bearer wrong-token-0123456789"},
                    {"Authorization": ALICE},
                ):
                    r = anon.request(method, _url(path, job), headers=headers)
                    assert r.status_code == 401, (method, path, headers, r.status_code)
    assert _states(live)[live.running] == "running" and _states(live)[live.queued] == "queued"


MALFORMED_IDS = ["%2e%2e", "not-a-job", "x" * 300, "%00", "'%20OR%201=1%20--", "%E2%80%AE"]


def near_misses(job_id: str) -> list[str]:
    """Ids one edit away from a real one: a character more, the last one changed, and the id in
    capitals where that changes it (an id whose random part has no letter, as 2% do, stays
    itself)."""
    last = "0" if job_id[-1] != "0" else "1"
    return [job_id + "x", job_id[:-1] + last] + ([job_id.upper()] if job_id.upper() != job_id else [])


def test_near_misses_are_other_ids():
    for job_id in ("20261203-174125-92943293", "20261203-174125-9294329a", "20261203-174125-00000000"):
        misses = near_misses(job_id)
        assert job_id not in misses and len(set(misses)) == len(misses) >= 2


def test_malformed_and_near_miss_ids_are_404_on_every_job_route(live):
    with live.client(timeout=httpx.Timeout(30, read=5)) as c:
        for job_id in MALFORMED_IDS + near_misses(live.running):
            for method, path in _job_routes(live.doc):
                r = _request(c, method, _url(path, job_id))
                assert r.status_code == 404, (method, path, job_id, r.status_code, r.text[:200])
                assert _error_code(r) in ("job_not_found", "not_found")


def test_every_read_route_answers_about_a_running_and_a_queued_job(live):
    with live.client(timeout=httpx.Timeout(30, read=5)) as c:
        for job in (live.running, live.queued):
            is_running = job == live.running
            assert c.get(f"/v1/jobs/{job}").json()["state"] == ("running" if is_running else "queued")
            attempts = c.get(f"/v1/jobs/{job}/attempts").json()["items"]
            assert [a["submission_id"] for a in attempts] == ([job] if is_running else [])
            assert c.get(f"/v1/jobs/{job}/metrics").status_code == 200
            logs = c.get(f"/v1/jobs/{job}/logs")
            assert logs.status_code == 200, logs.text
            assert (f"=== attempt 1 ({job}) ===" in logs.text) == is_running
            arts = c.get(f"/v1/jobs/{job}/artifacts")
            assert arts.status_code == 200, arts.text
            names = {a["name"] for a in arts.json()["items"]}
            assert ("spec.json" in names) == is_running and "report.json" not in names
            for name in ("report.json", "model.safetensors", "no-such-file"):
                r = c.get(f"/v1/jobs/{job}/artifacts/{name}")
                assert r.status_code == 404 and _error_code(r) == "artifact_not_found", (job, name, r.text)
            r = c.get(f"/v1/jobs/{job}/report")
            assert r.status_code == 404 and _error_code(r) == "artifact_not_found", r.text
            if is_running:
                assert c.get(f"/v1/jobs/{job}/artifacts/spec.json").json()["name"] == "contract-running"
            # Streams that follow the job until it ends: the first event is its current state;
            # the log follows the driver through Ray (a queued job has none yet).
            with c.stream("GET", f"/v1/jobs/{job}/events") as r:
                assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
                lines = []
                for line in r.iter_lines():
                    lines.append(line)
                    if line.startswith("data:"):
                        break
                assert any(line.startswith("event:") for line in lines), lines
            r = _request(c, "GET", f"/v1/jobs/{job}/logs?follow=true")
            assert r.status_code == 200
    assert _states(live)[live.running] == "running" and _states(live)[live.queued] == "queued"


# The job routes that answer at once (the event stream and `logs?follow=true` follow a live job
# until it ends; cancel changes it, and is tested on its own below).
FUZZED = ["get_job", "job_attempts", "job_metrics", "list_artifacts", "get_artifact", "job_report"]


def _fuzz(live: Live, job_id: str) -> tuple[list[str], dict[str, set[int]]]:
    config = schemathesis.Config.from_dict(
        {
            "base-url": live.api.url,
            "headers": {"Authorization": f"Bearer {ALICE}"},
            "workers": 1,
            "request-timeout": 20,
            "generation": {"max-examples": 5, "deterministic": True},
            "phases": {"stateful": {"enabled": False}},
            "parameters": {"path.job_id": job_id},
        }
    )
    schema = schemathesis.openapi.from_url(f"{live.api.url}/openapi.json", config=config)
    schema = schema.include(operation_id=FUZZED)
    failures: list[str] = []
    statuses: dict[str, set[int]] = {}
    for event in schemathesis.engine.from_schema(schema).execute():
        if isinstance(event, events.ScenarioFinished):
            for nodes in event.recorder.checks.values():
                for node in nodes:
                    if node.failure_info is not None:
                        f = node.failure_info.failure
                        failures.append(f"{f.operation} [{node.name}] {f.title}: {f.message}")
            for case_id, interaction in event.recorder.interactions.items():
                if interaction.response is not None:
                    label = event.recorder.cases[case_id].value.operation.label
                    statuses.setdefault(label, set()).add(interaction.response.status_code)
        elif isinstance(event, events.NonFatalError | events.FatalError):
            failures.append(f"error: {event!r}")
    return failures, statuses


def test_fuzzing_the_job_routes_of_a_running_and_a_queued_job(live):
    for job in (live.running, live.queued):
        failures, statuses = _fuzz(live, job)
        assert not failures, "\n".join(failures)
        assert len(statuses) == len(FUZZED), statuses
        assert all(code < 500 for codes in statuses.values() for code in codes), statuses
        assert 200 in statuses["GET /v1/jobs/{job_id}"], statuses  # the fuzzer reached the job
    assert _states(live)[live.running] == "running" and _states(live)[live.queued] == "queued"


def test_a_queued_job_cancelled_twice_and_its_key_replayed(live):
    job = live.keyed["id"]
    with live.client() as c, live.client(BOB) as bob:
        assert bob.post(f"/v1/jobs/{job}/cancel").status_code == 404
        r = c.post(f"/v1/jobs/{job}/cancel")
        assert r.status_code == 200 and r.json()["state"] == "cancelled", r.text
        r = c.post(f"/v1/jobs/{job}/cancel")
        assert r.status_code == 409 and _error_code(r) == "invalid_state", r.text
        assert r.json()["error"]["state"] == "cancelled"
        # The same key and body: the same job, cancelled, not a new one.
        again = c.post("/v1/jobs", json=_two_workers("contract-keyed"), headers={"Idempotency-Key": live.key})
        assert again.status_code in (200, 201), again.text
        assert again.json()["id"] == job and again.json()["state"] == "cancelled"
        assert again.headers.get("Idempotent-Replayed") == "true"
        other = c.post("/v1/jobs", json=_two_workers("contract-other"), headers={"Idempotency-Key": live.key})
        assert other.status_code == 409, other.text
        # Bob's same key is his own.
        mine = bob.post(
            "/v1/jobs", json=_two_workers("contract-keyed"), headers={"Idempotency-Key": live.key}
        )
        assert mine.status_code == 201 and mine.json()["id"] != job
        assert bob.post(f"/v1/jobs/{mine.json()['id']}/cancel").json()["state"] == "cancelled"
    assert _states(live)[live.queued] == "queued"


def test_a_running_job_cancelled_twice_at_once(live):
    answers: list[httpx.Response] = []
    barrier = threading.Barrier(2)

    def cancel():
        with live.client() as c:
            barrier.wait()
            answers.append(c.post(f"/v1/jobs/{live.running}/cancel"))

    threads = [threading.Thread(target=cancel) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(r.status_code for r in answers) == [200, 409], [r.text for r in answers]
    won = next(r for r in answers if r.status_code == 200)
    lost = next(r for r in answers if r.status_code == 409)
    assert won.json()["state"] == "cancelled" and lost.json()["error"]["state"] == "cancelled", lost.text
    with live.client() as c:
        assert c.get(f"/v1/jobs/{live.running}").json()["state"] == "cancelled"
        r = c.post(f"/v1/jobs/{live.running}/cancel")
        assert r.status_code == 409 and _error_code(r) == "invalid_state"


def test_every_job_ends_in_its_state_with_one_ray_job_per_attempt(live):
    """The queued job is admitted once the cancelled one's CPU is free, and cancelled as it
    starts (a state the stand-in never shows a client); then every attempt is closed and Ray
    holds exactly one Ray job per attempt, stopped."""
    from ray.job_submission import JobSubmissionClient

    ids = [live.running, live.queued, live.keyed["id"]]
    with live.client() as c:
        wait_for(lambda: c.get(f"/v1/jobs/{live.queued}").json()["state"] != "queued", 120, 0.5, "admission")
        r = c.post(f"/v1/jobs/{live.queued}/cancel")
        assert r.status_code == 200 and r.json()["state"] == "cancelled", r.text

        def closed():
            attempts = {j: c.get(f"/v1/jobs/{j}/attempts").json()["items"] for j in ids}
            return attempts if all(a["outcome"] for items in attempts.values() for a in items) else None

        attempts = wait_for(closed, 120, 0.5, "every attempt closed")
        assert {j: c.get(f"/v1/jobs/{j}").json()["state"] for j in ids} == dict.fromkeys(ids, "cancelled")
    assert {j: [(a["submission_id"], a["outcome"]) for a in items] for j, items in attempts.items()} == {
        live.running: [(live.running, "cancelled")],
        live.queued: [(live.queued, "cancelled")],
        live.keyed["id"]: [],
    }
    held = ray_submissions(live.dashboard_url, ids)
    assert held == {live.running: [live.running], live.queued: [live.queued], live.keyed["id"]: []}
    ray = JobSubmissionClient(live.dashboard_url)
    for j in (live.running, live.queued):
        status = wait_for(
            lambda j=j: ray.get_job_status(j).is_terminal() and ray.get_job_status(j), 60, 0.5, j
        )
        assert status.value == "STOPPED", (j, status)
