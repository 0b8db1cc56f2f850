"""Measurements for `report.json`: what the compression cost and bought, measured on artifacts."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from workers.compression.pruning import prunable_weights
from workers.data import Dataset


def param_counts(model: nn.Module) -> dict:
    total = sum(p.numel() for p in model.parameters())
    nonzero = sum(int((p != 0).sum()) for p in model.parameters())
    return {"total": total, "nonzero": nonzero}


def sparsity_of(model: nn.Module, names: list[str] | None = None) -> dict:
    """Zero fraction of the prunable (Linear/Conv) weights: global and per layer."""
    weights = prunable_weights(model)
    if names is not None:
        weights = {n: w for n, w in weights.items() if n in names}
    zeros = {n: int((w == 0).sum()) for n, w in weights.items()}
    sizes = {n: w.numel() for n, w in weights.items()}
    total = sum(sizes.values())
    return {
        "global": sum(zeros.values()) / total if total else 0.0,
        "layers": {n: zeros[n] / sizes[n] for n in weights},
    }


def dense_bytes(model: nn.Module) -> int:
    """The fp32 size of every parameter: what the uncompressed model costs."""
    return sum(p.numel() * 4 for p in model.parameters())


@torch.no_grad()
def torch_accuracy(model: nn.Module, data: Dataset, batch: int = 512) -> dict:
    model.eval()
    correct = total = 0
    loss = 0.0
    for i in range(0, len(data.x_val), batch):
        logits = model(data.x_val[i : i + batch]).float()
        y = data.y_val[i : i + batch]
        if data.info.kind == "tokens":
            logits, y = logits.reshape(-1, logits.shape[-1]), y.reshape(-1)
        loss += F.cross_entropy(logits, y, reduction="sum").item()
        correct += int((logits.argmax(-1) == y).sum())
        total += y.numel()
    return {"accuracy": correct / total, "loss": loss / total}
