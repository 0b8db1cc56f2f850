"""The end of every job: export the trained model, measure the exported artifacts, write the
report. Everything here runs on the final checkpoint, never on a live training process.

Artifacts: `model.safetensors` (the float weights as trained, pruned), `model.onnx` (fp32 graph),
`model.int8.onnx` (`model.int4.onnx` for weight-only 4 bits) when quantized, `model.packed` (the
compressed artifact: what `size.compressed_bytes` measures; it rebuilds the weights the quantized
graph computes with, bit for bit). `report.accuracy` is measured by running the quantized ONNX
model (the fp32 one when not quantized) in onnxruntime over the validation split;
`report.sparsity` and `report.params` are counted on `model.packed` as decoded from the stored
bytes, after checking that the runtime graph holds the same zeros and that no weight pruned in
training came back (ExportError otherwise). `latency_ms.dense` times `model.onnx` (the unpruned
architecture's fp32 graph when channel pruning shipped a smaller model; `size.dense_bytes` is
then that architecture's too), `latency_ms.compressed` the runtime artifact, side by side; when
they are one graph, one measurement fills both keys and `latency_setup.same_artifact` says so.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable

import numpy as np
import onnx
import torch
from safetensors.torch import save as safetensors_save
from torch import nn

from service.artifacts import ArtifactStore, JobArtifacts
from service.errors import ArtifactKeyError, ArtifactNotFound, CheckpointError
from service.spec import JobSpec
from workers import onnx_export, pack, report
from workers.checkpoint import load_latest
from workers.compression import quantization as quant
from workers.compression import registry, weight_sharing
from workers.compression.pruning import prunable_weights
from workers.compression.schedules import pruning_end
from workers.data import Dataset
from workers.models import build_model
from workers.models.folding import fold_batchnorm

log = logging.getLogger(__name__)

CALIBRATION_SAMPLES = 512  # training samples whose activation ranges calibrate ptq / fixed graphs
LATENCY_REPEATS = 50
LATENCY_BATCHES = (1, 64)


def final_model(spec: JobSpec, data: Dataset, store: ArtifactStore, job_id: str, total_steps: int):
    """The model as it finished training (fake-quantized layers included) and its checkpoint."""
    ckpt = load_latest(store, job_id)
    if ckpt is None or ckpt.step != total_steps:
        got = "none" if ckpt is None else f"step {ckpt.step}"
        raise CheckpointError(f"no verified final checkpoint (want step {total_steps}, found {got})")
    model = build_model(spec.model.name, spec.model.args, data.info)
    quant.prepare(model, spec.compression.quantization)
    model.load_state_dict(ckpt.state["model"])
    # Each method's last word on what ships (channel pruning deletes its removed channels).
    model = registry.finalize(spec, model.eval(), data.x_train[:8])
    return model.eval(), ckpt


def float_weights(spec: JobSpec, data: Dataset, model: nn.Module) -> tuple[nn.Module, dict]:
    """A plain registry model holding `model`'s parameters and buffers (no quantizer state)."""
    plain = build_model(spec.model.name, spec.model.args, data.info).eval()
    registry_shapes = _shapes(plain)
    trained = model.state_dict()
    registry.conform(plain, trained)  # a finalized model may be smaller than the registry's
    state = _State((k, trained[k].detach().clone().contiguous()) for k in plain.state_dict())
    state.tied = dict(getattr(plain, "_tied", {}))
    state.reshaped = _shapes(plain) != registry_shapes
    plain.load_state_dict(state)
    return plain, state


class _State(dict):
    """A state dict that knows its tied aliases (alias key -> stored key) and whether a method
    shipped other shapes than the registry builds (channel pruning deletes channels)."""

    tied: dict[str, str]
    reshaped: bool


def _shapes(model: nn.Module) -> dict[str, torch.Size]:
    return {k: v.shape for k, v in model.state_dict().items()}


def deployed_state(state: dict[str, torch.Tensor], qweights: dict) -> dict[str, torch.Tensor]:
    """The weights a quantized model ships: each quantized layer's code * scale, and its other
    float tensors (biases, norms, embeddings) on the float16 grid, which halves their bytes in
    the packed file (the int8 graph requantizes biases to int32 anyway). Accuracy is measured on
    the graph built from exactly these values. A float model ships as trained."""
    if not qweights:
        return dict(state)
    out = {}
    for k, v in state.items():
        half = v.half().float() if v.dtype == torch.float32 else v
        out[k] = half if bool(torch.isfinite(half).all()) else v  # beyond float16's range: as is
    for name, qw in qweights.items():
        out[weight_key(state, name)] = quant.dequantize(qw)
    return out


def weight_key(state: dict, layer: str) -> str:
    """The state-dict key of a layer's weight. A tied weight is stored once, under the other
    name (GPT-2's lm_head.weight is transformer.wte.weight; workers.models.hf)."""
    key = f"{layer}.weight"
    if key in state:
        return key
    for alias, kept in getattr(state, "tied", {}).items():
        if alias == key:
            return kept
    raise CheckpointError(f"layer {layer}: no weight {key} in the model's state")


def _token_contract(model: nn.Module) -> dict:
    """HuggingFace models take token ids of any batch and length up to their position table."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "onnx_max_seq"):
        return {}
    return {
        "shape": ["batch", "seq"],
        "ids": "token ids",
        "vocab_size": int(config.vocab_size),
        "max_positions": int(model.onnx_max_seq),
        "dynamic_axes": ["batch", "seq"],
    }


def _calibration(data: Dataset, batch: int) -> list[np.ndarray]:
    x = data.x_train[:CALIBRATION_SAMPLES].numpy()
    return [x[i : i + batch] for i in range(0, len(x), batch)]


def _dense_accuracy(spec: JobSpec, store: ArtifactStore, own: float) -> tuple[float | None, list[str]]:
    c = spec.compression
    if c.pruning is None and c.clipping is None and c.quantization.mode == "none":
        return own, []  # this job is the dense run
    if c.baseline_job is None:
        return None, []
    try:
        base = JobArtifacts(store, c.baseline_job).get_json("report.json")
        return float(base["accuracy"]), []
    except (ArtifactNotFound, ArtifactKeyError, KeyError, ValueError, TypeError):
        return None, [f"compression.baseline_job {c.baseline_job!r} has no report with an accuracy"]


def export(
    spec: JobSpec,
    data: Dataset,
    store: ArtifactStore,
    job_id: str,
    total_steps: int,
    run_info: dict,
    latency_repeats: int = LATENCY_REPEATS,
    on_verify: Callable[[], None] | None = None,
) -> dict:
    """Write every artifact, verify them against each other, measure them and return the report
    (also written as report.json). `on_verify` is called when writing ends and measuring the
    artifacts begins (the driver's `verifying` phase)."""
    arts = JobArtifacts(store, job_id)
    q = spec.compression.quantization
    model, _ = final_model(spec, data, store, job_id, total_steps)
    plain, state = float_weights(spec, data, model)
    arts.put_bytes("model.safetensors", safetensors_save(state, metadata={"job_id": job_id}))

    qweights = quant.export_weights(model, q) if q.mode != "none" else OrderedDict()
    deployed = deployed_state(state, qweights)
    # What a rebuild needs (the input's shape and normalisation), not the training split's sizes:
    # the header is a visible part of a few-KB artifact.
    info = {k: v for k, v in data.info.to_dict().items() if k not in ("source", "n_train", "n_val")}
    meta = {"model": spec.model.model_dump(), "data_info": info, "job_id": job_id}
    packed = pack.pack(
        deployed,
        meta,
        quantized={weight_key(state, n): qw for n, qw in qweights.items()},
        shared=weight_sharing.shared_layers(spec, deployed),
    )
    arts.put_bytes("model.packed", packed)
    # Decoded from the stored bytes: what ships, and what sparsity and params are counted on.
    rebuilt = pack.rebuild(arts.get_bytes("model.packed"))
    for k, v in rebuilt.state_dict().items():
        if not torch.equal(v, deployed[k]):
            raise CheckpointError(f"packed model does not rebuild {k} exactly")

    # BatchNorm folded into its conv (ResNet): the graph's convs then hold the weights it runs.
    graph_model, _ = fold_batchnorm(plain)
    fp32 = onnx_export.to_onnx(graph_model, data.x_val)
    arts.put_bytes("model.onnx", onnx_export.to_bytes(fp32))
    qinfo: dict = {"mode": q.mode}
    artifact = "model.onnx"
    if qweights:
        # The quantized graph starts from the model the packed file rebuilds: one set of weights.
        extra, runtime_nodes = _quantized_onnx(spec, data, model, rebuilt, qweights, arts, total_steps)
        qinfo.update(extra)
        artifact = qinfo["onnx"]
    else:
        runtime_nodes = onnx_export.layer_nodes(fp32, prunable_weights(graph_model))

    if on_verify:
        on_verify()
    runtime = arts.get_bytes(artifact)
    graph_weights = onnx_export.layer_weights(onnx.load_from_string(runtime), runtime_nodes)
    report.check_shipped_zeros(rebuilt, plain, graph_weights, artifact)
    # One session per graph: with nothing quantized, the runtime artifact *is* model.onnx; with
    # the model's shape unchanged, model.onnx is also the dense reference (below).
    fp32_session = onnx_export.session(arts.get_bytes("model.onnx"))
    runtime_session = fp32_session if artifact == "model.onnx" else onnx_export.session(runtime)
    unpruned = _unpruned(spec, data) if state.reshaped else None
    dense_session = fp32_session
    if unpruned is not None:
        dense_session = onnx_export.session(
            onnx_export.to_bytes(onnx_export.to_onnx(fold_batchnorm(unpruned)[0], data.x_val))
        )
    sessions = {"dense": dense_session, "compressed": runtime_session}
    if fp32_session is not dense_session and fp32_session is not runtime_session:
        sessions["model_onnx"] = fp32_session  # the slim fp32 graph, a deploy candidate of its own
    same_artifact = dense_session is runtime_session
    if qweights:
        qinfo["fp32_onnx_accuracy"] = report.onnx_accuracy(fp32_session, data)["accuracy"]
    artifact_scores = report.onnx_accuracy(sessions["compressed"], data)
    float_scores = report.torch_accuracy(model, data)
    dense_acc, warnings = _dense_accuracy(spec, store, artifact_scores["accuracy"])
    warnings += report.gap_warnings(
        artifact_scores["accuracy"], float_scores["accuracy"], "the PyTorch model's"
    )
    latency = report.latency_table(sessions, data.x_val.numpy(), LATENCY_BATCHES, latency_repeats)
    fp32_accuracy = qinfo.get("fp32_onnx_accuracy", artifact_scores["accuracy"])
    fp32_label = next(k for k, v in sessions.items() if v is fp32_session)
    deploy = report.choose_deploy(
        _deploy_candidates(artifact, latency, fp32_label, fp32_accuracy, artifact_scores["accuracy"]),
        "model.onnx",
    )
    dense = report.dense_bytes(plain if unpruned is None else unpruned)
    rep = {
        "job_id": job_id,
        "name": spec.name,
        "model": spec.model.name,
        "data": data.info.source,
        "precision": spec.precision,
        "strategy": spec.parallel.strategy,
        "workers": spec.parallel.workers,
        "input": {
            "shape": ["N", *data.info.input_shape],
            "dtype": data.info.input_dtype,
            "kind": data.info.kind,
            **_token_contract(plain),
        },
        "accuracy": artifact_scores["accuracy"],
        "accuracy_source": f"{artifact} run in onnxruntime on the validation split",
        "float_accuracy": float_scores["accuracy"],
        "dense_accuracy": dense_acc,
        "val_loss": artifact_scores["loss"],
        # Counted on the decoded model.packed (checked against the runtime graph above); a
        # quantized model may have a few more zeros than it trained with: codes rounded to 0.
        "sparsity": {
            **report.sparsity_of(rebuilt),
            "measured_on": "model.packed",
            "trained_global": report.sparsity_of(plain)["global"],
        },
        "params": {
            **report.param_counts(rebuilt),
            "measured_on": "model.packed",
            # The module exported as model.onnx (BatchNorm folded into its convs), whose layer
            # shapes the quantized graph shares.
            "exported": report.param_counts(graph_model)["total"],
            "exported_measured_on": "the model exported as model.onnx (BatchNorm folded)",
        },
        "flops": report.flops_section(fp32, tuple(data.info.input_shape), "model.onnx"),
        "size": {
            "dense_bytes": dense,
            "compressed_bytes": len(packed),
            "ratio": dense / len(packed),
            "onnx_bytes": len(arts.get_bytes("model.onnx")),
            **({"onnx_quantized_bytes": len(arts.get_bytes(artifact))} if qweights else {}),
        },
        "latency_ms": latency,
        "latency_setup": {
            "runtime": onnx_export.runtime_name(),
            "statistic": f"median of {latency_repeats} runs after 5 warm-up runs"
            + (
                ", one artifact: dense and compressed are one measurement"
                if same_artifact
                else ", interleaved"
            ),
            # model.onnx is the fp32 graph: onnxruntime's dense kernels skip no zeros, so it
            # runs as the unpruned model would, unless a method shipped fewer channels: then
            # the unpruned architecture's own fp32 graph is the reference.
            "dense": "model.onnx" if unpruned is None else UNPRUNED_REFERENCE,
            "compressed": artifact,
            "same_artifact": same_artifact,
            "speedup": None if same_artifact else report.speedups(latency, LATENCY_BATCHES),
        },
        "quantization": qinfo,
        # The fastest artifact that keeps accuracy within report.GAP_WARNING of model.onnx.
        "deploy": deploy,
        "artifacts": {
            "weights": "model.safetensors",
            "onnx": "model.onnx",
            "packed": "model.packed",
            **({"onnx_quantized": artifact} if qweights else {}),
        },
        "warnings": warnings,
        **run_info,
    }
    # Each compression method's own measurements of the shipped model (e.g. N:M compliance).
    for section, part in registry.report_parts(spec, rebuilt).items():
        rep.setdefault(section, {}).update(part)
    if data.info.kind == "tokens":
        rep["perplexity"] = float(np.exp(artifact_scores["loss"]))
    for w in warnings:
        log.warning("job %s: %s", job_id, w)
    arts.put_json("report.json", rep)
    return rep


UNPRUNED_REFERENCE = "the unpruned architecture's fp32 graph (built for timing, not an artifact)"


def _unpruned(spec: JobSpec, data: Dataset) -> nn.Module:
    """The model as the registry builds it, for a job whose method shipped another shape
    (channel pruning deletes channels): "dense" in the report then means this model, not the
    slim model.onnx. Its weights are random: fp32 bytes and the time of onnxruntime's dense
    kernels depend on the shapes only."""
    return build_model(spec.model.name, spec.model.args, data.info).eval()


def _deploy_candidates(
    artifact: str, latency: dict, fp32_label: str, fp32_accuracy: float, accuracy: float
) -> dict:
    """report.choose_deploy's input: model.onnx (timed under `fp32_label`) and the runtime
    artifact, as measured."""
    out = {"model.onnx": {"accuracy": fp32_accuracy, "latency_ms": {}}}
    if artifact != "model.onnx":
        out[artifact] = {"accuracy": accuracy, "latency_ms": {}}
    for b in LATENCY_BATCHES:
        suffix = "" if b == 1 else f"_batch{b}"
        out["model.onnx"]["latency_ms"][b] = latency[f"{fp32_label}{suffix}"]
        if artifact != "model.onnx":
            out[artifact]["latency_ms"][b] = latency[f"compressed{suffix}"]
    return out


def _quantized_onnx(
    spec, data, model, rebuilt, qweights, arts: JobArtifacts, total_steps: int
) -> tuple[dict, dict[str, onnx_export.LayerNode]]:
    """Write the quantized graph of the deployed (`rebuilt`) model; return the report's
    `quantization` details and the graph's node of each layer."""
    q = spec.compression.quantization
    # Folding keeps each layer's trained codes (its scales absorb the BatchNorm): see folding.
    rebuilt, qweights = fold_batchnorm(rebuilt, qweights)
    src = onnx_export.to_onnx(rebuilt, data.x_val)
    weights = prunable_weights(rebuilt)
    nodes = onnx_export.layer_nodes(src, weights)
    info: dict = {"bits": q.bits, "layers": len(qweights)}
    if q.mode in ("qat", "fixed"):
        sched = quant.schedule(q, total_steps, pruning_end(spec))
        info["start_step"] = sched.start
        if q.mode == "qat" and q.bits == 8:
            info["freeze_step"] = sched.freeze_at
    if q.mode == "fixed":
        info["scale"] = q.scale
    if q.codebook_bits is not None:
        info["codebook_bits"] = q.codebook_bits
    info["weights"] = f"int{q.bits} per-output-channel symmetric (zero point 0)"
    if q.bits == 4:
        graph = onnx_export.quantize_weights_only(src, weights, qweights)
        info["activations"] = "float (weight-only int4: DequantizeLinear, float compute)"
    else:
        fq = quant.FakeQuantizer(model, quant.QuantSchedule(0, 0, 0))
        ranges = fq.activation_ranges()
        calib = _calibration(data, spec.train.batch_size)
        graph = onnx_export.quantize_int8(src, weights, qweights, ranges, calib, q.kernels)
        info["activations"] = "uint8 per-tensor affine"
        # how the codes are stored decides which onnxruntime kernels run them (spec field)
        info["kernels"] = {"portable": "portable (uint8 + 128, U8U8)", "vnni": "vnni (int8, U8S8)"}[q.kernels]
        info["activation_ranges"] = {
            "from_qat_observers": sorted(ranges),
            "calibrated_samples": sum(len(b) for b in calib),
        }
        info["input_qparams"] = {n: {"scale": s, "zero_point": z} for n, (s, z) in ranges.items()}
    info["onnx"] = f"model.int{q.bits}.onnx"
    arts.put_bytes(info["onnx"], onnx_export.to_bytes(graph))
    return info, nodes
