"""Channel pruning that is faster, not only sparser: onnxruntime latency of the dense model, the
masked channel-pruned model (dense shapes, zero filters: what the export shipped before issue 15)
and the slim model the export now ships (`structure: channel`, workers/compression/channel_slim.py),
timed side by side at batch 1 and 64.

A convolutional model at 32x32 (the registry's convnet, channels [32, 64], hidden 128, on a
32x32 one-channel synthetic set; and optionally the CIFAR-style ResNet-8) is trained twice as
real jobs (`workers.train_loop.train` + `workers.export.export`, no Ray) with the same seed,
budget and data: dense, and with gradual channel pruning (per-layer scope) followed by
fine-tuning. Accuracy is each ONNX artifact's own, over the validation split. Target (issue 15):
>= 2x at batch 64 at <= 1 point of accuracy lost.

    .venv/bin/python -m bench.compression.channels [--repeats 50] [--models convnet resnet] [--seeds 0]

Writes bench/results/compression_channels/{results.json, table.md, latency.png}. The machine is
shared: results.json records the load average at start and end; latencies are medians of
interleaved runs on one onnxruntime thread, so load shifts all columns alike, but a quiet re-run
is the better figure.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time

import numpy as np
import torch

from bench.common import conditions, machine, markdown_table, results_dir
from service.artifacts import JobArtifacts, LocalArtifactStore
from service.spec import parse_spec
from workers import export, onnx_export, report
from workers.checkpoint import load_latest
from workers.compression import quantization as quant
from workers.data import load_dataset
from workers.models import build_model
from workers.models.folding import fold_batchnorm
from workers.session import LocalSession
from workers.train_loop import train

log = logging.getLogger("bench.compression.channels")

DATA = {
    "name": "synthetic",
    "args": {
        "n_samples": 2000,
        "n_features": 1024,
        "n_classes": 10,
        "n_informative": 64,
        "class_sep": 2.0,
        "seed": 0,
    },
    "val_fraction": 0.2,
}
TRAIN = {"optimizer": "adamw", "lr": 0.002, "weight_decay": 0.0, "lr_schedule": "cosine", "batch_size": 64}
MODELS = {
    "convnet": {"name": "convnet", "args": {"channels": [32, 64], "hidden": 128}},
    "resnet": {"name": "resnet", "args": {"depth": 8, "width": 32}},
}
EPOCHS = 12  # 25 steps each: pruning ramps over steps 25..150, then 150 steps of fine-tuning
PRUNING = {
    "structure": "channel",
    "scope": "layer",
    "schedule": "cubic",
    "final_sparsity": 0.5,
    "start_step": 25,
    "end_step": 150,
    "frequency": 25,
}
BATCHES = (1, 64)


def spec_for(model: str, pruned: bool, seed: int, sparsity: float = 0.5, epochs: int = EPOCHS):
    return parse_spec(
        {
            "name": f"bench-channels-{model}-{'channel' if pruned else 'dense'}",
            "model": MODELS[model],
            "data": DATA,
            "train": {**TRAIN, "epochs": epochs, "seed": seed},
            "compression": {"pruning": {**PRUNING, "final_sparsity": sparsity}} if pruned else {},
            "checkpoint": {"every_steps": 100_000, "keep": 1},
        }
    )


def masked_onnx(spec, data, store, job_id: str) -> bytes:
    """The channel job's final model before slimming (dense shapes, zero filters) as fp32 ONNX."""
    ckpt = load_latest(store, job_id)
    model = build_model(spec.model.name, spec.model.args, data.info)
    quant.prepare(model, spec.compression.quantization)
    model.load_state_dict(ckpt.state["model"])
    graph_model, _ = fold_batchnorm(model.eval())
    return onnx_export.to_bytes(onnx_export.to_onnx(graph_model, data.x_val))


def measure(model: str, seed: int, repeats: int, store, sparsity: float, epochs: int) -> dict:
    data = load_dataset(spec_for(model, False, seed).data)
    jobs = {}
    for pruned in (False, True):
        spec = spec_for(model, pruned, seed, sparsity, epochs)
        job = f"{model}-{seed}-{'channel' if pruned else 'dense'}"
        t0 = time.time()
        summary = train(spec, data, LocalSession(store, job))
        rep = export.export(spec, data, store, job, summary["step"], {"steps": summary["step"]}, 5)
        jobs[pruned] = (spec, job, rep, time.time() - t0)
        log.info("%s seed %d %s: accuracy %.4f", model, seed, job, rep["accuracy"])
    spec_c, job_c, rep_c, _ = jobs[True]
    artifacts = {
        "dense": JobArtifacts(store, jobs[False][1]).get_bytes("model.onnx"),
        "masked": masked_onnx(spec_c, data, store, job_c),
        "slim": JobArtifacts(store, job_c).get_bytes("model.onnx"),
    }
    sessions = {k: onnx_export.session(v) for k, v in artifacts.items()}
    accuracy = {k: report.onnx_accuracy(s, data)["accuracy"] for k, s in sessions.items()}
    x = data.x_val.numpy()
    latency = {b: onnx_export.latency_interleaved(sessions, x, b, repeats) for b in BATCHES}
    return {
        "model": model,
        "seed": seed,
        "steps": jobs[True][2]["steps"],
        "epochs": epochs,
        "pruning": {**PRUNING, "final_sparsity": sparsity},
        "machine": machine(),
        "params": {
            "dense": jobs[False][2]["params"]["total"],
            "slim": rep_c["params"]["total"],
        },
        "structure": rep_c.get("structure"),
        "onnx_bytes": {k: len(v) for k, v in artifacts.items()},
        "accuracy": accuracy,
        "delta_points": 100 * (accuracy["slim"] - accuracy["dense"]),
        "latency_ms": {f"batch{b}": latency[b] for b in BATCHES},
        "speedup": {
            f"batch{b}": {
                "slim_vs_dense": latency[b]["dense"] / latency[b]["slim"],
                "masked_vs_dense": latency[b]["dense"] / latency[b]["masked"],
            }
            for b in BATCHES
        },
        "train_seconds": {"dense": jobs[False][3], "channel": jobs[True][3]},
    }


def table(rows: list[dict]) -> str:
    headers = [
        "model (seed), sparsity, steps",
        "params dense -> slim",
        "accuracy dense / slim (points)",
        "b1 ms dense / masked / slim",
        "b64 ms dense / masked / slim",
        "speed-up slim b1 / b64",
        "masked b64",
    ]
    body = []
    for r in rows:
        a, lat, sp = r["accuracy"], r["latency_ms"], r["speedup"]
        body.append(
            [
                f"{r['model']} ({r['seed']}), {r['pruning']['final_sparsity']}, {r['steps']}",
                f"{r['params']['dense']:,} -> {r['params']['slim']:,}",
                f"{a['dense']:.4f} / {a['slim']:.4f} ({r['delta_points']:+.2f})",
                " / ".join(f"{lat['batch1'][k]:.3f}" for k in ("dense", "masked", "slim")),
                " / ".join(f"{lat['batch64'][k]:.2f}" for k in ("dense", "masked", "slim")),
                f"{sp['batch1']['slim_vs_dense']:.2f}x / {sp['batch64']['slim_vs_dense']:.2f}x",
                f"{sp['batch64']['masked_vs_dense']:.2f}x",
            ]
        )
    return markdown_table(headers, body)


def plot(rows: list[dict], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(BATCHES), figsize=(5 * len(BATCHES), 3.2), squeeze=False)
    kinds = ("dense", "masked", "slim")
    for ax, b in zip(axes[0], BATCHES, strict=True):
        labels = [
            f"{r['model']} s{r['seed']}\n{r['pruning']['final_sparsity']}, {r['steps']} st" for r in rows
        ]
        ys = np.arange(len(rows))
        for i, k in enumerate(kinds):
            ax.barh(ys + (i - 1) * 0.27, [r["latency_ms"][f"batch{b}"][k] for r in rows], 0.27, label=k)
        ax.set_yticks(ys, labels)
        ax.set_xlabel("ms per run (median, onnxruntime, 1 thread)")
        ax.set_title(f"batch {b}")
    axes[0][0].legend()
    fig.suptitle("channel pruning: dense vs masked (zeros) vs slim model.onnx")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["convnet"], choices=sorted(MODELS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--sparsity", type=float, default=0.5, help="final_sparsity (per-layer channels)")
    ap.add_argument("--epochs", type=int, default=EPOCHS)
    ap.add_argument("--append", action="store_true", help="keep the rows already in results.json")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        store = LocalArtifactStore(tmp)
        for model in args.models:
            for seed in args.seeds:
                rows.append(measure(model, seed, args.repeats, store, args.sparsity, args.epochs))
    out = results_dir("compression_channels")
    if args.append and (out / "results.json").exists():
        rows = json.loads((out / "results.json").read_text())["rows"] + rows
    m = machine()
    summary = {
        model: {
            "median_speedup_batch64": statistics.median(
                r["speedup"]["batch64"]["slim_vs_dense"] for r in rows if r["model"] == model
            ),
            "median_delta_points": statistics.median(r["delta_points"] for r in rows if r["model"] == model),
        }
        for model in {r["model"] for r in rows}
    }
    (out / "results.json").write_text(
        json.dumps({"machine": m, "repeats": args.repeats, "summary": summary, "rows": rows}, indent=2)
    )
    text = (
        "# Channel pruning: latency of the slim model (bench/compression/channels.py)\n\n"
        "`.venv/bin/python -m bench.compression.channels --models M --seeds S --sparsity F "
        "--epochs E --repeats 50 [--append]` (one row per run; each row's conditions in results.json)\n\n"
        + table(rows)
        + "\n\nmasked: the channel job's model with dense shapes and zero filters (what onnxruntime ran "
        "before slimming: no faster than dense); slim: its model.onnx as exported now. Medians of "
        f"{args.repeats} interleaved runs after 5 warm-ups, one onnxruntime thread. Target: >= 2x at "
        "batch 64 at <= 1 point lost.\n\n" + conditions(m) + "\n"
    )
    (out / "table.md").write_text(text)
    plot(rows, out / "latency.png")
    print(text)


if __name__ == "__main__":
    main()
