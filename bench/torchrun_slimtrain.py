"""slimtrain's own training loop under torchrun (no Ray): isolates Ray Train's overhead.

torchrun --nproc_per_node 2 bench/torchrun_slimtrain.py SPEC OUT.json"""

from __future__ import annotations

import json
import os
import sys
import tempfile

import torch
import torch.distributed as dist

from service.artifacts import LocalArtifactStore
from service.spec import load_spec_file
from workers.data import load_dataset
from workers.parallel import Dist
from workers.session import LocalSession
from workers.train_loop import train


def main(spec_path: str, out_path: str) -> None:
    dist.init_process_group("gloo")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    spec = load_spec_file(spec_path)
    data = load_dataset(spec.data)
    with tempfile.TemporaryDirectory() as tmp:
        session = LocalSession(LocalArtifactStore(tmp), "bench", Dist(dist.get_rank(), dist.get_world_size()))
        train(spec, data, session)
    if dist.get_rank() == 0:
        train_recs = [r for r in session.records if r["kind"] == "train"]
        rates = [r["samples_per_second"] for r in train_recs]
        times = {r["event"]: r["time"] for r in session.records if r["kind"] == "event"}
        with open(out_path, "w") as f:
            json.dump(
                {
                    "rates": rates,
                    "window_times": [r["time"] for r in train_recs],
                    "train_start": times["start"],
                    "train_end": times["done"],
                },
                f,
            )
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
