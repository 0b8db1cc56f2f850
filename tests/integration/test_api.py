"""The REST API over real HTTP (uvicorn on loopback) on SQLite and PostgreSQL: every route and
every error code, idempotency under concurrent requests, pagination, tenant isolation, SSE
resumption. The Ray cluster is a stand-in the tests drive (tests/plugins/fake_ray.py); the
background loops run as in production, on short intervals."""

from __future__ import annotations

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from api.app import create_app
from service.artifacts import JobArtifacts, LocalArtifactStore
from service.settings import Settings
from tests.conftest import wait_for
from tests.plugins.fake_ray import RUNNING, SUCCEEDED, FakeRay
from tests.plugins.server import serve_app

pytestmark = pytest.mark.integration

ALICE, BOB = "alice-token-0123456789", "bob-token-0123456789ab"
METRICS = "metrics-token-0123456789abcdef"  # Prometheus' (tests/integration/test_security.py)
SPEC = {"name": "api-test", "model": {"name": "mlp"}, "data": {"name": "digits"}, "parallel": {"workers": 2}}


class Api:
    def __init__(self, url: str, ray: FakeRay, artifacts: LocalArtifactStore):
        self.url, self.ray, self.artifacts = url, ray, artifacts
        self.alice = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {ALICE}"}, timeout=30)
        self.bob = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {BOB}"}, timeout=30)
        self.anon = httpx.Client(base_url=url, timeout=30)

    def submit(self, client=None, **over) -> dict:
        r = (client or self.alice).post("/v1/jobs", json={**SPEC, **over})
        assert r.status_code == 201, r.text
        return r.json()

    def job(self, job_id: str) -> dict:
        return self.alice.get(f"/v1/jobs/{job_id}").json()

    def wait_state(self, job_id: str, state: str, timeout: float = 15) -> dict:
        return wait_for(
            lambda: (j := self.job(job_id))["state"] == state and j, timeout, 0.05, f"{job_id} {state}"
        )


@pytest.fixture(scope="module")
def api(module_database_url, tmp_path_factory):
    data = tmp_path_factory.mktemp("data")
    settings = Settings(
        data_dir=data,
        database_url=module_database_url,
        api_tokens=f"{ALICE}:alice,{BOB}:bob",
        metrics_token=METRICS,
        scheduler_interval_s=0.1,
        reconcile_interval_s=0.1,
        ingest_interval_s=0.1,
        max_workers=8,
        max_epochs=100,
    )
    ray = FakeRay(cpu=1000)
    artifacts = LocalArtifactStore(data / "artifacts")
    with serve_app(create_app(settings, ray=ray, artifacts=artifacts)) as url:
        yield Api(url, ray, artifacts)


V1_ROUTES = [
    ("POST", "/v1/jobs"),
    ("GET", "/v1/jobs"),
    ("GET", "/v1/jobs/x"),
    ("POST", "/v1/jobs/x/cancel"),
    ("GET", "/v1/jobs/x/attempts"),
    ("GET", "/v1/jobs/x/metrics"),
    ("GET", "/v1/jobs/x/events"),
    ("GET", "/v1/jobs/x/logs"),
    ("GET", "/v1/jobs/x/artifacts"),
    ("GET", "/v1/jobs/x/artifacts/report.json"),
    ("GET", "/v1/jobs/x/report"),
    ("GET", "/v1/cluster"),
]


@pytest.mark.parametrize("method,path", V1_ROUTES)
def test_every_v1_route_needs_a_valid_token(api, method, path):
    for headers in (
        {},
        {"Authorization": "Bearer wrong-token-0123456789"},
        {"Authorization": f"Basic {ALICE}"},
    ):
        r = api.anon.request(method, path, headers=headers, json=SPEC if method == "POST" else None)
        assert r.status_code == 401, (headers, r.text)
        assert r.json()["error"]["code"] == "unauthorized"
        assert r.headers["WWW-Authenticate"] == "Bearer"


def test_operational_routes_are_open(api):
    assert api.anon.get("/healthz").json() == {"status": "ok", "checks": {}}
    r = api.anon.get("/readyz")
    assert r.status_code == 200
    assert r.json()["checks"] == {
        "database": "ok",
        "reconciler": "ok",
        "scheduler": "ok",
        "ingest": "ok",
        "sweeps": "ok",
    }


def test_submit_answers_201_with_the_queued_job(api):
    r = api.alice.post("/v1/jobs", json=SPEC)
    assert r.status_code == 201
    job = r.json()
    assert r.headers["Location"] == f"/v1/jobs/{job['id']}"
    assert job["tenant"] == "alice" and job["name"] == "api-test" and job["max_attempts"] == 3
    assert job["spec"]["train"]["epochs"] == 10  # defaults filled in
    assert job["state"] == "queued"


def test_invalid_spec_is_422_naming_each_field(api):
    bad = {**SPEC, "model": {"name": "resnet50"}, "colour": "red"}
    r = api.alice.post("/v1/jobs", json=bad)
    assert r.status_code == 422
    err = r.json()["error"]
    assert err["code"] == "invalid_spec"
    assert {f["field"] for f in err["fields"]} == {"model.name", "colour"}
    assert "allowed: mlp, lenet5, convnet, gpt" in err["message"]


@pytest.mark.parametrize(
    "body,field",
    [(b"{not json", "(body)"), (b"[1, 2]", "(spec)"), (b"", "(body)"), (b'"x"', "(spec)")],
)
def test_a_body_that_is_no_spec_is_422(api, body, field):
    r = api.alice.post("/v1/jobs", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 422
    assert r.json()["error"]["fields"][0]["field"] == field


def test_a_job_above_the_limits_is_422(api):
    r = api.alice.post("/v1/jobs", json={**SPEC, "parallel": {"workers": 16}, "train": {"batch_size": 64}})
    assert r.status_code == 422
    assert r.json()["error"] == {
        "code": "limit_exceeded",
        "message": "parallel.workers: 16 is above this server's limit (8)",
        "fields": [{"field": "parallel.workers", "message": "16 is above this server's limit (8)"}],
    }


def test_streaming_on_for_data_that_cannot_stream_is_422_at_submit(api):
    r = api.alice.post("/v1/jobs", json={**SPEC, "data": {"name": "digits", "streaming": "on"}})
    assert r.status_code == 422
    message = "on is not possible: built-in datasets load in memory; use auto or off"
    assert r.json()["error"]["fields"] == [{"field": "data.streaming", "message": message}]


def test_an_unknown_field_names_the_nearest_known_one(api):
    r = api.alice.post("/v1/jobs", json={**SPEC, "compression": {"pruning": {"final_sparsty": 0.9}}})
    assert r.status_code == 422
    err = r.json()["error"]
    message = "unknown field `final_sparsty`; did you mean `final_sparsity`?"
    assert err["fields"] == [{"field": "compression.pruning.final_sparsty", "message": message}]
    assert err["message"] == f"compression.pruning.final_sparsty: {message}"


def test_a_schedule_past_the_last_step_is_422_at_submit(api):
    # digits: 1437 training samples, 22 batches of 64 per epoch, 10 epochs
    spec = {**SPEC, "compression": {"pruning": {"start_step": 0, "end_step": 221, "frequency": 10}}}
    r = api.alice.post("/v1/jobs", json=spec)
    assert r.status_code == 422
    assert r.json()["error"] == {
        "code": "invalid_spec",
        "message": "compression.pruning.end_step: 221 is after the job's last step (220): "
        "10 epochs of 22 steps",
        "fields": [
            {
                "field": "compression.pruning.end_step",
                "message": "221 is after the job's last step (220): 10 epochs of 22 steps",
            }
        ],
    }
    spec["compression"]["pruning"]["end_step"] = 220  # the last step itself is allowed
    assert api.alice.post("/v1/jobs", json=spec).status_code == 201


YAML_SPEC = "name: api-test\nmodel: {name: mlp}\ndata: {name: digits}\nparallel:\n  workers: 2\n"


@pytest.mark.parametrize(
    "content_type", ["application/yaml", "application/x-yaml", "text/yaml; charset=utf-8"]
)
def test_a_yaml_body_is_read_like_json(api, content_type):
    key = f"yaml-{content_type}"
    r = api.alice.post(
        "/v1/jobs",
        content=YAML_SPEC.encode(),
        headers={"Content-Type": content_type, "Idempotency-Key": key},
    )
    assert r.status_code == 201, r.text
    job = r.json()
    assert job["spec"] == api.submit()["spec"]
    # the same spec as JSON under the same key is the same submission
    again = api.alice.post("/v1/jobs", json=SPEC, headers={"Idempotency-Key": key})
    assert again.status_code == 201 and again.json()["id"] == job["id"]


@pytest.mark.parametrize(
    "body,message",
    [
        (b"name: [x\n", "body: not valid YAML or JSON: line 2, column 1: expected ',' or ']'"),
        (b"a: &a [1]\nb: *a\n", "body: not valid YAML or JSON: line 2, column 4: aliases (*name)"),
        (b"\xff\xfe", "body: not UTF-8"),
        (YAML_SPEC.replace("mlp", "mpl").encode(), "model.name: unknown model 'mpl'"),
    ],
)
def test_a_bad_yaml_body_is_422_naming_the_line(api, body, message):
    r = api.alice.post("/v1/jobs", content=body, headers={"Content-Type": "application/yaml"})
    assert r.status_code == 422
    assert r.json()["error"]["message"].startswith(message), r.json()


@pytest.mark.parametrize("content_type", ["application/json", "application/yaml"])
def test_a_body_nested_too_deeply_is_422_not_500(api, content_type):
    r = api.alice.post("/v1/jobs", content=b"[" * 100_000, headers={"Content-Type": content_type})
    assert r.status_code == 422 and r.json()["error"]["fields"][0]["field"] == "(body)"


@pytest.mark.parametrize(
    "content_type", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data"]
)
def test_a_body_neither_json_nor_yaml_is_415(api, content_type):
    r = api.alice.post("/v1/jobs", content=json.dumps(SPEC).encode(), headers={"Content-Type": content_type})
    assert r.status_code == 415
    assert r.json()["error"] == {
        "code": "unsupported_media_type",
        "message": f"Content-Type {content_type}: send the job spec as JSON (application/json) "
        "or YAML (application/yaml)",
    }


def test_a_body_over_one_mib_is_413_by_length_and_by_stream(api):
    big = b'{"name": "' + b"x" * (1024 * 1024) + b'"}'
    r = api.alice.post("/v1/jobs", content=big, headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"

    def chunks():  # no Content-Length: chunked transfer encoding
        for _ in range(20):
            yield b" " * 65536

    r = api.alice.post("/v1/jobs", content=chunks(), headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and "larger than the limit of 1048576" in r.json()["error"]["message"]
    big_yaml = b"name: " + b"x" * (1024 * 1024) + b"\n"
    r = api.alice.post("/v1/jobs", content=big_yaml, headers={"Content-Type": "application/yaml"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"


def test_a_lying_content_length_is_refused(api):
    with socket.create_connection(("127.0.0.1", int(api.url.rsplit(":", 1)[1]))) as s:
        s.sendall(
            b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + ALICE.encode() + b"\r\n"
            b"Content-Type: application/json\r\nContent-Length: 99999999999\r\n\r\n{}"
        )
        assert s.recv(100).startswith(b"HTTP/1.1 413")


def test_idempotency_key_replays_the_job_and_refuses_another_body(api):
    h = {"Idempotency-Key": "idem-1"}
    a = api.alice.post("/v1/jobs", json=SPEC, headers=h)
    b = api.alice.post(
        "/v1/jobs", content=json.dumps(SPEC, indent=4), headers={**h, "Content-Type": "application/json"}
    )
    assert a.status_code == b.status_code == 201
    assert a.json()["id"] == b.json()["id"]
    assert b.headers["Idempotent-Replayed"] == "true" and "Idempotent-Replayed" not in a.headers
    c = api.alice.post("/v1/jobs", json={**SPEC, "priority": 5}, headers=h)
    assert c.status_code == 409 and c.json()["error"]["code"] == "idempotency_conflict"
    d = api.bob.post("/v1/jobs", json=SPEC, headers=h)  # keys are per tenant
    assert d.status_code == 201 and d.json()["id"] != a.json()["id"]


def test_concurrent_duplicate_requests_create_one_job(api):
    key = {"Idempotency-Key": f"concurrent-{time.time()}"}
    barrier = threading.Barrier(8)

    def post(_):
        with httpx.Client(base_url=api.url, headers={"Authorization": f"Bearer {ALICE}", **key}) as c:
            barrier.wait()
            return c.post("/v1/jobs", json={**SPEC, "name": "dup"})

    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(post, range(8)))
    assert {r.status_code for r in responses} == {201}
    assert len({r.json()["id"] for r in responses}) == 1
    dups = [j for j in api.alice.get("/v1/jobs", params={"limit": 200}).json()["items"] if j["name"] == "dup"]
    assert len(dups) == 1


def test_idempotency_key_header_is_checked(api):
    r = api.alice.post("/v1/jobs", json=SPEC, headers={"Idempotency-Key": "k" * 256})
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_request"


def test_get_and_tenant_isolation(api):
    job = api.submit()
    assert api.job(job["id"])["id"] == job["id"]
    for path in ("", "/cancel", "/metrics", "/events", "/logs", "/artifacts", "/report", "/attempts"):
        method = "POST" if path == "/cancel" else "GET"
        r = api.bob.request(method, f"/v1/jobs/{job['id']}{path}")
        assert r.status_code == 404 and r.json()["error"]["code"] == "job_not_found", path
    assert api.alice.get("/v1/jobs/20990101-000000-deadbeef").status_code == 404
    assert job["id"] not in [j["id"] for j in api.bob.get("/v1/jobs").json()["items"]]


def test_pagination_and_state_filter(api):
    client = httpx.Client(base_url=api.url, headers={"Authorization": f"Bearer {BOB}"})
    ids = [api.submit(client, name=f"page-{i}")["id"] for i in range(5)]
    seen, cursor = [], None
    while True:
        params = {"limit": 2, **({"cursor": cursor} if cursor else {})}
        page = client.get("/v1/jobs", params=params).json()
        assert len(page["items"]) <= 2
        seen += [j["id"] for j in page["items"] if j["name"].startswith("page-")]
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert seen == ids[::-1]
    client.post(f"/v1/jobs/{ids[0]}/cancel")
    cancelled = client.get("/v1/jobs", params={"state": "cancelled"}).json()["items"]
    assert [j["id"] for j in cancelled] == [ids[0]]
    both = client.get("/v1/jobs", params=[("state", "cancelled"), ("state", "queued"), ("state", "starting")])
    assert ids[0] in [j["id"] for j in both.json()["items"]]


@pytest.mark.parametrize(
    "params,code,status",
    [
        ({"state": "paused"}, "invalid_request", 422),
        ({"limit": 0}, "invalid_request", 422),
        ({"limit": 201}, "invalid_request", 422),
        ({"cursor": "no-such-cursor"}, "invalid_cursor", 400),
        ({"cursor": "../../etc"}, "invalid_cursor", 400),
        ({"cursor": "x" * 2000}, "bad_request", 400),
    ],
)
def test_bad_list_parameters(api, params, code, status):
    r = api.alice.get("/v1/jobs", params=params)
    assert r.status_code == status and r.json()["error"]["code"] == code


def test_cancel_then_cancel_again_is_409(api):
    job = api.submit()
    r = api.alice.post(f"/v1/jobs/{job['id']}/cancel")
    assert r.status_code == 200 and r.json()["state"] == "cancelled"
    r = api.alice.post(f"/v1/jobs/{job['id']}/cancel")
    assert r.status_code == 409
    assert r.json()["error"]["code"] == "invalid_state" and r.json()["error"]["state"] == "cancelled"


@pytest.fixture(scope="module")
def finished(api):
    """One job taken through Ray's statuses, with metrics, a log and artifacts."""
    job = api.submit(name="finished")
    jid = job["id"]
    wait_for(lambda: jid in api.ray.jobs, 10, 0.05, "submission")
    # as Ray forwards a worker's line: its prefix coloured
    api.ray.set(jid, RUNNING, log="\x1b[36m(RayTrainWorker pid=7)\x1b[0m driver says hello\n")
    api.wait_state(jid, "running")
    arts = JobArtifacts(api.artifacts, jid)
    recs = [{"kind": "event", "event": "start", "step": 0, "total_steps": 30}]
    recs += [{"kind": "train", "step": s, "loss": 2.0 / s, "sparsity": 0.5} for s in (10, 20, 30)]
    recs += [{"kind": "eval", "step": 30, "val_accuracy": 0.9}]
    arts.put_bytes("metrics.jsonl", "".join(json.dumps(r) + "\n" for r in recs).encode())
    wait_for(lambda: api.job(jid)["progress"]["step"] == 30, 10, 0.05, "ingest")
    arts.put_json("report.json", {"accuracy": 0.9, "sparsity": {"global": 0.5}})
    arts.put_bytes("checkpoints/step-00000030/meta.json", b'{"step": 30}')
    arts.put_bytes("model.safetensors", bytes(range(256)) * 1000)
    api.ray.set(jid, SUCCEEDED, "Job finished successfully.")
    return api.wait_state(jid, "succeeded")


def test_progress_and_attempts_of_a_finished_job(api, finished):
    assert finished["progress"]["val_accuracy"] == 0.9 and finished["progress"]["total_steps"] == 30
    assert finished["started_at"] and finished["finished_at"] and finished["error"] is None
    attempts = api.alice.get(f"/v1/jobs/{finished['id']}/attempts").json()["items"]
    assert [(a["number"], a["submission_id"], a["outcome"]) for a in attempts] == [
        (1, finished["id"], "succeeded")
    ]


def test_metrics_series_pages_and_kinds(api, finished):
    url = f"/v1/jobs/{finished['id']}/metrics"
    everything = api.alice.get(url).json()
    assert [m["seq"] for m in everything["items"]] == [0, 1, 2, 3, 4] and everything["next_cursor"] is None
    page = api.alice.get(url, params={"limit": 2}).json()
    assert [m["seq"] for m in page["items"]] == [0, 1] and page["next_cursor"] == "1"
    page = api.alice.get(url, params={"limit": 2, "cursor": "1"}).json()
    assert [m["seq"] for m in page["items"]] == [2, 3]
    train = api.alice.get(url, params={"kind": "train"}).json()["items"]
    assert [(m["step"], m["data"]["loss"]) for m in train] == [(10, 0.2), (20, 0.1), (30, 2.0 / 30)]
    assert api.alice.get(url, params={"cursor": "x"}).status_code == 400


def _read_sse(client, url, headers=None, limit=100):
    events, current = [], {}
    with client.stream("GET", url, headers=headers or {}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if not line:
                if "data" in current:
                    events.append(current)
                current = {}
                if len(events) >= limit:
                    break
                continue
            key, _, value = line.partition(":")
            current[key] = value.strip()
    return events


def test_events_stream_replays_everything_and_ends_at_the_final_state(api, finished):
    url = f"/v1/jobs/{finished['id']}/events"
    events = _read_sse(api.alice, url)
    assert [int(e["id"]) for e in events] == list(range(1, len(events) + 1))
    states = [json.loads(e["data"])["state"] for e in events if e["event"] == "state"]
    assert states == ["queued", "starting", "running", "succeeded"]
    assert sum(e["event"] == "metric" for e in events) == 5
    resumed = _read_sse(api.alice, url, headers={"Last-Event-ID": events[3]["id"]})
    assert resumed == events[4:]
    assert _read_sse(api.alice, url + "?after=5") == events[5:]
    assert api.alice.get(url, headers={"Last-Event-ID": "abc"}).status_code == 400


def test_events_arrive_live(api):
    job = api.submit(name="live")
    got: list[dict] = []

    def follow():
        got.extend(_read_sse(api.alice, f"/v1/jobs/{job['id']}/events"))

    t = threading.Thread(target=follow)
    t.start()
    wait_for(lambda: job["id"] in api.ray.jobs, 10, 0.05, "submission")
    api.alice.post(f"/v1/jobs/{job['id']}/cancel")
    t.join(10)
    assert not t.is_alive()
    assert [json.loads(e["data"])["state"] for e in got][-1] == "cancelled"


def test_logs(api, finished):
    text = api.alice.get(f"/v1/jobs/{finished['id']}/logs").text
    # plain text: no colour codes reach a pipe or the dashboard
    assert text == f"=== attempt 1 ({finished['id']}) ===\n(RayTrainWorker pid=7) driver says hello\n"
    followed = api.alice.get(f"/v1/jobs/{finished['id']}/logs", params={"follow": "true"}).text
    assert followed == text
    queued = api.submit(name="no-log-yet", parallel={"workers": 2})
    api.alice.post(f"/v1/jobs/{queued['id']}/cancel")
    assert api.alice.get(f"/v1/jobs/{queued['id']}/logs").text in (
        "",
        f"=== attempt 1 ({queued['id']}) ===\n",
    )


def test_artifacts_list_and_download(api, finished):
    base = f"/v1/jobs/{finished['id']}/artifacts"
    names = [a["name"] for a in api.alice.get(base).json()["items"]]
    assert {
        "report.json",
        "metrics.jsonl",
        "spec.json",
        "model.safetensors",
        "checkpoints/step-00000030/meta.json",
    } <= set(names)
    assert names == sorted(names)
    page = api.alice.get(base, params={"limit": 2}).json()
    rest = api.alice.get(base, params={"cursor": page["next_cursor"]}).json()["items"]
    assert [a["name"] for a in page["items"] + rest] == names
    ckpt = api.alice.get(base, params={"prefix": "checkpoints"}).json()["items"]
    assert [a["name"] for a in ckpt] == ["checkpoints/step-00000030/meta.json"]
    r = api.alice.get(f"{base}/model.safetensors")
    assert r.status_code == 200 and r.content == bytes(range(256)) * 1000
    assert r.headers["content-type"] == "application/octet-stream"
    assert api.alice.get(f"{base}/checkpoints/step-00000030/meta.json").json() == {"step": 30}
    assert api.alice.get(f"{base}/nothing.bin").json()["error"]["code"] == "artifact_not_found"


@pytest.mark.parametrize(
    "raw_path",
    [
        "..%2F..%2Fslimtrain.db",
        "%2E%2E/%2E%2E/x",
        "checkpoints/..%2F..%2F..%2Fetc%2Fpasswd",
        ".hidden",
        "a%5Cb",
        "a%00b",
        "a//b",
    ],
)
def test_artifact_names_cannot_leave_the_job(api, finished, raw_path):
    # raw paths: httpx would normalise '..' away before sending
    with httpx.Client(base_url=api.url) as c:
        req = c.build_request("GET", "/", headers={"Authorization": f"Bearer {ALICE}"})
        req.url = req.url.copy_with(raw_path=f"/v1/jobs/{finished['id']}/artifacts/{raw_path}".encode())
        r = c.send(req)
    assert r.status_code in (400, 404), r.text
    assert r.json()["error"]["code"] in ("invalid_artifact_name", "not_found")
    assert b"SQLite" not in r.content and b"root:" not in r.content


def test_report(api, finished):
    assert api.alice.get(f"/v1/jobs/{finished['id']}/report").json()["accuracy"] == 0.9
    job = api.submit(name="no-report")
    r = api.alice.get(f"/v1/jobs/{job['id']}/report")
    assert r.status_code == 404 and r.json()["error"]["code"] == "artifact_not_found"


def test_a_report_that_fails_its_checksum_is_refused_not_served(api):
    job = api.submit(name="tampered")
    jid = job["id"]
    wait_for(lambda: jid in api.ray.jobs, 10, 0.05, "submission")
    arts = JobArtifacts(api.artifacts, jid)
    arts.put_json("report.json", {"accuracy": 0.5})
    arts.write_manifest()
    arts.put_json("report.json", {"accuracy": 0.99})
    r = api.alice.get(f"/v1/jobs/{jid}/report")
    assert r.status_code == 502 and r.json()["error"]["code"] == "artifact_corrupt"
    assert "sha256" in r.json()["error"]["message"] and b"0.99" not in r.content


def test_cluster(api):
    c = api.alice.get("/v1/cluster").json()
    assert c["reachable"] and c["capacity"] == {"CPU": 1000.0, "GPU": 0.0}
    assert c["dashboard_url"] == "http://fake-ray:8265" and set(c["jobs"]) >= {"queued", "succeeded"}
    api.ray.reachable = False
    try:
        down = api.alice.get("/v1/cluster").json()
    finally:
        api.ray.reachable = True
    assert not down["reachable"] and "refused" in down["error"]


def test_prometheus_metrics(api, finished):
    prom = {"Authorization": f"Bearer {METRICS}"}
    text = api.anon.get("/metrics", headers=prom).text
    assert 'slimtrain_jobs{state="succeeded"}' in text and "slimtrain_queue_length" in text
    assert (
        'slimtrain_http_request_duration_seconds_count{method="GET",route="/v1/jobs/{job_id}",status="200"}'
        in text
    )
    running = api.submit(name="prom")
    wait_for(lambda: running["id"] in api.ray.jobs, 10, 0.05, "submission")
    api.ray.set(running["id"], RUNNING)
    api.wait_state(running["id"], "running")
    JobArtifacts(api.artifacts, running["id"]).put_bytes(
        "metrics.jsonl", b'{"kind": "train", "step": 7, "loss": 0.25, "sparsity": 0.3}\n'
    )
    wait_for(lambda: api.job(running["id"])["progress"]["step"] == 7, 10, 0.05, "ingest")
    text = api.anon.get("/metrics", headers=prom).text
    assert f'slimtrain_job_loss{{job_id="{running["id"]}",tenant="alice"}} 0.25' in text
    assert f'slimtrain_job_sparsity{{job_id="{running["id"]}",tenant="alice"}} 0.3' in text
    api.anon.get("/no/such/path/12345")
    # unmatched paths share one label
    assert "/no/such/path" not in api.anon.get("/metrics", headers=prom).text


def test_unknown_routes_and_methods_answer_json(api):
    r = api.alice.get("/v1/nope")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = api.alice.delete("/v1/jobs")
    assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"


def test_openapi_documents_every_field(api):
    doc = api.anon.get("/openapi.json").json()
    assert set(doc["paths"]) >= {p for _, p in V1_ROUTES if "/x" not in p} | {"/v1/jobs/{job_id}/events"}
    body = doc["paths"]["/v1/jobs"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"$ref": "#/components/schemas/JobSpec"}
    schemas = doc["components"]["schemas"]
    ours = [
        "JobOut",
        "JobPage",
        "Progress",
        "MetricRecord",
        "MetricPage",
        "ArtifactPage",
        "ClusterOut",
        "AttemptOut",
    ]
    for name in ours:
        for field, prop in schemas[name]["properties"].items():
            assert prop.get("description"), f"{name}.{field} has no description"
    assert "train" in schemas["JobSpec"]["properties"]
