"""Streamed datasets through real Ray Data (the session's 2-CPU head): the same samples per epoch
as the in-memory path, a resume that repeats exactly what docs/reliability.md promises, and a
2-worker DDP job on a parquet file several times larger than what a worker may hold."""

from __future__ import annotations

import json
import threading

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from service.artifacts import JobArtifacts, LocalArtifactStore
from service.spec import DataSpec, parse_spec
from workers.checkpoint import load_latest
from workers.data import load_dataset, load_for_job, streaming
from workers.session import LocalSession
from workers.train_loop import Faults, train

pytestmark = pytest.mark.integration


def write_parquet(store, tmp_path, name: str, n: int, f: int, row_group: int, seed: int = 0) -> int:
    """A deterministic parquet file of n samples (one list column of f float32 features, 4
    classes) in the store; returns the features' bytes."""
    rng = np.random.default_rng(seed)
    y = (np.arange(n) % 4).astype(np.int64)
    x = (rng.standard_normal((n, f), dtype=np.float32) + y[:, None]).astype(np.float32)
    col = pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), f)
    src = tmp_path / name
    pq.write_table(pa.table({"x": col, "label": y}), src, row_group_size=row_group)
    store.put_file(f"datasets/{name}", src)
    return x.nbytes


def _run_job_within(spec, name: str, store, seconds: float) -> dict:
    """The job's report, run through the driver on a thread, so a hang fails the test within
    `seconds` (e.g. Ray Data starved of CPU) instead of holding the session's Ray head."""
    from workers.driver import run_job

    out: dict = {}

    def go():
        try:
            out["report"] = run_job(spec, name, store)
        except BaseException as e:
            out["error"] = e

    t = threading.Thread(target=go, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f"job {name} did not finish in {seconds} s"
    assert "error" not in out, out.get("error")
    return out["report"]


def data_spec(name: str, **kw) -> dict:
    return {
        "uri": f"store://datasets/{name}",
        # what the service fills in at submission: the tenant's key
        "resolved_uri": f"datasets/{name}",
        "feature_columns": ["x"],
        "label_column": "label",
        **kw,
    }


@pytest.fixture()
def store(tmp_path):
    return LocalArtifactStore(tmp_path / "store")


def rows(x: torch.Tensor) -> list[tuple]:
    return sorted(map(tuple, x.tolist()))


def test_streamed_epochs_hold_the_in_memory_samples_and_resume_exactly(ray_cluster, store, tmp_path):
    write_parquet(store, tmp_path, "small.parquet", n=1000, f=8, row_group=90)
    spec = DataSpec.model_validate(data_spec("small.parquet", streaming="on"))
    mem = load_dataset(spec, store)
    st = load_for_job(spec, "ddp", store)
    assert st.streamed and st.info.n_train == len(mem.x_train) == 800
    spe, batch, seed = 8, 100, 3  # 800 training rows: every one is in some batch of an epoch

    feed = streaming.Feed(st.local_shards(seed, batch, spe, 2 * spe), batch, spe, seed, rank=0, world=1)
    got = [feed.train_batch(s) for s in range(2 * spe)]
    x0, y0 = got[0]
    assert x0.dtype == mem.x_train.dtype and x0.shape == (batch, *mem.x_train.shape[1:])
    assert y0.dtype == mem.y_train.dtype and y0.shape == (batch,)
    for epoch in (0, 1):
        xs = torch.cat([x for x, _ in got[epoch * spe : (epoch + 1) * spe]])
        ys = torch.cat([y for _, y in got[epoch * spe : (epoch + 1) * spe]])
        # the same set of samples (features with their labels) as the in-memory training split
        assert rows(torch.column_stack([xs, ys])) == rows(torch.column_stack([mem.x_train, mem.y_train]))
    assert not torch.equal(got[0][0], got[spe][0])  # each epoch its own (seeded) order

    # A resume in the middle of epoch 1 (step 11), with new iterators: the same batches, from a
    # stream that starts at epoch 1 (the driver starts it at the newest checkpoint's epoch).
    shards = st.local_shards(seed, batch, spe, 2 * spe, start_step=11)
    again = streaming.Feed(shards, batch, spe, seed, rank=0, world=1)
    for s in range(11, 2 * spe):
        x, y = again.train_batch(s)
        assert torch.equal(x, got[s][0]) and torch.equal(y, got[s][1])


def _job(name: str, **train) -> dict:
    return {
        "name": "streamed",
        "model": {"name": "mlp", "args": {"hidden": [32]}},
        "data": data_spec(name, streaming="on"),
        "train": {"epochs": 2, "batch_size": 100, "lr": 0.05, "seed": 1, "log_every_steps": 4, **train},
        "checkpoint": {"every_steps": 5},
    }


def test_one_worker_resumed_from_a_mid_epoch_checkpoint_ends_as_an_uninterrupted_run(
    ray_cluster, store, tmp_path
):
    """docs/reliability.md: with one worker a streamed run resumed from a checkpoint sees the
    batches an uninterrupted run sees, so it ends with the same weights, bit for bit."""
    write_parquet(store, tmp_path, "resume.parquet", n=1000, f=8, row_group=90)
    spec = parse_spec(_job("resume.parquet"))
    data = load_for_job(spec.data, "ddp", store)
    assert data.streamed

    def session(job):
        # What the driver does: the stream starts at the newest checkpoint's epoch.
        start = streaming.resume_step(JobArtifacts(store, job))
        shards = data.local_shards(spec.train.seed, 100, 8, 16, start_step=start)
        return LocalSession(store, job, shards=shards)

    train(spec, data, session("whole"))
    with pytest.raises(RuntimeError, match="injected"):
        train(spec, data, session("broken"), Faults(raise_at_step=13))  # checkpoint at step 10
    assert load_latest(store, "broken").step == 10
    train(spec, data, session("broken"))  # resumes at step 10: epoch 1, batch 2
    a, b = load_latest(store, "whole").state["model"], load_latest(store, "broken").state["model"]
    assert load_latest(store, "broken").step == 16
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_ddp_job_on_parquet_several_times_a_workers_memory_cap(ray_cluster, store, tmp_path):
    """A 2-worker DDP job, workers at 0.5 CPU on the 2-CPU head (Ray Data keeps 1: no
    "backpressured ... 0 CPU" hang; the thread join bounds the test if it did hang), through one
    epoch of a file 4x the cap. The cap is measured, not enforced: once a worker is warm (after
    its first evaluation, at step 12: imports, process group, model, Ray Data's executor for the
    validation split and the first blocks in place), its private resident memory (RssAnon,
    sampled every 50 ms) never exceeds what it was then by more than a quarter of the dataset's
    feature bytes while it streams the other 68% of the epoch and evaluates 3 more times.
    Holding its share of the rows (40% of the file) would break it. Shared pages (Ray
    object-store blocks read zero-copy) are printed, not capped: the store's size bounds them.
    Sized for CI: 24,000 rows (47 MiB, cap 11.7 MiB) and 4 evaluations, each a Ray Data
    execution per rank, which is where such a job's time goes; 40,000 rows and 7 evaluations
    took 4 minutes."""
    nbytes = write_parquet(store, tmp_path, "big.parquet", n=24_000, f=512, row_group=1_000)
    cap = nbytes // 4
    spec = parse_spec(
        {
            "name": "streamed-ddp",
            "model": {"name": "mlp", "args": {"hidden": [64]}},
            "data": data_spec("big.parquet", streaming="on"),
            "train": {
                "epochs": 1,
                "batch_size": 512,
                "lr": 0.05,
                "seed": 0,
                "log_every_steps": 20,
                "eval_every_steps": 12,
            },
            "parallel": {"strategy": "ddp", "workers": 2},
            "checkpoint": {"every_steps": 1000},
            "retries": 0,
        }
    )
    report = _run_job_within(spec, "streamed-ddp", store, 400)
    records = [
        json.loads(line)
        for line in JobArtifacts(store, "streamed-ddp").get_bytes("metrics.jsonl").decode().splitlines()
    ]
    done = next(r for r in records if r.get("event") == "done")
    assert done["step"] == 19_200 // 512
    mem = done["worker_memory"]
    growth = [m["peak"]["anon"] - m["first_eval"]["anon"] for m in mem]
    mib = 2**20
    since_step1 = [round((m["peak"]["anon"] - m["first_step"]["anon"]) / mib) for m in mem]
    print(
        f"dataset {nbytes / mib:.1f} MiB, cap {cap / mib:.1f} MiB; per worker MiB: private growth "
        f"{[round(g / mib) for g in growth]} (since the first step: {since_step1}), "
        f"peak rss {[round(m['peak']['rss'] / mib) for m in mem]}, "
        f"peak shared {[round(m['peak']['shmem'] / mib) for m in mem]}"
    )
    assert len(mem) == 2 and all(g < cap for g in growth), (growth, cap)
    assert report["accuracy"] > 0.5  # it learned (4 separable classes)


def test_an_image_zip_streams_through_ray_data(ray_cluster, store, tmp_path):
    """An image zip through real Ray Data (read tasks open the archive where it lies): one
    epoch's batches hold exactly the in-memory training split's images with their labels."""
    import io
    import zipfile

    from PIL import Image

    rng = np.random.default_rng(0)
    src = tmp_path / "imgs.zip"
    with zipfile.ZipFile(src, "w") as z:
        for i in range(120):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 255, (6, 6)).astype(np.uint8), mode="L").save(buf, format="PNG")
            z.writestr(f"c{i % 3}/{i:03d}.png", buf.getvalue())
    store.put_file("datasets/imgs.zip", src)
    spec = DataSpec(uri="store://datasets/imgs.zip", resolved_uri="datasets/imgs.zip", streaming="on")
    mem = load_dataset(spec, store)
    st = load_for_job(spec, "ddp", store)
    assert st.streamed and st.info.n_train == len(mem.x_train) == 96
    feed = streaming.Feed(st.local_shards(0, 32, 3, 3), 32, 3, 0, rank=0, world=1)
    got = [feed.train_batch(s) for s in range(3)]
    xs, ys = torch.cat([x for x, _ in got]), torch.cat([y for _, y in got])
    assert rows(torch.column_stack([xs, ys])) == rows(torch.column_stack([mem.x_train, mem.y_train]))


def test_a_jsonl_corpus_streams_through_ray_data(ray_cluster, store, monkeypatch):
    """JSON Lines through real Ray Data (read tasks tokenise line-aligned byte ranges, several
    per epoch), from a folder of 3 shards (workers/data/shards.py): one epoch's batches hold
    exactly the in-memory training windows of the one file the shards were cut from."""
    # 201 documents of 16 bytes: 200 windows of 16, 160 of them training rows
    lines = [json.dumps({"text": f"line {i:05d} abcd"}) for i in range(201)]
    store.put_bytes("datasets/c.jsonl", "\n".join(lines).encode())
    for k, (a, b) in enumerate(((0, 67), (67, 140), (140, 201))):  # no shard ends in a line break
        store.put_bytes(f"datasets/c/part-{k}.jsonl", "\n".join(lines[a:b]).encode())
    one = DataSpec(uri="store://datasets/c.jsonl", resolved_uri="datasets/c.jsonl", seq_len=16)
    mem = load_dataset(one, store)
    spec = DataSpec(
        uri="store://datasets/c/", resolved_uri="datasets/c/", format="jsonl", seq_len=16, streaming="on"
    )
    monkeypatch.setattr(streaming, "TEXT_GROUP_BYTES", 700)
    monkeypatch.setattr(streaming, "TASK_ROWS", 60)
    st = load_for_job(spec, "ddp", store)
    n, batch = st.info.n_train, 32  # an epoch leaves no row out
    assert st.streamed and n == len(mem.x_train) == 160 and len(st.plan.row_starts) > 3
    assert set(st.plan.group_shard) == {0, 1, 2}
    feed = streaming.Feed(st.local_shards(0, batch, n // batch, n // batch), batch, n // batch, 0, 0, 1)
    got = [feed.train_batch(s) for s in range(n // batch)]
    xs, ys = torch.cat([x for x, _ in got]), torch.cat([y for _, y in got])
    assert xs.dtype == torch.int64 and xs.shape == (n, 16)
    assert rows(torch.cat([xs, ys], 1)) == rows(torch.cat([mem.x_train, mem.y_train], 1))


def test_a_pipeline_job_streams_an_npz_as_one_process_reads_it(ray_cluster, store, tmp_path):
    """A 2-stage pipeline job through the driver (Ray Train, "train" unsplit: stage 0 and the
    last stage each read the whole stream, workers.data.streaming.reads) on an uncompressed NHWC
    npz read by row ranges: its losses follow a one-process run fed by the same stream through
    real Ray Data, step for step, which they could not if the two stages read different rows."""
    rng = np.random.default_rng(0)
    y = np.arange(600) % 4
    x = (rng.standard_normal((600, 4, 4, 1)) + y[:, None, None, None]).astype(np.float32)
    np.savez(tmp_path / "img.npz", X=x, y=y)
    store.put_file("datasets/img.npz", tmp_path / "img.npz")
    job = {
        "name": "pipe-streamed",
        "model": {"name": "mlp", "args": {"hidden": [32]}},
        "data": {
            "uri": "store://datasets/img.npz",
            "resolved_uri": "datasets/img.npz",
            "layout": "nhwc",
            "streaming": "on",
        },
        "train": {
            "epochs": 1,
            "batch_size": 32,
            "lr": 0.05,
            "seed": 1,
            "log_every_steps": 1,
            "eval_every_steps": 15,
        },
        "parallel": {"strategy": "pipeline", "workers": 2, "pipeline_microbatches": 2},
        "checkpoint": {"every_steps": 1000},
        "retries": 0,
    }
    _run_job_within(parse_spec(job), "pipe-streamed", store, 300)
    lines = JobArtifacts(store, "pipe-streamed").get_bytes("metrics.jsonl").decode().splitlines()
    pipe = [json.loads(line) for line in lines]

    one = parse_spec({**job, "parallel": {"strategy": "ddp", "workers": 1}})
    data = load_for_job(one.data, "ddp", store)
    assert data.streamed and data.info.image_shape == (1, 4, 4) and data.info.n_train == 480
    session = LocalSession(store, "one", shards=data.local_shards(1, 32, 15, 15))
    train(one, data, session)

    def curve(records, kind, key):
        return [r[key] for r in records if r.get("kind") == kind]

    assert len(curve(pipe, "train", "loss")) == 15
    assert curve(pipe, "train", "loss") == pytest.approx(curve(session.records, "train", "loss"), rel=1e-4)
    assert curve(pipe, "eval", "val_loss") == pytest.approx(
        curve(session.records, "eval", "val_loss"), rel=1e-4
    )
    assert curve(pipe, "train", "loss")[-1] < 0.7 * curve(pipe, "train", "loss")[0]
