"""Sessions: how the training loop reports and checkpoints.

`RaySession` runs inside a Ray Train worker: records go to the driver's `MetricsRelay` actor,
checkpoints through `ray.train.report(checkpoint=...)` into the job's artifact store.
`LocalSession` does the same against a plain folder, for tests, benchmarks and torchrun."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import ray

from service.artifacts import ArtifactStore, JobArtifacts
from workers.checkpoint import CHECKPOINTS, Loaded, dir_name, load_latest, write_checkpoint
from workers.parallel import Dist


@ray.remote(num_cpus=0)
class MetricsRelay:
    """Buffers rank 0's records until the driver drains them. Calls from one worker execute in
    order, so records arrive in the order they were emitted; it outlives worker restarts."""

    def __init__(self):
        self.records: list[dict] = []

    def push(self, records: list[dict]) -> None:
        self.records.extend(records)

    def drain(self) -> list[dict]:
        out, self.records = self.records, []
        return out


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
            device = torch.device("cuda", ctx.get_local_rank())
            torch.cuda.set_device(device)
        else:
            device = torch.device("cpu")
        self.dist = Dist(rank, world, device)
        self.store, self.job_id, self.relay = store, job_id, relay

    def emit(self, record: dict) -> None:
        self.relay.push.remote([_stamp(record)])

    def save(self, step: int, state: dict | None, rng: list[dict], meta: dict) -> None:
        import ray.train

        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            if state is not None:
                write_checkpoint(Path(tmp), step, state, rng, meta)
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report({"step": step}, checkpoint=checkpoint, checkpoint_dir_name=dir_name(step))

    def restore(self) -> Loaded | None:
        return load_latest(self.store, self.job_id)


class LocalSession:
    """Single process (or torchrun) sessions writing checkpoints straight into a store."""

    def __init__(
        self,
        store: ArtifactStore,
        job_id: str,
        dist: Dist | None = None,
        on_record: Callable[[dict], None] | None = None,
    ):
        self.dist = dist or Dist()
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
