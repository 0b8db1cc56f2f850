"""Parallel strategies, one module each, sharing the training loop and the compression code.
`get_strategy(name)` returns the strategy class for `parallel.strategy`."""

from __future__ import annotations

from workers.parallel.base import Dist, Strategy


def get_strategy(name: str) -> type[Strategy]:
    if name == "ddp":
        from workers.parallel.ddp import DDPStrategy

        return DDPStrategy
    if name == "fsdp":
        from workers.parallel.fsdp import FSDPStrategy

        return FSDPStrategy
    if name == "pipeline":
        from workers.parallel.pipeline import PipelineStrategy

        return PipelineStrategy
    raise ValueError(f"unknown strategy {name!r}")


__all__ = ["Dist", "Strategy", "get_strategy"]
