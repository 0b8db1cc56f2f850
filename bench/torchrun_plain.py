"""A plain PyTorch DDP training script for the parity benchmark: no slimtrain, no Ray.

    torchrun --nproc_per_node 2 bench/torchrun_plain.py SPEC OUT.json

Trains the same registry model on the same data with the same global batches and optimizer as
slimtrain would (so only the framework differs) and writes steady-state samples/s per window."""

from __future__ import annotations

import json
import os
import sys
import time

import torch
import torch.distributed as dist
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel

from service.spec import load_spec_file
from workers.data import load_dataset
from workers.data import sharding as sh
from workers.models import build_model


def main(spec_path: str, out_path: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    spec = load_spec_file(spec_path)
    data = load_dataset(spec.data)
    model = DistributedDataParallel(
        build_model(spec.model.name, spec.model.args, data.info, seed=spec.train.seed)
    )
    t = spec.train
    opt = torch.optim.SGD(model.parameters(), lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)
    spe = sh.steps_per_epoch(data.info.n_train, t.batch_size)
    total = min(t.max_steps or 10**9, t.epochs * spe)
    train_start = time.time()  # wall clock: the parity bench compares it with the launch time
    window, rates, times, start = t.log_every_steps, [], [], time.perf_counter()
    perm = None
    for step in range(total):
        if perm is None or step % spe == 0:
            perm = sh.epoch_permutation(data.info.n_train, t.seed, step // spe)
        idx = sh.rank_slice(sh.global_batch(perm, step % spe, t.batch_size), rank, world)
        x, y = data.x_train[idx], data.y_train[idx]
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
        if (step + 1) % window == 0:
            now = time.perf_counter()
            rates.append(window * t.batch_size / (now - start))
            times.append(time.time())  # wall clock, to match the bench's CPU samples
            start = now
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(
                {
                    "rates": rates,
                    "window_times": times,
                    "steps": total,
                    "train_start": train_start,
                    "train_end": time.time(),
                },
                f,
            )
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
