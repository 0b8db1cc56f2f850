"""ONNX artifacts: the fp32 model, its int8 (or weight-only int4) form, and running them.

- `to_onnx`: torch.export-based exporter (`torch.onnx.export(dynamo=True)`), opset 21, dynamic
  batch axis. Registry models carry normalisation and reshaping inside, so the graph takes the
  raw features (digits: float32 [N, 64]; gpt: int64 tokens [N, T]) and returns logits. Parameter
  names survive as initializer names (a Linear on 3-D input becomes MatMul with a transposed,
  renamed initializer: `layer_nodes` finds those by value).
- `quantize_int8`: onnxruntime's static quantizer (QDQ format, per-channel symmetric weights,
  uint8 activations — what its CPU kernels fuse into QLinearConv/QGemm). The weights are given to
  it as overrides with *our* codes' scales and the inputs of quantized layers with the QAT
  observers' ranges, so the graph computes with exactly the grid the model trained on; the rest
  (conv outputs; every activation under `ptq` / `fixed`) is calibrated on training batches.
  `check_codes` then reads the integer weights back out of the graph and compares them with ours.
  The weight codes (-127..127) are stored as uint8 with zero point 128 (U8U8), not as int8
  (U8S8): on x86 CPUs without VNNI (AVX2, AVX-512F) onnxruntime's U8S8 kernels multiply with
  VPMADDUBSW, which adds two u8*s8 products into a *saturating* int16 (255 * 127 * 2 > 32767), so
  the fused graph silently computed something else than QAT trained (tests/unit/test_export.py's
  digits QAT mlp on an AVX2 CPU: 0.9136 against 0.9248, where the same graph unfused scores
  0.9248). Its U8U8 kernels widen to int16 before multiplying and are exact on every CPU
  (onnxruntime's documented remedy; `WEIGHT_ZERO_POINT`).
  Measured against the other exports onnxruntime offers (bench/compression --latency, onnxruntime
  1.32, AMD EPYC AVX2 without VNNI, one thread): this one is 1.78x fp32 at batch 64 on a 2.8 M mlp
  (5.6x at batch 1: the int8 weights fit the caches), 1.46x on the gpt, 1.22x on a ResNet-8. U8S8
  exports (int8 weights; QDQ or QOperator, static or dynamic) ran a further 1.1-1.8x faster, but
  only because VPMADDUBSW may saturate, so they are not exact on this CPU; 7-bit weights
  (`reduce_range`) would avoid that at the price of re-rounding the QAT codes; dynamic activations
  turn convs into ConvInteger, 2-6x slower than fp32. Per-tensor weights were 0-20% faster than
  per-channel on the same kernels, but would discard the per-channel scales QAT trained. So the
  exact per-channel U8U8 export with the QAT codes and activation ranges stays the default.
  `kernels="vnni"` (spec `quantization.kernels`) stores the same codes as int8 for fleets with
  VNNI or AMX, where U8S8 is exact; there the slim convnet's int8 graph ran 1.5x faster than its
  fp32 graph while the U8U8 one ran slower (bench/compression/channels.py, `-vnni` rows).
- `quantize_weights_only`: int4 (or int8) DequantizeLinear on each weight, float compute:
  onnxruntime has int4 weights (opset 21) but no int4 activation kernels on CPU. Written here
  rather than with onnxruntime's MatMulNBits quantizer, which covers MatMul only (not Gemm or
  Conv) and picks its own block-wise scales instead of the ones we trained with.
"""

from __future__ import annotations

import logging
import tempfile
import threading
import time
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import helper, numpy_helper
from torch import nn

from service.errors import ExportError
from workers.compression.quantization import ACT_QMIN
from workers.pack import QuantizedWeight

log = logging.getLogger(__name__)

OPSET = 21  # int4 DequantizeLinear needs 21
INPUT, OUTPUT = "input", "logits"
QUANTIZED_OPS = ("Conv", "Gemm", "MatMul")
# Symmetric int8 codes c in -127..127 stored as c + 128 in uint8: see the module docstring (U8U8).
WEIGHT_ZERO_POINT = 128
# Ops that pass a quantized tensor on unchanged in range (or clip it at 0, which a uint8 grid
# with zero point 0 does by itself): the range of a layer's input also holds upstream of them.
_PASSTHROUGH = {"Relu", "MaxPool", "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Identity"}


# One export at a time in a process: `warnings.catch_warnings` below is process-wide.
_EXPORT_LOCK = threading.Lock()
# The exporter parses onnxscript's op sources with `ast.parse` on every export, and CPython 3.11
# (3.11.7 here) keeps the AST converter's recursion depth in interpreter-wide state, so any other
# thread parsing at the same moment -- 3.11's traceback formatting parses the failing line to draw
# its carets, so a thread logging an exception is enough -- can fail the export with "SystemError:
# AST constructor recursion depth mismatch" (python/cpython#106905). The lock cannot keep every
# thread out, so a collision is retried: the parse is pure, a second try sees no trace of the
# first (seen in full test runs here, never twice in a row).
_AST_RACE = "AST constructor recursion depth mismatch"
_AST_RACE_TRIES = 4


def to_onnx(model: nn.Module, example: torch.Tensor) -> onnx.ModelProto:
    """Export a float model (eval mode) with a dynamic batch axis."""
    with _EXPORT_LOCK:
        for attempt in range(_AST_RACE_TRIES):
            try:
                return _to_onnx(model, example)
            except Exception as e:
                if not _is_ast_race(e) or attempt == _AST_RACE_TRIES - 1:
                    raise
    raise AssertionError("unreachable")


def _is_ast_race(error: BaseException | None) -> bool:
    """Whether the error, or one it was raised from, is the AST converter's thread race."""
    while error is not None:
        if isinstance(error, SystemError) and _AST_RACE in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False


def _to_onnx(model: nn.Module, example: torch.Tensor) -> onnx.ModelProto:
    model = model.eval()
    batch = torch.export.Dim("batch", min=1, max=1 << 20)
    dims = {0: batch}
    # Token models (HuggingFace's) take any length up to their position table: dynamic too.
    max_len = getattr(model, "onnx_max_seq", None)
    if max_len:
        dims[1] = torch.export.Dim("seq", min=1, max=max_len)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            model,
            (example[:2] if len(example) >= 2 else example,),
            dynamo=True,
            opset_version=OPSET,
            input_names=[INPUT],
            output_names=[OUTPUT],
            dynamic_shapes=(dims,),
            verbose=False,
        )
    return _fold_weight_transposes(program.model_proto)


def warm_up() -> threading.Thread:
    """Pay the exporter's one-time set-up (torch.export and the ONNX translator loading and
    tracing their first graph) in the background while the job trains, so the export phase does
    not. The driver starts it on the worker group's first record, so it never delays the first
    metric. Measured in one process on this 2-CPU machine: a first export of a small mlp 7.6 s and a
    second 1.4-1.9 s at load 5 (6 s against 39 s at load 12, in a Ray driver); after this warm-up
    (4.7 s) the first export took 1.7 s. The driver joins it before exporting: never two exports at
    once (`warnings.catch_warnings` in `to_onnx` is process-wide)."""
    thread = threading.Thread(target=_export_tiny, name="onnx-warm-up", daemon=True)
    thread.start()
    return thread


def _export_tiny() -> None:
    try:
        to_onnx(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)), torch.zeros(2, 4))
    except Exception as e:  # only a head start: the job's own export reports its errors
        log.warning("exporter warm-up failed (the export will pay its set-up): %s", e)


def _fold_weight_transposes(m: onnx.ModelProto) -> onnx.ModelProto:
    """Give every MatMul / Gemm whose weight is `Transpose(initializer)` a pre-transposed
    initializer of its own. The exporter's constant folding stops at a size limit (8192
    elements), so a tied output projection (GPT-2's `lm_head` = `wte`, also read by the
    embedding's Gather) reaches a MatMul through a Transpose node once the model is wider than
    a toy: layer mapping, int8 quantization (initializer weights only) and the zero checks all
    need the weight as an initializer."""
    inits = {i.name: i for i in m.graph.initializer}
    producers = _producers(m)
    for node in m.graph.node:
        if node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2:
            continue
        t = producers.get(node.input[1])
        if t is None or t.op_type != "Transpose" or t.input[0] not in inits:
            continue
        arr = numpy_helper.to_array(inits[t.input[0]])
        perm = next((list(a.ints) for a in t.attribute if a.name == "perm"), None)
        if arr.ndim != 2 or perm not in (None, [1, 0]):
            continue
        name = f"{t.input[0]}.T"
        if name not in inits:
            inits[name] = numpy_helper.from_array(np.ascontiguousarray(arr.T), name)
            m.graph.initializer.append(inits[name])
        node.input[1] = name
    # A Transpose of an initializer that nothing reads any more (nor the graph's outputs) goes.
    used = _consumers(m).keys() | {o.name for o in m.graph.output}
    keep = [
        n
        for n in m.graph.node
        if not (n.op_type == "Transpose" and n.input[0] in inits and n.output[0] not in used)
    ]
    del m.graph.node[:]
    m.graph.node.extend(keep)
    return m


def to_bytes(m: onnx.ModelProto) -> bytes:
    return m.SerializeToString()


# --- mapping torch layers to ONNX nodes ---------------------------------------------------------


@dataclass(frozen=True)
class LayerNode:
    node: str  # name of the Conv / Gemm / MatMul node
    op: str
    weight: str  # initializer name of its weight
    transposed: bool  # the initializer is the torch weight transposed (Linear -> MatMul)
    input: str  # the activation tensor it reads
    axis: int = 0  # output-channel axis of the initializer (what the node computes)


def _init_axis(node: onnx.NodeProto) -> int:
    """The output-feature axis of a node's weight input: Conv's filters are dim 0, MatMul's B is
    (in, out), Gemm's B is (out, in) with transB=1, (in, out) without."""
    if node.op_type == "MatMul":
        return 1
    if node.op_type == "Gemm":
        return 0 if next((a.i for a in node.attribute if a.name == "transB"), 0) else 1
    return 0


def layer_nodes(m: onnx.ModelProto, weights: dict[str, torch.Tensor]) -> dict[str, LayerNode]:
    """The node computing each torch layer (by layer name), found through its weight's values.
    `weights` may say each weight's own output axis (`out_axis`, as prunable_weights does: 1 for
    transformers' Conv1D); whether the initializer is the torch weight transposed follows."""
    torch_axis = getattr(weights, "out_axis", {})
    inits = {i.name: i for i in m.graph.initializer}
    by_value: dict[tuple, tuple[str, bool]] = {}
    for name, w in weights.items():
        arr = w.detach().float().cpu().numpy()
        by_value[(arr.shape, arr.tobytes())] = (name, False)
        if arr.ndim == 2:
            t = np.ascontiguousarray(arr.T)
            by_value.setdefault((t.shape, t.tobytes()), (name, True))
    out: dict[str, LayerNode] = {}
    for node in m.graph.node:
        if node.op_type not in QUANTIZED_OPS or len(node.input) < 2 or node.input[1] not in inits:
            continue
        arr = numpy_helper.to_array(inits[node.input[1]])
        hit = by_value.get((arr.shape, np.ascontiguousarray(arr).tobytes()))
        if hit is None:
            continue
        name, transposed = hit
        axis = _init_axis(node)
        if arr.ndim == 2:
            transposed = axis != torch_axis.get(name, 0)
        out[name] = LayerNode(node.name, node.op_type, node.input[1], transposed, node.input[0], axis)
    missing = sorted(set(weights) - set(out))
    if missing:
        raise ExportError(f"ONNX graph has no node for layer(s) {missing}")
    return out


def _producers(m: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {o: n for n in m.graph.node for o in n.output}


def _consumers(m: onnx.ModelProto) -> dict[str, int]:
    count: dict[str, int] = {}
    for n in m.graph.node:
        for i in n.input:
            count[i] = count.get(i, 0) + 1
    return count


# --- int8: onnxruntime static quantization ------------------------------------------------------


class _Batches:
    """onnxruntime's CalibrationDataReader protocol over in-memory batches."""

    def __init__(self, batches: Iterable[np.ndarray]):
        self._it: Iterator[np.ndarray] = iter(batches)

    def get_next(self):
        x = next(self._it, None)
        return None if x is None else {INPUT: x}

    def rewind(self):  # part of the reader protocol; calibration reads the batches once
        return None


def activation_overrides(
    m: onnx.ModelProto, nodes: dict[str, LayerNode], ranges: dict[str, tuple[float, int]]
) -> dict[str, list[dict]]:
    """Per-tensor overrides for the input of each quantized layer (from QAT observers), carried
    upstream through ops that keep the range (Relu, MaxPool, Reshape...) so the producer's output
    is quantized on the same grid and onnxruntime needs no requantization in between."""
    from onnxruntime.quantization import QuantType

    producers, consumers = _producers(m), _consumers(m)
    out: dict[str, list[dict]] = {}
    for name, (scale, zp) in ranges.items():
        entry = {
            "quant_type": QuantType.QUInt8,
            "scale": np.array(scale, dtype=np.float32),
            "zero_point": np.array(zp, dtype=np.uint8),
        }
        tensor = nodes[name].input
        while True:
            out[tensor] = [dict(entry)]
            p = producers.get(tensor)
            if p is None or p.op_type not in _PASSTHROUGH or consumers.get(p.input[0], 0) != 1:
                break
            if p.op_type == "Relu" and zp != ACT_QMIN:
                break  # the grid does not clip at 0: the Relu must stay
            tensor = p.input[0]
    return out


def weight_overrides(
    nodes: dict[str, LayerNode], q: dict[str, QuantizedWeight], kernels: str = "portable"
) -> dict[str, list[dict]]:
    """Our scales for each quantized weight, stored as uint8 + 128 (`portable`, U8U8) or as int8
    (`vnni`, U8S8): the same codes either way."""
    qtype, zero_point = _weight_storage(kernels)
    out = {}
    for name, qw in q.items():
        ln = nodes[name]
        out[ln.weight] = [
            {
                "axis": ln.axis,
                "quant_type": qtype,
                "scale": np.array(s, dtype=np.float32),
                "zero_point": zero_point,
            }
            for s in qw.scale.float().tolist()
        ]
    return out


def _weight_storage(kernels: str):
    """(onnxruntime QuantType, zero point) of the weight codes for `kernels` (module docstring)."""
    from onnxruntime.quantization import QuantType

    if kernels == "vnni":
        return QuantType.QInt8, np.array(0, dtype=np.int8)
    if kernels != "portable":
        raise ValueError(f"kernels: {kernels!r}; allowed: portable, vnni")
    return QuantType.QUInt8, np.array(WEIGHT_ZERO_POINT, dtype=np.uint8)


def quantize_int8(
    fp32: onnx.ModelProto,
    weights: dict[str, torch.Tensor],
    q: dict[str, QuantizedWeight],
    ranges: dict[str, tuple[float, int]],
    calibration: Iterable[np.ndarray],
    kernels: str = "portable",
) -> onnx.ModelProto:
    """The QDQ int8 graph of `fp32`, whose quantized layers already hold code * scale: our weight
    codes, our activation ranges where we have them (QAT), calibrated ranges (MinMax over
    `calibration`) for the rest. `kernels`: the weights' storage (spec quantization.kernels)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    nodes = layer_nodes(fp32, weights)
    overrides = {**activation_overrides(fp32, nodes, ranges), **weight_overrides(nodes, q, kernels)}
    with tempfile.TemporaryDirectory() as tmp:
        # From a file: given a ModelProto, the quantizer rewrites it in place.
        raw, src, out = Path(tmp) / "raw.onnx", Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        raw.write_bytes(to_bytes(fp32))
        # onnxruntime's recommended preparation: shape inference (its graph optimisation is
        # skipped: it would rename or fold the initializers our overrides are keyed by).
        # onnxruntime's symbolic shape inference gives up on a graph with a dynamic sequence
        # axis as well (BERT's position slice: "unsupported broadcast between Min(32, seq) seq")
        # and then writes its partial model into the working directory: such graphs get onnx's
        # own shape inference only, which is all the QDQ quantizer needs.
        dynamic = sum(bool(d.dim_param) for d in fp32.graph.input[0].type.tensor_type.shape.dim)
        quant_pre_process(str(raw), str(src), skip_optimization=True, skip_symbolic_shape=dynamic > 1)
        quantize_static(
            str(src),
            str(out),
            _Batches(calibration),
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=[*QUANTIZED_OPS, "Relu", "MaxPool"],
            nodes_to_exclude=_float_matmuls(fp32, nodes),
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=_weight_storage(kernels)[0],  # U8U8 unless asked (module docstring)
            calibrate_method=CalibrationMethod.MinMax,
            extra_options={
                "WeightSymmetric": True,
                "ActivationSymmetric": False,
                "MatMulConstBOnly": True,
                # Linear outputs stay float (QGemm / MatMulIntegerToFloat take float out): the
                # next layer quantizes its own input, as in training; logits are never rounded.
                "OpTypesToExcludeOutputQuantization": ["Gemm", "MatMul"],
                # Keep our weight scales even where the int32 bias scale gets small.
                "QDQDisableWeightAdjustForInt32Bias": True,
                "TensorQuantOverrides": overrides,
            },
        )
        model = onnx.load(str(out))
    check_codes(model, nodes, q)
    return model


def _float_matmuls(m: onnx.ModelProto, nodes: dict[str, LayerNode]) -> list[str]:
    """MatMuls that are not one of our layers (attention's q @ k^T, att @ v): left in float."""
    ours = {ln.node for ln in nodes.values()}
    return [n.name for n in m.graph.node if n.op_type == "MatMul" and n.name not in ours]


def _codes(layer: str, dq: onnx.NodeProto, inits: dict[str, onnx.TensorProto]) -> np.ndarray:
    """The signed codes a weight's DequantizeLinear reads: stored value minus zero point (int16).
    Symmetric weights have one zero point (0 for int8/int4, 128 for uint8 storage) on every
    channel, so a code 0 is a weight exactly 0; anything else is refused."""
    arr = np.asarray(numpy_helper.to_array(inits[dq.input[0]]))
    codes = arr.astype(np.int8 if arr.dtype == ml_dtypes.int4 else np.int16).astype(np.int16)
    if len(dq.input) > 2 and dq.input[2]:
        zp = np.unique(numpy_helper.to_array(inits[dq.input[2]]).astype(np.int16))
        if len(zp) != 1:
            raise ExportError(f"layer {layer}: weight zero points differ across channels (not symmetric)")
        codes = codes - zp[0]
    return codes


def check_codes(m: onnx.ModelProto, nodes: dict[str, LayerNode], q: dict[str, QuantizedWeight]) -> None:
    """Every quantized layer of `m` reads exactly our integer codes and scales."""
    inits = {i.name: i for i in m.graph.initializer}
    producers = _producers(m)
    by_name = {n.name: n for n in m.graph.node}
    for name, qw in q.items():
        ln = nodes[name]
        node = by_name.get(ln.node)
        dq = producers.get(node.input[1]) if node is not None else None
        if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] not in inits:
            raise ExportError(f"layer {name}: its weight is not dequantized from integer codes")
        codes = _codes(name, dq, inits)
        scale = numpy_helper.to_array(inits[dq.input[1]]).astype(np.float32)
        want = qw.codes.numpy()
        if ln.transposed:
            want = want.T
        if not (np.array_equal(codes, want) and np.array_equal(scale, qw.scale.float().numpy())):
            raise ExportError(f"layer {name}: the quantized graph's codes differ from the packed ones")


def layer_weights(m: onnx.ModelProto, nodes: dict[str, LayerNode]) -> dict[str, np.ndarray]:
    """Each layer's weight as the graph stores it, in torch's orientation: the float initializer,
    or the signed integer codes its DequantizeLinear reads (stored value minus the one zero point,
    so a zero code is a zero weight). What `report.sparsity` is checked against."""
    inits = {i.name: i for i in m.graph.initializer}
    producers = _producers(m)
    by_name = {n.name: n for n in m.graph.node}
    out = {}
    for name, ln in nodes.items():
        node = by_name.get(ln.node)
        if node is None:
            raise ExportError(f"layer {name}: node {ln.node!r} is not in the graph")
        src = node.input[1]
        if src not in inits:
            dq = producers.get(src)
            if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] not in inits:
                raise ExportError(f"layer {name}: its weight is neither an initializer nor dequantized codes")
            arr = _codes(name, dq, inits)
        else:
            arr = np.asarray(numpy_helper.to_array(inits[src]))
        out[name] = arr.T if ln.transposed else arr
    return out


# --- weight-only (int4) -------------------------------------------------------------------------


def quantize_weights_only(
    fp32: onnx.ModelProto, weights: dict[str, torch.Tensor], q: dict[str, QuantizedWeight]
) -> onnx.ModelProto:
    """Each quantized layer's weight becomes DequantizeLinear(int codes, scale): int4 codes for
    4-bit (stored packed two to a byte by ONNX), int8 otherwise. Compute stays float."""
    nodes = layer_nodes(fp32, weights)
    out = onnx.ModelProto()
    out.CopyFrom(fp32)
    g = out.graph
    by_name = {n.name: n for n in g.node}
    new_inits, dq_nodes = [], []
    for name, qw in q.items():
        ln = nodes[name]
        codes = qw.codes.numpy().astype(np.int8)
        if ln.transposed:
            codes = np.ascontiguousarray(codes.T)
        # ml_dtypes' int4 makes onnx pack two codes per byte (raw data), as the format intends.
        stored = codes.astype(ml_dtypes.int4) if qw.bits == 4 else codes
        base = f"{name}.weight_q"
        new_inits += [
            numpy_helper.from_array(stored, base),
            numpy_helper.from_array(qw.scale.float().numpy(), f"{base}_scale"),
        ]
        dq_nodes.append(
            helper.make_node(
                "DequantizeLinear",
                [base, f"{base}_scale"],  # no zero point: symmetric, 0 by default
                [f"{base}_dq"],
                name=f"{base}_DequantizeLinear",
                axis=ln.axis,
            )
        )
        by_name[ln.node].input[1] = f"{base}_dq"
    used = {i for n in g.node for i in n.input}
    keep = [i for i in g.initializer if i.name in used]
    del g.initializer[:]
    g.initializer.extend(keep + new_inits)
    nodes_sorted = dq_nodes + list(g.node)  # the DQs read initializers only: topological first
    del g.node[:]
    g.node.extend(nodes_sorted)
    onnx.checker.check_model(out)
    check_codes(out, nodes, q)
    return out


# --- running ------------------------------------------------------------------------------------


def session(model: onnx.ModelProto | bytes, threads: int = 1) -> ort.InferenceSession:
    """A CPU session. One intra-op thread by default: latency figures then do not depend on how
    busy the machine's other cores are, and they compare like with like."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    data = model if isinstance(model, bytes) else to_bytes(model)
    return ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])


def predict(sess: ort.InferenceSession, x: np.ndarray, batch: int = 256) -> np.ndarray:
    return np.concatenate([sess.run(None, {INPUT: x[i : i + batch]})[0] for i in range(0, len(x), batch)])


def _batch_of(x: np.ndarray, batch: int) -> np.ndarray:
    reps = -(-batch // len(x))  # x tiled when it has fewer samples
    return np.ascontiguousarray(np.concatenate([x] * reps)[:batch])


def latency_ms(sess: ort.InferenceSession, x: np.ndarray, batch: int, repeats: int, warmup: int = 5) -> float:
    """Median wall time of one `sess.run` on `batch` samples (x tiled when it has fewer)."""
    return latency_interleaved({0: sess}, x, batch, repeats, warmup)[0]


def latency_interleaved(
    sessions: dict, x: np.ndarray, batch: int, repeats: int, warmup: int = 5
) -> dict[object, float]:
    """Median wall time (ms) of one `run` on `batch` samples for each session, measured side by
    side: every repeat runs each session once, in an order that rotates, so a change in the
    machine's load falls on all of them alike instead of on whichever was timed last."""
    feed = {INPUT: _batch_of(x, batch)}
    keys = list(sessions)
    for _ in range(warmup):
        for k in keys:
            sessions[k].run(None, feed)
    times: dict[object, list[float]] = {k: [] for k in keys}
    for r in range(repeats):
        for k in keys[r % len(keys) :] + keys[: r % len(keys)]:
            t0 = time.perf_counter()
            sessions[k].run(None, feed)
            times[k].append(time.perf_counter() - t0)
    return {k: float(np.median(t) * 1e3) for k, t in times.items()}


def runtime_name() -> str:
    return f"onnxruntime {ort.__version__} CPUExecutionProvider, 1 intra-op thread"
