"""Weight clipping: clamp Linear/Conv weights to [-max_abs, max_abs] after every step."""

from __future__ import annotations

import torch
from torch import nn

from service.spec import JobSpec
from workers.compression.protocol import BaseMethod, Context
from workers.compression.pruning import _local


@torch.no_grad()
def clip_weights_(weights: list[nn.Parameter], max_abs: float) -> None:
    # clamp keeps exact zeros at zero, so clipping never undoes a pruning mask.
    for w in weights:
        _local(w).clamp_(-max_abs, max_abs)


class ClippingMethod(BaseMethod):
    """`compression.clipping`: stateless, so nothing to checkpoint."""

    name = "clipping"

    def __init__(self, max_abs: float):
        self.max_abs = max_abs
        self.weights: list[nn.Parameter] = []

    @classmethod
    def from_spec(cls, spec: JobSpec) -> ClippingMethod | None:
        c = spec.compression.clipping
        return None if c is None else cls(c.max_abs)

    def attach(self, ctx: Context) -> None:
        self.weights = list(ctx.strategy.prunable(ctx.model, [], ()).values())

    def after_optimizer_step(self) -> None:
        clip_weights_(self.weights, self.max_abs)
