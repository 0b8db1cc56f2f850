"""What every parallel strategy provides to the training loop."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from workers.compression.pruning import ReduceSum, prunable_weights


@dataclass
class Dist:
    """This process's place in the job. With world_size 1 no process group is needed."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def active(self) -> bool:
        return self.world_size > 1 and dist.is_available() and dist.is_initialized()

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        if not self.active:
            return t
        out = t.to(self.device).clone()  # NCCL reduces on the GPU; gloo on the CPU
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out.to(t.device)

    def all_gather_object(self, obj) -> list:
        if not self.active:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.active:
            dist.barrier()


LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class Strategy(ABC):
    """How a model is laid out over the job's processes.

    The loop calls `wrap` once, then `forward_backward` every step; the compression code reaches
    the weights through `prunable` and reduces its statistics with `pruner_reduce`, so pruning
    reads the same under every strategy."""

    name: str

    def __init__(self, d: Dist):
        self.dist = d

    @abstractmethod
    def wrap(self, model: nn.Module) -> nn.Module:
        """Distribute `model` (built identically on every rank) and return what to train."""

    @abstractmethod
    def unwrap(self, wrapped: nn.Module) -> nn.Module:
        """The module whose parameters the optimizer and the pruner work on."""

    @abstractmethod
    def forward_backward(
        self, wrapped: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn: LossFn, precision
    ) -> torch.Tensor:
        """Run one step's forward and backward; return this rank's loss (detached, fp32)."""

    def prunable(self, wrapped: nn.Module, exclude: list[str], skip: tuple[str, ...]) -> OrderedDict:
        return prunable_weights(self.unwrap(wrapped), exclude, skip)

    def pruner_reduce(self) -> ReduceSum | None:
        """None when every rank holds whole weights; otherwise a sum across the shard group."""
        return None

    def masks_must_match(self) -> bool:
        """Whether every rank must hold identical masks (replicas) or different ones (shards)."""
        return True

    @abstractmethod
    def full_state_dict(self, wrapped: nn.Module) -> dict[str, torch.Tensor]:
        """The whole model's state on rank 0 (other ranks may return {})."""

    @abstractmethod
    def load_full_state_dict(self, wrapped: nn.Module, state: dict[str, torch.Tensor]) -> None: ...

    @abstractmethod
    def optimizer_state_dict(self, wrapped: nn.Module, opt: torch.optim.Optimizer) -> dict: ...

    @abstractmethod
    def load_optimizer_state_dict(
        self, wrapped: nn.Module, opt: torch.optim.Optimizer, state: dict
    ) -> None: ...
