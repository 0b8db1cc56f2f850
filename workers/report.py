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
