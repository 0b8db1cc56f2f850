"""Measurements for `report.json`: what the compression cost and bought, measured on artifacts."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from service.errors import ExportError
from workers.compression.pruning import prunable_weights
from workers.data import Dataset

log = logging.getLogger(__name__)

GAP_WARNING = 0.01  # accuracy lost between two forms of one model beyond which the report warns


def param_counts(model: nn.Module) -> dict:
    total = sum(p.numel() for p in model.parameters())
    nonzero = sum(int((p != 0).sum()) for p in model.parameters())
    return {"total": total, "nonzero": nonzero}


def _array(w: torch.Tensor | np.ndarray) -> np.ndarray:
    return w.detach().cpu().numpy() if isinstance(w, torch.Tensor) else np.asarray(w)


def sparsity_from(weights: Mapping[str, torch.Tensor | np.ndarray]) -> dict:
    """Zero fraction of `weights` (float values or integer codes with zero point 0): global and
    per layer."""
    zeros = {n: int(np.count_nonzero(_array(w) == 0)) for n, w in weights.items()}
    sizes = {n: int(_array(w).size) for n, w in weights.items()}
    total = sum(sizes.values())
    return {
        "global": sum(zeros.values()) / total if total else 0.0,
        "layers": {n: zeros[n] / sizes[n] for n in weights},
    }


def sparsity_of(model: nn.Module, names: list[str] | None = None) -> dict:
    """Zero fraction of the prunable (Linear/Conv) weights: global and per layer."""
    weights = prunable_weights(model)
    if names is not None:
        weights = {n: w for n, w in weights.items() if n in names}
    return sparsity_from(weights)


def check_shipped_zeros(
    shipped: nn.Module, trained: nn.Module, runtime: Mapping[str, np.ndarray], runtime_name: str
) -> None:
    """The zeros `report.sparsity` counts in the packed model (`shipped`) are really there:
    - every weight the training left at zero (pruned) is zero in the packed file: a non-zero there
      would be a pruned weight revived by the export (quantization may add zeros by rounding
      small weights to code 0; it may never remove one);
    - the runtime graph (`runtime`: its weights, or integer codes, in torch's orientation) has
      exactly the packed file's zeros, position by position.
    Raises ExportError naming the layer otherwise."""
    packed = {n: _array(w) for n, w in prunable_weights(shipped).items()}
    floats = {n: _array(w) for n, w in prunable_weights(trained).items()}
    if set(packed) != set(floats) or set(packed) != set(runtime):
        raise ExportError(
            f"layers differ: model.packed {sorted(packed)}, trained {sorted(floats)}, "
            f"{runtime_name} {sorted(runtime)}"
        )
    for name, w in packed.items():
        revived = int(np.count_nonzero((floats[name] == 0) & (w != 0)))
        if revived:
            raise ExportError(f"layer {name}: {revived} pruned weight(s) are non-zero in model.packed")
        graph = np.asarray(runtime[name])
        if graph.shape != w.shape:
            raise ExportError(
                f"layer {name}: shape {graph.shape} in {runtime_name}, {w.shape} in model.packed"
            )
        differ = int(np.count_nonzero((graph == 0) != (w == 0)))
        if differ:
            raise ExportError(
                f"layer {name}: {differ} weight(s) are zero in one of {runtime_name} and model.packed "
                "but not in the other"
            )


def dense_bytes(model: nn.Module) -> int:
    """The fp32 size of every parameter: what the uncompressed model costs."""
    return sum(p.numel() * 4 for p in model.parameters())


def score(batches: Iterable[tuple[torch.Tensor, torch.Tensor]], kind: str) -> dict:
    """Accuracy and mean cross-entropy over (logits, targets) batches; for tokens, per token."""
    correct = total = 0
    loss = 0.0
    for logits, y in batches:
        logits = torch.as_tensor(logits).float()
        y = torch.as_tensor(y)
        if kind == "tokens":
            logits, y = logits.reshape(-1, logits.shape[-1]), y.reshape(-1)
        loss += F.cross_entropy(logits, y, reduction="sum").item()
        correct += int((logits.argmax(-1) == y).sum())
        total += y.numel()
    return {"accuracy": correct / total, "loss": loss / total}


@torch.no_grad()
def torch_accuracy(model: nn.Module, data: Dataset, batch: int = 512) -> dict:
    model.eval()
    return score(
        (
            (model(data.x_val[i : i + batch]), data.y_val[i : i + batch])
            for i in range(0, len(data.x_val), batch)
        ),
        data.info.kind,
    )


def onnx_accuracy(sess, data: Dataset, batch: int = 256) -> dict:
    """Run an onnxruntime session over the validation split: the artifact's own accuracy."""
    x = data.x_val.numpy()
    return score(
        (
            (sess.run(None, {sess.get_inputs()[0].name: x[i : i + batch]})[0], data.y_val[i : i + batch])
            for i in range(0, len(x), batch)
        ),
        data.info.kind,
    )


def gap_warnings(accuracy: float, reference: float | None, what: str) -> list[str]:
    """A warning when `accuracy` is more than GAP_WARNING below `reference`."""
    # Rounded: accuracies are ratios of counts, and 0.96 - 0.95 must not count as over 0.01.
    if reference is None or round(reference - accuracy, 9) <= GAP_WARNING:
        return []
    return [
        f"accuracy {accuracy:.4f} of the exported artifact is {100 * (reference - accuracy):.2f} points "
        f"below {what} ({reference:.4f})"
    ]


def latency_table(sessions: dict[str, object], x: np.ndarray, batches: tuple[int, ...], repeats: int) -> dict:
    """{"dense": ms at batch 1, "compressed": ..., "dense_batch64": ..., ...}: the DESIGN keys hold
    batch 1; larger batches get a suffix. Distinct sessions are timed side by side (interleaved,
    see `latency_interleaved`); labels given the same session object share one measurement, so
    an artifact is never raced against itself."""
    from workers.onnx_export import latency_interleaved

    distinct: dict[int, object] = {}
    for sess in sessions.values():
        distinct.setdefault(id(sess), sess)
    out = {}
    for b in batches:
        ms = latency_interleaved(distinct, x, b, repeats)
        for label, sess in sessions.items():
            out[label if b == 1 else f"{label}_batch{b}"] = ms[id(sess)]
    return out


def speedups(latency: dict, batches: tuple[int, ...]) -> dict:
    """dense / compressed latency per batch size ({"batch1": ..., "batch64": ...})."""
    out = {}
    for b in batches:
        suffix = "" if b == 1 else f"_batch{b}"
        out[f"batch{b}"] = latency[f"dense{suffix}"] / latency[f"compressed{suffix}"]
    return out


# --- what the exported model costs to run: parameters and multiply-accumulates -----------------

MAC_OPS = ("Conv", "Gemm", "MatMul")


def _concrete(m, shape: tuple[int, ...] | None):
    """A copy of `m` whose first input has the concrete `shape` (None: every symbolic dimension
    becomes 1), with onnx's shape inference run over it."""
    import onnx

    c = onnx.ModelProto()
    c.CopyFrom(m)
    dims = c.graph.input[0].type.tensor_type.shape.dim
    if shape is not None and len(shape) != len(dims):
        raise ValueError(f"input shape {shape} does not match the graph's {len(dims)} dimensions")
    for i, d in enumerate(dims):
        if shape is not None:
            d.dim_value = int(shape[i])  # setting dim_value clears dim_param
        elif d.dim_param:
            d.dim_value = 1
    return onnx.shape_inference.infer_shapes(c, data_prop=True)


def _shapes(m) -> dict[str, tuple[int, ...]]:
    out = {}
    for vi in [*m.graph.input, *m.graph.value_info, *m.graph.output]:
        dims = vi.type.tensor_type.shape.dim
        if dims and all(d.HasField("dim_value") for d in dims):
            out[vi.name] = tuple(int(d.dim_value) for d in dims)
    for init in m.graph.initializer:
        out[init.name] = tuple(int(d) for d in init.dims)
    return out


def node_macs(
    op: str, inputs: list[tuple[int, ...] | None], output: tuple[int, ...] | None, attrs: dict
) -> int | None:
    """Multiply-accumulates of one Conv / Gemm / MatMul node from its tensors' shapes (None when a
    shape is unknown). Conv: every output element sums over C_in/group x kernel; Gemm and MatMul:
    every output element sums over the shared (K) dimension."""
    if output is None or any(s is None for s in inputs[:2]):
        return None
    out = int(np.prod(output))
    if op == "Conv":
        w = inputs[1]
        return out * int(np.prod(w[1:]))  # w: [C_out, C_in / group, *kernel]
    if op == "Gemm":
        a = inputs[0]
        return out * (a[0] if attrs.get("transA", 0) else a[-1])
    if op == "MatMul":
        return out * inputs[0][-1]
    raise ValueError(f"no MAC count for op {op!r}")


def graph_macs(m, shape: tuple[int, ...] | None = None) -> dict:
    """Multiply-accumulates of one run of ONNX graph `m` on an input of `shape` (batch first;
    None: 1 for every symbolic axis), over its Conv / Gemm / MatMul nodes, which
    hold all but a sliver of the arithmetic (element-wise ops, norms and softmax are not counted).
    `macs_nonzero_weights` counts only the multiply-accumulates whose weight (an initializer) is
    non-zero: what a sparse kernel would have to do; a dense kernel runs all of `macs`.
    Nodes whose shapes onnx cannot infer are named in `uncounted`."""
    from onnx import numpy_helper

    c = _concrete(m, shape)
    shapes = _shapes(c)
    inits = {i.name: i for i in c.graph.initializer}
    total = nonzero = 0
    uncounted = []
    for node in c.graph.node:
        if node.op_type not in MAC_OPS:
            continue
        attrs = {a.name: a.i for a in node.attribute if a.type == a.INT}
        ins = [shapes.get(i) for i in node.input]
        macs = node_macs(node.op_type, ins, shapes.get(node.output[0]), attrs)
        if macs is None:
            uncounted.append(node.name)
            continue
        total += macs
        w = node.input[1] if len(node.input) > 1 else None
        if w in inits:
            arr = numpy_helper.to_array(inits[w])
            # Each weight element takes part in the same number of products: the nonzero
            # fraction of the weight is the fraction of its node's products that remain.
            macs = macs * int(np.count_nonzero(arr)) // max(arr.size, 1)
        nonzero += macs
    return {"macs": int(total), "macs_nonzero_weights": int(nonzero), "uncounted": uncounted}


def flops_section(m, sample_shape: tuple[int, ...], counted_on: str) -> dict:
    """report.flops: MACs (and FLOPs = 2 x MACs) of one sample of `sample_shape` (the input's
    shape without its batch axis) through the exported graph."""
    g = graph_macs(m, (1, *sample_shape))
    return {
        "macs": g["macs"],
        "flops": 2 * g["macs"],
        # Over non-zero weights only: what a sparse kernel would run (onnxruntime's CPU kernels
        # are dense and run `macs`; pruning changes this figure, not the latency).
        "effective_macs_nonzero_weights": g["macs_nonzero_weights"],
        "effective_flops_nonzero_weights": 2 * g["macs_nonzero_weights"],
        "per": f"sample: input [1, {', '.join(str(d) for d in sample_shape)}]",
        "ops": "Conv, Gemm and MatMul multiply-accumulates (element-wise ops, norms, softmax not counted)",
        "counted_on": counted_on,
        **({"uncounted_nodes": g["uncounted"]} if g["uncounted"] else {}),
    }


# --- which artifact to deploy ---------------------------------------------------------------------

# A candidate must be this much faster (geometric mean over the measured batch sizes) than the
# fp32 graph to be worth deploying instead: below it, the difference is within the run-to-run
# spread of a shared machine, and the fp32 graph is the simpler artifact to serve.
DEPLOY_MIN_SPEEDUP = 1.05


def choose_deploy(
    candidates: Mapping[str, Mapping],
    reference: str,
    gate: float = GAP_WARNING,
    min_speedup: float = DEPLOY_MIN_SPEEDUP,
) -> dict:
    """The runtime artifact to deploy: the fastest candidate whose accuracy is at most `gate`
    below the `reference` artifact's (the fp32 graph), and at least `min_speedup` faster than it
    (geometric mean of its speed-ups at each measured batch size); otherwise the reference.
    `candidates`: artifact -> {"accuracy": float, "latency_ms": {batch: ms}}, every candidate
    timed at the same batch sizes. A pure function of the measurements."""
    ref = candidates[reference]
    batches = sorted(ref["latency_ms"])

    def speedup(name: str) -> float:
        lat = candidates[name]["latency_ms"]
        ratios = [ref["latency_ms"][b] / lat[b] for b in batches]
        return float(np.exp(np.mean(np.log(ratios))))

    def fmt(name: str) -> str:
        lat = candidates[name]["latency_ms"]
        return ", ".join(f"batch {b} {ref['latency_ms'][b] / lat[b]:.2f}x" for b in batches)

    ok, refused = [], []
    for name, c in candidates.items():
        if name == reference:
            continue
        lost = round(ref["accuracy"] - c["accuracy"], 9)
        if lost > gate:
            refused.append(f"{name} loses {100 * lost:.2f} points of accuracy (gate {100 * gate:.2f})")
        elif speedup(name) < min_speedup:
            refused.append(f"{name} is not faster ({fmt(name)} vs {reference}; needs {min_speedup:.2f}x)")
        else:
            ok.append(name)
    if ok:
        best = max(ok, key=speedup)
        lost = ref["accuracy"] - candidates[best]["accuracy"]
        why = (
            f"fastest artifact within the accuracy gate: {fmt(best)} vs {reference}, "
            f"accuracy {candidates[best]['accuracy']:.4f} ({-100 * lost:+.2f} points)"
        )
    else:
        best = reference
        why = f"{reference}: " + ("; ".join(refused) if refused else "the only artifact")
    return {"artifact": best, "why": why, "speedup": 1.0 if best == reference else speedup(best)}
