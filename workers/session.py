"""Sessions: how the training loop reports and checkpoints.

`RaySession` runs inside a Ray Train worker: records go to the driver's `MetricsRelay` actor
(workers.relay), checkpoints through `ray.train.report(checkpoint=...)` into the job's artifact
store.
`LocalSession` does the same against a plain folder, for tests, benchmarks and torchrun."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from service.artifacts import ArtifactStore, JobArtifacts
from workers.checkpoint import CHECKPOINTS, Loaded, dir_name, load_latest, write_checkpoint
from workers.data.streaming import memory_now
from workers.parallel import Dist

# How long a checkpoint waits for the driver to write out the records before it (the driver
# polls every 0.25 s; this only trips when the driver is stuck writing to the store).
DURABLE_TIMEOUT_S = 120.0


def _stamp(record: dict) -> dict:
    record.setdefault("time", time.time())
    return record


class RaySession:
    def __init__(self, store: ArtifactStore, job_id: str, relay):
        import ray.train

        ctx = ray.train.get_context()
        rank, world = ctx.get_world_rank(), ctx.get_world_size()
        import torch

        if torch.cuda.is_available():
            # Ray's answer, not cuda:<local rank>: two workers holding halves of one GPU both see
            # it as cuda:0, and local rank 1 has no cuda:1.
            import ray.train.torch

            device = ray.train.torch.get_device()
            torch.cuda.set_device(device)
        else:
            device = torch.device("cpu")
        self.dist = Dist(rank, world, device)
        self.store, self.job_id, self.relay = store, job_id, relay
        # Before the worker fetches any data: the baseline of its memory figures (train's summary).
        self.memory_start = memory_now()

    def dataset_shards(self) -> dict:
        """This worker's Ray Data iterators of a streamed dataset (the TorchTrainer's datasets)."""
        import ray.train

        return {name: ray.train.get_dataset_shard(name) for name in ("train", "val")}

    def emit(self, record: dict) -> None:
        self.relay.push.remote([_stamp(record)])

    def save(self, step: int, state: dict | None, rng: list[dict], meta: dict) -> None:
        import ray.train

        if self.dist.rank == 0:
            self._records_durable()
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            if state is not None:
                write_checkpoint(Path(tmp), step, state, rng, meta)
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report({"step": step}, checkpoint=checkpoint, checkpoint_dir_name=dir_name(step))

    def restore(self) -> Loaded | None:
        return load_latest(self.store, self.job_id)

    def _records_durable(self) -> None:
        """Block until every record emitted so far is in metrics.jsonl. A checkpoint is where a
        lost attempt resumes; were its records still in flight when the driver died (the Ray
        head lost, say), the series would have a gap that no later attempt fills, and the
        attempt itself would be missing from the count kept in the records."""
        import ray  # here, as every Ray import of this module: LocalSession runs without Ray

        want = ray.get(self.relay.mark.remote())
        deadline = time.monotonic() + DURABLE_TIMEOUT_S
        while ray.get(self.relay.durable_count.remote()) < want:
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"the driver did not write out the metrics within {DURABLE_TIMEOUT_S:.0f} s"
                )
            time.sleep(0.02)


class LocalSession:
    """Single process (or torchrun) sessions writing checkpoints straight into a store."""

    def __init__(
        self,
        store: ArtifactStore,
        job_id: str,
        dist: Dist | None = None,
        on_record: Callable[[dict], None] | None = None,
        shards: dict | None = None,
    ):
        """`shards`: Ray Data iterators ("train", "val") standing in for Ray Train's dataset
        shards when the data is streamed (tests and benches run the loop without Ray Train)."""
        self.dist = dist or Dist()
        self.shards = shards
        self.memory_start = memory_now()
        self.arts = JobArtifacts(store, job_id)
        self.store, self.job_id = store, job_id
        self.records: list[dict] = []
        self.on_record = on_record

    def emit(self, record: dict) -> None:
        self.records.append(_stamp(record))
        if self.on_record:
            self.on_record(record)

    def save(self, step: int, state: dict | None, rng: list[dict], meta: dict) -> None:
        if state is None:
            return
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            write_checkpoint(folder, step, state, rng, meta)
            # manifest.json last, as in the folder itself
            for p in sorted(folder.iterdir(), key=lambda p: p.name == "manifest.json"):
                self.arts.put_bytes(f"{CHECKPOINTS}/{dir_name(step)}/{p.name}", p.read_bytes())

    def restore(self) -> Loaded | None:
        return load_latest(self.store, self.job_id)

    def dataset_shards(self) -> dict:
        if self.shards is None:
            raise RuntimeError("a streamed dataset needs LocalSession(shards=...)")
        return self.shards
