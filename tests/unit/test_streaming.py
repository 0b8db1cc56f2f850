"""The streamed data path without Ray: which path a spec takes, the CPU left for Ray Data, and the
same samples, shapes, dtypes and statistics as the in-memory path for the same parquet file."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import torch

from service.artifacts import LocalArtifactStore
from service.errors import ConfigError
from service.spec import DataSpec
from workers.data import load_dataset, load_for_job, locate_uri, streaming


def write_parquet(path, n=203, f=16, classes=4, seed=0, row_group=37, image=False):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % classes  # every class present
    rng.shuffle(y)
    x = (rng.standard_normal((n, f)) + y[:, None]).astype(np.float32)
    if image:
        side = int(np.sqrt(f))
        col = pa.array(x.reshape(n, 1, side, side).tolist())
        table = pa.table({"pixels": col, "label": y.astype(np.int32)})
    else:
        table = pa.table({**{f"f{i}": x[:, i] for i in range(f)}, "label": y.astype(np.int64)})
    pq.write_table(table, path, row_group_size=row_group)
    return x, y


def spec_for(uri, f=16, image=False, **kw):
    cols = ["pixels"] if image else [f"f{i}" for i in range(f)]
    # resolved_uri: what the service fills in at submission (the tenant's key)
    resolved = uri.removeprefix("store://") if uri.startswith("store://") else None
    return DataSpec(uri=uri, resolved_uri=resolved, feature_columns=cols, label_column="label", **kw)


@pytest.fixture()
def store(tmp_path):
    return LocalArtifactStore(tmp_path / "store")


def put(store, tmp_path, name="d.parquet", **kw):
    src = tmp_path / name
    x, y = write_parquet(src, **kw)
    store.put_file(f"datasets/{name}", src)
    return x, y


@pytest.mark.parametrize(
    ("kw", "strategy", "size", "threshold", "want"),
    [
        ({"streaming": "auto"}, "ddp", 2000, 1000, True),
        ({"streaming": "auto"}, "ddp", 1000, 1000, False),  # not above the threshold
        ({"streaming": "auto"}, "fsdp", 2000, 1000, True),  # fsdp ranks read shards as ddp's
        ({"streaming": "auto"}, "pipeline", 2000, 1000, True),  # first and last stage read it whole
        ({"streaming": "off"}, "ddp", 2000, 1000, False),
        ({"streaming": "on"}, "ddp", 10, 1000, True),
    ],
)
def test_streaming_decision(kw, strategy, size, threshold, want):
    spec = spec_for("store://datasets/d.parquet", **kw)
    assert streaming.wants_streaming(spec, strategy, size, threshold) is want


@pytest.mark.parametrize(
    ("spec", "strategy", "named"),
    [
        (DataSpec(name="digits", streaming="on"), "ddp", "built-in"),
        (
            DataSpec(uri="store://datasets/d.parquet", token_column="t", streaming="on"),
            "ddp",
            "language-modelling",
        ),
        (DataSpec(uri="store://datasets/d.tar.gz", streaming="on"), "ddp", "compressed tar"),
    ],
)
def test_streaming_on_refuses_what_cannot_stream(spec, strategy, named):
    with pytest.raises(ConfigError, match="data.streaming") as e:
        streaming.wants_streaming(spec, strategy, 10**9, 0)
    assert named in str(e.value)
    # auto falls back to memory instead
    assert not streaming.wants_streaming(spec.model_copy(update={"streaming": "auto"}), strategy, 10**9, 0)


@pytest.mark.parametrize(
    ("workers", "cpus", "want"),
    [(2, 2, 0.5), (1, 2, 1.0), (2, 8, 1.0), (4, 3, 0.5), (3, 2, 0.33)],
)
def test_streamed_workers_leave_cpu_for_ray_data(workers, cpus, want):
    got = streaming.worker_cpus(workers, cpus, streamed=True)
    assert got == want
    # the FEASIBILITY hang: all CPUs to training workers leaves Ray Data none
    assert workers * got <= cpus - streaming.DATA_CPUS + 1e-9
    assert streaming.worker_cpus(workers, cpus, streamed=False) == 1.0


@pytest.mark.parametrize(("workers", "cpus"), [(2, 1), (20, 2)])
def test_no_room_for_ray_data_is_a_config_error(workers, cpus):
    with pytest.raises(ConfigError, match="parallel.workers"):
        streaming.worker_cpus(workers, cpus, streamed=True)


def test_auto_streams_above_the_threshold_only(store, tmp_path):
    put(store, tmp_path)
    spec = spec_for("store://datasets/d.parquet")
    _, _, size = locate_uri(spec.location(), store)
    assert getattr(load_for_job(spec, "ddp", store, stream_above_bytes=size - 1), "streamed", False)
    assert not getattr(load_for_job(spec, "ddp", store, stream_above_bytes=size), "streamed", False)
    with pytest.raises(ConfigError, match="not found"):
        locate_uri("store://datasets/missing.parquet", store)


def _streamed(store, spec):
    path, fs, _ = locate_uri(spec.location(), store)
    return streaming.open_streamed(spec, path, fs)


@pytest.mark.parametrize("image", [False, True])
def test_same_split_samples_and_info_as_in_memory(store, tmp_path, image):
    f = 16
    put(store, tmp_path, f=f, image=image)
    spec = spec_for("store://datasets/d.parquet", f=f, image=image)
    mem = load_dataset(spec, store)
    st = _streamed(store, spec)
    a, b = mem.info.to_dict(), st.info.to_dict()
    # float64 sums over row groups vs float32 over the whole array
    assert b.pop("mean") == pytest.approx(a.pop("mean"), rel=1e-5, abs=1e-6)
    assert b.pop("std") == pytest.approx(a.pop("std"), rel=1e-5)
    assert a == b
    # Training rows, read row group by row group as the Ray Data tasks do: the same samples.
    parts = [st.plan.rows(i, "train") for i in range(len(st.plan.row_starts))]
    x = np.concatenate([p["x"] for p in parts])
    y = np.concatenate([p["y"] for p in parts])
    assert x.dtype == mem.x_train.numpy().dtype and y.dtype == mem.y_train.numpy().dtype
    assert x.shape[1:] == tuple(mem.x_train.shape[1:])

    def rows(xs, ys):
        return sorted(map(tuple, np.column_stack([xs, ys]).tolist()))

    assert rows(x, y) == rows(mem.x_train.numpy(), mem.y_train.numpy())
    # Export's in-memory part: the validation split in the in-memory path's own order.
    exp = st.for_export(calibration_rows=20)
    assert torch.equal(exp.x_val, mem.x_val) and torch.equal(exp.y_val, mem.y_val)
    assert exp.x_train.shape == (20, *mem.x_train.shape[1:])


def test_validation_bits_match_the_split(store, tmp_path):
    put(store, tmp_path, n=203)
    st = _streamed(store, spec_for("store://datasets/d.parquet", val_fraction=0.3))
    from workers.data.sharding import split_indices

    _, val = split_indices(203, 0.3)
    want = np.zeros(203, bool)
    want[val.numpy()] = True
    got = np.concatenate([st.plan.is_val(s, 7) for s in range(0, 196, 7)] + [st.plan.is_val(196, 7)])
    assert (got == want).all()


def test_bad_labels_and_columns_are_refused_like_in_memory(store, tmp_path):
    src = tmp_path / "bad.parquet"
    y = np.array([0, 1, 3] * 10)  # class 2 never occurs
    pq.write_table(pa.table({"f0": np.ones(30, np.float32), "label": y}), src, row_group_size=7)
    store.put_file("datasets/bad.parquet", src)
    spec = DataSpec(
        uri="store://datasets/bad.parquet",
        resolved_uri="datasets/bad.parquet",
        feature_columns=["f0"],
        label_column="label",
    )
    with pytest.raises(ConfigError, match="class 2 never occurs"):
        _streamed(store, spec)
    with pytest.raises(ConfigError, match="no column 'nope'"):
        _streamed(store, spec.model_copy(update={"feature_columns": ["nope"]}))
    (tmp_path / "store" / "datasets" / "junk.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(ConfigError, match="not a readable parquet"):
        streaming.open_streamed(
            spec.model_copy(update={"uri": "store://datasets/junk.parquet"}),
            str(tmp_path / "store" / "datasets" / "junk.parquet"),
            pafs.LocalFileSystem(),
        )


def test_s3_parquet_streams_with_the_credentials_the_plan_carries(
    s3_server, s3_bucket, tmp_path, monkeypatch
):
    """s3:// parquet streams (the allow-list is checked at submission): the driver scans it with
    the service's credentials, and a read task gets them inside the pickled plan, as Ray Data's
    tasks do, without AWS variables of its own."""
    import pickle

    from service.spec import streaming_unsupported

    x, y = write_parquet(tmp_path / "d.parquet")
    s3_server.client().upload_file(str(tmp_path / "d.parquet"), s3_bucket, "data/d.parquet")
    for k, v in s3_server.env.items():
        monkeypatch.setenv(k, v)
    spec = spec_for(f"s3://{s3_bucket}/data/d.parquet", streaming="on")
    assert streaming_unsupported(spec, "ddp") is None
    st = load_for_job(spec, "ddp", None)
    mem = load_dataset(spec.model_copy(update={"streaming": "off"}), None)
    assert st.streamed and st.info.n_train == len(mem.x_train)
    with pytest.raises(ConfigError, match="data.uri: .*missing.parquet not found"):
        locate_uri(f"s3://{s3_bucket}/data/missing.parquet", None)
    plan = pickle.loads(pickle.dumps(st.plan))
    for k in s3_server.env:
        monkeypatch.delenv(k)
    parts = [plan.rows(i, "train") for i in range(len(plan.row_starts))]
    got = np.column_stack([np.concatenate([p["x"] for p in parts]), np.concatenate([p["y"] for p in parts])])
    want = np.column_stack([mem.x_train.numpy(), mem.y_train.numpy()])
    assert sorted(map(tuple, got.tolist())) == sorted(map(tuple, want.tolist()))


def test_s3_npz_streams_by_ranged_reads(s3_server, s3_bucket, tmp_path, monkeypatch):
    """An uncompressed npz on s3:// streams as on the store: the .npy headers are parsed through
    the pyarrow S3 filesystem and each group is one ranged read per array."""
    import pickle

    monkeypatch.setattr(streaming, "TASK_ROWS", 32)
    rng = np.random.default_rng(4)
    y = np.arange(100) % 3
    x = (rng.standard_normal((100, 2, 3, 3)) + y[:, None, None, None]).astype(np.float32)
    np.savez(tmp_path / "d.npz", X=x, y=y)
    s3_server.client().upload_file(str(tmp_path / "d.npz"), s3_bucket, "data/d.npz")
    for k, v in s3_server.env.items():
        monkeypatch.setenv(k, v)
    spec = DataSpec(uri=f"s3://{s3_bucket}/data/d.npz", streaming="on")
    st = load_for_job(spec, "ddp", None)
    mem = load_dataset(spec.model_copy(update={"streaming": "off"}), None)
    assert st.streamed and len(st.plan.row_starts) == 4 and st.info.image_shape == (2, 3, 3)
    plan = pickle.loads(pickle.dumps(st.plan))  # as a read task gets it
    parts = [plan.rows(i, "train") for i in range(len(plan.row_starts))]
    got = np.column_stack([np.concatenate([p["x"] for p in parts]), np.concatenate([p["y"] for p in parts])])
    want = np.column_stack([mem.x_train.numpy(), mem.y_train.numpy()])
    assert sorted(map(tuple, got.tolist())) == sorted(map(tuple, want.tolist()))


def test_read_tasks_group_row_groups_up_to_the_rows_or_bytes_limit(monkeypatch):
    monkeypatch.setattr(streaming, "TASK_ROWS", 100)
    monkeypatch.setattr(streaming, "TASK_BYTES", 1000)
    starts = (0, 40, 80, 120, 160, 300)
    # rows: 40 40 40 40 140 10; bytes small except group 3
    got = streaming.read_tasks(starts, 310, (10, 10, 10, 2000, 10, 10))
    assert got == [(0, 1, 2), (3,), (4,), (5,)]
    assert [g for t in got for g in t] == list(range(len(starts)))  # every group once, in order


@pytest.mark.parametrize("drop", [0, 7, 45])
def test_epoch_plan_is_a_seeded_permutation_that_drops_the_ragged_tail(drop):
    rows = [20, 30, 10, 25]
    plan = streaming.epoch_plan(3, 1, rows, drop)
    assert sorted(t for t, _ in plan) == [0, 1, 2, 3]
    assert sum(k for _, k in plan) == sum(rows) - drop
    assert all(0 <= k <= rows[t] for t, k in plan)
    # the drop comes off the epoch's last tasks
    kept_whole = [k == rows[t] for t, k in plan]
    assert kept_whole == sorted(kept_whole, reverse=True)
    assert plan == streaming.epoch_plan(3, 1, rows, drop)
    orders = {tuple(t for t, _ in streaming.epoch_plan(3, e, rows, drop)) for e in range(6)}
    assert len(orders) > 1  # each epoch its own order


@pytest.mark.parametrize(
    "sizes, size, want",
    [
        ([3, 1, 6, 0, 7], 4, [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [12, 13, 14, 15]]),  # 16 dropped
        ([8], 4, [[0, 1, 2, 3], [4, 5, 6, 7]]),
        ([1, 1, 1], 2, [[0, 1]]),
        ([2], 3, []),
        ([], 3, []),
    ],
)
def test_rebatch_cuts_the_stream_into_full_batches_across_blocks(sizes, size, want):
    edges = np.cumsum([0, *sizes])
    blocks = [{"x": np.arange(a, b), "y": -np.arange(a, b)} for a, b in zip(edges, edges[1:], strict=False)]
    blocks[1:1] = [{}]  # a block without columns, in the middle of a carried batch: no rows
    got = list(streaming.rebatch(iter(blocks), size))
    assert [b["x"].tolist() for b in got] == want
    assert [b["y"].tolist() for b in got] == [[-v for v in w] for w in want]


def _png(px: np.ndarray, mode: str) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(px.astype(np.uint8), mode=mode).save(buf, format="PNG")
    return buf.getvalue()


def test_image_zip_streams_the_in_memory_samples(store, tmp_path, monkeypatch):
    """An image zip (3 class folders, gray and colour PNGs of two sizes, resized, archive noise
    and names out of order): the same DataInfo, training samples and validation split as the
    in-memory path, read in runs of images as the Ray Data tasks read them."""
    import zipfile

    rng = np.random.default_rng(0)
    src = tmp_path / "imgs.zip"
    with zipfile.ZipFile(src, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("__MACOSX/._x.png", b"junk")
        for i in rng.permutation(60):
            side = 6 if i % 2 else 9
            rgb = i % 5 == 0
            px = rng.integers(0, 255, (side, side, 3) if rgb else (side, side))
            z.writestr(f"top/c{i % 3}/{i:03d}.png", _png(px, "RGB" if rgb else "L"))
    store.put_file("datasets/imgs.zip", src)
    spec = DataSpec(uri="store://datasets/imgs.zip", resolved_uri="datasets/imgs.zip", image_size=8)
    mem = load_dataset(spec, store)
    monkeypatch.setattr(streaming, "TASK_ROWS", 7)  # several groups
    st = load_for_job(spec.model_copy(update={"streaming": "on"}), "ddp", store)
    assert st.streamed and len(st.plan.row_starts) == 9
    a, b = mem.info.to_dict(), st.info.to_dict()
    assert b.pop("mean") == pytest.approx(a.pop("mean"), rel=1e-6)
    assert b.pop("std") == pytest.approx(a.pop("std"), rel=1e-6)
    assert a == b
    assert tuple(a["image_shape"]) == (3, 8, 8)  # gray replicated: one colour image makes all RGB
    import pickle

    plan = pickle.loads(pickle.dumps(st.plan))  # as Ray Data's read tasks get it
    parts = [plan.rows(i, "train") for i in range(len(plan.row_starts))]
    x, y = np.concatenate([p["x"] for p in parts]), np.concatenate([p["y"] for p in parts])
    assert x.dtype == np.float32 and y.dtype == np.int64
    got = sorted(map(tuple, np.column_stack([x, y]).tolist()))
    assert got == sorted(map(tuple, np.column_stack([mem.x_train.numpy(), mem.y_train.numpy()]).tolist()))
    exp = st.for_export(calibration_rows=5)
    assert torch.equal(exp.x_val, mem.x_val) and torch.equal(exp.y_val, mem.y_val)
    # a compressed tar cannot be read from the middle (on: refused, naming data.streaming)
    tgz = DataSpec(uri="s3://b/i.tar.gz", streaming="on")
    with pytest.raises(ConfigError, match="data.streaming.*compressed tar"):
        streaming.wants_streaming(tgz, "ddp", 10**9, 0)


# --- jsonl / text ---------------------------------------------------------------------------


def _bpe(lines: list[str]):
    """A byte-level BPE (its pre-tokenizer keeps spaces and line breaks, so tokens could span
    lines if a whole file were tokenised at once), trained by the test."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    tok.train_from_iterator(lines, trainers.BpeTrainer(vocab_size=320, initial_alphabet=alphabet))
    return tok


def _corpus() -> list[str]:
    from workers.data.sources import stdlib_corpus

    text = stdlib_corpus(24_000)[0].decode("utf-8", "replace")
    lines = text.split("\n")
    lines[40] = "é" * 900  # a line longer than a group, multi-byte characters
    return lines


@pytest.mark.parametrize(
    ("fmt", "tokenizer", "group_bytes"),
    [("jsonl", True, 700), ("text", False, 50), ("text", True, 300), ("jsonl", False, 4000)],
)
def test_text_streams_the_in_memory_windows(store, tmp_path, monkeypatch, fmt, tokenizer, group_bytes):
    """jsonl (blank lines, a text field, other fields) and plain text, bytes or a trained BPE, cut
    into groups smaller than a window (50 bytes: groups that start no window, tails that span
    several groups) or holding many: the streamed plan gives the in-memory path's DataInfo,
    training windows and validation split."""
    import json
    import pickle

    lines = _corpus()
    if fmt == "jsonl":
        body = "\n".join(json.dumps({"id": i, "body": t}) if i % 7 else "  " for i, t in enumerate(lines))
        opts = {"text_column": "body"}
    else:
        body, opts = "\n".join(lines), {}
    name = f"c.{'jsonl' if fmt == 'jsonl' else 'txt'}"
    store.put_bytes(f"datasets/{name}", body.encode())
    if tokenizer:
        store.put_bytes("datasets/tok.json", _bpe(lines).to_str().encode())
        opts.update(tokenizer="store://datasets/tok.json", resolved_tokenizer="datasets/tok.json")
    spec = DataSpec(uri=f"store://datasets/{name}", resolved_uri=f"datasets/{name}", seq_len=32, **opts)
    mem = load_dataset(spec, store)
    monkeypatch.setattr(streaming, "TEXT_GROUP_BYTES", group_bytes)
    st = load_for_job(spec.model_copy(update={"streaming": "on"}), "ddp", store)
    assert st.streamed and st.info == mem.info
    assert len(st.plan.row_starts) > 3
    plan = pickle.loads(pickle.dumps(st.plan))  # as Ray Data's read tasks get it
    parts = [plan.rows(i, "train") for i in range(len(plan.row_starts))]
    x, y = np.concatenate([p["x"] for p in parts]), np.concatenate([p["y"] for p in parts])
    assert x.dtype == y.dtype == np.int64 and x.shape[1:] == (32,)

    def windows(xs, ys):
        return sorted(map(tuple, np.concatenate([xs, ys], axis=1).tolist()))

    assert windows(x, y) == windows(mem.x_train.numpy(), mem.y_train.numpy())
    exp = st.for_export(calibration_rows=7)
    assert torch.equal(exp.x_val, mem.x_val) and torch.equal(exp.y_val, mem.y_val)


def test_text_streamed_refuses_what_in_memory_refuses(store, monkeypatch):
    monkeypatch.setattr(streaming, "TEXT_GROUP_BYTES", 64)
    good = "\n".join('{"text": "%s"}' % ("x" * 40) for _ in range(60))
    cases = [
        ("bad.jsonl", good + '\n{"text": 1}\n', {}, "data.text_column: line 61 has no string field 'text'"),
        ("bad2.jsonl", good + "\nnot json\n", {}, "line 61 of store://datasets/bad2.jsonl is not JSON"),
        ("bad.txt", "ab\n" * 100 + "\udcff", {}, "not UTF-8 text .byte 300"),
        ("short.txt", "ab\n" * 100, {"seq_len": 64}, "data.seq_len: 300 tokens make 4 samples"),
    ]
    for name, body, opts, match in cases:
        store.put_bytes(f"datasets/{name}", body.encode("utf-8", "surrogateescape"))
        spec = DataSpec(
            uri=f"store://datasets/{name}", resolved_uri=f"datasets/{name}", streaming="on", **opts
        )
        with pytest.raises(ConfigError, match=match):
            load_for_job(spec, "ddp", store)
        with pytest.raises(ConfigError, match=match):  # the same words on both paths
            load_dataset(spec, store)


# --- image tar --------------------------------------------------------------------------------


def _tar(path, entries: dict[str, bytes], mode: str = "w", extra=()):
    import io
    import tarfile

    with tarfile.open(path, mode, format=tarfile.GNU_FORMAT) as t:
        for name, data in entries.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
        for info in extra:
            t.addfile(info)


def test_image_tar_streams_the_in_memory_samples(store, tmp_path, monkeypatch):
    """An uncompressed tar (names over tar's 100 characters, folders, noise, gray and colour
    PNGs): the driver's pass records member offsets, read tasks seek to them and give the
    in-memory path's samples. A member rewritten after the pass is refused, not misread."""
    import pickle
    import tarfile

    rng = np.random.default_rng(1)
    deep = "d" * 120  # a GNU long name: its header is not the one before the data
    entries = {"top/.DS_Store": b"noise"}
    for i in rng.permutation(40):
        rgb = i % 4 == 0
        px = rng.integers(0, 255, (6, 6, 3) if rgb else (6, 6))
        entries[f"top/c{i % 2}/{deep if i % 3 == 0 else ''}{i:03d}.png"] = _png(px, "RGB" if rgb else "L")
    _tar(tmp_path / "i.tar", entries)
    store.put_file("datasets/i.tar", tmp_path / "i.tar")
    spec = DataSpec(uri="store://datasets/i.tar", resolved_uri="datasets/i.tar")
    mem = load_dataset(spec, store)
    monkeypatch.setattr(streaming, "TASK_ROWS", 6)
    st = load_for_job(spec.model_copy(update={"streaming": "on"}), "ddp", store)
    assert st.streamed and isinstance(st.plan, streaming.TarPlan)
    a, b = mem.info.to_dict(), st.info.to_dict()
    assert b.pop("mean") == pytest.approx(a.pop("mean"), rel=1e-6)
    assert b.pop("std") == pytest.approx(a.pop("std"), rel=1e-6)
    assert a == b
    plan = pickle.loads(pickle.dumps(st.plan))
    parts = [plan.rows(i, "train") for i in range(len(plan.row_starts))]
    x, y = np.concatenate([p["x"] for p in parts]), np.concatenate([p["y"] for p in parts])
    got = sorted(map(tuple, np.column_stack([x, y]).tolist()))
    assert got == sorted(map(tuple, np.column_stack([mem.x_train.numpy(), mem.y_train.numpy()]).tolist()))
    exp = st.for_export(calibration_rows=5)
    assert torch.equal(exp.x_val, mem.x_val) and torch.equal(exp.y_val, mem.y_val)
    # rewritten: another member where the pass saw this one
    _tar(tmp_path / "i.tar", dict(reversed(list(entries.items()))))
    store.put_file("datasets/i.tar", tmp_path / "i.tar")
    with pytest.raises(ConfigError, match="changed since it was checked|no longer an image"):
        for i in range(len(plan.row_starts)):
            plan.rows(i, "train")
    # links are refused by the driver's pass, as in memory
    link = tarfile.TarInfo("top/c0/evil.png")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    _tar(tmp_path / "l.tar", dict(list(entries.items())[:12]), extra=[link])
    store.put_file("datasets/l.tar", tmp_path / "l.tar")
    lspec = DataSpec(uri="store://datasets/l.tar", resolved_uri="datasets/l.tar", streaming="on")
    with pytest.raises(ConfigError, match="is a symlink"):
        load_for_job(lspec, "ddp", store)


def test_a_compressed_tar_loads_in_memory_or_is_refused_when_on(store, tmp_path):
    rng = np.random.default_rng(2)
    entries = {f"c{i % 2}/{i}.png": _png(rng.integers(0, 255, (5, 5)), "L") for i in range(12)}
    _tar(tmp_path / "i.tar", entries, mode="w:gz")
    store.put_file("datasets/i.tar", tmp_path / "i.tar")  # the upload's name says nothing
    spec = DataSpec(uri="store://datasets/i.tar", resolved_uri="datasets/i.tar")
    got = load_for_job(spec, "ddp", store, stream_above_bytes=0)
    assert not getattr(got, "streamed", False) and got.info.n_train + got.info.n_val == 12
    with pytest.raises(ConfigError, match="data.streaming: on is not possible: .*gzip-compressed tar"):
        load_for_job(spec.model_copy(update={"streaming": "on"}), "ddp", store)


def test_an_s3_folder_of_shards_reads_as_its_one_file(s3_server, s3_bucket, tmp_path, monkeypatch):
    """s3://bucket/prefix/ (workers/data/shards.py): the parquet files under the prefix, in key
    order, Spark's markers and files of a neighbouring prefix left out, give the one file's
    samples in memory and streamed."""
    x, _ = write_parquet(tmp_path / "d.parquet", n=120, row_group=25)
    table = pq.read_table(tmp_path / "d.parquet")
    client = s3_server.client()
    for k, (a, b) in enumerate(((0, 50), (50, 120))):
        pq.write_table(table.slice(a, b - a), tmp_path / f"p{k}.parquet", row_group_size=25)
        client.upload_file(str(tmp_path / f"p{k}.parquet"), s3_bucket, f"t/part-{k}.parquet")
    client.put_object(Bucket=s3_bucket, Key="t/_SUCCESS", Body=b"")
    client.upload_file(str(tmp_path / "p0.parquet"), s3_bucket, "t-other/part-9.parquet")
    for k, v in s3_server.env.items():
        monkeypatch.setenv(k, v)
    spec = DataSpec(
        uri=f"s3://{s3_bucket}/t/",
        format="parquet",
        feature_columns=[f"f{i}" for i in range(16)],
        label_column="label",
    )
    mem = load_dataset(spec, None)
    assert len(mem.x_train) + len(mem.x_val) == 120
    want = torch.cat([mem.x_train, mem.x_val]).sort(0)[0]
    assert torch.equal(want, torch.from_numpy(x).sort(0)[0])
    st = load_for_job(spec.model_copy(update={"streaming": "on"}), "ddp", None)
    assert st.streamed and st.plan.shard_uris == (
        f"s3://{s3_bucket}/t/part-0.parquet",
        f"s3://{s3_bucket}/t/part-1.parquet",
    )
    rows = [st.plan.rows(i, "train") for i in range(len(st.plan.row_starts))]
    got = np.concatenate([r["x"] for r in rows])
    assert sorted(map(tuple, got.tolist())) == sorted(map(tuple, mem.x_train.numpy().tolist()))
