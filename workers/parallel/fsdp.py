"""Fully sharded data parallel (FSDP2, `fully_shard`): every rank holds a dim-0 shard of each
parameter, of its gradient and of its optimizer state, and gathers one block's parameters at a
time for compute.

Compression works on the shards: the pruner sees each weight's local rows (`_local`), sums its
counts across ranks, and keeps masks sharded like their weights; thresholds come out identical
to those of the gathered weights, so DDP and FSDP prune the same entries. Checkpoints hold whole
(gathered) state dicts, so they read the same as DDP's and export needs no change.
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler
from torch.distributed.tensor import DTensor, distribute_tensor

from workers.parallel.ddp import DDPStrategy
from workers.precision import DTYPES

log = logging.getLogger(__name__)

# Gathered to rank 0 and moved to the CPU, one tensor at a time: a checkpoint never needs the
# whole model twice on an accelerator.
GATHER = StateDictOptions(full_state_dict=True, cpu_offload=True)
SCATTER = StateDictOptions(full_state_dict=True)


def shard_units(model: nn.Module) -> list[nn.Module]:
    """The modules sharded as one group each, bottom-up: the items of top-level module lists
    (a GPT's transformer blocks) and every other top-level child with parameters (embedding,
    head; a CNN's feature and classifier stacks). The root takes whatever is left.

    A child holding a tied parameter (GPT-2's wte, which is lm_head's weight) is not a unit: one
    parameter in two groups would be resharded by one while the other computes with it. Its own
    children are considered instead, and the tied modules stay with the root, in one group."""
    seen: set[int] = set()
    tied: set[int] = set()
    for _, p in model.named_parameters(remove_duplicate=False):
        (tied if id(p) in seen else seen).add(id(p))
    out: list[nn.Module] = []

    def visit(module: nn.Module) -> None:
        for child in module.children():
            for part in list(child) if isinstance(child, nn.ModuleList) else [child]:
                params = list(part.parameters())
                if not params:
                    continue
                if any(id(p) in tied for p in params):
                    visit(part)
                else:
                    out.append(part)

    visit(model)
    return out


def mixed_precision(precision: str) -> MixedPrecisionPolicy:
    """Gathered parameters in the compute dtype; gradients reduced in fp32, so the averaged
    gradient a shard's optimizer sees is as exact as DDP's."""
    dtype = DTYPES.get(precision)
    if dtype is None:
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)


def _sharded(t: torch.Tensor) -> bool:
    return isinstance(t, DTensor)


class FSDPStrategy(DDPStrategy):
    """Data parallel like DDP (same batches, same forward/backward), with sharded state."""

    name = "fsdp"

    def wrap(self, model: nn.Module) -> nn.Module:
        model = model.to(self.dist.device)
        if not dist.is_initialized():  # one process, no group: nothing to shard across
            return model
        mesh = init_device_mesh(self.dist.device.type, (dist.get_world_size(),))
        policy = mixed_precision(self.spec.precision if self.spec else "fp32")
        for unit in shard_units(model):
            fully_shard(unit, mesh=mesh, mp_policy=policy)
        fully_shard(model, mesh=mesh, mp_policy=policy)
        return model

    def unwrap(self, wrapped: nn.Module) -> nn.Module:
        return wrapped  # fully_shard changes the module in place; names stay the model's

    def pruner_reduce(self):
        return self.dist.all_reduce_sum

    def masks_must_match(self) -> bool:
        return False

    def grad_scaler(self) -> torch.amp.GradScaler:
        if not dist.is_initialized():
            return super().grad_scaler()
        return ShardedGradScaler(device=self.dist.device.type)

    def gather_masks(self, weights, masks):
        out = {}
        for name, w in weights.items():
            m = masks[name]
            if _sharded(w):
                # gloo gathers no bool tensors: masks travel as bytes
                local = m.to(device=w.device, dtype=torch.uint8)
                full = DTensor.from_local(
                    local, w.device_mesh, w.placements, shape=w.shape, stride=w.stride(), run_check=False
                )
                m = full.full_tensor().to(torch.bool)
            out[name] = m.cpu()
        return out

    def local_masks(self, weights, full):
        out = {}
        for name, w in weights.items():
            m = full[name]
            if _sharded(w):
                # Every rank holds the whole mask: each cuts its own rows, no communication.
                whole = m.to(device=w.device, dtype=torch.uint8)
                m = distribute_tensor(whole, w.device_mesh, w.placements, src_data_rank=None).to_local()
            out[name] = m.to(torch.bool)
        return out

    def full_state_dict(self, wrapped):
        if not dist.is_initialized():
            return super().full_state_dict(wrapped)
        return get_model_state_dict(wrapped, options=GATHER)

    def load_full_state_dict(self, wrapped, state):
        if not dist.is_initialized():
            return super().load_full_state_dict(wrapped, state)
        set_model_state_dict(wrapped, state, options=SCATTER)

    def optimizer_state_dict(self, wrapped, opt):
        if not dist.is_initialized():
            return super().optimizer_state_dict(wrapped, opt)
        return get_optimizer_state_dict(wrapped, opt, options=GATHER)

    def load_optimizer_state_dict(self, wrapped, opt, state):
        if not dist.is_initialized():
            return super().load_optimizer_state_dict(wrapped, opt, state)
        set_optimizer_state_dict(wrapped, opt, state, options=SCATTER)
