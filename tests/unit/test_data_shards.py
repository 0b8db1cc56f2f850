"""Datasets of several files (workers/data/shards.py), without Ray: a folder of parquet, jsonl or
text shards gives the rows of the one file they were cut from, in memory and through the
streamed plans (the read tasks' groups); mismatched shards, empty folders and folders outside
the caller's namespace are refused by name; shard uploads (NAME/SHARD) stay in their tenant."""

from __future__ import annotations

import io
import json
import pickle

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from service.artifacts import LocalArtifactStore
from service.datasets import DatasetStore, InvalidDatasetName, resolve_data
from service.errors import ConfigError, SpecError
from service.spec import DataSpec, parse_spec
from service.tenant_files import check_s3
from workers.data import load_dataset, load_for_job, locate_shards, streaming
from workers.data.shards import select


@pytest.fixture()
def store(tmp_path):
    return LocalArtifactStore(tmp_path / "store")


def _table(n=203, f=6, seed=0) -> pa.Table:
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 4
    rng.shuffle(y)
    x = (rng.standard_normal((n, f)) + y[:, None]).astype(np.float32)
    return pa.table({**{f"f{i}": x[:, i] for i in range(f)}, "label": y.astype(np.int64)})


def _parquet(table: pa.Table, row_group: int) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf, row_group_size=row_group)
    return buf.getvalue()


def _spec(uri: str, resolved: str, **kw) -> DataSpec:
    cols = [f"f{i}" for i in range(6)]
    return DataSpec(uri=uri, resolved_uri=resolved, feature_columns=cols, label_column="label", **kw)


def _put_shards(store, table: pa.Table, cuts=(70, 140), row_groups=(37, 16, 50)) -> None:
    """`table` cut into shards of different row-group sizes, as Spark writes them (with its
    marker files, which are not data), in the upload layout SET/SHARD/data.parquet."""
    bounds = [0, *cuts, table.num_rows]
    for k in range(len(bounds) - 1):
        part = table.slice(bounds[k], bounds[k + 1] - bounds[k])
        store.put_bytes(f"datasets/set/part-{k}.parquet/data.parquet", _parquet(part, row_groups[k]))
        store.put_bytes(f"datasets/set/part-{k}.parquet/meta.json", b"{}")
    store.put_bytes("datasets/set/_SUCCESS", b"")
    store.put_bytes("datasets/set/.part-0.parquet.crc", b"xx")


def _plan_rows(st) -> dict[str, np.ndarray]:
    plan = pickle.loads(pickle.dumps(st.plan))  # as Ray Data's read tasks get it
    parts = [plan.rows(i, "train") for i in range(len(plan.row_starts))]
    return {c: np.concatenate([p[c] for p in parts]) for c in ("x", "y", "row")}


def test_parquet_shards_are_the_one_file_in_memory_and_streamed(store):
    table = _table()
    store.put_bytes("datasets/one.parquet", _parquet(table, 37))
    _put_shards(store, table)
    one = _spec("store://datasets/one.parquet", "datasets/one.parquet")
    folder = _spec("store://datasets/set/", "datasets/set/", format="parquet")
    files, _ = locate_shards(folder, store)
    assert [f.uri for f in files] == [f"store://datasets/set/part-{k}.parquet" for k in range(3)]

    a, b = load_dataset(one, store), load_dataset(folder, store)
    for k in ("x_train", "y_train", "x_val", "y_val"):  # the same tensors, the same split
        assert torch.equal(getattr(a, k), getattr(b, k)), k
    assert {**a.info.to_dict(), "source": ""} == {**b.info.to_dict(), "source": ""}

    # Streamed: every shard's row groups are groups of the plan; same positions, same split.
    sa = load_for_job(one.model_copy(update={"streaming": "on"}), "ddp", store)
    sb = load_for_job(folder.model_copy(update={"streaming": "on"}), "ddp", store)
    assert sb.streamed and sb.plan.val_bits == sa.plan.val_bits and sb.plan.n == 203
    assert set(sb.plan.group_shard) == {0, 1, 2} and len(sb.plan.row_starts) == 2 + 5 + 2
    ia, ib = sa.info.to_dict(), sb.info.to_dict()
    for k in ("mean", "std"):  # float64 sums over other row groups: another summation order
        assert ib.pop(k) == pytest.approx(ia.pop(k), rel=1e-9)
    assert {**ia, "source": ""} == {**ib, "source": ""}
    ra, rb = _plan_rows(sa), _plan_rows(sb)
    order_a, order_b = np.argsort(ra["row"]), np.argsort(rb["row"])
    for c in ("x", "y", "row"):
        assert np.array_equal(ra[c][order_a], rb[c][order_b]), c
    assert np.array_equal(rb["x"][order_b], a.x_train.numpy()[np.argsort(_train_rows(203))])
    exp = sb.for_export(calibration_rows=10)
    assert torch.equal(exp.x_val, a.x_val) and torch.equal(exp.y_val, a.y_val)


def _train_rows(n: int) -> np.ndarray:
    from workers.data.sharding import split_indices

    return split_indices(n, 0.2)[0].numpy()


@pytest.mark.parametrize(("fmt", "group_bytes"), [("jsonl", 700), ("text", 50)])
def test_text_shards_are_the_one_file(store, monkeypatch, fmt, group_bytes):
    """Documents of the shards one file's after the other's (a shard need not end in a line
    break); streamed in groups small enough that a block's tail reads on into the next shard."""
    from workers.data.sources import stdlib_corpus

    lines = stdlib_corpus(12_000)[0].decode("utf-8", "replace").split("\n")
    if fmt == "jsonl":
        lines = [json.dumps({"body": t}) if i % 9 else "" for i, t in enumerate(lines)]
    ext, opts = ("jsonl", {"text_column": "body"}) if fmt == "jsonl" else ("txt", {})
    cut = [0, len(lines) // 3, 2 * len(lines) // 3, len(lines)]
    shards = ["\n".join(lines[cut[k] : cut[k + 1]]) for k in range(3)]
    shards[0] += "\n"  # one shard ends in a line break, the others do not
    store.put_bytes(f"datasets/one.{ext}", "\n".join(lines).encode())
    for k, body in enumerate(shards):
        store.put_bytes(f"datasets/c/p{k}.{ext}", body.encode())
    store.put_bytes("datasets/c/notes.md", b"not a shard")  # another format: not read
    one = DataSpec(uri=f"store://datasets/one.{ext}", resolved_uri=f"datasets/one.{ext}", seq_len=24, **opts)
    folder = DataSpec(uri="store://datasets/c/", resolved_uri="datasets/c/", format=fmt, seq_len=24, **opts)
    a, b = load_dataset(one, store), load_dataset(folder, store)
    for k in ("x_train", "y_train", "x_val", "y_val"):
        assert torch.equal(getattr(a, k), getattr(b, k)), k

    monkeypatch.setattr(streaming, "TEXT_GROUP_BYTES", group_bytes)
    st = load_for_job(folder.model_copy(update={"streaming": "on"}), "ddp", store)
    assert st.streamed and st.info.n_train == len(a.x_train) and set(st.plan.group_shard) == {0, 1, 2}
    r = _plan_rows(st)
    order = np.argsort(r["row"])
    assert np.array_equal(
        r["x"][order], a.x_train.numpy()[np.argsort(_train_rows(len(a.x_train) + len(a.x_val)))]
    )
    assert np.array_equal(
        r["y"][order], a.y_train.numpy()[np.argsort(_train_rows(len(a.x_train) + len(a.x_val)))]
    )


def test_npz_shards_concatenate(store):
    rng = np.random.default_rng(1)
    x, y = rng.standard_normal((60, 5)).astype(np.float32), np.arange(60) % 3
    for k, s in enumerate((slice(0, 25), slice(25, 60))):
        buf = io.BytesIO()
        np.savez(buf, X=x[s], y=y[s])
        store.put_bytes(f"datasets/n/p{k}.npz", buf.getvalue())
    got = load_dataset(DataSpec(uri="store://datasets/n/", resolved_uri="datasets/n/", format="npz"), store)
    assert torch.equal(torch.cat([got.x_train, got.x_val]).sort(0)[0], torch.from_numpy(x).sort(0)[0])
    buf = io.BytesIO()
    np.savez(buf, X=x[:20, :4], y=y[:20])
    store.put_bytes("datasets/n/p2.npz", buf.getvalue())
    with pytest.raises(ConfigError, match=r"data.uri: array X .* store://datasets/n/p2.npz"):
        load_dataset(DataSpec(uri="store://datasets/n/", resolved_uri="datasets/n/", format="npz"), store)


@pytest.mark.parametrize(
    ("change", "named"),
    [
        (lambda t: t.set_column(6, "label", t.column("label").cast(pa.int32())), r"column 'label' is int32"),
        (lambda t: t.drop_columns(["f3"]), r"has no column 'f3'"),
    ],
)
def test_shards_with_another_schema_are_refused_naming_the_column_and_shard(store, change, named):
    table = _table()
    _put_shards(store, table)
    bad = change(table.slice(140, 63))
    store.put_bytes("datasets/set/part-2.parquet/data.parquet", _parquet(bad, 50))
    folder = _spec("store://datasets/set/", "datasets/set/", format="parquet")
    for load in (
        lambda: load_dataset(folder, store),
        lambda: load_for_job(folder.model_copy(update={"streaming": "on"}), "ddp", store),
    ):
        with pytest.raises(ConfigError, match=named) as e:
            load()
        assert "data.uri" in str(e.value) and "store://datasets/set/part-2.parquet" in str(e.value)
    # A column the job does not read may differ (pandas writes an all-null column as null).
    extra = table.slice(140, 63).append_column("note", pa.nulls(63))
    store.put_bytes("datasets/set/part-2.parquet/data.parquet", _parquet(extra, 50))
    assert len(load_dataset(folder, store).x_train) == 162


def test_a_folder_without_shards_is_refused(store):
    store.put_bytes("datasets/e/_SUCCESS", b"")
    store.put_bytes("datasets/e/part-0.jsonl", b'{"text": "x"}\n')
    folder = _spec("store://datasets/e/", "datasets/e/", format="parquet")
    with pytest.raises(ConfigError, match=r"data.uri: store://datasets/e/ holds no parquet files"):
        load_dataset(folder, store)
    with pytest.raises(ConfigError, match="data.uri: store://datasets/e/ holds no parquet"):
        load_for_job(folder, "ddp", store)


def test_select_skips_marker_files_and_sorts_by_key():
    entries = [
        ("part-10.parquet", 5),
        ("_SUCCESS", 0),
        ("part-2.parquet", 5),
        (".part-2.parquet.crc", 1),
        ("_temporary/0/part-9.parquet", 5),
        ("year=2024/part-0.parquet", 5),
    ]
    got = [shown for shown, _, _ in select("s3://b/t/", "parquet", entries, store_layout=False)]
    assert got == ["part-10.parquet", "part-2.parquet", "year=2024/part-0.parquet"]
    with pytest.raises(ConfigError, match="image_zip"):
        select("s3://b/t/", "image_zip", [("a.zip", 1)], store_layout=False)


# --- the caller's namespace -------------------------------------------------------------------


@pytest.mark.parametrize(
    "uri",
    [
        "store://datasets/../other/",
        "store://datasets/set/../../bob/datasets/x/",
        "store://datasets/a/b/c/",
        "store://datasets//",
        "store://datasets/",
        "store://_tenants/bob/datasets/x/",
        "s3://bucket/a/../b/",
    ],
)
def test_a_folder_uri_never_leaves_the_callers_datasets(uri):
    with pytest.raises(ValueError, match="data.uri|uri"):
        DataSpec(uri=uri, format="parquet", feature_columns=["f0"], label_column="label")


def _job(uri: str, **data) -> object:
    return parse_spec(
        {
            "name": "j",
            "model": {"name": "mlp"},
            "data": {"uri": uri, "feature_columns": ["f0"], "label_column": "label", **data},
        }
    )


def _upload(datasets: DatasetStore, tenant: str, name: str, body: bytes) -> dict:
    up = datasets.start(tenant, name)
    try:
        up.write(body)
        return up.finish()
    finally:
        up.close()


def test_shard_uploads_resolve_inside_the_tenant_only(store, tmp_path):
    datasets = DatasetStore(store, 10**9, tmp_path / "tmp")
    body = _parquet(_table(40), 20)
    for k in range(2):
        _upload(datasets, "alice", f"set/part-{k}.parquet", body)
    spec = resolve_data(_job("store://datasets/set/"), "alice", store)
    assert spec.data.resolved_uri == "_tenants/alice/datasets/set/" and spec.data.format == "parquet"
    assert len(load_dataset(spec.data, store).x_train) == 64
    assert [e["name"] for e in datasets.list("alice")] == ["set/part-0.parquet", "set/part-1.parquet"]
    # bob has no such set: exactly as absent as a missing one, and nothing of alice's is named
    for tenant in ("bob", "alice"):
        uri = "store://datasets/set/" if tenant == "bob" else "store://datasets/none/"
        with pytest.raises(SpecError, match="data.uri: no dataset shards under") as e:
            resolve_data(_job(uri), tenant, store)
        assert "alice" not in str(e.value)
    # one shard alone is a dataset too
    one = resolve_data(_job("store://datasets/set/part-1.parquet"), "alice", store)
    assert one.data.resolved_uri == "_tenants/alice/datasets/set/part-1.parquet/data.parquet"
    npz = parse_spec(
        {"name": "j", "model": {"name": "mlp"}, "data": {"uri": "store://datasets/set/", "format": "npz"}}
    )
    with pytest.raises(SpecError, match="data.format: npz, but the shards of 'set' were uploaded as parquet"):
        resolve_data(npz, "alice", store)
    # a set and a one-file dataset never share a name; deleting SET deletes its shards
    with pytest.raises(InvalidDatasetName, match="set of shards"):
        datasets.start("alice", "set")
    _upload(datasets, "alice", "single.parquet", body)
    with pytest.raises(InvalidDatasetName, match="one file"):
        datasets.start("alice", "single.parquet/p0.parquet")
    with pytest.raises(InvalidDatasetName):
        datasets.start("alice", "set/a/b.parquet")
    datasets.delete("alice", "set")
    assert [e["name"] for e in datasets.list("alice")] == ["single.parquet"]


def test_shards_of_different_formats_are_refused(store, tmp_path):
    datasets = DatasetStore(store, 10**9, tmp_path / "tmp")
    _upload(datasets, "alice", "mix/a.parquet", _parquet(_table(40), 20))
    _upload(datasets, "alice", "mix/b.jsonl", b"".join(b'{"text": "hello"}\n' for _ in range(20)))
    with pytest.raises(SpecError, match=r"data.uri: shard mix/b.jsonl is jsonl but mix/a.parquet is parquet"):
        resolve_data(_job("store://datasets/mix/"), "alice", store)
    # a tokenizer.json beside jsonl shards is no shard
    datasets.delete("alice", "mix/a.parquet")
    _upload(datasets, "alice", "mix/tok.json", _bpe_json())
    text = {
        "name": "j",
        "model": {"name": "gpt"},
        "data": {"uri": "store://datasets/mix/", "tokenizer": "store://datasets/mix/tok.json"},
    }
    data = resolve_data(parse_spec(text), "alice", store).data
    assert (data.format, data.resolved_uri) == ("jsonl", "_tenants/alice/datasets/mix/")
    assert data.resolved_tokenizer == "_tenants/alice/datasets/mix/tok.json/tokenizer.json"


def _bpe_json() -> bytes:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(
        ["hello world"] * 5,
        trainers.BpeTrainer(vocab_size=270, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()),
    )
    return tok.to_str().encode()


@pytest.mark.parametrize(
    ("uri", "ok"),
    [("s3://b/data/", True), ("s3://b/data/t/", True), ("s3://b/data-other/", False), ("s3://b/", False)],
)
def test_an_s3_folder_must_lie_in_an_allowed_prefix(store, uri, ok):
    if ok:
        assert check_s3(uri, "data.uri", store, ["s3://b/data"]) == uri
    else:
        with pytest.raises(SpecError, match="data.uri: .*outside"):
            check_s3(uri, "data.uri", store, ["s3://b/data"])
    with pytest.raises(ValueError, match="format: a folder of shards"):
        DataSpec(uri=uri, feature_columns=["f0"], label_column="label")
