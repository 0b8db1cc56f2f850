"""Latency-centred rows of bench/compression: does int8 pay in onnxruntime on this CPU, and which
int8 export is the fastest one that keeps accuracy?

Three models large enough for the kernels to matter, each trained briefly as a real job
(`workers.train_loop.train` + `workers.export.export`, int8 PTQ, no Ray):
- mlp: digits, hidden [2048, 1024, 512] (2.8 M parameters);
- resnet: CIFAR-style ResNet-8, width 32, on a 32x32 one-channel synthetic set;
- gpt: the built-in character-level transformer, 2 layers, 256 wide, on the stdlib text.

For each, the job's `model.onnx` (fp32) and `model.int8.onnx` (the export default) are timed
side by side (interleaved, one onnxruntime thread) with the other int8 exports onnxruntime offers,
built from the same fp32 graph and the same calibration batches: per-channel vs per-tensor
weights, QDQ vs operator-level (QOperator: QLinearConv / QGemm / QLinearMatMul), static vs
dynamic activations (MatMulInteger / DynamicQuantizeMatMul / ConvInteger), uint8 weights with
zero point 128 (U8U8 kernels) vs int8 weights (U8S8 kernels) and int8 weights on 7 bits
(`reduce_range`). Accuracy is each artifact's own, run over the validation split.

    .venv/bin/python -m bench.compression.run --latency [--repeats 30] [--models mlp resnet gpt]
"""

from __future__ import annotations

import logging
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

from service.artifacts import JobArtifacts
from service.spec import parse_spec
from workers import export, onnx_export, report
from workers.data import load_dataset
from workers.session import LocalSession
from workers.train_loop import train

log = logging.getLogger("bench.compression.latency")

TRAIN = {"optimizer": "adamw", "lr": 0.002, "weight_decay": 0.0, "lr_schedule": "cosine", "seed": 0}
MODELS: dict[str, dict] = {
    "mlp": {
        "model": {"name": "mlp", "args": {"hidden": [2048, 1024, 512]}},
        "data": {"name": "digits", "val_fraction": 0.2},
        "train": {**TRAIN, "epochs": 6, "batch_size": 64},
    },
    "resnet": {
        "model": {"name": "resnet", "args": {"depth": 8, "width": 32}},
        "data": {
            "name": "synthetic",
            "args": {
                "n_samples": 1600,
                "n_features": 1024,
                "n_classes": 10,
                "n_informative": 64,
                "class_sep": 2.0,
                "seed": 0,
            },
            "val_fraction": 0.2,
        },
        "train": {**TRAIN, "epochs": 3, "batch_size": 64},
    },
    "gpt": {
        "model": {"name": "gpt", "args": {"n_layer": 2, "n_head": 4, "n_embd": 256}},
        "data": {"name": "text", "args": {"block_size": 64, "max_chars": 120_000}, "val_fraction": 0.2},
        "train": {**TRAIN, "epochs": 1, "max_steps": 80, "batch_size": 16, "lr": 0.003},
    },
}
BATCHES = (1, 64)

# name -> (format, static?, per_channel, weight type, reduce_range). "default" is model.int8.onnx.
VARIANTS: dict[str, tuple[str, bool, bool, str, bool]] = {
    "QDQ static per-channel U8S8": ("qdq", True, True, "s8", False),
    "QDQ static per-channel U8S8 7-bit weights": ("qdq", True, True, "s8", True),
    "QDQ static per-tensor U8U8": ("qdq", True, False, "u8", False),
    "QDQ static per-tensor U8S8": ("qdq", True, False, "s8", False),
    "QOperator static per-channel U8U8": ("qop", True, True, "u8", False),
    "QOperator static per-channel U8S8": ("qop", True, True, "s8", False),
    "dynamic per-channel U8U8": ("qop", False, True, "u8", False),
    "dynamic per-channel U8S8": ("qop", False, True, "s8", False),
    "dynamic per-tensor U8S8": ("qop", False, False, "s8", False),
}


def spec_for(key: str):
    m = MODELS[key]
    return parse_spec(
        {
            "name": f"bench-latency-{key}",
            "model": m["model"],
            "data": m["data"],
            "train": m["train"],
            "compression": {"quantization": {"mode": "ptq", "bits": 8}},
            "checkpoint": {"every_steps": 100_000, "keep": 1},
        }
    )


def ort_variant(fp32: bytes, calibration: list[np.ndarray], how: tuple, exclude: list[str]) -> bytes:
    """One of onnxruntime's own int8 exports of the fp32 graph (its quantizers, our calibration)."""
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    fmt, static, per_channel, wtype, reduce_range = how
    weight_type = QuantType.QInt8 if wtype == "s8" else QuantType.QUInt8
    with tempfile.TemporaryDirectory() as tmp:
        raw, src, out = Path(tmp) / "raw.onnx", Path(tmp) / "src.onnx", Path(tmp) / "q.onnx"
        raw.write_bytes(fp32)
        quant_pre_process(str(raw), str(src), skip_optimization=True, skip_symbolic_shape=True)
        if static:
            quantize_static(
                str(src),
                str(out),
                onnx_export._Batches(calibration),
                quant_format=QuantFormat.QDQ if fmt == "qdq" else QuantFormat.QOperator,
                op_types_to_quantize=[*onnx_export.QUANTIZED_OPS, "Relu", "MaxPool"],
                nodes_to_exclude=exclude,
                per_channel=per_channel,
                reduce_range=reduce_range,
                activation_type=QuantType.QUInt8,
                weight_type=weight_type,
                calibrate_method=CalibrationMethod.MinMax,
                extra_options={
                    "WeightSymmetric": True,
                    "MatMulConstBOnly": True,
                    "OpTypesToExcludeOutputQuantization": ["Gemm", "MatMul"],
                },
            )
        else:
            quantize_dynamic(
                str(src),
                str(out),
                op_types_to_quantize=list(onnx_export.QUANTIZED_OPS),
                nodes_to_exclude=exclude,
                per_channel=per_channel,
                reduce_range=reduce_range,
                weight_type=weight_type,
                extra_options={"MatMulConstBOnly": True},
            )
        return out.read_bytes()


def kernels(sess_bytes: bytes) -> str:
    """The int8 compute ops onnxruntime runs after its graph fusions (what the CPU executes)."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        opts = ort.SessionOptions()
        opts.optimized_model_filepath = str(Path(tmp) / "opt.onnx")
        opts.log_severity_level = 3
        ort.InferenceSession(sess_bytes, opts, providers=["CPUExecutionProvider"])
        ops = [n.op_type for n in onnx.load(opts.optimized_model_filepath).graph.node]
    int_ops = sorted(
        {o for o in ops if "Integer" in o or o.startswith(("QLinear", "QGemm", "DynamicQuantize"))}
    )
    return ", ".join(int_ops) or "float only"


def measure_model(key: str, store, repeats: int) -> list[dict]:
    spec = spec_for(key)
    data = load_dataset(spec.data)
    job = f"latency-{key}"
    t0 = time.perf_counter()
    summary = train(spec, data, LocalSession(store, job))
    rep = export.export(spec, data, store, job, summary["step"], {"steps": summary["step"]}, 5)
    log.info("%s: trained and exported in %.0f s", key, time.perf_counter() - t0)
    arts = JobArtifacts(store, job)
    fp32 = arts.get_bytes("model.onnx")
    graph = onnx.load_from_string(fp32)
    exclude = [
        n.name for n in graph.graph.node if n.op_type == "MatMul" and _reads_activations_only(graph, n)
    ]
    calib = export._calibration(data, spec.train.batch_size)
    artifacts: dict[str, bytes] = {
        "fp32": fp32,
        "default (model.int8.onnx)": arts.get_bytes("model.int8.onnx"),
    }
    for name, how in VARIANTS.items():
        if key == "resnet" and not how[1] and how[2] is False:
            continue  # ConvInteger per-tensor: the per-channel dynamic row already shows ConvInteger
        try:
            artifacts[name] = ort_variant(fp32, calib, how, exclude)
        except Exception as e:  # a variant onnxruntime cannot build for this graph: say so
            log.warning("%s: %s not built: %s", key, name, e)
    sessions = {}
    for name, b in artifacts.items():
        try:
            sessions[name] = onnx_export.session(b)
        except Exception as e:
            log.warning("%s: %s does not load: %s", key, name, e)
    acc = {name: report.onnx_accuracy(s, data) for name, s in sessions.items()}
    lat = {
        b: onnx_export.latency_interleaved(
            sessions, data.x_val.numpy(), b, repeats if b == 1 else max(5, repeats // 3)
        )
        for b in BATCHES
    }
    params = report.param_counts(
        export.float_weights(spec, data, export.final_model(spec, data, store, job, summary["step"])[0])[0]
    )["total"]
    rows = []
    for name in sessions:
        rows.append(
            {
                "model": key,
                "variant": name,
                "params": params,
                "kernels": kernels(artifacts[name]) if name != "fp32" else "float",
                "bytes": len(artifacts[name]),
                "accuracy": acc[name]["accuracy"],
                "delta_points": 100 * (acc[name]["accuracy"] - acc["fp32"]["accuracy"]),
                "float_accuracy": rep["float_accuracy"],
                **{f"latency_b{b}": lat[b][name] for b in BATCHES},
                **{f"speedup_b{b}": lat[b]["fp32"] / lat[b][name] for b in BATCHES},
            }
        )
    for r in rows:
        log.info(
            "%s %-45s acc %.4f  b1 %.3f ms (%.2fx)  b64 %.2f ms (%.2fx)  %s",
            key,
            r["variant"],
            r["accuracy"],
            r["latency_b1"],
            r["speedup_b1"],
            r["latency_b64"],
            r["speedup_b64"],
            r["kernels"],
        )
    return rows


def _reads_activations_only(m: onnx.ModelProto, node: onnx.NodeProto) -> bool:
    """Attention's q @ k^T and att @ v: both inputs computed, no weight (left in float)."""
    inits = {i.name for i in m.graph.initializer}
    return not any(i in inits for i in node.input)


def run(models: list[str], repeats: int, store) -> list[dict]:
    rows = []
    for key in models:
        rows += measure_model(key, store, repeats)
    return rows


def table(rows: list[dict]) -> str:
    from bench.common import markdown_table

    headers = [
        "model",
        "int8 export (fp32 = model.onnx)",
        "params",
        "kernels after onnxruntime's fusions",
        "accuracy (points vs fp32)",
        "b1 median ms",
        "b64 median ms",
        "speed-up vs fp32 b1 / b64",
    ]
    out = [
        [
            r["model"],
            r["variant"],
            f"{r['params'] / 1e6:.2f} M",
            r["kernels"],
            f"{100 * r['accuracy']:.2f}% ({r['delta_points']:+.2f})",
            f"{r['latency_b1']:.3f}",
            f"{r['latency_b64']:.2f}",
            "baseline" if r["variant"] == "fp32" else f"{r['speedup_b1']:.2f}x / {r['speedup_b64']:.2f}x",
        ]
        for r in rows
    ]
    return markdown_table(headers, out)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in rows))
    variants = [v for v in dict.fromkeys(r["variant"] for r in rows) if v != "fp32"]
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 6), sharey=True, squeeze=False)
    for ax, model in zip(axes[0], models, strict=True):
        got = {r["variant"]: r for r in rows if r["model"] == model}
        names = [v for v in variants if v in got]
        y = np.arange(len(names))
        ax.barh(y - 0.2, [got[v]["speedup_b1"] for v in names], 0.4, label="batch 1")
        ax.barh(y + 0.2, [got[v]["speedup_b64"] for v in names], 0.4, label="batch 64")
        ax.axvline(1.0, color="black", linewidth=1)
        ax.axvline(1.5, color="grey", linestyle=":", linewidth=1)
        ax.set_yticks(y, names, fontsize=7)
        ax.set_title(f"{model} ({got['fp32']['params'] / 1e6:.1f} M params)")
        ax.set_xlabel("speed-up vs fp32 model.onnx (onnxruntime, 1 thread)")
    axes[0][0].legend(loc="lower right")
    fig.suptitle("int8 exports vs fp32 on this CPU (interleaved medians; dotted: the 1.5x target)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def median_of(xs):
    return statistics.median(xs)
