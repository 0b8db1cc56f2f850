"""`/v1/datasets` and `data.uri: store://datasets/NAME` through the live API (tests/plugins/
live_api.py: real uvicorn, SQLite, a local artifact store, the Ray stand-in FinishingRay). About
HTTP, tenants and what is refused on arrival; what the readers make of each format is
tests/unit/test_data_formats.py, whose archive builders this file borrows."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import zipfile

import numpy as np
import pyarrow as pa
import pytest

from service.artifacts import LocalArtifactStore
from service.spec import parse_spec
from tests.plugins.live_api import ALICE, BOB, live_api
from tests.unit.test_data_formats import GOOD_PNG, _link, _parquet, _tar, _zip
from workers.data import load_dataset

pytestmark = pytest.mark.integration

LIMIT = 256 * 1024
ALLOWED = "s3://shared-data/public"
SPEC = {"name": "byod", "model": {"name": "mlp"}}
FEATURES = {"feature_columns": ["x"], "label_column": "label"}


def _table(offset: float, labels=None) -> bytes:
    labels = np.arange(40) % 4 if labels is None else np.asarray(labels)
    x = [np.full(6, offset + i, np.float32) for i in range(len(labels))]
    return _parquet(pa.table({"x": x, "label": labels}))


def _too_large() -> bytes:
    """A parquet file over the module's limit (LIMIT)."""
    n = LIMIT // 4
    return _parquet(pa.table({"x": np.arange(n, dtype=np.float64), "label": np.zeros(n, np.int64)}))


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    data = tmp_path_factory.mktemp("datasets")
    store = LocalArtifactStore(data / "artifacts")
    with live_api(data, store, max_dataset_bytes=LIMIT, s3_allowed_prefixes=[ALLOWED]) as api:
        yield api


def _job(client, data: dict, model: dict | None = None):
    return client.post("/v1/jobs", json={**SPEC, "model": model or SPEC["model"], "data": data})


def _names(client) -> list[str]:
    return [d["name"] for d in client.get("/v1/datasets").json()["items"]]


def test_two_tenants_with_one_name_each_read_their_own(api):
    alice, bob = api.client(ALICE), api.client(BOB)
    a, b = _table(0.0), _table(100.0, np.arange(40) % 2)
    r = alice.put("/v1/datasets/train.parquet", content=a)
    assert r.status_code == 201, r.text
    assert r.json() == {
        "name": "train.parquet",
        "size": len(a),
        "sha256": hashlib.sha256(a).hexdigest(),
        "format": "parquet",
        "created": r.json()["created"],
        "samples": 40,
        "num_classes": 4,
        "columns": ["x", "label"],
    }
    assert bob.put("/v1/datasets/train.parquet", content=b).json()["num_classes"] == 2
    assert alice.put("/v1/datasets/zeta.parquet", content=a).status_code == 201
    assert _names(alice) == ["train.parquet", "zeta.parquet"] and _names(bob) == ["train.parquet"]
    # another tenant's name is absent: not deletable, not trainable on
    assert bob.delete("/v1/datasets/zeta.parquet").status_code == 404
    r = _job(bob, {"uri": "store://datasets/zeta.parquet", **FEATURES})
    assert r.status_code == 422, r.text
    assert r.json()["error"]["fields"][0]["field"] == "data.uri"
    missing = _job(bob, {"uri": "store://datasets/never.parquet", **FEATURES}).json()["error"]["fields"][0]
    assert r.json()["error"]["fields"][0]["message"].replace("zeta", "X") == missing["message"].replace(
        "never", "X"
    )
    # each tenant's job resolves the one name to its own file, which the workers' loader reads
    got = {}
    for who, client in (("alice", alice), ("bob", bob)):
        job = _job(client, {"uri": "store://datasets/train.parquet", **FEATURES})
        assert job.status_code == 201, job.text
        data = parse_spec(job.json()["spec"]).data
        assert data.resolved_uri == f"_tenants/{who}/datasets/train.parquet/data.parquet"
        got[who] = load_dataset(data, api.artifacts)
    assert got["alice"].info.num_classes == 4 and got["bob"].info.num_classes == 2
    assert got["bob"].x_train.min() >= 100 > got["alice"].x_train.max()
    assert alice.delete("/v1/datasets/zeta.parquet").status_code == 204
    assert alice.delete("/v1/datasets/zeta.parquet").status_code == 404
    assert _names(alice) == ["train.parquet"]


def test_format_override_and_a_tokenizer_resolve_by_name(api):
    from tests.unit.test_data_formats import _bpe, _corpus_docs

    alice = api.client(ALICE)
    docs = _corpus_docs()[:50]
    corpus = "\n".join(json.dumps({"body": d}) for d in docs).encode()
    r = alice.put("/v1/datasets/corpus", params={"format": "jsonl", "text_column": "body"}, content=corpus)
    assert r.status_code == 201, r.text
    assert (r.json()["format"], r.json()["samples"]) == ("jsonl", 50)
    tok = _bpe().to_str().encode()  # trained on the whole corpus, these 50 docs among it
    assert alice.put("/v1/datasets/tok.json", content=tok).json()["format"] == "tokenizer"
    data = {"uri": "store://datasets/corpus", "tokenizer": "store://datasets/tok.json", "text_column": "body"}
    job = _job(alice, data, {"name": "gpt"})
    assert job.status_code == 201, job.text
    stored = job.json()["spec"]["data"]
    assert stored["format"] == "jsonl"  # from the upload: workers never guess from the name
    assert stored["resolved_tokenizer"] == "_tenants/alice/datasets/tok.json/tokenizer.json"
    # a tokenizer is not data, data is not a tokenizer, a format the upload was not checked as
    for bad, field in (
        ({"uri": "store://datasets/tok.json"}, "data.uri"),
        ({"uri": "store://datasets/corpus", "tokenizer": "store://datasets/corpus.json"}, "data.tokenizer"),
        ({"uri": "store://datasets/corpus", "format": "text"}, "data.format"),
    ):
        r = _job(alice, bad, {"name": "gpt"})
        assert r.status_code == 422 and r.json()["error"]["fields"][0]["field"] == field, r.text


def _symlink_zip() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("a/x.png", GOOD_PNG)
        link = zipfile.ZipInfo("b/evil.png")
        link.external_attr = 0o120777 << 16
        z.writestr(link, "/etc/passwd")
    return buf.getvalue()


def _corrupt_parquet() -> bytes:
    good = bytearray(_table(0.0))
    good[len(good) // 3 : len(good) // 3 + 64] = b"\xff" * 64  # inside a data page
    return bytes(good)


@pytest.mark.parametrize(
    ("name", "body", "says"),
    [
        ("slip.zip", _zip({"a/x.png": GOOD_PNG, "../../etc/b.png": GOOD_PNG}), "escapes its folder"),
        ("abs.tar", _tar({"a/x.png": GOOD_PNG, "/tmp/b.png": GOOD_PNG}, mode="w"), "absolute"),
        (
            "link.tar",
            _tar({"a/x.png": GOOD_PNG}, mode="w", extra=[_link("b/e.png", tarfile.SYMTYPE, "/etc/passwd")]),
            "is a symlink",
        ),
        ("link.zip", _symlink_zip(), "is a link"),
        ("bomb.zip", _zip({"a/x.png": GOOD_PNG, "b/zeros.png": bytes(4 << 20)}), "decompression bomb"),
        ("one-class.zip", _zip({f"a/{i}.png": GOOD_PNG for i in range(12)}), "one class folder"),
        ("broken.parquet", _corrupt_parquet(), "not a readable parquet file"),
        ("neg.parquet", _table(0.0, [*range(4)] * 9 + [-1, 0, 1, 2]), "label -1 is negative"),
        ("gap.parquet", _table(0.0, [0, 1, 2, 255] * 10), "class 3 never occurs"),
        ("nolabel.parquet", _parquet(pa.table({"x": np.arange(20.0)})), "no label column"),
        ("weights.npz", b"PK\x03\x04 not really", "not an .npz"),
        ("noformat.bin", b"x" * 100, "cannot tell the format"),
    ],
)
def test_bad_files_are_refused_and_nothing_is_written(api, name, body, says):
    alice = api.client(ALICE)
    before = sorted(o.key for o in api.artifacts.list(""))
    r = alice.put(f"/v1/datasets/{name}", content=body)
    assert r.status_code == 422, r.text
    assert says in r.json()["error"]["message"], r.json()
    assert sorted(o.key for o in api.artifacts.list("")) == before
    assert not list((api.data_dir / "uploads").iterdir())  # the waiting copy is gone too


def test_over_the_limit_is_413_and_nothing_is_stored(api):
    alice = api.client(ALICE)
    big = _too_large()
    r = alice.put("/v1/datasets/big.parquet", content=big)
    assert r.status_code == 413 and "SLIMTRAIN_MAX_DATASET_BYTES" in r.text, r.text
    # without Content-Length (chunked): counted as the bytes arrive
    r = alice.put(
        "/v1/datasets/big.parquet", content=iter([big[i : i + 8192] for i in range(0, len(big), 8192)])
    )
    assert r.status_code == 413, r.text
    assert "big.parquet" not in _names(alice)


def test_s3_uris_only_under_the_operators_prefixes(api):
    alice = api.client(ALICE)
    ok = _job(alice, {"uri": f"{ALLOWED}/digits.npz"})
    assert ok.status_code == 201, ok.text
    assert ok.json()["spec"]["data"]["resolved_uri"] == f"{ALLOWED}/digits.npz"
    for data, model, field in (
        ({"uri": "s3://shared-data/private/x.npz"}, None, "data.uri"),
        ({"uri": "s3://shared-data/public-not/x.npz"}, None, "data.uri"),  # whole segments only
        (
            {"uri": f"{ALLOWED}/c.txt", "tokenizer": "s3://elsewhere/t.json"},
            {"name": "gpt"},
            "data.tokenizer",
        ),
        (
            {"name": "digits"},
            {"name": "mlp", "init": {"uri": "s3://elsewhere/w.safetensors"}},
            "model.init.uri",
        ),
    ):
        r = _job(alice, data, model)
        assert r.status_code == 422, r.text
        err = r.json()["error"]["fields"][0]
        assert err["field"] == field and "SLIMTRAIN_S3_ALLOWED_PREFIXES" in err["message"], err


def test_no_allowed_prefix_refuses_s3_saying_how_to_allow_it(tmp_path):
    from service.errors import SpecError
    from service.tenant_files import check_s3

    store = LocalArtifactStore(tmp_path)
    with pytest.raises(SpecError, match="not enabled on this server; the operator allows .* SLIMTRAIN_S3"):
        check_s3("s3://b/x.npz", "data.uri", store, [])
    assert check_s3("s3://b/x.npz", "data.uri", store, None) == "s3://b/x.npz"  # slimtrain run


def test_cli_push_ls_rm(api, tmp_path):
    from typer.testing import CliRunner

    from api.cli import app as cli

    runner = CliRunner()
    auth = ["--url", api.url, "--token", BOB]
    path = tmp_path / "mine.parquet"
    path.write_bytes(_table(5.0))
    r = runner.invoke(cli, ["dataset", "push", str(path), *auth])  # NAME: the file's
    assert r.exit_code == 0, r.output
    assert hashlib.sha256(path.read_bytes()).hexdigest() in r.stdout
    r = runner.invoke(cli, ["dataset", "ls", "--json", *auth])
    listed = {d["name"]: d for d in json.loads(r.stdout)}
    assert listed["mine.parquet"]["samples"] == 40
    assert runner.invoke(cli, ["dataset", "rm", "mine.parquet", *auth]).exit_code == 0
    r = runner.invoke(cli, ["dataset", "rm", "mine.parquet", *auth])
    assert r.exit_code == 2 and "no dataset 'mine.parquet'" in r.output
    path.write_bytes(_corrupt_parquet())
    r = runner.invoke(cli, ["dataset", "push", str(path), "bad.parquet", *auth])
    assert r.exit_code == 2 and "not a readable parquet file" in r.output, r.output


def test_shards_upload_as_set_slash_name_and_a_job_reads_the_set(api):
    """A table cut into shards (as Spark writes it) uploads as SET/SHARD and trains as
    store://datasets/SET/, inside the uploader's tenant only (workers/data/shards.py)."""
    alice, bob = api.client(ALICE), api.client(BOB)
    for k in range(2):
        r = alice.put(f"/v1/datasets/parts/p{k}.parquet", content=_table(100.0 * k))
        assert r.status_code == 201 and r.json()["name"] == f"parts/p{k}.parquet", r.text
    assert {"parts/p0.parquet", "parts/p1.parquet"} <= set(_names(alice))
    for bad in ("parts/a/b.parquet", "parts/.x.parquet", "parts/"):
        assert alice.put(f"/v1/datasets/{bad}", content=_table(0.0)).status_code in (404, 405, 422), bad
    assert alice.put("/v1/datasets/parts", content=_table(0.0)).status_code == 422  # a set, not a file
    r = _job(bob, {"uri": "store://datasets/parts/", **FEATURES})
    assert r.status_code == 422 and r.json()["error"]["fields"][0]["field"] == "data.uri", r.text
    job = _job(alice, {"uri": "store://datasets/parts/", **FEATURES})
    assert job.status_code == 201, job.text
    data = parse_spec(job.json()["spec"]).data
    assert data.resolved_uri == "_tenants/alice/datasets/parts/" and data.format == "parquet"
    got = load_dataset(data, api.artifacts)
    assert len(got.x_train) + len(got.x_val) == 80 and got.x_train.max() >= 100
    assert alice.delete("/v1/datasets/parts").status_code == 204
    assert not any(n.startswith("parts/") for n in _names(alice))


# --- slimtrain dataset push DIR SET: a folder of shards, all or nothing (api/dataset_sets.py) ---


def _cli(api, *args, token=ALICE):
    from typer.testing import CliRunner

    from api.cli import app as cli

    return CliRunner().invoke(cli, [*args, "--url", api.url, "--token", token])


def _spark_folder(root, bad: int | None = None, body=_corrupt_parquet):
    """Three 40-row parquet parts as Spark writes them, with its marker and checksum files;
    part `bad` is `body()` (corrupt)."""
    root.mkdir()
    for k in range(3):
        body_k = body() if k == bad else _table(100.0 * k)
        (root / f"part-{k:05d}.parquet").write_bytes(body_k)
    (root / "_SUCCESS").write_bytes(b"")
    (root / ".part-00000.parquet.crc").write_bytes(b"crc")
    return root


def _said(r) -> str:
    """The CLI's output as one line: rich wraps long messages (and the table of a 422's fields)."""
    return " ".join(r.output.replace("│", " ").split())


def _set_names(api, client, name):
    return sorted(n for n in _names(client) if n.startswith(name + "/"))


def test_cli_pushes_a_folder_as_a_set_that_ls_shows_whole_and_a_job_reads(api, tmp_path):
    alice = api.client(ALICE)
    folder = _spark_folder(tmp_path / "clicks")
    r = _cli(api, "dataset", "push", str(folder), "clicks/")
    assert r.exit_code == 0, r.output
    parts = [f"part-{k:05d}.parquet" for k in range(3)]
    assert _set_names(api, alice, "clicks") == [f"clicks/{p}" for p in parts]  # no _SUCCESS, no .crc
    size = sum((folder / p).stat().st_size for p in parts)
    assert f"clicks/  3 files  {size:,} bytes  -> store://datasets/clicks/" in r.stdout
    r = _cli(api, "dataset", "ls")
    assert r.exit_code == 0, r.output
    (line,) = [x for x in r.stdout.splitlines() if x.startswith("clicks/")]
    assert line.startswith(f"clicks/  parquet  3 shards  120 samples  4 classes  {size:,} bytes"), line
    job = _job(alice, {"uri": "store://datasets/clicks/", **FEATURES})
    assert job.status_code == 201, job.text
    got = load_dataset(parse_spec(job.json()["spec"]).data, api.artifacts)
    assert len(got.x_train) + len(got.x_val) == 120
    # a set that exists is not pushed into (two uploads mixed), whatever the folder holds
    r = _cli(api, "dataset", "push", str(folder), "clicks")
    assert r.exit_code == 2 and "clicks/ already exists (3 files" in r.output, r.output
    assert "dataset rm clicks" in r.output
    assert _cli(api, "dataset", "rm", "clicks/").exit_code == 0
    assert _set_names(api, alice, "clicks") == []
    # --json: the set and each shard's entry as the server gave it
    r = _cli(api, "dataset", "push", str(folder), "--json")  # NAME: the folder's
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["name"] == "clicks/" and [e["name"] for e in out["shards"]] == [f"clicks/{p}" for p in parts]
    assert out["shards"][0]["sha256"] == hashlib.sha256((folder / parts[0]).read_bytes()).hexdigest()
    assert alice.delete("/v1/datasets/clicks").status_code == 204


def test_cli_refuses_a_folder_that_is_no_set_with_exit_2_and_sends_nothing(api, tmp_path):
    alice = api.client(ALICE)
    assert (
        alice.put("/v1/datasets/single", params={"format": "parquet"}, content=_table(0.0)).status_code == 201
    )
    before = _names(alice)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "_SUCCESS").write_bytes(b"")
    nested = _spark_folder(tmp_path / "nested")
    (nested / "year=2024").mkdir()
    mixed = _spark_folder(tmp_path / "mixed")
    (mixed / "notes.jsonl").write_text('{"text": "hi"}\n')
    for folder, name, says in (
        (empty, "e", "holds no shard files"),
        (nested, "n", "holds year=2024/, which is no file"),
        (mixed, "m", "mixes formats (notes.jsonl is jsonl, part-00000.parquet is parquet)"),
        (nested, "bad name!", "invalid dataset set name 'bad name!'"),
        (nested, "a/b", "invalid dataset set name 'a/b'"),
    ):
        r = _cli(api, "dataset", "push", str(folder), name)
        assert r.exit_code == 2, (name, r.output)
        assert says in _said(r), (name, r.output)
    # a one-file dataset's name: the API's own refusal, and nothing of the set stays
    r = _cli(api, "dataset", "push", str(_spark_folder(tmp_path / "clash")), "single")
    assert r.exit_code == 2, r.output
    assert "dataset 'single' is one file; a set of shards needs a name of its own" in _said(r), r.output
    assert "nothing of single/ reached the server" in r.output
    assert _names(alice) == before
    assert alice.delete("/v1/datasets/single").status_code == 204


@pytest.mark.parametrize(
    ("body", "says"),
    [
        (_corrupt_parquet, "store://datasets/half/part-00002.parquet is not a readable parquet file"),
        (_too_large, "dataset_too_large: the upload is"),
    ],
)
def test_a_shard_refused_midway_rolls_back_the_shards_stored_before(api, tmp_path, body, says):
    """All or nothing: part 2 is refused (corrupt; over SLIMTRAIN_MAX_DATASET_BYTES), parts 0
    and 1 were stored: they are deleted again, and the server's message says what was wrong."""
    alice = api.client(ALICE)
    r = _cli(api, "dataset", "push", str(_spark_folder(tmp_path / "half", bad=2, body=body)), "half")
    assert r.exit_code == 2, r.output
    said = _said(r)
    assert "push of half/ stopped at shard part-00002.parquet" in said
    assert (
        "rolled back: the 2 shards stored before (part-00000.parquet, part-00001.parquet) were deleted"
        in said
    )
    assert says in said, said
    assert _set_names(api, alice, "half") == []


def test_a_lost_connection_midway_rolls_back_or_names_exactly_what_stays(api, tmp_path, monkeypatch):
    """The connection breaks after part 1 reached the server (its answer lost). With the server
    still there, the rollback deletes parts 0 and 1; without it (every later call fails too),
    the report names what is on the server and what is not, and the listing agrees."""
    from api.client import Client, Unreachable

    alice = api.client(ALICE)
    real_push = Client.push

    def push_then_lose_part_1(self, kind, path, name, *a, **kw):
        entry = real_push(self, kind, path, name, *a, **kw)
        if name.endswith("part-00001.parquet"):
            raise Unreachable("connection reset (test)")
        return entry

    monkeypatch.setattr(Client, "push", push_then_lose_part_1)
    r = _cli(api, "dataset", "push", str(_spark_folder(tmp_path / "lost")), "lost")
    assert r.exit_code == 3, r.output
    said = _said(r)
    assert "stopped at shard part-00001.parquet" in said and "nothing of lost/ is on the server" in said
    assert "connection reset (test)" in said
    assert _set_names(api, alice, "lost") == []

    def unreachable(self, *a, **kw):
        raise Unreachable("connection refused (test)")

    monkeypatch.setattr(Client, "delete_upload", unreachable)
    r = _cli(api, "dataset", "push", str(_spark_folder(tmp_path / "stays")), "stays")
    assert r.exit_code == 3, r.output
    said = _said(r)
    assert (
        "NOT rolled back: stays/ on the server holds 2 of the shards (part-00000.parquet, "
        "part-00001.parquet (perhaps)) and lacks part-00002.parquet" in said
    ), said
    assert "slimtrain dataset rm stays" in said
    assert _set_names(api, alice, "stays") == ["stays/part-00000.parquet", "stays/part-00001.parquet"]
    assert alice.delete("/v1/datasets/stays").status_code == 204
