"""Pruning overhead: training step time with masks active vs dense, same model and batches.

Masks are active from step 0 (oneshot at 90%), so every measured step pays for masking the
gradients before and the weights after the optimizer step. Single process, interleaved runs.
Target: masked/dense <= 1.05.

    .venv/bin/python -m bench.pruning_overhead [--rounds 5] [--steps 400]
"""

from __future__ import annotations

import argparse
import tempfile

import torch

from bench.common import machine, markdown_table, median, out_dir, save_json
from service.artifacts import LocalArtifactStore
from service.spec import parse_spec
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


def step_ms(s, data) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        out = train(s, data, LocalSession(LocalArtifactStore(tmp), "o"))
    return 1000 * out["train_seconds"] / out["step"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=400)
    args = ap.parse_args()
    torch.set_num_threads(1)
    out = out_dir("pruning_overhead")
    rows, raw = [], {}
    for label, (model, data_cfg, batch) in MODELS.items():
        dense_spec = spec(model, data_cfg, batch, args.steps, False)
        pruned_spec = spec(model, data_cfg, batch, args.steps, True)
        data = load_dataset(dense_spec.data)
        dense, masked = [], []
        step_ms(dense_spec, data)  # warm-up: allocator, kernels
        for r in range(args.rounds):
            pair = [(dense, dense_spec), (masked, pruned_spec)]
            for bucket, s in pair if r % 2 == 0 else pair[::-1]:
                bucket.append(step_ms(s, data))
        ratios = [m / d for m, d in zip(masked, dense, strict=True)]
        rows.append([label, median(dense), median(masked), median(masked) / median(dense), median(ratios)])
        raw[label] = {"dense_ms": dense, "masked_ms": masked}
        print(rows[-1], flush=True)
    table = markdown_table(
        ["model", "dense ms/step", "masked ms/step", "ratio of medians", "median of paired ratios"], rows
    )
    (out / "table.md").write_text(table + "\n")
    save_json(out / "results.json", {"raw": raw, "machine": machine()})
    _plot(raw, out / "pruning_overhead.png")
    print(table)


def _plot(raw: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(raw), figsize=(9, 3.5))
    for ax, (label, d) in zip(axes, raw.items(), strict=True):
        ax.boxplot([d["dense_ms"], d["masked_ms"]], tick_labels=["dense", "90% masks"])
        ax.set_title(label, fontsize=8)
        ax.set_ylabel("ms / optimizer step")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
