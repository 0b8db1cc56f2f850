"""Pipeline parallel with a streamed dataset, without Ray: who reads what (`streaming.reads`),
stage 0 and the last stage reading the same global batches of the same seeded stream (and a
resumed stream the same batches again), the stages between reading nothing; and a 3-stage
pipeline (3 gloo processes) trained from such streams following one process fed by the same
stream. The stand-in below delivers a stream as Ray Data does for an unsplit dataset with
`preserve_order` (what each reading stage gets); tests/integration/test_streaming_ray.py runs
the real one."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from service.artifacts import LocalArtifactStore
from service.spec import DataSpec, parse_spec, streaming_unsupported
from workers.data import load_for_job, streaming


class InOrder:
    """A Ray Data iterator of `StreamedData.streams` items read in order (preserve_order): each
    item's read task as a block, or its rows rebatched into torch batches of exactly batch_size
    (the last maybe fewer). Every call iterates anew, as each reader's own execution does."""

    def __init__(self, items: list[dict], read):
        self.items, self.read = items, read

    def iter_batches(self, batch_size=None, batch_format="numpy", prefetch_batches=1):
        for item in self.items:  # a block per read task
            yield self.read({k: np.array([v]) for k, v in item.items()})

    def iter_torch_batches(self, batch_size: int, drop_last: bool = False):
        buf: dict | None = None
        for item in self.items:
            out = self.read({k: np.array([v]) for k, v in item.items()})
            buf = out if buf is None else {k: np.concatenate([buf[k], out[k]]) for k in out}
            while len(buf["y"]) >= batch_size:
                yield {k: torch.from_numpy(v[:batch_size]) for k, v in buf.items()}
                buf = {k: v[batch_size:] for k, v in buf.items()}
        if buf is not None and len(buf["y"]) and not drop_last:
            yield {k: torch.from_numpy(v) for k, v in buf.items()}


def shards(st, seed: int, batch: int, spe: int, total: int, start: int = 0) -> dict:
    return {
        name: InOrder(items, read)
        for name, (items, read) in st.streams(seed, batch, spe, total, start).items()
    }


@pytest.mark.parametrize(
    ("strategy", "world", "readers", "split", "per_batch"),
    [("ddp", 3, [0, 1, 2], True, 8), ("fsdp", 2, [0, 1], True, 12), ("pipeline", 4, [0, 3], False, 24)],
)
def test_one_place_decides_who_reads_what(strategy, world, readers, split, per_batch):
    got = [streaming.reads(strategy, r, world) for r in range(world)]
    assert [r for r, g in enumerate(got) if g.train] == readers
    assert all(g.split is split for g in got)
    for r in readers:
        index, count = got[r].share
        assert 24 // count == per_batch and (index, count) == ((r, world) if split else (0, 1))
    # the streaming decision no longer refuses pipeline
    spec = DataSpec(uri="store://datasets/d.parquet", feature_columns=["x"], label_column="y", streaming="on")
    assert streaming_unsupported(spec, strategy) is None


def put_npz(tmp_path, n: int = 230, f: int = 12, seed: int = 0) -> LocalArtifactStore:
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 4
    x = (rng.standard_normal((n, f)) + y[:, None]).astype(np.float32)
    np.savez(tmp_path / "d.npz", X=x, y=y)
    store = LocalArtifactStore(tmp_path / "store")
    store.put_file("datasets/d.npz", tmp_path / "d.npz")
    return store


DATA = {"uri": "store://datasets/d.npz", "resolved_uri": "datasets/d.npz", "streaming": "on"}


def test_first_and_last_stage_read_the_same_rows_the_middle_none(tmp_path, monkeypatch):
    monkeypatch.setattr(streaming, "TASK_ROWS", 40)  # several read tasks, shuffled per epoch
    monkeypatch.setattr(streaming, "EVAL_CHUNK_ROWS", 16)  # 46 validation rows: 3 chunks
    st = load_for_job(DataSpec.model_validate(DATA), "pipeline", put_npz(tmp_path), stream_above_bytes=0)
    assert st.streamed and st.info.n_train == 184 and st.info.n_val == 46
    seed, batch, spe, total, world = 5, 16, 11, 22, 4  # 184 rows: 11 batches, 8 rows left out

    def feed(rank: int, start: int = 0):
        asked = []

        def get():
            asked.append(rank)
            return shards(st, seed, batch, spe, total, start)

        f = streaming.feed_for("pipeline", rank, world, get, batch, spe, seed, st.info.n_val)
        return f, asked

    stages = [feed(r) for r in range(world)]
    batches = {r: [f.train_batch(s) for s in range(total)] for r, (f, _) in enumerate(stages)}
    first, last = batches[0], batches[world - 1]
    for (x0, y0), (x3, y3) in zip(first, last, strict=True):
        assert x0.shape == (batch, 12) and torch.equal(x0, x3) and torch.equal(y0, y3)
    for r in (1, 2):  # the middle stages read nothing and never ask for a shard
        assert all(b == (None, None) for b in batches[r]) and stages[r][1] == []
    # each epoch holds 176 distinct training rows, in its own order
    rows = [torch.cat([x for x, _ in first[e * spe : (e + 1) * spe]]) for e in (0, 1)]
    assert all(len({tuple(r) for r in e.tolist()}) == spe * batch for e in rows)
    assert not torch.equal(rows[0], rows[1])
    # validation: as many chunks (forwards) on every stage; the readers' are the same rows
    chunks = {r: list(f.val_chunks()) for r, (f, _) in enumerate(stages)}
    assert [len(c) for c in chunks.values()] == [3, 3, 3, 3]
    assert sum(len(y) for _, y in chunks[0]) == 46 and all(len(y) == 0 for _, y in chunks[1])
    assert all(torch.equal(a[1], b[1]) for a, b in zip(chunks[0], chunks[world - 1], strict=True))
    # a resume at step 13 (mid-epoch 1): a new stream from epoch 1 gives the same batches again
    again = feed(world - 1, start=13)[0]
    for s in range(13, total):
        x, y = again.train_batch(s)
        assert torch.equal(x, first[s][0]) and torch.equal(y, first[s][1])


SPEC = {
    "name": "mlp-pipeline-streamed",
    "model": {"name": "mlp", "args": {"hidden": [32, 32]}},
    "data": DATA,
    "train": {
        "epochs": 2,
        "batch_size": 16,
        "lr": 0.05,
        "seed": 2,
        "log_every_steps": 1,
        "eval_every_steps": 11,
    },
    "parallel": {"strategy": "pipeline", "workers": 3, "pipeline_microbatches": 4},
    "checkpoint": {"every_steps": 1000},
}


def _stage(rank: int, world: int, spec: dict, st, root: str) -> None:
    from workers.parallel import Dist
    from workers.session import LocalSession
    from workers.train_loop import train

    spec = parse_spec(spec)
    # Only the stages that read may ask for the stream (the middle one must not).
    reads = streaming.reads("pipeline", rank, world).train
    sh = shards(st, spec.train.seed, 16, 11, 22) if reads else None
    session = LocalSession(LocalArtifactStore(root), "pipe", Dist(rank, world), shards=sh)
    train(spec, st, session)
    if rank == 0:
        Path(root, "records.json").write_text(json.dumps(session.records))


def test_a_3_stage_pipeline_trains_from_the_stream_as_one_process(tmp_path):
    """3 stages (gloo) fed by `feed_for`: losses follow a single process fed by the same
    stream (the microbatches' mean gradient is the batch's), which they could not if stage 0's
    inputs and the last stage's targets came from different rows; every stage evaluates."""
    from tests.unit.test_parallel_strategies import spawn
    from workers.session import LocalSession
    from workers.train_loop import train

    store = put_npz(tmp_path)
    st = load_for_job(DataSpec.model_validate(DATA), "pipeline", store, stream_above_bytes=0)
    assert st.streamed
    spawn(_stage, SPEC, st, str(tmp_path / "store"), world=3, tmp=tmp_path)
    pipe = json.loads((tmp_path / "store" / "records.json").read_text())
    one = {**SPEC, "parallel": {"strategy": "ddp", "workers": 1}}
    session = LocalSession(store, "one", shards=shards(st, 2, 16, 11, 22))
    train(parse_spec(one), st, session)

    def curve(records, kind, key):
        return [r[key] for r in records if r["kind"] == kind]

    assert len(curve(pipe, "train", "loss")) == 22
    assert curve(pipe, "train", "loss") == pytest.approx(curve(session.records, "train", "loss"), rel=1e-4)
    assert curve(pipe, "eval", "val_loss") == pytest.approx(
        curve(session.records, "eval", "val_loss"), rel=1e-4
    )
    assert curve(pipe, "train", "loss")[-1] < 0.7 * curve(pipe, "train", "loss")[0]
