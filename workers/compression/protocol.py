"""The one shape of a compression method (pruning, clipping, quantization, and any added later).

The training loop knows no method by name: it asks the registry (workers.compression.registry)
for the methods a spec turns on, in a fixed order, and calls the hooks below on each of them. A
method is built from the whole spec (it may read its neighbours' sections, as quantization reads
when pruning's last mask update falls), changes the plain model before a strategy wraps it
(`convert`), binds to the wrapped model (`attach`), then acts around every step. What it must
keep across a restart is either in the model's own buffers (then `state_key` is None) or in its
`state_dict`, which the checkpoint stores under `state_key` (one key per method, also written as
None when the method is off, so a checkpoint's layout does not depend on the spec).

Order within a step (see workers.train_loop.train_step):

    on_step(step)            the schedule, before the step's batch (mask updates); also once
                             after the last step, whose update shapes the exported model
    before_forward(step)     flags that are a pure function of the step
    forward, backward, unscale
    after_backward()         gradients are real (unscaled): mask them, fold observer ranges
    clip_grad_norm, optimizer step (maybe skipped by the fp16 scaler)
    after_optimizer_step()   unconditionally, also after a skipped step: re-apply masks, clamp
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Protocol, runtime_checkable

import torch
from torch import nn

if TYPE_CHECKING:
    from service.spec import JobSpec
    from workers.parallel import Dist, Strategy


@dataclass
class Context:
    """What `attach` binds a method to: the model as the strategy laid it out, on this rank."""

    spec: JobSpec
    dist: Dist
    strategy: Strategy
    model: nn.Module  # as wrapped by the strategy
    total_steps: int
    # inputs(step, n): this rank's inputs of the n training batches of steps step .. step+n-1,
    # as those steps read them, for a method that calibrates on data (run them through
    # `strategy.infer`). None where the data streams: a stream is read once, by the steps.
    inputs: Callable[[int, int], Iterator[torch.Tensor]] | None = None

    @property
    def module(self) -> nn.Module:
        return self.strategy.unwrap(self.model)


@runtime_checkable
class Method(Protocol):
    name: ClassVar[str]  # its section of `compression` in the spec
    state_key: ClassVar[str | None]  # its key in a checkpoint's state (None: nothing to keep)

    @classmethod
    def from_spec(cls, spec: JobSpec) -> Method | None:
        """The method a spec asks for, or None when its section is off."""

    def convert(self, model: nn.Module) -> None:
        """Change the plain model in place, before any strategy wraps, shards or splits it."""

    def attach(self, ctx: Context) -> None:
        """Bind to the wrapped model (after `convert` on every rank)."""

    def on_step(self, step: int, optimizer: torch.optim.Optimizer) -> dict | None:
        """The schedule at `step`, on every rank (it may hold collectives); returns an event
        record for rank 0 to report when it changed something, else None."""

    def before_forward(self, step: int) -> None: ...

    def after_backward(self) -> None: ...

    def after_optimizer_step(self) -> None: ...

    def start_part(self) -> dict:
        """Keys for the run's start event (e.g. the whole schedule, for charts)."""

    def train_part(self, step: int) -> dict:
        """Keys for a train record at `step` (steps done), on every rank: measuring may be a
        collective; only rank 0's result is reported."""

    def state_dict(self) -> dict | None:
        """What exact resume needs beyond the model, optimizer and RNG; called on every rank
        (it may gather), used from rank 0. None when `state_key` is None."""

    def load_state_dict(self, state: dict | None) -> None:
        """Restore from a checkpoint's `state[state_key]` (whole, as rank 0 saved it)."""

    @classmethod
    def report_part(cls, spec: JobSpec, model: nn.Module) -> dict[str, dict]:
        """Keys this method adds to report.json, by section, measured on the exported `model`."""

    @classmethod
    def finalize(cls, spec: JobSpec, model: nn.Module, example: torch.Tensor) -> nn.Module:
        """The trained model (eval mode, as the final checkpoint rebuilds it) as it ships: called
        once by the export before anything is written (`example`: a few training inputs)."""

    @classmethod
    def conform(cls, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        """Give a freshly built registry model the structure of a `state` saved from a model
        `finalize` changed (shapes), in place, before the state is loaded into it."""


class BaseMethod:
    """No-op hooks, so a method writes only those it needs."""

    name: ClassVar[str] = ""
    state_key: ClassVar[str | None] = None

    def convert(self, model: nn.Module) -> None:
        return None

    def attach(self, ctx: Context) -> None:
        return None

    def on_step(self, step: int, optimizer: torch.optim.Optimizer) -> dict | None:
        return None

    def before_forward(self, step: int) -> None:
        return None

    def after_backward(self) -> None:
        return None

    def after_optimizer_step(self) -> None:
        return None

    def start_part(self) -> dict:
        return {}

    def train_part(self, step: int) -> dict:
        return {}

    def state_dict(self) -> dict | None:
        return None

    def load_state_dict(self, state: dict | None) -> None:
        return None

    @classmethod
    def report_part(cls, spec: JobSpec, model: nn.Module) -> dict[str, dict]:
        return {}

    @classmethod
    def finalize(cls, spec: JobSpec, model: nn.Module, example: torch.Tensor) -> nn.Module:
        return model

    @classmethod
    def conform(cls, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        return None
