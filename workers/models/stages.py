"""Pipeline stages cut from registry models.

A model that can be pipelined lists its forward pass as a chain of named modules
(`pipeline_chain()`): applying the links in order is `forward(x)`. The chain is grouped into
units that each start at a layer with parameters (so no stage is left without any), and the units
are split into contiguous stages that balance parameter counts. A stage is the model with every
module outside its slice removed: its parameters keep the model's own names, so the stages'
state dicts merge into exactly the model's, and checkpoints and exports need no renaming.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from contextlib import AbstractContextManager

from torch import nn

from service.errors import ConfigError

Link = tuple[str, nn.Module]  # (name in the model, or "" for parameter-free glue; module)


def chain_of(model: nn.Module) -> list[Link]:
    chain = getattr(model, "pipeline_chain", None)
    if chain is None:
        raise ConfigError(
            f"parallel.strategy: {type(model).__name__} cannot be split into pipeline stages "
            "(it defines no pipeline_chain()); use ddp or fsdp"
        )
    return chain()


def n_params(links: list[Link]) -> int:
    return sum(p.numel() for _, m in links for p in m.parameters())


def units(chain: list[Link]) -> list[list[Link]]:
    """Group the chain so that each unit starts at a link with parameters; parameter-free links
    (activations, pooling, flatten, the input adapter's buffers) ride with their neighbours."""
    out: list[list[Link]] = []
    for link in chain:
        if not out or (n_params([link]) and n_params(out[-1])):
            out.append([link])
        else:
            out[-1].append(link)
    return out


def partition(costs: list[int], n: int) -> list[int]:
    """Start index of each of `n` contiguous, non-empty parts of `costs` that minimise the largest
    part's sum (ties: the earliest cut). Pure; `n` may not exceed len(costs)."""
    m = len(costs)
    if not 1 <= n <= m:
        raise ValueError(f"cannot cut {m} units into {n} parts")
    prefix = [0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    inf = float("inf")
    # best[k][i]: the smallest largest-part sum of the first i units cut into k parts
    best = [[inf] * (m + 1) for _ in range(n + 1)]
    cut = [[0] * (m + 1) for _ in range(n + 1)]
    best[0][0] = 0
    for k in range(1, n + 1):
        for i in range(k, m + 1):
            for j in range(k - 1, i):
                v = max(best[k - 1][j], prefix[i] - prefix[j])
                if v < best[k][i]:
                    best[k][i], cut[k][i] = v, j
    starts, i = [], m
    for k in range(n, 0, -1):
        i = cut[k][i]
        starts.append(i)
    return starts[::-1]


def max_stages(model: nn.Module) -> int:
    return len(units(chain_of(model)))


def require_stages(model: nn.Module, n: int) -> None:
    """Raise ConfigError (naming parallel.workers) unless `model` can be cut into `n` stages."""
    most = max_stages(model)
    if n > most:
        raise ConfigError(
            f"parallel.workers: {type(model).__name__} splits into at most {most} pipeline "
            f"stages (one per layer with parameters), not {n}"
        )


def stage_links(model: nn.Module, n: int, index: int) -> list[Link]:
    """The links of stage `index` of `n`."""
    require_stages(model, n)
    us = units(chain_of(model))
    starts = partition([n_params(u) for u in us], n)
    ends = [*starts[1:], len(us)]
    return [link for u in us[starts[index] : ends[index]] for link in u]


class Stage(nn.Module):
    """One pipeline stage: the model's own modules for a slice of its chain, under their own names.

    `autocast` is set by the pipeline strategy around training steps; activations leave a stage
    in fp32 because the next stage's receive buffers are sized and typed once, when the pipeline
    first runs, and must not depend on which ops autocast chose."""

    def __init__(self, model: nn.Module, links: list[Link]):
        super().__init__()
        keep = {name for name, _ in links if name}
        for name, child in model.named_children():
            self.add_module(name, child)
        for name, _ in chain_of(model):
            if name and name not in keep:
                parent, _, leaf = name.rpartition(".")
                del (self.get_submodule(parent) if parent else self)._modules[leaf]
        for name, child in list(self.named_children()):
            empty = next(child.parameters(), None) is None and next(child.buffers(), None) is None
            if name not in keep and empty:
                del self._modules[name]
        self.links = [m for _, m in links]
        self.autocast: Callable[[], AbstractContextManager] = contextlib.nullcontext

    def forward(self, x):
        with self.autocast():
            for m in self.links:
                x = m(x)
        return x.float() if x.is_floating_point() else x


def cut_stage(model: nn.Module, n: int, index: int) -> Stage:
    """Stage `index` of `n` of `model`. The model is consumed: its modules move into the stage."""
    return Stage(model, stage_links(model, n, index))
