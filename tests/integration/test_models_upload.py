"""`/v1/models` and `model.init` through the live API (tests/plugins/live_api.py: real uvicorn,
SQLite, a local artifact store, and the Ray stand-in FinishingRay, whose drivers succeed at once
leaving a model.safetensors and a manifest). About HTTP and tenants: the training from those
weights is tests/unit/test_init_weights.py."""

from __future__ import annotations

import hashlib
import io
import json
import pickle

import pytest
import torch
from safetensors.torch import save as st_save

from service.artifacts import LocalArtifactStore
from tests.plugins.live_api import ALICE, BOB, live_api

pytestmark = pytest.mark.integration

SPEC = {"name": "init", "model": {"name": "mlp"}, "data": {"name": "digits"}}
LIMIT = 64 * 1024


def _weights(value: float) -> bytes:
    return st_save({"w": torch.full((4, 4), value), "b": torch.zeros(4)})


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    data = tmp_path_factory.mktemp("models")
    with live_api(data, LocalArtifactStore(data / "artifacts"), max_model_bytes=LIMIT) as api:
        yield api


def _init(client, init: dict):
    return client.post("/v1/jobs", json={**SPEC, "model": {"name": "mlp", "init": init}})


def test_two_tenants_with_one_name_each_see_their_own(api):
    alice, bob = api.client(ALICE), api.client(BOB)
    a, b = _weights(1.0), _weights(2.0)
    r = alice.put("/v1/models/base", content=a)
    assert r.status_code == 201, r.text
    assert r.json()["sha256"] == hashlib.sha256(a).hexdigest() and r.json()["size"] == len(a)
    assert bob.put("/v1/models/base", content=b).status_code == 201
    assert alice.put("/v1/models/alice-only", content=a).status_code == 201
    mine = {m["name"]: m for m in alice.get("/v1/models").json()["items"]}
    theirs = {m["name"]: m for m in bob.get("/v1/models").json()["items"]}
    assert set(mine) == {"alice-only", "base"} and set(theirs) == {"base"}
    assert mine["base"]["sha256"] == hashlib.sha256(a).hexdigest()
    assert theirs["base"]["sha256"] == hashlib.sha256(b).hexdigest()
    # another tenant's name is absent: not deletable, not startable from
    assert bob.delete("/v1/models/alice-only").status_code == 404
    r = _init(bob, {"uri": "store://models/alice-only"})
    assert r.status_code == 422 and r.json()["error"]["fields"][0]["field"] == "model.init.uri"
    # each tenant's job resolves the one name to its own weights
    ja = _init(alice, {"uri": "store://models/base"}).json()
    jb = _init(bob, {"uri": "store://models/base"}).json()
    ka, kb = ja["spec"]["model"]["init"]["resolved"], jb["spec"]["model"]["init"]["resolved"]
    assert api.artifacts.get_bytes(ka) == a and api.artifacts.get_bytes(kb) == b
    assert alice.delete("/v1/models/alice-only").status_code == 204
    assert [m["name"] for m in alice.get("/v1/models").json()["items"]] == ["base"]


def test_init_from_a_job_is_for_its_own_tenant_only(api):
    alice, bob = api.client(ALICE), api.client(BOB)
    parent = alice.post("/v1/jobs", json=SPEC).json()
    assert alice.get(f"/v1/jobs/{parent['id']}").json()["state"] == "succeeded"
    r = _init(alice, {"job": parent["id"]})
    assert r.status_code == 201, r.text
    assert r.json()["spec"]["model"]["init"]["resolved"] == f"{parent['id']}/model.safetensors"
    other, missing = _init(bob, {"job": parent["id"]}), _init(bob, {"job": "no-such-job"})
    assert other.status_code == missing.status_code == 422
    fo, fm = other.json()["error"]["fields"][0], missing.json()["error"]["fields"][0]
    assert fo["field"] == fm["field"] == "model.init.job"
    # refused exactly like a missing job: the message differs only by the id it repeats
    assert fo["message"].replace(parent["id"], "X") == fm["message"].replace("no-such-job", "X")


def test_a_client_cannot_set_the_resolved_key(api):
    bob = api.client(BOB)
    r = _init(bob, {"uri": "store://models/base", "resolved": "_tenants/alice/models/base/model.safetensors"})
    assert r.status_code == 422
    assert r.json()["error"]["fields"][0]["field"] == "model.init.resolved"


def test_over_the_limit_is_413_and_nothing_is_stored(api):
    alice = api.client(ALICE)
    big = st_save({"w": torch.zeros(LIMIT // 4 + 16)})
    r = alice.put("/v1/models/big", content=big)
    assert r.status_code == 413, r.text
    # without Content-Length (chunked): refused while streaming
    r = alice.put("/v1/models/big", content=iter([big[i : i + 4096] for i in range(0, len(big), 4096)]))
    assert r.status_code == 413, r.text
    assert "big" not in [m["name"] for m in alice.get("/v1/models").json()["items"]]


class _Boom:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_pickle_disguised_as_safetensors_is_refused_and_never_unpickled(api, tmp_path):
    alice = api.client(ALICE)
    marker = tmp_path / "unpickled"
    for raw in (pickle.dumps({"w": _Boom(str(marker))}), b"not weights", b""):
        r = alice.put("/v1/models/evil.safetensors", content=raw)
        assert r.status_code == 422, r.text
        assert r.json()["error"]["code"] == "not_safetensors"
        assert "safetensors" in r.json()["error"]["message"]
    assert not marker.exists()
    assert "evil.safetensors" not in [m["name"] for m in alice.get("/v1/models").json()["items"]]


def test_names_that_could_escape_are_refused(api):
    alice = api.client(ALICE)
    for name in ("..", ".hidden", "_tenants", "a%2Fb"):
        r = alice.put(f"/v1/models/{name}", content=_weights(1.0))
        assert r.status_code in (404, 422), (name, r.status_code, r.text)
    assert all(not m["name"].startswith((".", "_")) for m in alice.get("/v1/models").json()["items"])


def test_cli_push_ls_rm(api, tmp_path):
    from typer.testing import CliRunner

    from api.cli import app as cli

    runner = CliRunner()
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(_weights(3.0))
    auth = ["--url", api.url, "--token", BOB]
    r = runner.invoke(cli, ["model", "push", str(weights), "from-cli", *auth])
    assert r.exit_code == 0, r.output
    assert hashlib.sha256(weights.read_bytes()).hexdigest() in r.stdout
    r = runner.invoke(cli, ["model", "ls", "--json", *auth])
    assert "from-cli" in [m["name"] for m in json.loads(r.stdout)]
    assert runner.invoke(cli, ["model", "rm", "from-cli", *auth]).exit_code == 0
    r = runner.invoke(cli, ["model", "rm", "from-cli", *auth])
    assert r.exit_code == 2 and "no model 'from-cli'" in r.output
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(pickle.dumps({"a": 1}))
    r = runner.invoke(cli, ["model", "push", str(bad), "bad", *auth])
    assert r.exit_code == 2 and "not a safetensors file" in r.output


# --- through the driver on a real Ray head (tests/conftest.py ray_cluster) ----------------------

RAY_PARENT = {
    "name": "parent",
    "model": {"name": "mlp", "args": {"hidden": [64]}},
    "data": {"name": "digits"},
    "train": {"epochs": 3, "batch_size": 64, "lr": 0.1},
}


def test_a_pruning_job_from_a_dense_parent_through_the_driver(ray_cluster, tmp_path):
    """run_job as the service's entrypoint runs it: the parent's exported accuracy is the child's
    step-0 accuracy (within one validation sample) and its report's baseline. Step 0 is scored
    by the driver (workers.initial_eval), once, before the worker group's first record, for a
    job without init too (no baseline then)."""
    from service.errors import ConfigError
    from service.spec import parse_spec
    from service.uploads import model_key, resolve_init
    from workers.driver import run_job

    store = LocalArtifactStore(tmp_path / "artifacts")
    parent = run_job(parse_spec(RAY_PARENT), "parent", store)
    records = [json.loads(x) for x in store.get_bytes("parent/metrics.jsonl").decode().splitlines()]
    step0 = [i for i, r in enumerate(records) if r.get("kind") == "eval" and r.get("step") == 0]
    start = next(i for i, r in enumerate(records) if r.get("event") == "start")
    assert len(step0) == 1 and step0[0] < start and "baseline" not in records[step0[0]]
    assert records[step0[0]]["val_accuracy"] < 0.3 and "baseline" not in parent
    child_spec = {
        **RAY_PARENT,
        "name": "child",
        "model": {**RAY_PARENT["model"], "init": {"job": "parent"}},
        "train": {"epochs": 3, "batch_size": 64, "lr": 0.02},
        "compression": {"pruning": {"final_sparsity": 0.6, "start_step": 0, "end_step": 40, "frequency": 10}},
    }
    spec = resolve_init(parse_spec(child_spec, submitted=True), "acme", store)
    child = run_job(spec, "child", store)
    lines = store.get_bytes("child/metrics.jsonl").decode().splitlines()
    step0 = [r for r in map(json.loads, lines) if r.get("kind") == "eval" and r.get("step") == 0]
    assert len(step0) == 1
    n_val = round(1797 * 0.2)
    assert abs(step0[0]["val_accuracy"] - parent["accuracy"]) <= 1 / n_val + 1e-12
    stored = json.loads(store.get_bytes("child/report.json"))
    assert stored["baseline"]["accuracy"] == step0[0]["val_accuracy"] == child["dense_accuracy"]
    assert abs(stored["baseline"]["accuracy"] - parent["accuracy"]) <= 1 / n_val + 1e-12
    assert child["sparsity"]["global"] == pytest.approx(0.6, abs=0.005)
    # weights that do not fit: refused in the driver's preflight, before any worker starts
    store.put_bytes(model_key("acme", "wrong"), _weights(1.0))
    bad = {
        **RAY_PARENT,
        "name": "bad",
        "model": {**RAY_PARENT["model"], "init": {"uri": "store://models/wrong"}},
    }
    with pytest.raises(ConfigError, match="missing keys .*; unexpected keys b, w$"):
        run_job(resolve_init(parse_spec(bad, submitted=True), "acme", store), "bad", store)
    kinds = [json.loads(x).get("phase") for x in store.get_bytes("bad/metrics.jsonl").decode().splitlines()]
    assert kinds == ["preparing"]


class _NeverWhole(io.BytesIO):
    """A file that refuses to be read whole: each read must name a size."""

    def read(self, size=-1):
        assert size is not None and size >= 0, "the whole file was read into memory"
        return super().read(size)


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_uploads_reach_the_store_in_parts(kind, tmp_path, request):
    """What an upload (a model, a dataset) hands the artifact store is a file, copied part by
    part (boto3's managed upload for S3), never read whole into memory."""
    if kind == "local":
        store = LocalArtifactStore(tmp_path / "store")
    else:
        server = request.getfixturevalue("s3_server")
        store = server.store(request.getfixturevalue("s3_bucket"), "p")
    data = bytes(range(256)) * 8192  # 2 MiB: several of the local store's 1 MiB parts
    store.put_fileobj("_tenants/t/models/m/model.safetensors", _NeverWhole(data))
    assert store.get_bytes("_tenants/t/models/m/model.safetensors") == data
