"""Per-worker memory of gpt training under ddp, fsdp and pipeline (CPU, gloo).

Each configuration runs the real training loop's `build` and `train_step` in W processes. After
a warm-up step (so the optimizer state exists), every rank measures from its live tensors the
bytes of its parameters, gradients and optimizer state right after a step, when all three
coexist: the state that sharding divides. Then one more step runs under torch's MemTracker
(every tensor allocation, activations and FSDP's gathered blocks included) for the peak.
Storages are counted once each, at their real (for FSDP: padded) size.

    .venv/bin/python -m bench.memory.run [--layers 4] [--embd 256] [--worlds 2 4] [--out DIR]

Writes {table.md,results.json,memory.png} to bench/memory/results/ (or --out).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed._tools.mem_tracker import MemTracker

from bench.common import conditions, machine, markdown_table, results_dir, save_json
from service.spec import parse_spec
from workers.compression.pruning import _local
from workers.data import load_dataset
from workers.data import sharding as sh
from workers.parallel import Dist
from workers.train_loop import _batch, build, train_step

MIB = 2**20


class PeakTracker(MemTracker):
    """MemTracker's whole-step peak without its per-module snapshots, which refuse a module
    called more than once per step (a pipeline stage runs once per microbatch)."""

    def _pre_fw_hook(self, *args):
        pass

    def _post_fw_hook(self, *args):
        pass

    def _pre_bw_hook(self, *args):
        pass

    def _post_bw_hook(self, *args):
        pass


def job_spec(strategy: str, world: int, layers: int, embd: int, batch: int) -> dict:
    return {
        "name": "memory",
        "model": {"name": "gpt", "args": {"n_layer": layers, "n_head": 4, "n_embd": embd}},
        "data": {"name": "text", "args": {"block_size": 64, "max_chars": 100_000}},
        "train": {"epochs": 1, "max_steps": 10, "batch_size": batch, "optimizer": "adamw"},
        "parallel": {"strategy": strategy, "workers": world, "pipeline_microbatches": 4},
        "compression": {"pruning": {"final_sparsity": 0.5, "start_step": 0, "end_step": 5, "frequency": 1}},
    }


def storage_bytes(tensors, seen: set) -> int:
    """Bytes of the storages behind `tensors`, each storage once (shared across calls via `seen`)."""
    total = 0
    for t in tensors:
        st = _local(t).untyped_storage()
        if st.data_ptr() not in seen:
            seen.add(st.data_ptr())
            total += st.nbytes()
    return total


def measure(run) -> dict:
    params = list(run.module.parameters())
    seen: set = set()
    p = storage_bytes(params, seen)
    g = storage_bytes([x.grad for x in params if x.grad is not None], seen)
    opt = [v for s in run.optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.dim() > 0]
    o = storage_bytes(opt, seen)
    return {"params": p / MIB, "grads": g / MIB, "optimizer": o / MIB, "state": (p + g + o) / MIB}


def _worker(rank: int, world: int, port: int, spec: dict, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=300))
    s = parse_spec(spec)
    data = load_dataset(s.data)
    run = build(s, data, Dist(rank, world))
    perm = sh.epoch_permutation(data.info.n_train, s.train.seed, 0)

    def step():
        run.pruner.maybe_update(run.step, run.optimizer)
        x, y = _batch(run, perm, run.step)
        train_step(run, x, y)
        run.step += 1

    step()  # warm-up: the optimizer state exists from here on
    step()
    state = measure(run)
    tracker = PeakTracker()
    tracker.track_external(run.module, run.optimizer)
    with tracker:
        step()
    peak = tracker.get_tracker_snapshot("peak")
    state["peak_tracked"] = sum(d["Total"] for d in peak.values()) / MIB
    state["rank"] = rank
    Path(out, f"rank{rank}.json").write_text(json.dumps(state))
    dist.barrier()
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_config(strategy: str, world: int, args) -> list[dict]:
    spec = job_spec(strategy, world, args.layers, args.embd, args.batch)
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_worker, args=(world, _free_port(), spec, out), nprocs=world)
        return [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(world)]


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['strategy']}\nW={r['workers']}" for r in rows]
    fig, ax = plt.subplots(figsize=(8, 4.2))
    bottom = [0.0] * len(rows)
    for key, color in (("params", "#4c72b0"), ("grads", "#dd8452"), ("optimizer", "#55a868")):
        vals = [r[key] for r in rows]
        ax.bar(labels, vals, bottom=bottom, label=key, color=color)
        bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
    ax.plot(labels, [r["peak_tracked"] for r in rows], "k_", markersize=28, mew=2, label="peak (all tensors)")
    ax.set_ylabel("MiB per worker (largest rank)")
    ax.set_title("gpt training memory per worker: parameters + gradients + optimizer state")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--embd", type=int, default=256)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--worlds", type=int, nargs="+", default=[2, 4])
    # Default: bench/results/memory (committed), or BENCH_OUT/memory when set. bench.run_all's quick
    # mode writes elsewhere, so it never overwrites the committed figures.
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    args.out = args.out or results_dir("memory")

    configs = [("ddp", 1)]
    for w in args.worlds:
        configs += [("ddp", w), ("fsdp", w), ("pipeline", w)]
    rows = []
    for strategy, world in configs:
        ranks = run_config(strategy, world, args)
        worst = max(ranks, key=lambda r: r["state"])
        rows.append(
            {"strategy": strategy, "workers": world, **worst, "per_rank_state": [r["state"] for r in ranks]}
        )
        print(f"{strategy} W={world}: state {worst['state']:.2f} MiB, peak {worst['peak_tracked']:.2f} MiB")

    full = rows[0]["state"]
    table = markdown_table(
        [
            "strategy",
            "workers",
            "params MiB",
            "grads MiB",
            "optimizer MiB",
            "state MiB",
            "state / 1 process",
            "peak MiB",
        ],
        [
            [
                r["strategy"],
                r["workers"],
                r["params"],
                r["grads"],
                r["optimizer"],
                r["state"],
                r["state"] / full,
                r["peak_tracked"],
            ]
            for r in rows
        ],
    )
    n = sum(p.numel() for p in _model_params(args))
    header = (
        f"gpt n_layer={args.layers}, n_embd={args.embd}, block 64, vocab 256 ({n / 1e6:.2f} M parameters), "
        f"AdamW, fp32, global batch {args.batch}, 4 microbatches; largest rank per configuration."
    )
    args.out.mkdir(parents=True, exist_ok=True)
    m = machine()
    (args.out / "table.md").write_text(f"{conditions(m)}\n{header}\n\n{table}\n")
    meta = {**vars(args), "out": str(args.out)}
    save_json(args.out / "results.json", {"machine": m, "args": meta, "params": n, "rows": rows})
    plot(rows, args.out / "memory.png")
    print(header)
    print(table)


def _model_params(args):
    from workers.models import build_model

    spec = parse_spec(job_spec("ddp", 1, args.layers, args.embd, args.batch))
    data = load_dataset(spec.data)
    return build_model(spec.model.name, spec.model.args, data.info).parameters()


if __name__ == "__main__":
    main()
