"""One artifact-store suite, run against the local folder and against a real S3-protocol server
on loopback (moto's standalone server): both backends must behave the same for everything the
jobs, the checkpoints and the API rely on."""

from __future__ import annotations

import contextlib
import hashlib
import io
import pickle
import tracemalloc
import urllib.request

import numpy as np
import pyarrow.fs
import pytest
import torch

from service.artifacts import CHUNK, JobArtifacts, LocalArtifactStore, open_store
from service.errors import ArtifactKeyError, ArtifactNotFound, ConfigError
from service.s3_store import S3ArtifactStore, read_s3_uri
from service.spec import DataSpec
from tests.plugins.s3 import CREDENTIALS
from tests.raycluster import free_port
from workers.checkpoint import dir_name, load_latest
from workers.data import load_dataset
from workers.session import LocalSession

pytestmark = pytest.mark.integration

BIG = 24 * 1024 * 1024


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        return LocalArtifactStore(tmp_path / "store")
    server = request.getfixturevalue("s3_server")
    return server.store(request.getfixturevalue("s3_bucket"), "runs/prod")


def test_put_get_json_exists(store):
    arts = JobArtifacts(store, "job-1")
    arts.put_bytes("a.bin", b"hello")
    arts.put_json("report.json", {"accuracy": 0.9})
    assert arts.get_bytes("a.bin") == b"hello"
    assert arts.get_json("report.json") == {"accuracy": 0.9}
    assert arts.exists("a.bin") and not arts.exists("b.bin")
    arts.put_bytes("a.bin", b"replaced")
    assert arts.get_bytes("a.bin") == b"replaced"
    with pytest.raises(ArtifactNotFound):
        arts.get_bytes("missing.bin")
    with pytest.raises(ArtifactNotFound):
        arts.open_read("missing.bin")


def test_list_is_sorted_recursive_and_scoped_to_the_folder(store):
    a, b = JobArtifacts(store, "job"), JobArtifacts(store, "job2")
    for name in (
        "z.txt",
        "checkpoints/step-00000002/state.pt",
        "checkpoints/step-00000001/state.pt",
        "a.txt",
    ):
        a.put_bytes(name, name.encode())
    b.put_bytes("a.txt", b"other job")
    assert [a.name_of(o.key) for o in a.list()] == [
        "a.txt",
        "checkpoints/step-00000001/state.pt",
        "checkpoints/step-00000002/state.pt",
        "z.txt",
    ]
    # "job" is a folder: job2's objects share the string prefix but are not listed
    assert all(o.key.startswith("job/") for o in a.list())
    assert [o.size for o in a.list("checkpoints")] == [len("checkpoints/step-00000001/state.pt")] * 2
    assert a.list("nothing") == []


def test_delete_prefix_removes_the_folder_only(store):
    arts = JobArtifacts(store, "job")
    arts.put_bytes("checkpoints/step-00000001/state.pt", b"1")
    arts.put_bytes("checkpoints/step-00000002/state.pt", b"2")
    arts.put_bytes("checkpoints-extra.txt", b"sibling with the same string prefix")
    store.delete_prefix(arts.key("checkpoints/step-00000001"))
    assert [arts.name_of(o.key) for o in arts.list()] == [
        "checkpoints-extra.txt",
        "checkpoints/step-00000002/state.pt",
    ]
    store.delete_prefix(arts.key("checkpoints-extra.txt"))  # one object
    store.delete_prefix(arts.key("does-not-exist"))  # nothing to do is not an error
    assert [arts.name_of(o.key) for o in arts.list()] == ["checkpoints/step-00000002/state.pt"]
    for root in ("", "/"):
        with pytest.raises(ArtifactKeyError):
            store.delete_prefix(root)


def test_manifest_lists_every_artifact_and_catches_tampering(store):
    arts = JobArtifacts(store, "job")
    arts.put_bytes("model.safetensors", b"w" * 1000)
    arts.put_json("report.json", {"x": 1})
    arts.put_bytes("checkpoints/step-00000001/state.pt", b"excluded")
    manifest = arts.write_manifest()
    assert [(n, e["size"]) for n, e in manifest["files"].items()] == [
        ("model.safetensors", 1000),
        ("report.json", len(arts.get_bytes("report.json"))),
    ]
    assert manifest["files"]["model.safetensors"]["sha256"] == hashlib.sha256(b"w" * 1000).hexdigest()
    assert arts.get_json("manifest.json") == manifest
    assert arts.verify_manifest() == []
    arts.put_bytes("model.safetensors", b"W" * 1000)  # same size, other bytes
    store.delete_prefix(arts.key("report.json"))
    assert arts.verify_manifest() == ["model.safetensors", "report.json"]


ESCAPES = [
    "../other/secret.txt",
    "a/../../other/secret.txt",
    "/other/secret.txt",
    "..",
    "a\\..\\b",
    "%2e%2e/x",
]


@pytest.mark.parametrize("name", ESCAPES)
def test_names_cannot_escape_the_job_prefix(store, name):
    JobArtifacts(store, "other").put_bytes("secret.txt", b"secret")
    arts = JobArtifacts(store, "job")
    for op in (
        lambda: arts.get_bytes(name),
        lambda: arts.put_bytes(name, b"x"),
        lambda: arts.open_read(name),
        lambda: arts.exists(name),
    ):
        with pytest.raises(ArtifactKeyError):
            op()
    # a listing may strip surrounding slashes, but never reaches outside the job
    with contextlib.suppress(ArtifactKeyError):
        assert all(o.key.startswith("job/") for o in arts.list(name))
    assert JobArtifacts(store, "other").get_bytes("secret.txt") == b"secret"


def test_large_object_streams_in_chunks_without_buffering(store, tmp_path):
    data = np.random.default_rng(0).integers(0, 256, BIG, dtype=np.uint8).tobytes()
    src = tmp_path / "big.bin"
    src.write_bytes(data)
    arts = JobArtifacts(store, "job")
    store.put_file(arts.key("big.bin"), src)
    del data
    h, chunks, largest = hashlib.sha256(), 0, 0
    tracemalloc.start()
    try:
        with arts.open_read("big.bin") as f:
            for chunk in iter(lambda: f.read(CHUNK), b""):
                h.update(chunk)
                chunks += 1
                largest = max(largest, len(chunk))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert h.hexdigest() == hashlib.sha256(src.read_bytes()).hexdigest() == store.sha256(arts.key("big.bin"))
    assert chunks == BIG // CHUNK and largest == CHUNK
    # a reader that buffered the object would hold all 24 MiB at once
    assert peak < BIG // 4, f"peak {peak / 2**20:.1f} MiB while streaming"
    [out] = store.download_prefix(arts.key("big.bin").rsplit("/", 1)[0] + "/", tmp_path / "dl")
    assert out.read_bytes() == src.read_bytes()


def test_ray_storage_is_the_jobs_folder(store):
    """What Ray Train writes through (storage_path, storage_filesystem) lands in the job's
    folder of the store, visible to list() and readable by the checkpoint loader."""
    path, fs = store.ray_storage("job")
    fs = fs or pyarrow.fs.LocalFileSystem()
    fs.create_dir(f"{path}/checkpoints/step-00000001")
    with fs.open_output_stream(f"{path}/checkpoints/step-00000001/state.pt") as f:
        f.write(b"state")
    assert [(o.key, o.size) for o in store.list("job/")] == [("job/checkpoints/step-00000001/state.pt", 5)]
    assert store.get_bytes("job/checkpoints/step-00000001/state.pt") == b"state"


def _save(store, job, step):
    LocalSession(store, job).save(
        step, {"w": torch.full((4,), float(step))}, [{"torch": torch.get_rng_state()}], {"world_size": 1}
    )


def test_corrupt_and_half_written_checkpoints_are_skipped(store):
    for step in (10, 20, 30):
        _save(store, "job", step)
    assert load_latest(store, "job").step == 30
    arts = JobArtifacts(store, "job")
    state = f"checkpoints/{dir_name(30)}/state.pt"
    flipped = bytearray(arts.get_bytes(state))
    flipped[len(flipped) // 2] ^= 0xFF
    arts.put_bytes(state, bytes(flipped))
    assert load_latest(store, "job").step == 20
    # an upload cut short: the files are there, the manifest (written last) is not
    store.delete_prefix(arts.key(f"checkpoints/{dir_name(20)}/manifest.json"))
    got = load_latest(store, "job")
    assert got.step == 10 and torch.equal(got.state["w"], torch.full((4,), 10.0))


# S3 only: what the local folder has no counterpart for.


def test_s3_large_uploads_go_multipart(s3_server, s3_bucket, tmp_path):
    store = s3_server.store(s3_bucket, "p")
    src = tmp_path / "big.bin"
    src.write_bytes(b"\x01" * BIG)
    store.put_file("job/big.bin", src)
    head = s3_server.client().head_object(Bucket=s3_bucket, Key="p/job/big.bin")
    assert head["ContentLength"] == BIG and head["ETag"].strip('"').endswith("-2")


def test_s3_keys_live_under_the_prefix_and_raw_keys_are_checked(s3_server, s3_bucket):
    store = s3_server.store(s3_bucket, "runs/prod")
    store.put_bytes("job/a.txt", b"a")
    keys = [o["Key"] for o in s3_server.client().list_objects_v2(Bucket=s3_bucket)["Contents"]]
    assert keys == ["runs/prod/job/a.txt"]
    for bad in ("../outside.txt", "job/../../outside", "job//a.txt", ".hidden"):
        with pytest.raises(ArtifactKeyError):
            store.put_bytes(bad, b"x")
        with pytest.raises(ArtifactKeyError):
            store.open_read(bad)
    with pytest.raises(ArtifactKeyError):
        store.list("../")
    # Within our own name limit, beyond S3's key limit once the prefixes are in front: the
    # refusal names S3's limit rather than claiming the name itself is too long.
    name = "job/" + "n" * 1015
    with pytest.raises(ArtifactKeyError, match="S3 key would be 1029 bytes .* S3 allows 1024"):
        store.put_bytes(name, b"x")


def test_s3_presigned_url_downloads_the_object(s3_server, s3_bucket):
    store = s3_server.store(s3_bucket, "p")
    store.put_bytes("job/model.onnx", b"onnx bytes")
    url = store.presigned_url("job/model.onnx", expires=60, filename="model.onnx")
    assert "Signature" in url and "slimtrain-test-secret" not in url
    with urllib.request.urlopen(url, timeout=10) as resp:
        assert resp.read() == b"onnx bytes"
        assert resp.headers["Content-Disposition"] == 'attachment; filename="model.onnx"'
    with pytest.raises(ValueError, match="expires"):
        store.presigned_url("job/model.onnx", expires=8 * 24 * 3600)
    with pytest.raises(ArtifactKeyError):
        store.presigned_url("../x")


def test_s3_store_pickles_with_its_endpoint_and_hides_secrets(s3_server, s3_bucket):
    store = s3_server.store(s3_bucket, "p")
    store.put_bytes("job/a.txt", b"a")
    clone = pickle.loads(pickle.dumps(store))
    assert clone.get_bytes("job/a.txt") == b"a"
    assert "slimtrain-test-secret" not in repr(store) + str(store)


def test_s3_credentials_and_endpoint_come_from_the_environment(s3_server, s3_bucket, monkeypatch):
    for k, v in s3_server.env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("SLIMTRAIN_ARTIFACT_URI", f"s3://{s3_bucket}/env")
    from service.settings import Settings

    s = Settings()
    store = open_store(s.resolved_artifact_uri, s.s3_endpoint_url)
    assert isinstance(store, S3ArtifactStore) and store.credentials.access_key == "slimtrain-test-key"
    store.put_bytes("job/a.txt", b"from env")
    assert s3_server.store(s3_bucket, "env").get_bytes("job/a.txt") == b"from env"


def test_s3_dataset_uri_loads_through_read_s3_uri(s3_server, s3_bucket, monkeypatch):
    for k, v in s3_server.env.items():
        monkeypatch.setenv(k, v)
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    np.savez(buf, X=rng.normal(size=(50, 8)).astype(np.float32), y=rng.integers(0, 3, 50))
    s3_server.client().put_object(Bucket=s3_bucket, Key="datasets/toy.npz", Body=buf.getvalue())
    assert read_s3_uri(f"s3://{s3_bucket}/datasets/toy.npz") == buf.getvalue()
    data = load_dataset(DataSpec(uri=f"s3://{s3_bucket}/datasets/toy.npz", val_fraction=0.2))
    assert data.info.n_train + data.info.n_val == 50 and data.info.input_shape == (8,)
    for uri in (f"s3://{s3_bucket}/datasets/missing.npz", "s3://no-such-bucket-xyz/a.npz"):
        with pytest.raises(ConfigError, match=r"data\.uri: .* does not exist"):
            load_dataset(DataSpec(uri=uri))


def test_s3_misconfiguration_names_the_setting(s3_server, s3_bucket, tmp_path):
    with pytest.raises(ConfigError, match="SLIMTRAIN_ARTIFACT_URI: bucket 'no-such-bucket-xyz'"):
        s3_server.store("no-such-bucket-xyz").put_bytes("job/a", b"x")
    closed = S3ArtifactStore(f"s3://{s3_bucket}", f"http://127.0.0.1:{free_port()}", credentials=CREDENTIALS)
    with pytest.raises(ConfigError, match="SLIMTRAIN_S3_ENDPOINT_URL: cannot reach"):
        closed.put_bytes("job/a", b"x")
    for uri in ("s3://", "s3:///prefix", "s3://b/p?x=1", "ftp://host/x"):
        with pytest.raises(ConfigError, match="SLIMTRAIN_ARTIFACT_URI"):
            open_store(uri)
    for endpoint in ("minio:9000", "http://minio:9000/path", "tcp://minio:9000"):
        with pytest.raises(ConfigError, match="SLIMTRAIN_S3_ENDPOINT_URL"):
            open_store("s3://bucket/p", endpoint)
    with pytest.raises(ArtifactKeyError):
        open_store("s3://bucket/../p")
    assert isinstance(open_store(str(tmp_path / "plain")), LocalArtifactStore)
    assert isinstance(open_store((tmp_path / "uri").as_uri()), LocalArtifactStore)
