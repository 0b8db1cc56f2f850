"""Compression benchmark on digits: accuracy, size and CPU latency of the exported artifacts.

For `mlp` (LeNet-300-100) and `lenet5`: dense fp32; cubic GMP to 50/75/90/95%; 90% + int8 QAT;
90% + int8 PTQ; 95% + int8 QAT + weight sharing (16 shared codes per layer, Deep Compression's
"packing" stages), and the same at 97% to see where 40x is crossed. Every row is a real job:
`workers.train_loop.train` in this process with a `LocalSession` (no Ray: the numbers are about
compression, not scheduling), then the same `workers.export.export` every job ends with.
Accuracy is the exported ONNX model's, run in onnxruntime over the validation split (359
digits); size and sparsity are the packed artifact's (`report.sparsity`, counted on model.packed);
latency is onnxruntime CPU with one thread, the median of repeated runs of the row's runtime
artifact, timed interleaved with the dense fp32 job's `model.onnx` of the same model and seed: the
speed-up is against that dense baseline (never against the row's own unquantized graph).

    .venv/bin/python -m bench.compression.run [--seeds 0 1 2] [--models mlp lenet5] [--out DIR]

Writes table.md, results.json and accuracy_vs_ratio.png to bench/results/compression/ (committed).

    .venv/bin/python -m bench.compression.run --latency [--latency-models mlp resnet gpt]

runs only the latency rows (`bench/compression/latency.py`: int8 exports against fp32 on models
of millions of parameters, at batch 1 and 64) and replaces only their part of results.json
(`latency`) and table.md, plus int8_speedup.png; the size rows stay as they were measured.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
import warnings
from pathlib import Path

from bench.common import machine, markdown_table, save_json
from bench.compression import latency
from service.artifacts import JobArtifacts, LocalArtifactStore
from service.spec import parse_spec
from workers import export, onnx_export, report
from workers.data import load_dataset
from workers.session import LocalSession
from workers.train_loop import train

log = logging.getLogger("bench.compression")
RESULTS = Path(__file__).resolve().parent.parent / "results" / "compression"  # committed
MODEL_ARGS = {"mlp": {"hidden": [300, 100]}, "lenet5": {}}
EPOCHS = 30  # 22 steps per epoch: 660 steps
PRUNE = {"schedule": "cubic", "start_step": 50, "end_step": 500, "frequency": 25}
QAT = {"mode": "qat", "bits": 8, "start_step": 500}

CONFIGS: list[tuple[str, dict]] = [
    ("dense fp32", {}),
    ("GMP 50%", {"pruning": {**PRUNE, "final_sparsity": 0.5}}),
    ("GMP 75%", {"pruning": {**PRUNE, "final_sparsity": 0.75}}),
    ("GMP 90%", {"pruning": {**PRUNE, "final_sparsity": 0.9}}),
    ("GMP 95%", {"pruning": {**PRUNE, "final_sparsity": 0.95}}),
    ("GMP 90% + int8 QAT", {"pruning": {**PRUNE, "final_sparsity": 0.9}, "quantization": QAT}),
    ("GMP 90% + int8 PTQ", {"pruning": {**PRUNE, "final_sparsity": 0.9}, "quantization": {"mode": "ptq"}}),
    (
        "GMP 95% + int8 QAT + 16 shared codes",
        {"pruning": {**PRUNE, "final_sparsity": 0.95}, "quantization": {**QAT, "codebook_bits": 4}},
    ),
    (  # past the rows: where the Deep Compression bar (40x) is crossed, and at what cost
        "GMP 97% + int8 QAT + 16 shared codes",
        {"pruning": {**PRUNE, "final_sparsity": 0.97}, "quantization": {**QAT, "codebook_bits": 4}},
    ),
]


def spec_for(model: str, compression: dict, seed: int):
    return parse_spec(
        {
            "name": f"bench-{model}",
            "model": {"name": model, "args": MODEL_ARGS[model]},
            "data": {"name": "digits", "val_fraction": 0.2},
            "train": {
                "epochs": EPOCHS,
                "batch_size": 64,
                "optimizer": "sgd",
                "lr": 0.05,
                "momentum": 0.9,
                "weight_decay": 5e-4,
                "lr_schedule": "cosine",
                "seed": seed,
            },
            "compression": compression,
            "checkpoint": {"every_steps": 10_000, "keep": 1},
        }
    )


def _job_id(model: str, seed: int, label: str) -> str:
    return f"{model}-{seed}-{[c for c, _ in CONFIGS].index(label)}"


def against_dense(store, data, model: str, seed: int, job: str, artifact: str, repeats: int) -> dict:
    """Latency (ms, batch 1 and 64) of `job`'s runtime artifact and of the dense fp32 job's
    model.onnx (same model and seed), timed side by side; the dense row is its own baseline."""
    base = _job_id(model, seed, "dense fp32")
    dense = onnx_export.session(JobArtifacts(store, base).get_bytes("model.onnx"))
    ours = dense if job == base else onnx_export.session(JobArtifacts(store, job).get_bytes(artifact))
    return report.latency_table({"dense": dense, "compressed": ours}, data.x_val.numpy(), (1, 64), repeats)


def run_one(store, data, model: str, label: str, compression: dict, seed: int, repeats: int) -> dict:
    spec = spec_for(model, compression, seed)
    job = _job_id(model, seed, label)
    t0 = time.perf_counter()
    summary = train(spec, data, LocalSession(store, job))
    t1 = time.perf_counter()
    rep = export.export(spec, data, store, job, summary["step"], {"steps": summary["step"]}, repeats)
    artifact = rep["accuracy_source"].split()[0]
    lat = against_dense(store, data, model, seed, job, artifact, repeats)
    return {
        "model": model,
        "config": label,
        "seed": seed,
        "accuracy": rep["accuracy"],
        "float_accuracy": rep["float_accuracy"],
        "sparsity": rep["sparsity"]["global"],  # of model.packed
        "dense_bytes": rep["size"]["dense_bytes"],
        "packed_bytes": rep["size"]["compressed_bytes"],
        "ratio": rep["size"]["ratio"],
        "artifact": artifact,
        "artifact_bytes": rep["size"].get("onnx_quantized_bytes", rep["size"]["onnx_bytes"]),
        "latency_b1": lat["compressed"],
        "latency_b64": lat["compressed_batch64"],
        # The dense fp32 job's model.onnx, timed interleaved with this row's artifact.
        "dense_latency_b1": lat["dense"],
        "dense_latency_b64": lat["dense_batch64"],
        "baseline": job == _job_id(model, seed, "dense fp32"),
        "train_s": t1 - t0,
        "export_s": time.perf_counter() - t1,
    }


def summarise(rows: list[dict]) -> list[dict]:
    """Mean over seeds; accuracy change against the dense row of the same seed."""
    dense = {(r["model"], r["seed"]): r["accuracy"] for r in rows if r["config"] == "dense fp32"}
    out = []
    for model in MODEL_ARGS:
        for label, _ in CONFIGS:
            rs = [r for r in rows if r["model"] == model and r["config"] == label]
            if not rs:
                continue

            def mean(key, rs=rs):
                return statistics.fmean(r[key] for r in rs)

            out.append(
                {
                    "model": model,
                    "config": label,
                    "seeds": len(rs),
                    "accuracy": mean("accuracy"),
                    "accuracy_min": min(r["accuracy"] for r in rs),
                    "accuracy_max": max(r["accuracy"] for r in rs),
                    "delta_points": statistics.fmean(
                        100 * (r["accuracy"] - dense[(model, r["seed"])]) for r in rs
                    ),
                    "float_accuracy": mean("float_accuracy"),
                    "sparsity": mean("sparsity"),
                    "packed_bytes": mean("packed_bytes"),
                    "ratio": mean("ratio"),
                    "artifact": rs[0]["artifact"],
                    "artifact_bytes": mean("artifact_bytes"),
                    "latency_b1": statistics.median(r["latency_b1"] for r in rs),
                    "latency_b64": statistics.median(r["latency_b64"] for r in rs),
                    # None for the dense row: it is the baseline, not a second artifact.
                    "speedup_b1": None
                    if rs[0]["baseline"]
                    else statistics.median(r["dense_latency_b1"] / r["latency_b1"] for r in rs),
                    "speedup_b64": None
                    if rs[0]["baseline"]
                    else statistics.median(r["dense_latency_b64"] / r["latency_b64"] for r in rs),
                }
            )
    return out


def table(summary: list[dict]) -> str:
    headers = [
        "model",
        "configuration",
        "artifact accuracy (mean, min-max)",
        "vs dense (points)",
        "PyTorch accuracy (float weights, before int8 and sharing)",
        "sparsity (packed)",
        "packed size (B)",
        "ratio vs dense fp32",
        "runtime artifact",
        "latency b1 / b64 (ms)",
        "speed-up vs dense fp32 job b1 / b64",
    ]
    rows = [
        [
            s["model"],
            s["config"],
            f"{100 * s['accuracy']:.2f}% ({100 * s['accuracy_min']:.2f}-{100 * s['accuracy_max']:.2f})",
            f"{s['delta_points']:+.2f}",
            f"{100 * s['float_accuracy']:.2f}%",
            f"{s['sparsity']:.3f}",
            f"{s['packed_bytes']:,.0f}",
            f"{s['ratio']:.1f}x",
            f"{s['artifact']} ({s['artifact_bytes'] / 1024:,.0f} KiB)",
            f"{s['latency_b1']:.4f} / {s['latency_b64']:.4f}",
            "baseline" if s["speedup_b1"] is None else f"{s['speedup_b1']:.2f}x / {s['speedup_b64']:.2f}x",
        ]
        for s in summary
    ]
    return markdown_table(headers, rows)


# Short point labels for the plot (the table has the full names).
TAGS = {
    "dense fp32": "fp32",
    "GMP 50%": "50%",
    "GMP 75%": "75%",
    "GMP 90%": "90%",
    "GMP 95%": "95%",
    "GMP 90% + int8 QAT": "90% qat",
    "GMP 90% + int8 PTQ": "90% ptq",
    "GMP 95% + int8 QAT + 16 shared codes": "95% qat+16",
    "GMP 97% + int8 QAT + 16 shared codes": "97% qat+16",
}


def plot(summary: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5.5))
    # mlp labels below-right of their points, lenet5 above-left: the two series interleave.
    for model, marker, offset, align in (("mlp", "o", (5, -11), "left"), ("lenet5", "s", (-5, 5), "right")):
        pts = [s for s in summary if s["model"] == model]
        if not pts:
            continue
        ax.errorbar(
            [s["ratio"] for s in pts],
            [100 * s["accuracy"] for s in pts],
            yerr=[
                [100 * (s["accuracy"] - s["accuracy_min"]) for s in pts],
                [100 * (s["accuracy_max"] - s["accuracy"]) for s in pts],
            ],
            fmt=marker,
            capsize=3,
            label=f"{model} (LeNet-300-100)" if model == "mlp" else "lenet5 (LeNet-5)",
        )
        for s in pts:
            ax.annotate(
                TAGS[s["config"]],
                (s["ratio"], 100 * s["accuracy"]),
                fontsize=8,
                xytext=offset,
                ha=align,
                textcoords="offset points",
            )
    ax.axvline(40, color="grey", linestyle=":", linewidth=1)
    ax.text(40, ax.get_ylim()[0], " Deep Compression 40x", fontsize=8, color="grey", va="bottom")
    ax.set_xscale("log")
    ax.set_xlabel("compression ratio (dense fp32 bytes / packed artifact bytes)")
    ax.set_ylabel("accuracy of the exported artifact on digits (%)")
    ax.set_title("slimtrain on digits: accuracy vs compression (onnxruntime, mean over seeds)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=130)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--models", nargs="+", default=list(MODEL_ARGS), choices=list(MODEL_ARGS))
    ap.add_argument(
        "--latency-repeats",
        type=int,
        default=None,
        help="Timed runs per artifact (200; --latency: 30 at batch 1)",
    )
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--replot", action="store_true", help="Redraw the plot from results.json only.")
    ap.add_argument(
        "--latency",
        action="store_true",
        help="Only the latency rows (bench.compression.latency): int8 exports vs fp32 on larger "
        "models; replaces the `latency` part of results.json and table.md, keeps the size rows.",
    )
    ap.add_argument("--latency-models", nargs="+", default=["mlp", "resnet", "gpt"])
    args = ap.parse_args()
    if args.latency:
        args.latency_repeats = args.latency_repeats or 30
        run_latency(args)
        return
    args.latency_repeats = args.latency_repeats or 200
    if args.replot:
        plot(
            json.loads((args.out / "results.json").read_text())["summary"], args.out / "accuracy_vs_ratio.png"
        )
        return
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    log.setLevel(logging.INFO)
    warnings.filterwarnings("ignore")
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        store = LocalArtifactStore(tmp)
        data = load_dataset(spec_for("mlp", {}, 0).data)
        for seed in args.seeds:
            for model in args.models:
                for label, compression in CONFIGS:
                    r = run_one(store, data, model, label, compression, seed, args.latency_repeats)
                    log.info(
                        "%s seed %d %-38s acc %.4f  %7d B  %5.1fx  (train %.1fs, export %.1fs)",
                        model,
                        seed,
                        label,
                        r["accuracy"],
                        r["packed_bytes"],
                        r["ratio"],
                        r["train_s"],
                        r["export_s"],
                    )
                    rows.append(r)
    summary = summarise(rows)
    md = table(summary)
    old = _load(args.out)
    results = {"machine": machine(), "runs": rows, "summary": summary}
    if "latency" in old:
        results["latency"] = old["latency"]
    save_json(args.out / "results.json", results)
    write_table(args.out, results)
    plot(summary, args.out / "accuracy_vs_ratio.png")
    print(md)


def _load(out: Path) -> dict:
    path = out / "results.json"
    return json.loads(path.read_text()) if path.exists() else {}


def write_table(out: Path, results: dict) -> None:
    """table.md: the size rows, then the latency rows, each with its own conditions line."""
    from bench.common import conditions

    parts = []
    if "summary" in results:
        parts += [
            "## Size and accuracy (digits)",
            "",
            conditions(results["machine"]),
            "",
            table(results["summary"]),
        ]
    if "latency" in results:
        lat = results["latency"]
        parts += [
            "",
            "## Latency: int8 exports vs fp32 (bench.compression.latency)",
            "",
            conditions(lat["machine"]),
            "",
            latency.table(lat["rows"]),
        ]
    (out / "table.md").write_text("\n".join(parts) + "\n")


def run_latency(args) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    log.setLevel(logging.INFO)
    latency.log.setLevel(logging.INFO)
    warnings.filterwarnings("ignore")
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        rows = latency.run(args.latency_models, args.latency_repeats, LocalArtifactStore(tmp))
    results = _load(args.out)
    results["latency"] = {
        "machine": machine(),
        "repeats": {"batch1": args.latency_repeats, "batch64": max(5, args.latency_repeats // 3)},
        "wall_seconds": time.perf_counter() - t0,
        "rows": rows,
    }
    save_json(args.out / "results.json", results)
    write_table(args.out, results)
    latency.plot(rows, args.out / "int8_speedup.png")
    print(latency.table(rows))


if __name__ == "__main__":
    main()
