"""Channel pruning that is faster, not only sparser: onnxruntime latency of the dense model, the
masked channel-pruned model (dense shapes, zero filters: what the export shipped before issue 15),
the slim model the export now ships (`structure: channel`, workers/compression/channel_slim.py)
and, for channels + int8 QAT, the slim model's int8 graph (model.int8.onnx), timed side by side at
batch 1 and 64.

A convolutional model at 32x32 (the registry's convnet, channels [32, 64], hidden 128, on a
32x32 one-channel synthetic set; and optionally the CIFAR-style ResNet-8) is trained as real jobs
(`workers.train_loop.train` + `workers.export.export`, no Ray) with the same seed, step budget
and data: dense, with gradual channel pruning (per-layer scope) followed by fine-tuning, and
(`--int8`) with the same pruning plus int8 QAT from the last pruning step. Accuracy is each ONNX
artifact's own, over the 400 validation samples (one sample = 0.25 points); the loss is against
the dense job of the same seed and steps. Targets (issue 15): channels >= 2x faster at batch 64
at <= 1 point lost; channels + int8 >= 3x.

    .venv/bin/python -m bench.compression.channels --recipes r50-e100-s300 --seeds 0 1 2 \\
        --int8 r50-e100-s300

`--recipes` picks from RECIPES (every recipe ever run stays in the table: `--append` keeps the
rows already in results.json, each with its own command and conditions). Writes
bench/results/compression_channels/{results.json, table.md, latency.png}, rewritten after every
seed. The machine is shared: each row records the load average; latencies are medians of
interleaved runs on one onnxruntime thread, so load shifts all columns alike.

Cost: on two free CPUs (load under 1) a 400-step dense convnet job trains in ~40 s, a channel
job in ~40-60 s, with QAT ~50-65 s, and the command above with 3 seeds ran in 8 minutes
(2026-12-02); at load 12-43 the same 300-step dense job took 1019 s of wall time.
On the shared 2-CPU machine at load 15-40 one process got 0.12-0.25 of a CPU (more processes did
not get more: five side by side got 3% each), i.e. hours; run it where a CPU is free, or one seed per run
(`--append`), or one process per seed with its own BENCH_OUT, joined afterwards with
`--append --merge DIR/compression_channels/results.json ...`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from bench.common import conditions, machine, markdown_table, results_dir, save_json
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
STEPS_PER_EPOCH = 25  # 1600 training samples at batch 64
PRUNING = {"structure": "channel", "scope": "layer", "schedule": "cubic", "start_step": 25, "frequency": 25}
# name -> final channel sparsity per layer, the step the cubic ramp (from step 25) ends, epochs.
# Everything after end_step is fine-tuning of the pruned model (cosine learning rate).
RECIPES = {
    "r50-e150-s300": {"sparsity": 0.5, "end_step": 150, "epochs": 12},  # the first recipe
    "r50-e150-s500": {"sparsity": 0.5, "end_step": 150, "epochs": 20},  # + 200 fine-tuning steps
    "r50-e100-s300": {"sparsity": 0.5, "end_step": 100, "epochs": 12},  # ramp ends earlier
    "r50-e75-s300": {"sparsity": 0.5, "end_step": 75, "epochs": 12},
    "r40-e150-s300": {"sparsity": 0.4, "end_step": 150, "epochs": 12},  # gentler end sparsity
    "r50-e100-s400": {"sparsity": 0.5, "end_step": 100, "epochs": 16},
    "r40-e100-s400": {"sparsity": 0.4, "end_step": 100, "epochs": 16},
    # -m8: pruning.channel_multiple 8, each layer keeps a multiple of 8 channels (rounded up):
    # 40% of [32, 32, 64, 64] conv channels and 128 hidden units keeps [24, 24, 40, 40] and 80
    # where plain r40 keeps [19, 19, 38, 38] and 77, counts onnxruntime's kernels run slowly.
    "r40-e150-s300-m8": {"sparsity": 0.4, "end_step": 150, "epochs": 12, "multiple": 8},
    "r40-e100-s400-m8": {"sparsity": 0.4, "end_step": 100, "epochs": 16, "multiple": 8},
    # -c2r25: pruning.layer_sparsity keeps the second block and the hidden layer at 25%, the
    # first block at 50%: [16, 16, 48, 48] and 96 (bench/compression/widths.py: a narrow first
    # block is what onnxruntime runs fast; the wider rest keeps capacity).
    "r50-c2r25-e100-s400": {
        "sparsity": 0.5,
        "end_step": 100,
        "epochs": 16,
        "layers": {"features.conv2*": 0.25, "classifier.fc1": 0.25},
    },
    "r50-c2r25-e150-s300": {
        "sparsity": 0.5,
        "end_step": 150,
        "epochs": 12,
        "layers": {"features.conv2*": 0.25, "classifier.fc1": 0.25},
    },
    # -c2r375: the second block and the hidden layer at 37.5%: [16, 16, 40, 40] and 80
    "r50-c2r375-e150-s300": {
        "sparsity": 0.5,
        "end_step": 150,
        "epochs": 12,
        "layers": {"features.conv2*": 0.375, "classifier.fc1": 0.375},
    },
}
# -vnni: with --int8, model.int8.onnx stores int8 weights (quantization.kernels: vnni, U8S8
# kernels: exact on CPUs with VNNI or AMX only); the channel job is r50-c2r375-e150-s300's
RECIPES["r50-c2r375-e150-s300-vnni"] = {**RECIPES["r50-c2r375-e150-s300"], "kernels": "vnni"}
BATCHES = (1, 64)


def spec_for(model: str, seed: int, recipe: str | None, int8: bool = False, epochs: int | None = None):
    """The dense job (recipe None, `epochs` steps' worth) or a recipe's channel job (+ int8 QAT)."""
    compression = {}
    if recipe is not None:
        r = RECIPES[recipe]
        epochs = r["epochs"]
        compression["pruning"] = {
            **PRUNING,
            "final_sparsity": r["sparsity"],
            "end_step": r["end_step"],
            "channel_multiple": r.get("multiple", 1),
            "layer_sparsity": r.get("layers", {}),
        }
        if int8:
            # Fake quantization from pruning's last step: the channels it trains are the slim ones.
            compression["quantization"] = {
                "mode": "qat",
                "bits": 8,
                "start_step": r["end_step"],
                "kernels": r.get("kernels", "portable"),
            }
    kind = "dense" if recipe is None else f"{recipe}{'-int8' if int8 else ''}"
    return parse_spec(
        {
            "name": f"bench-channels-{model}-{kind}",
            "model": MODELS[model],
            "data": DATA,
            "train": {**TRAIN, "epochs": epochs, "seed": seed},
            "compression": compression,
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


def run_job(spec, data, store, job: str) -> dict:
    t0 = time.time()
    summary = train(spec, data, LocalSession(store, job))
    t1 = time.time()
    rep = export.export(spec, data, store, job, summary["step"], {"steps": summary["step"]}, 5)
    log.info(
        "%s: accuracy %.4f (train %.0f s, export %.0f s)", job, rep["accuracy"], t1 - t0, time.time() - t1
    )
    return {"job": job, "spec": spec, "report": rep, "train_s": t1 - t0, "export_s": time.time() - t1}


def measure_seed(
    model: str, seed: int, recipes: list[str], int8: list[str], repeats: int, store
) -> list[dict]:
    """Every job of one seed, then all their artifacts timed side by side (one interleaved loop
    per batch size), one row per compressed job."""
    data = load_dataset(spec_for(model, seed, None, epochs=1).data)
    dense = {}  # epochs -> dense job: each recipe's loss is against the dense job of its steps
    for epochs in sorted({RECIPES[r]["epochs"] for r in [*recipes, *int8]}):
        dense[epochs] = run_job(
            spec_for(model, seed, None, epochs=epochs), data, store, f"{model}-{seed}-dense-{epochs}"
        )
    jobs = []
    for recipe in dict.fromkeys([*recipes, *int8]):
        for q in [q for q in (False, True) if (recipe in int8 if q else recipe in recipes)]:
            spec = spec_for(model, seed, recipe, q)
            jobs.append(
                (recipe, q, run_job(spec, data, store, f"{model}-{seed}-{recipe}{'-int8' if q else ''}"))
            )

    arts = lambda j, name: JobArtifacts(store, j["job"]).get_bytes(name)  # noqa: E731
    sessions = {f"dense-{e}": onnx_export.session(arts(j, "model.onnx")) for e, j in dense.items()}
    for recipe, q, j in jobs:
        key = f"{recipe}{'-int8' if q else ''}"
        sessions[f"{key}/model.onnx"] = onnx_export.session(arts(j, "model.onnx"))
        if q:
            sessions[f"{key}/model.int8.onnx"] = onnx_export.session(arts(j, "model.int8.onnx"))
        else:
            sessions[f"{key}/masked"] = onnx_export.session(masked_onnx(j["spec"], data, store, j["job"]))
    accuracy = {k: report.onnx_accuracy(s, data)["accuracy"] for k, s in sessions.items()}
    x = data.x_val.numpy()
    latency = {b: onnx_export.latency_interleaved(sessions, x, b, repeats) for b in BATCHES}
    m = machine()
    rows = []
    for recipe, q, j in jobs:
        key = f"{recipe}{'-int8' if q else ''}"
        r = RECIPES[recipe]
        d = f"dense-{r['epochs']}"
        shipped = f"{key}/model.int8.onnx" if q else f"{key}/model.onnx"
        timed = {
            "dense": d,
            "slim": f"{key}/model.onnx",
            ("int8" if q else "masked"): f"{key}/{'model.int8.onnx' if q else 'masked'}",
        }
        rep = j["report"]
        rows.append(
            {
                "model": model,
                "seed": seed,
                "recipe": recipe,
                "kind": "channels + int8 QAT" if q else "channels",
                "artifact": "model.int8.onnx" if q else "model.onnx",
                "steps": rep["steps"],
                "epochs": r["epochs"],
                "pruning": j["spec"].compression.pruning.model_dump(mode="json"),
                "quantization": rep["quantization"] if q else None,
                "deploy": rep.get("deploy"),
                "params": {
                    "dense": dense[r["epochs"]]["report"]["params"]["total"],
                    "slim": rep["params"]["total"],
                },
                "structure": rep.get("structure"),
                "accuracy": {k: accuracy[v] for k, v in timed.items()},
                "accuracy_shipped": accuracy[shipped],
                "delta_points": 100 * (accuracy[shipped] - accuracy[d]),
                "latency_ms": {f"batch{b}": {k: latency[b][v] for k, v in timed.items()} for b in BATCHES},
                "speedup": {
                    f"batch{b}": {k: latency[b][d] / latency[b][v] for k, v in timed.items() if k != "dense"}
                    for b in BATCHES
                },
                "train_seconds": {"dense": dense[r["epochs"]]["train_s"], "compressed": j["train_s"]},
                "command": COMMAND,
                "machine": m,
            }
        )
    return rows


COMMAND = ""  # this run's command line, set by main


def _normalise(row: dict) -> dict:
    """Rows of the first run (before recipes and int8 rows) in today's shape."""
    if "recipe" in row:
        return row
    p = row["pruning"]
    sp = int(round(100 * p["final_sparsity"]))
    return {
        **row,
        "recipe": f"r{sp}-e{p['end_step']}-s{row['steps']}",
        "kind": "channels",
        "artifact": "model.onnx",
        "accuracy_shipped": row["accuracy"]["slim"],
        "speedup": {
            b: {"slim": v["slim_vs_dense"], "masked": v["masked_vs_dense"]} for b, v in row["speedup"].items()
        },
        "command": row.get("command", "(first run, before --recipes: same recipe as r50-e150-s300/s500)"),
    }


def kind_short(r: dict) -> str:
    return "int8" if r["kind"] != "channels" else "slim"


def table(rows: list[dict]) -> str:
    headers = [
        "model (seed), recipe, kind",
        "params dense -> slim",
        "accuracy dense / shipped (points)",
        "b1 ms dense / masked|slim fp32 / shipped",
        "b64 ms dense / masked|slim fp32 / shipped",
        "speed-up shipped b1 / b64",
        "report's deploy",
        "load (1 min)",
    ]
    body = []
    for r in rows:
        a, lat, sp, k = r["accuracy"], r["latency_ms"], r["speedup"], kind_short(r)
        mid = "masked" if k == "slim" else "slim"
        la = r["machine"]["load_average"]["start"][0]
        body.append(
            [
                f"{r['model']} ({r['seed']}), {r['recipe']}, {r['kind']}",
                f"{r['params']['dense']:,} -> {r['params']['slim']:,}",
                f"{a['dense']:.4f} / {r['accuracy_shipped']:.4f} ({r['delta_points']:+.2f})",
                " / ".join(f"{lat['batch1'][c]:.3f}" for c in ("dense", mid, k)),
                " / ".join(f"{lat['batch64'][c]:.2f}" for c in ("dense", mid, k)),
                f"{sp['batch1'][k]:.2f}x / {sp['batch64'][k]:.2f}x",
                (r.get("deploy") or {}).get("artifact", "-"),
                f"{la:.1f}",
            ]
        )
    return markdown_table(headers, body)


def speedup64(r: dict) -> float:
    return r["speedup"]["batch64"][kind_short(r)]


def summarise(rows: list[dict]) -> list[dict]:
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["model"], r["recipe"], r["kind"]), []).append(r)
    out = []
    for (model, recipe, kind), rs in groups.items():
        d = [r["delta_points"] for r in rs]
        s = [speedup64(r) for r in rs]
        out.append(
            {
                "model": model,
                "recipe": recipe,
                "kind": kind,
                "seeds": sorted(r["seed"] for r in rs),
                "delta_points": {"mean": statistics.mean(d), "min": min(d), "max": max(d)},
                "speedup_batch64": {"median": statistics.median(s), "min": min(s), "max": max(s)},
                "meets": {
                    "speed": statistics.median(s) >= (3.0 if kind != "channels" else 2.0),
                    "accuracy_1_point": statistics.mean(d) >= -1.0,
                },
            }
        )
    return out


def summary_table(summary: list[dict]) -> str:
    headers = [
        "model, recipe, kind",
        "seeds",
        "loss vs dense, points: mean (min / max)",
        "b64 speed-up: median (min-max)",
        "target",
    ]
    body = []
    for s in summary:
        d, sp = s["delta_points"], s["speedup_batch64"]
        target = ">= 3x" if s["kind"] != "channels" else ">= 2x, <= 1 point"
        met = (
            "met"
            if s["meets"]["speed"] and (s["kind"] != "channels" or s["meets"]["accuracy_1_point"])
            else "missed"
        )
        body.append(
            [
                f"{s['model']}, {s['recipe']}, {s['kind']}",
                " ".join(map(str, s["seeds"])),
                f"{d['mean']:+.2f} ({d['min']:+.2f} / {d['max']:+.2f})",
                f"{sp['median']:.2f}x ({sp['min']:.2f}-{sp['max']:.2f})",
                f"{target}: {met}",
            ]
        )
    return markdown_table(headers, body)


def plot(rows: list[dict], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 0.45 * len(rows) + 1.8), squeeze=False)
    labels = [f"{r['model']} s{r['seed']} {r['recipe']} {kind_short(r)}" for r in rows]
    ys = np.arange(len(rows))
    ax = axes[0][0]
    ax.barh(ys, [speedup64(r) for r in rows], color=["C1" if kind_short(r) == "int8" else "C0" for r in rows])
    ax.axvline(2.0, color="C0", ls="--", lw=1, label="2x (channels)")
    ax.axvline(3.0, color="C1", ls="--", lw=1, label="3x (channels + int8)")
    ax.set_yticks(ys, labels, fontsize=7)
    ax.set_xlabel("speed-up vs dense fp32 model.onnx, batch 64 (median, onnxruntime, 1 thread)")
    ax.legend(fontsize=7)
    ax = axes[0][1]
    ax.barh(
        ys, [r["delta_points"] for r in rows], color=["C1" if kind_short(r) == "int8" else "C0" for r in rows]
    )
    ax.axvline(-1.0, color="k", ls="--", lw=1, label="-1 point")
    ax.set_yticks(ys, [""] * len(rows))
    for a in axes[0]:
        a.invert_yaxis()  # rows in the table's order, top to bottom
    ax.set_xlabel("accuracy vs dense (same seed and steps), points")
    ax.legend(fontsize=7)
    load = rows[-1]["machine"]["load_average"]
    commit = str(rows[-1]["machine"]["git"]["commit"])[:10]
    fig.suptitle(
        f"channel pruning (+ int8): shipped artifact vs dense fp32; last run's load "
        f"{load['start'][0]:.1f} -> {load['end'][0]:.1f}, commit {commit}",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(out, rows: list[dict], repeats: int, t0: float) -> str:
    m = machine()
    summary = summarise(rows)
    save_json(
        out / "results.json",
        {
            "machine": m,
            "command": COMMAND,
            "wall_seconds": time.time() - t0,
            "repeats": repeats,
            "summary": summary,
            "rows": rows,
        },
    )
    text = (
        "# Channel pruning (+ int8): latency of the shipped artifact (bench/compression/channels.py)\n\n"
        f"Last run: `{COMMAND}` ({time.time() - t0:.0f} s). Each row's command and conditions are in "
        "results.json; recipe rNN-eE-sS: NN% of each layer's channels pruned on a cubic ramp from step 25 "
        "to step E, S steps in all (the rest fine-tunes the pruned model); -m8: each layer keeps a multiple "
        "of 8 channels (`pruning.channel_multiple: 8`); -c2r25 / -c2r375: the second block and the "
        "hidden layer pruned to 25% / 37.5% (`pruning.layer_sparsity`); int8: + QAT from step E; -vnni: "
        "model.int8.onnx for U8S8 kernels (`quantization.kernels: vnni`).\n\n"
        "## Per recipe (mean over seeds; loss against the dense job of the same seed and steps)\n\n"
        + summary_table(summary)
        + "\n\n## Every row\n\n"
        + table(rows)
        + "\n\nshipped: model.onnx (the slim fp32 graph) for channels, model.int8.onnx (the slim model's "
        "int8 graph) for channels + int8; masked: the channel job's model with dense shapes and zero filters "
        "(what onnxruntime ran before slimming). Medians of "
        f"{repeats} interleaved runs after 5 warm-ups, one onnxruntime thread. Accuracy over 400 validation "
        "samples (0.25 points each). The rows' runs:\n\n"
        + "\n".join(f"- {c}" for c in dict.fromkeys(conditions(r["machine"]) for r in rows))
        + "\n"
    )
    (out / "table.md").write_text(text)
    plot(rows, out / "latency.png")
    return text


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["convnet"], choices=sorted(MODELS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--recipes", nargs="*", default=["r50-e100-s300"], choices=list(RECIPES))
    ap.add_argument(
        "--int8",
        nargs="*",
        default=[],
        choices=list(RECIPES),
        help="recipes also run with int8 QAT (model.int8.onnx)",
    )
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--append", action="store_true", help="keep the rows already in results.json")
    ap.add_argument(
        "--merge",
        nargs="+",
        default=[],
        metavar="RESULTS_JSON",
        help="train nothing: add the rows of these results.json files (runs made side by side, e.g. one "
        "process per seed with BENCH_OUT set) and rewrite the table",
    )
    args = ap.parse_args(argv)
    global COMMAND
    COMMAND = ".venv/bin/python -m bench.compression.channels " + shlex.join(
        sys.argv[1:] if argv is None else argv
    )
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    log.setLevel(logging.INFO)
    warnings.filterwarnings("ignore")
    # One intra-op thread for training too: on this loaded 2-CPU machine two threads are slower
    # (bench.compression.frontier measured 1.6x), and onnxruntime's timing uses one anyway.
    torch.set_num_threads(1)
    t0 = time.time()
    out = results_dir("compression_channels")
    rows = []
    if args.append and (out / "results.json").exists():
        rows = [_normalise(r) for r in json.loads((out / "results.json").read_text())["rows"]]
    if args.merge:
        for path in args.merge:
            rows += [_normalise(r) for r in json.loads(Path(path).read_text())["rows"]]
        print(write(out, rows, args.repeats, t0))
        return
    with tempfile.TemporaryDirectory() as tmp:
        store = LocalArtifactStore(tmp)
        for model in args.models:
            for seed in args.seeds:
                rows += measure_seed(model, seed, args.recipes, args.int8, args.repeats, store)
                text = write(
                    out, rows, args.repeats, t0
                )  # after every seed: an interrupted run keeps its rows
    print(text)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
