"""Pruning overhead: training step time with masks active vs dense, same model and batches.

Masks are active from step 0 (oneshot at 90%), so every measured step pays for masking the
gradients before and the weights after the optimizer step. Single process, one thread,
interleaved runs. Target: masked/dense <= 1.05.

Two clocks per step: wall time (the loop's own `train_seconds`) and this thread's CPU time. On a
machine shared with other work, wall time counts the slices the scheduler gave to other
processes; CPU time does not, so its ratio is the one that resolves a few percent there.

    .venv/bin/python -m bench.pruning_overhead [--rounds 7] [--steps 1000]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from bench.common import load_at_end, machine, markdown_table, median, out_dir, save_json
from service.artifacts import LocalArtifactStore
from service.spec import parse_spec
from workers import train_loop
from workers.data import load_dataset
from workers.session import LocalSession
from workers.train_loop import train

MODELS = {
    "lenet5 / digits, batch 64": ({"name": "lenet5"}, {"name": "digits"}, 64),
    "mlp 1024-512 / synthetic, batch 256": (
        {"name": "mlp", "args": {"hidden": [1024, 512]}},
        {"name": "synthetic", "args": {"n_samples": 30000, "n_features": 256, "n_classes": 20}},
        256,
    ),
}


def spec(model, data, batch, steps, pruned: bool):
    s = {
        "name": "overhead",
        "model": model,
        "data": data,
        "train": {
            "epochs": 1000,
            "max_steps": steps,
            "batch_size": batch,
            "lr_schedule": "constant",
            "log_every_steps": steps,
            "eval_every_steps": steps,
        },
        "checkpoint": {"every_steps": steps},
    }
    if pruned:
        s["compression"] = {"pruning": {"schedule": "oneshot", "final_sparsity": 0.9, "start_step": 0}}
    return parse_spec(s)


class CpuClock:
    """Wraps the loop's `train_step` to add up the thread CPU time spent inside it: the same
    span the loop times with the wall clock, so the two clocks measure the same work."""

    def __init__(self):
        self.seconds = 0.0
        self.inner = train_loop.train_step

    def __call__(self, run, x, y):
        t = time.thread_time()
        try:
            return self.inner(run, x, y)
        finally:
            self.seconds += time.thread_time() - t


def step_ms(s, data) -> tuple[float, float]:
    """(wall, CPU) milliseconds per optimizer step."""
    clock = CpuClock()
    train_loop.train_step = clock  # train() looks the name up in its module at each step
    try:
        with tempfile.TemporaryDirectory() as tmp:
            out = train(s, data, LocalSession(LocalArtifactStore(tmp), "o"))
    finally:
        train_loop.train_step = clock.inner
    return 1000 * out["train_seconds"] / out["step"], 1000 * clock.seconds / out["step"]


def main() -> None:
    ap = argparse.ArgumentParser()
    # At 400 steps a lenet5 run lasted 0.7 s, and on this shared machine the ratio of medians
    # and the median of paired ratios then disagreed by 6 points (1.08 vs 1.02).
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--steps", type=int, default=1000)
    args = ap.parse_args()
    torch.set_num_threads(1)
    out = out_dir("pruning_overhead")
    rows, raw = [], {}
    t_all = time.monotonic()
    for label, (model, data_cfg, batch) in MODELS.items():
        dense_spec = spec(model, data_cfg, batch, args.steps, False)
        pruned_spec = spec(model, data_cfg, batch, args.steps, True)
        data = load_dataset(dense_spec.data)
        runs: dict[str, list[tuple[float, float]]] = {"dense": [], "masked": []}
        step_ms(dense_spec, data)  # warm-up: allocator, kernels
        for r in range(args.rounds):
            pair = [("dense", dense_spec), ("masked", pruned_spec)]
            for name, s in pair if r % 2 == 0 else pair[::-1]:
                runs[name].append(step_ms(s, data))
        row = [label]
        for clock in (0, 1):  # wall, CPU
            d = [x[clock] for x in runs["dense"]]
            m = [x[clock] for x in runs["masked"]]
            # Each round's two runs ran back to back: their ratio shares the load of the moment.
            row += [median(d), median(m), median([a / b for a, b in zip(m, d, strict=True)])]
        rows.append(row)
        raw[label] = {k: [{"wall_ms": w, "cpu_ms": c} for w, c in v] for k, v in runs.items()}
        print(rows[-1], flush=True)
    table = markdown_table(
        [
            "model",
            "dense wall ms/step",
            "masked wall ms/step",
            "wall: median of paired ratios",
            "dense CPU ms/step",
            "masked CPU ms/step",
            "CPU: median of paired ratios",
        ],
        rows,
    )
    note = (
        f"{args.rounds} interleaved rounds x {args.steps} steps per model, one process, 1 thread; "
        f"{time.monotonic() - t_all:.0f} s in all; {load_at_end()}"
    )
    (out / "table.md").write_text(table + "\n\n" + note + "\n")
    save_json(out / "results.json", {"raw": raw, "machine": machine(), "note": note})
    _plot(raw, out / "pruning_overhead.png")
    print(table)
    print(note)


def _plot(raw: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(raw), figsize=(10, 3.8))
    for ax, (label, d) in zip(axes, raw.items(), strict=True):
        data = [[x[k] for x in d[name]] for k in ("wall_ms", "cpu_ms") for name in ("dense", "masked")]
        ax.boxplot(data, tick_labels=["dense\nwall", "90% masks\nwall", "dense\nCPU", "90% masks\nCPU"])
        ax.set_title(label, fontsize=8)
        ax.set_ylabel("ms / optimizer step")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
