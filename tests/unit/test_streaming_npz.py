"""An npz streamed by row ranges, without Ray: an uncompressed npz (np.savez) is read by offset
from its stored .npy members and gives the in-memory path's samples, dtypes, shapes, split and
DataInfo (NHWC images, integer tokens); a compressed one (np.savez_compressed) is refused for
`data.streaming: on`, naming the field and why, and loads in memory under `auto`."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from service.artifacts import LocalArtifactStore
from service.errors import ConfigError
from service.spec import DataSpec, streaming_unsupported
from workers.data import load_dataset, load_for_job, streaming


@pytest.fixture()
def store(tmp_path):
    return LocalArtifactStore(tmp_path / "store")


def put_npz(store, tmp_path, name: str, compressed: bool = False, **arrays) -> None:
    src = tmp_path / name.replace("/", "_")
    with open(src, "wb") as f:
        (np.savez_compressed if compressed else np.savez)(f, **arrays)
    store.put_file(f"datasets/{name}", src)


def spec(name: str, **kw) -> DataSpec:
    # resolved_uri: what the service fills in at submission (the tenant's key)
    return DataSpec(uri=f"store://datasets/{name}", resolved_uri=f"datasets/{name}", **kw)


def train_rows(st) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """Every group's training rows, as the Ray Data read tasks read them."""
    parts = [st.plan.rows(i, "train") for i in range(len(st.plan.row_starts))]
    return np.concatenate([p["x"] for p in parts]), np.concatenate([p["y"] for p in parts]), parts


def same_rows(x: np.ndarray, y: np.ndarray, mx: torch.Tensor, my: torch.Tensor) -> bool:
    def rows(a, b):
        return sorted(map(tuple, np.column_stack([a.reshape(len(a), -1), b.reshape(len(b), -1)]).tolist()))

    return rows(x, y) == rows(mx.numpy(), my.numpy())


def check_same_as_in_memory(store, s: DataSpec, float_stats: bool):
    mem = load_dataset(s, store)
    st = load_for_job(s.model_copy(update={"streaming": "on"}), "ddp", store)
    assert st.streamed and isinstance(st.plan, streaming.NpzPlan)
    a, b = mem.info.to_dict(), st.info.to_dict()
    if float_stats:  # float64 sums over groups vs float32 over the whole array
        assert b.pop("mean") == pytest.approx(a.pop("mean"), rel=1e-5, abs=1e-6)
        assert b.pop("std") == pytest.approx(a.pop("std"), rel=1e-5)
    assert a == b
    x, y, _ = train_rows(st)
    assert x.dtype == mem.x_train.numpy().dtype and y.dtype == mem.y_train.numpy().dtype
    assert x.shape[1:] == tuple(mem.x_train.shape[1:]) and y.shape[1:] == tuple(mem.y_train.shape[1:])
    assert same_rows(x, y, mem.x_train, mem.y_train)
    exp = st.for_export(calibration_rows=10)  # the validation split in the in-memory order
    assert torch.equal(exp.x_val, mem.x_val) and torch.equal(exp.y_val, mem.y_val)
    return mem, st


def test_nhwc_images_stream_as_the_in_memory_tensors(store, tmp_path, monkeypatch):
    monkeypatch.setattr(streaming, "TASK_ROWS", 16)  # several groups: offsets beyond the first
    rng = np.random.default_rng(0)
    y = np.arange(70) % 3
    x = rng.integers(0, 255, (70, 5, 4, 3)).astype(np.uint8)  # N, H, W, C
    put_npz(store, tmp_path, "img.npz", X=x, y=y.astype(np.int32))
    mem, st = check_same_as_in_memory(store, spec("img.npz", layout="nhwc"), float_stats=True)
    assert st.info.image_shape == (3, 5, 4) and mem.info.kind == "image"
    assert len(st.plan.row_starts) == 5
    # the same tensors row for row: NHWC transposed to NCHW, not read as C=5, H=4, W=3
    _, _, parts = train_rows(st)
    rows = np.concatenate([p["row"] for p in parts])
    want = np.ascontiguousarray(x[rows].transpose(0, 3, 1, 2), dtype=np.float32).reshape(len(rows), -1)
    assert np.array_equal(np.concatenate([p["x"] for p in parts]), want)


def test_integer_tokens_stay_tokens(store, tmp_path):
    rng = np.random.default_rng(1)
    # language modelling: int32 X [N, T] with next-token y [N, T]
    tok = rng.integers(0, 50, (40, 9)).astype(np.int32)
    put_npz(store, tmp_path, "lm.npz", X=tok[:, :8], y=tok[:, 1:])
    _, st = check_same_as_in_memory(store, spec("lm.npz"), float_stats=False)
    assert st.info.kind == "tokens" and st.info.input_dtype == "int64"
    # sequence classification: int64 X [N, T], one label per row, never cast to float
    put_npz(store, tmp_path, "seq.npz", X=rng.integers(0, 30, (40, 6)), y=np.arange(40) % 2)
    _, st = check_same_as_in_memory(store, spec("seq.npz"), float_stats=False)
    assert st.info.kind == "sequence" and st.info.vocab_size is not None


def test_npz_shards_stream_as_the_one_file(store, tmp_path, monkeypatch):
    monkeypatch.setattr(streaming, "TASK_ROWS", 8)
    rng = np.random.default_rng(2)
    y = np.arange(45) % 4
    x = (rng.standard_normal((45, 6)) + y[:, None]).astype(np.float32)
    put_npz(store, tmp_path, "one.npz", X=x, y=y)
    for k, (a, b) in enumerate(((0, 20), (20, 21), (21, 45))):
        put_npz(store, tmp_path, f"set/part-{k}.npz", X=x[a:b], y=y[a:b])
    mem = load_dataset(spec("one.npz"), store)
    folder = spec("set/", format="npz", streaming="on")
    st = load_for_job(folder, "ddp", store)
    assert st.streamed and set(st.plan.group_shard) == {0, 1, 2}
    # no group spans two files
    for i, start in enumerate(st.plan.row_starts):
        k = st.plan.shard(i)
        end = st.plan.group(i)[1]
        assert st.plan.file_starts[k] <= start < end <= st.plan.file_starts[k] + st.plan.arrays[k][1].shape[0]
    xs, ys, _ = train_rows(st)
    assert same_rows(xs, ys, mem.x_train, mem.y_train)
    assert torch.equal(st.for_export(5).x_val, mem.x_val)
    # X of another dtype in one shard: refused naming data.uri and the shard
    put_npz(store, tmp_path, "set/part-1.npz", X=x[20:21].astype(np.float64), y=y[20:21])
    with pytest.raises(ConfigError, match=r"data.uri: array X is float64 .* in store://datasets/set/part-1"):
        load_for_job(folder, "ddp", store)


def test_compressed_npz_is_refused_for_streaming_on_and_loads_in_memory_under_auto(store, tmp_path):
    rng = np.random.default_rng(3)
    put_npz(store, tmp_path, "z.npz", compressed=True, X=rng.standard_normal((30, 4)), y=np.arange(30) % 2)
    assert streaming_unsupported(spec("z.npz"), "ddp") is None  # only the file says it
    with pytest.raises(ConfigError, match="data.streaming: on is not possible") as e:
        load_for_job(spec("z.npz", streaming="on"), "ddp", store)
    assert "compressed npz" in str(e.value) and "np.savez" in str(e.value)
    got = load_for_job(spec("z.npz"), "ddp", store, stream_above_bytes=0)  # auto: in memory
    assert not getattr(got, "streamed", False) and len(got.x_train) == 24


def test_npz_checks_are_the_in_memory_ones(store, tmp_path):
    x = np.ones((30, 3), np.float32)
    put_npz(store, tmp_path, "gap.npz", X=x, y=np.array([0, 1, 3] * 10))  # class 2 never occurs
    for mode in ("off", "on"):
        with pytest.raises(ConfigError, match="class 2 never occurs"):
            load_for_job(spec("gap.npz", streaming=mode), "ddp", store)
    put_npz(store, tmp_path, "len.npz", X=x, y=np.arange(29) % 2)
    with pytest.raises(ConfigError, match="X and y of .* need the same length"):
        load_for_job(spec("len.npz", streaming="on"), "ddp", store)
    bad = x.copy()
    bad[17, 1] = np.nan
    put_npz(store, tmp_path, "nan.npz", X=bad, y=np.arange(30) % 2)
    with pytest.raises(ConfigError, match="NaN or infinity"):
        load_for_job(spec("nan.npz", streaming="on"), "ddp", store)
    put_npz(store, tmp_path, "noy.npz", X=x)
    with pytest.raises(ConfigError, match="not an .npz with arrays X and y"):
        load_for_job(spec("noy.npz", streaming="on"), "ddp", store)
