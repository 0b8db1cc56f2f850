"""What every parallel strategy provides to the training loop."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from service.spec import JobSpec
from workers.compression.pruning import ReduceSum, _local, prunable_weights


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
    reads the same under every strategy. Where ranks hold different parts of the model (FSDP's
    shards, pipeline stages) the strategy also decides which data each rank sees (`data_shard`),
    how inference runs (`infer`), how gradient norms and fp16 inf checks span ranks, and how
    masks are stored whole in checkpoints (`gather_masks` / `local_masks`)."""

    name: str

    def __init__(self, d: Dist, spec: JobSpec | None = None):
        self.dist = d
        self.spec = spec

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

    def data_shard(self) -> tuple[int, int]:
        """(index, count): this rank takes the index-th of count equal slices of each global batch
        and of the validation set."""
        return self.dist.rank, self.dist.world_size

    @torch.no_grad()
    def infer(self, wrapped: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
        """Logits for `x` (this rank's data shard), or None on ranks that produce none. Every rank
        calls it equally often: a strategy may run collectives inside."""
        return self.unwrap(wrapped)(x)

    def grad_scaler(self) -> torch.amp.GradScaler:
        """The fp16 loss scaler. Where ranks hold different gradients (shards, stages), an inf on
        one rank must skip the step on all of them: such strategies all-reduce the inf flag."""
        return torch.amp.GradScaler(self.dist.device.type)

    def clip_grad_norm_(self, wrapped: nn.Module, max_norm: float) -> torch.Tensor:
        """Scale the gradients so that their global 2-norm is at most `max_norm`; return the norm.
        Where each rank holds part of the gradient, squared norms are summed across ranks first."""
        params = [p for p in self.unwrap(wrapped).parameters() if p.grad is not None]
        reduce = self.pruner_reduce()
        if reduce is None:
            return torch.nn.utils.clip_grad_norm_(params, max_norm)
        grads = [_local(p.grad) for p in params]
        sq = torch.zeros((), dtype=torch.float64)
        if grads:
            sq = torch.stack(torch._foreach_norm(grads)).double().cpu().pow(2).sum()
        total = reduce(sq).sqrt()
        coef = min(1.0, max_norm / (float(total) + 1e-6))
        if coef < 1.0:
            torch._foreach_mul_(grads, coef)
        return total

    def prunable(self, wrapped: nn.Module, exclude: list[str], skip: tuple[str, ...]) -> OrderedDict:
        return prunable_weights(self.unwrap(wrapped), exclude, skip)

    def pruner_reduce(self) -> ReduceSum | None:
        """None when every rank holds whole weights; otherwise a sum across the shard group."""
        return None

    def masks_must_match(self) -> bool:
        """Whether every rank must hold identical masks (replicas) or different ones (shards)."""
        return True

    def gather_masks(
        self, weights: Mapping[str, torch.Tensor], masks: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Whole-layer masks from this rank's part of them (laid out like `weights`), as a
        checkpoint stores them. Called on every rank; the result is needed on rank 0 only."""
        return masks

    def local_masks(
        self, weights: Mapping[str, torch.Tensor], full: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """This rank's part of whole-layer masks, laid out like `weights`."""
        return full

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
