"""FSDP with a streamed dataset: two gloo processes (no Ray), each rank reading its own share of
the stream as Ray Train's `get_dataset_shard` hands it, train and evaluate to the end. The shards
are a small stand-in for Ray Data's iterator (the delivery is not what this is about; the
integration tests run the real one). A validation batch that holds no row of one rank must still
be a forward on that rank: FSDP gathers the weights in every forward, so a rank that skipped one
would leave the other waiting."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from service.artifacts import LocalArtifactStore
from service.spec import DataSpec, parse_spec
from tests.unit.test_parallel_strategies import spawn
from workers.data import load_for_job, streaming
from workers.parallel import Dist
from workers.session import LocalSession
from workers.train_loop import train

SPEC = {
    "name": "gpt-fsdp-streamed",
    "model": {"name": "gpt", "args": {"n_layer": 1, "n_head": 2, "n_embd": 16}},
    "data": {"uri": "store://datasets/c.txt", "resolved_uri": "datasets/c.txt", "seq_len": 16},
    "train": {"epochs": 1, "max_steps": 6, "batch_size": 8, "lr": 0.01, "eval_every_steps": 3},
    "parallel": {"strategy": "fsdp", "workers": 2},
}


class Shard:
    """Fixed columns as Ray Data's DataIterator gives them: in blocks of uneven sizes (a split
    slices read tasks' blocks), or in torch batches."""

    def __init__(self, cols: dict[str, np.ndarray]):
        self.cols = cols

    def iter_batches(self, batch_size=None, batch_format="numpy", prefetch_batches=1):
        n, s = len(self.cols["y"]), 0
        while s < n:
            size = 7 + s % 5
            yield {k: v[s : s + size] for k, v in self.cols.items()}
            s += size

    def iter_torch_batches(self, batch_size: int, drop_last: bool = False):
        n = len(self.cols["y"])
        for s in range(0, n, batch_size):
            if drop_last and s + batch_size > n:
                break
            yield {k: torch.from_numpy(v[s : s + batch_size]) for k, v in self.cols.items()}


def _cat(parts: list[dict], k: str) -> np.ndarray:
    return np.concatenate([p[k] for p in parts])


def _rank(rank: int, world: int, spec: dict, st: streaming.StreamedData, root: str) -> None:
    spec = parse_spec(spec)
    plan, batch = st.plan, spec.train.batch_size
    train_parts = [plan.rows(i, "train") for i in range(len(plan.row_starts))]
    x, y = _cat(train_parts, "x"), _cat(train_parts, "y")
    steps, per = spec.train.max_steps, batch // world
    # rank r's share of each global batch, as the split stream hands out equal shares
    mine = (np.arange(steps * batch) % len(y)).reshape(steps, world, per)[:, rank].ravel()
    train_shard = Shard({"x": x[mine], "y": y[mine], "from_epoch": np.zeros(len(mine), np.int64)})
    val_parts = [plan.rows(i, "val") for i in range(len(plan.row_starts))]
    vrow = _cat(val_parts, "row")
    # rank 0's rows first: the last batch of "val" holds rank 1's rows only
    order = np.lexsort((vrow, vrow % world))
    val = Shard({k: _cat(val_parts, k)[order] for k in ("x", "y", "row")})
    session = LocalSession(
        LocalArtifactStore(root),
        "fsdp-streamed",
        Dist(rank, world),
        shards={"train": train_shard, "val": val},
    )
    train(spec, st, session)
    if rank == 0:
        Path(root, "records.json").write_text(json.dumps(session.records))


def test_fsdp_trains_and_evaluates_from_streamed_shards(tmp_path):
    from workers.data.sources import stdlib_corpus

    store = LocalArtifactStore(tmp_path)
    store.put_bytes("datasets/c.txt", stdlib_corpus(20_000)[0])
    spec = DataSpec.model_validate({**SPEC["data"], "val_fraction": 0.5, "streaming": "on"})
    st = load_for_job(spec, "fsdp", store)
    assert st.streamed and st.info.n_val > streaming.EVAL_CHUNK_ROWS  # two batches of "val"
    spawn(_rank, {**SPEC, "data": spec.model_dump(mode="json")}, st, str(tmp_path), tmp=tmp_path)
    records = json.loads((tmp_path / "records.json").read_text())
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [3, 6]
    assert all(np.isfinite(r["val_loss"]) for r in evals)
    assert [r["step"] for r in records if r["kind"] == "train"][-1] == 6
