"""Abuse of the live API (uvicorn on loopback; a Ray stand-in whose drivers finish at once):
requests without a valid token, another tenant's jobs, artifact names that try to leave their
job, bodies over the limit, unknown spec fields; and a malicious pickle planted as a checkpoint,
resumed from through the training loop's own load path. The routes are read from the OpenAPI
document, so a route added later is covered without editing this file."""

from __future__ import annotations

import hashlib
import http.client
import json
import logging
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest
import torch

from service.artifacts import ArtifactStore, JobArtifacts, LocalArtifactStore
from service.spec import parse_spec
from tests.plugins.live_api import ALICE, BOB, LiveApi, live_api
from workers.checkpoint import CHECKPOINTS, MANIFEST, STATE, dir_name, write_checkpoint
from workers.data import load_dataset
from workers.session import LocalSession
from workers.train_loop import Faults, train

pytestmark = pytest.mark.integration

SPEC = {"name": "abuse", "model": {"name": "mlp"}, "data": {"name": "digits"}}
OTHER_JOB_SECRET = b"SENTINEL-another-job-7f3a"
OUTSIDE_SECRET = b"SENTINEL-outside-the-store-91c2"


def _submit(client: httpx.Client, **over) -> dict:
    r = client.post("/v1/jobs", json={**SPEC, **over})
    assert r.status_code == 201, r.text
    return r.json()


def _operations(doc: dict, prefix: str = "/v1/"):
    for path, item in doc["paths"].items():
        if path.startswith(prefix):
            for method, op in item.items():
                yield method.upper(), path, op


def _url(path: str, job_id: str, name: str = "report.json") -> str:
    return path.replace("{job_id}", job_id).replace("{name}", name)


@dataclass
class Raw:
    status_code: int
    content: bytes

    def json(self):
        return json.loads(self.content)

    @property
    def text(self) -> str:
        return self.content.decode(errors="replace")


def _send_raw(api: LiveApi, raw_path: str, token: str = ALICE) -> Raw:
    """GET with the request target exactly as given (httpx resolves `..` segments first)."""
    host, port = api.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        conn.request("GET", raw_path, headers={"Authorization": f"Bearer {token}"})
        r = conn.getresponse()
        return Raw(r.status, r.read())
    finally:
        conn.close()


# --- one API on a local store, for the tests about auth, tenants, bodies and specs -----------


@dataclass
class Local:
    api: LiveApi
    doc: dict
    job: dict  # alice's, finished, with a report


@pytest.fixture(scope="module")
def local(tmp_path_factory) -> Local:
    data = tmp_path_factory.mktemp("abuse")
    with live_api(data, LocalArtifactStore(data / "artifacts")) as api:
        alice = api.client(ALICE)
        yield Local(api, alice.get("/openapi.json").json(), _submit(alice))


def _queued_job(local: Local) -> dict:
    """A job that stays queued: the Ray cluster is unreachable while it is submitted."""
    local.api.ray.reachable = False
    try:
        job = _submit(local.api.client(ALICE), name="waits")
    finally:
        local.api.ray.reachable = True
    assert job["state"] == "queued"
    return job


BAD_CREDENTIALS = [
    {},
    {"Authorization": "Bearer wrong-token-0123456789"},
    {"Authorization": "Bearer"},
    {"Authorization": f"Bearer {ALICE.upper()}"},
    {"Authorization": f"Bearer {ALICE}x"},
    {"Authorization": f"Basic {ALICE}"},
    {"Authorization": ALICE},
    {"X-Api-Key": ALICE},
]


def test_a_job_id_no_job_can_have_is_401_without_a_token_and_404_with_one(local):
    """Every job route checks the token before the id, whether it takes the checked `JobId`
    dependency or checks the id itself (the routes dashboards poll: api/params.py)."""
    anon, alice = local.api.client(None), local.api.client(ALICE)
    job_paths = [(m, p) for m, p, _ in _operations(local.doc) if "{job_id}" in p]
    assert len(job_paths) >= 8
    for method, path in job_paths:
        url = _url(path, "no~such~job")  # outside the id alphabet: never looked up
        assert anon.request(method, url).status_code == 401, (method, path)
        r = alice.request(method, url)
        assert r.status_code == 404 and r.json()["error"]["code"] == "job_not_found", (method, path, r.text)


def test_every_v1_route_refuses_a_missing_or_wrong_token(local):
    queued = _queued_job(local)
    anon = local.api.client(None)
    jobs_before = len(local.api.client(ALICE).get("/v1/jobs", params={"limit": 200}).json()["items"])
    operations = list(_operations(local.doc))
    assert len(operations) >= 14  # the walk found the API, not an empty document
    for method, path, op in operations:
        assert "401" in op["responses"], f"{method} {path} does not document 401"
        url = _url(path, queued["id"])
        for headers in BAD_CREDENTIALS:
            body = {**SPEC, "name": "unauthorized"} if method == "POST" else None
            r = anon.request(method, url, headers=headers, json=body)
            assert r.status_code == 401, (method, path, headers, r.status_code, r.text)
            assert r.json()["error"]["code"] == "unauthorized"
            assert r.headers["WWW-Authenticate"] == "Bearer"
    # ... and did nothing: no job created, the queued one not cancelled
    alice = local.api.client(ALICE)
    jobs = alice.get("/v1/jobs", params={"limit": 200}).json()["items"]
    assert len(jobs) == jobs_before and "unauthorized" not in {j["name"] for j in jobs}
    assert alice.get(f"/v1/jobs/{queued['id']}").json()["state"] == "queued"


def test_another_tenants_job_is_404_on_every_job_route(local):
    queued = _queued_job(local)
    bob = local.api.client(BOB)
    job_routes = [(m, p) for m, p, _ in _operations(local.doc) if "{job_id}" in p]
    assert len(job_routes) >= 9
    for job in (local.job, queued):
        for method, path in job_routes:
            r = bob.request(method, _url(path, job["id"]))
            assert r.status_code == 404, (method, path, r.status_code, r.text)
            assert r.json()["error"]["code"] == "job_not_found"
            assert job["name"].encode() not in r.content and b"accuracy" not in r.content
    assert local.job["id"] not in {j["id"] for j in bob.get("/v1/jobs").json()["items"]}
    assert local.api.client(ALICE).get(f"/v1/jobs/{queued['id']}").json()["state"] == "queued"


def test_bodies_over_the_limit_are_413_and_create_nothing(local):
    limit = 1024 * 1024  # Settings.max_body_bytes
    alice = local.api.client(ALICE)
    before = len(alice.get("/v1/jobs", params={"limit": 200}).json()["items"])
    body_routes = [(m, p) for m, p, op in _operations(local.doc) if "requestBody" in op]
    # The uploads have their own limits (max_dataset_bytes, max_model_bytes):
    # tests/integration/test_datasets_upload.py, test_models_upload.py
    assert sorted(body_routes) == [
        ("POST", "/v1/jobs"),
        ("POST", "/v1/sweeps"),
        ("PUT", "/v1/datasets/{name}"),
        ("PUT", "/v1/models/{name}"),
    ]
    body_routes = [r for r in body_routes if r == ("POST", "/v1/jobs")]
    sweeps_before = alice.get("/v1/sweeps").json()["items"]

    def padded(size: int) -> bytes:  # a valid spec, padded with whitespace to `size` bytes
        spec = json.dumps({**SPEC, "name": "big"}).encode()
        return spec + b" " * (size - len(spec))

    def chunked(data: bytes):  # no Content-Length: the limit is enforced while reading
        for i in range(0, len(data), 65536):
            yield data[i : i + 65536]

    json_type = {"Content-Type": "application/json"}
    for method, path in body_routes:
        assert alice.request(method, path, content=padded(limit), headers=json_type).status_code == 201
        for content in (padded(limit + 1), chunked(padded(limit + 1)), chunked(padded(8 * limit))):
            r = alice.request(method, path, content=content, headers=json_type)
            assert r.status_code == 413, r.text
            assert r.json()["error"]["code"] == "body_too_large"
    # A sweep request over the limit too (one at the limit would start a sweep's jobs).
    sweep = json.dumps(
        {"name": "big", "base": {**SPEC, "name": "big"}, "grid": {"train.lr": [0.1, 0.2]}}
    ).encode()
    over = sweep + b" " * (limit + 1 - len(sweep))
    for content in (over, chunked(over)):
        r = alice.request("POST", "/v1/sweeps", content=content, headers=json_type)
        assert r.status_code == 413, r.text
        assert r.json()["error"]["code"] == "body_too_large"
    assert alice.get("/v1/sweeps").json()["items"] == sweeps_before
    names = [j["name"] for j in alice.get("/v1/jobs", params={"limit": 200}).json()["items"]]
    assert len(names) == before + 1  # only the one at the limit


# The spec with every optional object present, so that each can get an unknown field.
FULL_SPEC = {
    "name": "unknown-fields",
    "model": {"name": "mlp", "args": {}},
    "data": {"name": "digits", "args": {}},
    "train": {"epochs": 1},
    "parallel": {"workers": 1},
    "compression": {
        "pruning": {"final_sparsity": 0.5, "start_step": 0, "end_step": 10, "frequency": 1},
        "clipping": {"max_abs": 1.0},
        "quantization": {"mode": "none"},
    },
    "checkpoint": {"every_steps": 10},
}


def _closed_objects(doc: dict, schema: dict, path: str = "") -> list[str]:
    """Dotted paths of every object in the spec's schema that allows no other fields."""
    schemas = doc["components"]["schemas"]
    while "$ref" in schema:
        schema = schemas[schema["$ref"].rsplit("/", 1)[-1]]
    options = schema.get("anyOf") or [schema]
    out = []
    for option in options:
        while "$ref" in option:
            option = schemas[option["$ref"].rsplit("/", 1)[-1]]
        if option.get("type") == "object" and option.get("additionalProperties") is False:
            out.append(path)
            for name, prop in option.get("properties", {}).items():
                out += _closed_objects(doc, prop, f"{path}.{name}" if path else name)
    return out


def _with_field(spec: dict, path: str, key: str, value) -> dict:
    spec = json.loads(json.dumps(spec))
    node = spec
    for part in path.split(".") if path else []:
        # a section the full spec cannot hold beside the others (weight_sharing excludes
        # quantization) is sent holding only the stray field: still refused, naming it
        node = node.setdefault(part, {})
    node[key] = value
    return spec


def test_unknown_spec_fields_are_422_naming_the_field(local):
    alice = local.api.client(ALICE)
    # model.init names a job of alice's that exists: the full spec is accepted as it is
    full = {**FULL_SPEC, "model": {**FULL_SPEC["model"], "init": {"job": local.job["id"]}}}
    assert alice.post("/v1/jobs", json=full).status_code == 201
    closed = _closed_objects(local.doc, local.doc["components"]["schemas"]["JobSpec"])
    assert {"", "model", "data", "compression.pruning", "compression.quantization"} <= set(closed)
    # model and data args are free-form in the schema and checked per model / dataset
    for path in [*closed, "model.args", "data.args"]:
        field = f"{path}.colour" if path else "colour"
        r = alice.post("/v1/jobs", json=_with_field(full, path, "colour", "red"))
        assert r.status_code == 422, (path, r.text)
        error = r.json()["error"]
        assert error["code"] == "invalid_spec"
        assert field in {f["field"] for f in error["fields"]}, (field, error)
        assert field in error["message"]


# --- artifact names that try to leave their job, against the local and the S3 store ----------


@dataclass
class Target:
    kind: str
    api: LiveApi
    store: ArtifactStore
    job: str  # alice's job, the one every name is asked of
    other: str  # another job of alice's, with a secret
    foreign: str  # bob's job, with a secret
    outside: str  # where the secret outside the store lives, as a path from the job's folder


@pytest.fixture(scope="module", params=["local", "s3"])
def target(request, tmp_path_factory) -> Target:
    data = tmp_path_factory.mktemp(f"traversal-{request.param}")
    if request.param == "local":
        store: ArtifactStore = LocalArtifactStore(data / "artifacts")
        (data / "secret.txt").write_bytes(OUTSIDE_SECRET)  # beside the store root
        outside = "../../secret.txt"
    else:
        s3 = request.getfixturevalue("s3_server")
        bucket = s3.new_bucket()
        store = s3.store(bucket, "root")
        s3.client().put_object(Bucket=bucket, Key="secret.txt", Body=OUTSIDE_SECRET)  # beside the prefix
        outside = "../../secret.txt"
    with live_api(data, store) as api:
        job, other = _submit(api.client(ALICE))["id"], _submit(api.client(ALICE))["id"]
        foreign = _submit(api.client(BOB))["id"]
        for j in (other, foreign):
            JobArtifacts(store, j).put_bytes("secret.txt", OTHER_JOB_SECRET)
        yield Target(request.param, api, store, job, other, foreign, outside)


def _enc(s: str) -> str:
    return quote(s, safe="")


# {o}: the other job, {f}: bob's job, {x}: the secret outside the store (relative)
TRAVERSALS = [
    "../{o}/secret.txt",
    "../{f}/secret.txt",
    "..%2f{o}%2fsecret.txt",
    "..%2F{f}%2Fsecret.txt",
    "%2e%2e%2f{o}%2fsecret.txt",
    "%2E%2E/{f}/secret.txt",
    ".%2e/{o}/secret.txt",
    "%252e%252e%252f{o}%252fsecret.txt",
    "%25252e%25252e%25252f{o}%25252fsecret.txt",
    "checkpoints/../../{o}/secret.txt",
    "checkpoints/..%2f..%2f{f}%2fsecret.txt",
    "./../{o}/secret.txt",
    "....//{o}/secret.txt",
    "..;/{o}/secret.txt",
    "{x}",
    "..%2f..%2fsecret.txt",
    "%2e%2e%2f%2e%2e%2fsecret.txt",
    "..%5c{o}%5csecret.txt",
    "..%5c..%5csecret.txt",
    "%5c%5c..%5c{f}%5csecret.txt",
    "secret.txt%00.json",
    "..%00/{o}/secret.txt",
    "%00../{o}/secret.txt",
    "%e2%80%a4%e2%80%a4/{o}/secret.txt",  # U+2024 one dot leader
    "%ef%bc%8e%ef%bc%8e/{o}/secret.txt",  # U+FF0E fullwidth full stop
    "%ef%b9%92%ef%b9%92/{o}/secret.txt",  # U+FE52 small full stop
    "%c0%ae%c0%ae/{o}/secret.txt",  # overlong UTF-8 '.'
    "%c0%ae%c0%ae%c0%af{o}%c0%afsecret.txt",
    "%uff0e%uff0e/{o}/secret.txt",
    "/{o}/secret.txt",
    "%2f{o}%2fsecret.txt",
    "{abs}",
    "%2fetc%2fpasswd",
    "../" * 64 + "etc/passwd",
    "a/" * 600 + "secret.txt",
    "x" * 5000,
    "/".join(["y" * 255] * 4),  # 1023 characters, every segment allowed: the longest name
]


def _fill(raw: str, t: Target) -> str:
    abs_secret = (
        str((Path(t.store.root) / t.outside.replace("../", "", 1)).resolve())
        if t.kind == "local"
        else "secret.txt"
    )
    return (
        raw.replace("{o}", t.other)
        .replace("{f}", t.foreign)
        .replace("{x}", t.outside)
        .replace("{abs}", _enc(abs_secret))
    )


def _never_leaks(r: Raw) -> None:
    assert OTHER_JOB_SECRET not in r.content and OUTSIDE_SECRET not in r.content, r.content[:200]
    assert b"root:" not in r.content and b"SQLite format" not in r.content


@pytest.mark.parametrize("raw", TRAVERSALS)
def test_artifact_names_never_read_outside_the_job(target, raw):
    r = _send_raw(target.api, f"/v1/jobs/{target.job}/artifacts/{_fill(raw, target)}")
    _never_leaks(r)
    assert r.status_code in (400, 404), (r.status_code, r.text[:300])
    assert r.json()["error"]["code"] in ("invalid_artifact_name", "artifact_not_found", "not_found")


JOB_ID_TRAVERSALS = ["..%2f{o}", "%2e%2e", "..", "{o}%00", "{o}%2f..%2f{f}", "..%5c{o}", "%2e%2e%2f%2e%2e"]


@pytest.mark.parametrize("raw", JOB_ID_TRAVERSALS)
def test_job_ids_never_reach_another_job(target, raw):
    r = _send_raw(target.api, f"/v1/jobs/{_fill(raw, target)}/artifacts/secret.txt")
    _never_leaks(r)
    assert r.status_code == 404, (r.status_code, r.text[:300])


@pytest.mark.parametrize(
    "prefix", ["..", "../{o}", "..%2f{f}", "%2e%2e%2f{o}", "/", "//..//{o}", "..%5c{o}", "checkpoints/../.."]
)
def test_artifact_listings_stay_in_the_job(target, prefix):
    r = _send_raw(target.api, f"/v1/jobs/{target.job}/artifacts?prefix={_fill(prefix, target)}")
    _never_leaks(r)
    if r.status_code == 200:  # "/" is the whole job
        names = [a["name"] for a in r.json()["items"]]
        assert names and "secret.txt" not in names and not any(".." in n for n in names)
    else:
        assert r.status_code in (400, 422), r.text


@pytest.mark.parametrize("target", ["local"], indirect=True)  # S3 has no links
def test_a_symlink_out_of_the_local_store_is_refused(target):
    root = Path(target.store.root)
    link = root / target.job / "escape.txt"
    link.symlink_to(root.parent / "secret.txt")
    r = target.api.client(ALICE).get(f"/v1/jobs/{target.job}/artifacts/escape.txt")
    _never_leaks(r)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_artifact_name"


# --- a malicious pickle planted as a checkpoint -----------------------------------------------


class Payload:
    """Unpickling this opens (so creates) the file at `path`: code execution, made visible."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _armed(path: Path) -> dict[str, bytes]:
    """The payload as a raw pickle and as a torch.save zip, each checked to fire when loaded the
    unsafe way (so the test below proves a refusal, not a dud)."""
    import io

    raw = pickle.dumps({"model": Payload(path)}, protocol=2)
    buf = io.BytesIO()
    torch.save({"model": Payload(path)}, buf)
    forms = {"pickle": raw, "torch": buf.getvalue()}
    pickle.loads(raw)
    assert path.exists(), "the raw pickle payload does not fire"
    path.unlink()
    torch.load(io.BytesIO(forms["torch"]), weights_only=False)
    assert path.exists(), "the torch.save payload does not fire"
    path.unlink()
    return forms


def _plant(store: ArtifactStore, job_id: str, step: int, state_bytes: bytes, fix_manifest: bool, tmp: Path):
    """A checkpoint folder whose state.pt is `state_bytes`; its manifest either vouches for those
    bytes (only the loader's refusal stands in the way) or is the genuine one (the checksum
    refuses it)."""
    folder = tmp / dir_name(step)
    write_checkpoint(folder, step, {"step": step}, [{}], {"world_size": 1})
    (folder / STATE).write_bytes(state_bytes)
    if fix_manifest:
        manifest = json.loads((folder / MANIFEST).read_text())
        manifest["files"][STATE] = {
            "size": len(state_bytes),
            "sha256": hashlib.sha256(state_bytes).hexdigest(),
        }
        (folder / MANIFEST).write_text(json.dumps(manifest))
    arts = JobArtifacts(store, job_id)
    for p in sorted(folder.iterdir(), key=lambda p: p.name == MANIFEST):  # the manifest last
        arts.put_bytes(f"{CHECKPOINTS}/{dir_name(step)}/{p.name}", p.read_bytes())


RESUME_SPEC = {
    "name": "resume",
    "model": {"name": "mlp", "args": {"hidden": [16]}},
    "data": {"name": "digits"},
    "train": {"epochs": 1, "max_steps": 8, "batch_size": 32},
    "checkpoint": {"every_steps": 4},
}


@pytest.fixture(scope="module")
def digits():
    return load_dataset(parse_spec(RESUME_SPEC).data)


@pytest.mark.parametrize("form", ["pickle", "torch"])
@pytest.mark.parametrize("fix_manifest", [True, False], ids=["manifest-vouches", "checksum-refuses"])
def test_a_planted_pickle_never_runs_when_the_job_resumes(
    target, digits, tmp_path, caplog, form, fix_manifest
):
    sentinel = tmp_path / "pwned"
    payload = _armed(sentinel)[form]
    spec = parse_spec(RESUME_SPEC)
    job = f"resume-{form}-{fix_manifest}"
    with pytest.raises(RuntimeError, match="injected"):  # a run that dies after its step-4 checkpoint
        train(spec, digits, LocalSession(target.store, job), Faults(raise_at_step=6))
    _plant(target.store, job, 6, payload, fix_manifest, tmp_path)
    session = LocalSession(target.store, job)
    with caplog.at_level(logging.WARNING, logger="workers.checkpoint"):
        train(spec, digits, session)
    assert not sentinel.exists()
    # The planted checkpoint was refused, with the reason in the log, and the job resumed from
    # the newest one that verifies and loads.
    assert [r["resumed_from"] for r in session.records if r.get("event") == "start"] == [4]
    reason = "cannot load" if fix_manifest else "missing or corrupt"
    assert any(re.search(f"step 6: .*{reason}", m) for m in caplog.messages), caplog.messages
