"""Data parallel: every rank holds the whole model; gradients are averaged by DDP."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from workers.parallel.base import LossFn, Strategy


class DDPStrategy(Strategy):
    name = "ddp"

    def wrap(self, model: nn.Module) -> nn.Module:
        model = model.to(self.dist.device)
        if not self.dist.active:
            return model
        ids = [self.dist.device.index] if self.dist.device.type == "cuda" else None
        # DDP broadcasts rank 0's parameters and buffers at construction: every replica starts equal.
        return DistributedDataParallel(model, device_ids=ids)

    def unwrap(self, wrapped: nn.Module) -> nn.Module:
        return wrapped.module if isinstance(wrapped, DistributedDataParallel) else wrapped

    def forward_backward(self, wrapped, x, y, loss_fn: LossFn, precision) -> torch.Tensor:
        with precision.autocast():
            loss = loss_fn(wrapped(x), y)
        precision.backward(loss)
        return loss.detach().float()

    def full_state_dict(self, wrapped):
        return {k: v.detach().cpu().clone() for k, v in self.unwrap(wrapped).state_dict().items()}

    def load_full_state_dict(self, wrapped, state):
        self.unwrap(wrapped).load_state_dict(state)

    def optimizer_state_dict(self, wrapped, opt):
        return opt.state_dict()

    def load_optimizer_state_dict(self, wrapped, opt, state):
        opt.load_state_dict(state)
