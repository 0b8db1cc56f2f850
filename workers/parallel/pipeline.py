"""Pipeline parallel (`torch.distributed.pipelining`): rank r runs stage r of the model, cut by
`workers.models.stages`; each global batch is split into `pipeline_microbatches` microbatches
that flow through the stages on a GPipe or 1F1B schedule. There is no data parallelism: stage 0
takes the whole global batch, the last stage computes the loss. Streamed data (Ray Data) reaches
those two only: the stages between get `x` and `y` None (workers.data.streaming.reads).

Compression sees the stages as a sharding by layer: every rank's pruner lists all the model's
prunable layers in the model's order, the ones it does not hold as empty placeholders, and its
counts are summed across stages. A global threshold then comes out exactly as on the whole
model, per-layer statistics add up, and every rank takes part in the same collectives.
"""

from __future__ import annotations

import contextlib
import logging
from collections import OrderedDict

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

from workers.compression.pruning import PRUNABLE, selected
from workers.models.stages import cut_stage
from workers.parallel.base import LossFn, Strategy

log = logging.getLogger(__name__)

SCHEDULES = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}
_MAX_DIMS = 8  # activations are sent after a fixed-size header holding their shape
_PER_STAGE = StateDictOptions(full_state_dict=False)


class PipelineStrategy(Strategy):
    name = "pipeline"

    def __init__(self, d, spec=None):
        super().__init__(d, spec)
        self.n_stages, self.index = d.world_size, d.rank
        self.first, self.last = self.index == 0, self.index == self.n_stages - 1
        self._layout: OrderedDict[str, torch.Size] = OrderedDict()
        self._held: set[str] = set()
        self._schedule = None

    # layout

    def wrap(self, model: nn.Module) -> nn.Module:
        if self.n_stages < 2:
            raise ValueError("pipeline parallelism needs at least 2 processes, one per stage")
        self._layout = OrderedDict(
            (name, m.weight.shape) for name, m in model.named_modules() if isinstance(m, PRUNABLE)
        )
        stage = cut_stage(model, self.n_stages, self.index).to(self.dist.device)
        self._held = {name for name, m in stage.named_modules() if isinstance(m, PRUNABLE)}
        log.info(
            "pipeline stage %d/%d: %d parameters",
            self.index,
            self.n_stages,
            sum(p.numel() for p in stage.parameters()),
        )
        return stage

    def unwrap(self, wrapped: nn.Module) -> nn.Module:
        return wrapped

    def data_shard(self) -> tuple[int, int]:
        return 0, 1  # every stage sees the whole batch: stage 0 its inputs, the last its targets

    def prunable(self, wrapped, exclude, skip):
        held = dict(super().prunable(wrapped, exclude, skip))
        out = OrderedDict()
        for name, shape in self._layout.items():
            if not selected(name, exclude, skip):
                continue
            # A layer of another stage: no entries here, its counts arrive through the reduction.
            out[name] = held.get(name, nn.Parameter(torch.empty(0, *shape[1:]), requires_grad=False))
        return out

    def pruner_reduce(self):
        return self.dist.all_reduce_sum

    def masks_must_match(self) -> bool:
        return False

    # training

    def _boundaries(self, wrapped: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Example input and output of this stage for one microbatch, from a forward in eval
        mode. Given to PipelineStage, they spare it its own shape inference, which would run an
        extra training-mode forward on uninitialised activations (and so feed garbage to any
        training-time state, such as QAT's activation observers)."""
        was_training = wrapped.training
        wrapped.eval()
        with torch.no_grad():
            # Only stage 0 has the batch's inputs (streamed, the other stages get x None).
            if self.first:
                h = x[: len(x) // self.spec.parallel.pipeline_microbatches]
            else:
                h = _recv(self.index - 1, self.dist.device)
            out = wrapped(h)
            if not self.last:
                _send(out, self.index + 1)
        wrapped.train(was_training)
        # Activations from the previous stage need their gradient; the batch's inputs do not.
        return h.detach().requires_grad_(not self.first), out.detach().requires_grad_(True)

    def _schedule_for(self, wrapped: nn.Module, x: torch.Tensor, loss_fn: LossFn, precision):
        if self._schedule is None:
            p = self.spec.parallel
            example_in, example_out = self._boundaries(wrapped, x)
            stage = PipelineStage(
                wrapped,
                self.index,
                self.n_stages,
                self.dist.device,
                input_args=(example_in,),
                output_args=(example_out,),
            )

            def stage_loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
                loss = loss_fn(out.float(), target)
                # The schedule runs backward from what this returns: the fp16-scaled loss.
                return precision.scaler.scale(loss) if precision.scaler else loss

            # scale_grads: each microbatch's loss is a mean, so the gradients are divided by
            # the number of microbatches to be the global batch's mean gradient.
            self._schedule = SCHEDULES[p.pipeline_schedule](
                stage, p.pipeline_microbatches, loss_fn=stage_loss, scale_grads=True
            )
        return self._schedule

    def forward_backward(self, wrapped, x, y, loss_fn: LossFn, precision) -> torch.Tensor:
        schedule = self._schedule_for(wrapped, x, loss_fn, precision)
        losses: list[torch.Tensor] = []
        if precision.scaler is not None and not self.last:
            # This stage's gradients arrive already scaled; its scaler needs the (identical)
            # scale to unscale them, which GradScaler only creates in scale().
            precision.scaler.scale(torch.ones((), device=self.dist.device))
        wrapped.autocast = precision.autocast
        try:
            if self.first:
                schedule.step(x)
            elif self.last:
                schedule.step(target=y, losses=losses)
            else:
                schedule.step()
        finally:
            wrapped.autocast = contextlib.nullcontext
        loss = torch.zeros((), device=self.dist.device)
        if self.last:
            loss = torch.stack([x.detach().float() for x in losses]).mean()
            if precision.scaler is not None:  # a power of two, unchanged until the optimizer step
                loss = loss / precision.scaler.get_scale()
        # Every rank reports the batch loss, so the loop's mean over ranks is that loss.
        dist.broadcast(loss, src=self.n_stages - 1)
        return loss.cpu()

    def grad_scaler(self) -> torch.amp.GradScaler:
        return ShardedGradScaler(device=self.dist.device.type)

    @torch.no_grad()
    def infer(self, wrapped, x):
        h = x if self.first else _recv(self.index - 1, self.dist.device)
        out = wrapped(h)
        if self.last:
            return out
        _send(out, self.index + 1)
        return None

    # checkpoints: every stage's part merged on rank 0 into the whole model's

    def _gather(self, part):
        parts = [None] * self.n_stages if self.first else None
        dist.gather_object(part, parts, dst=0)
        return parts

    def full_state_dict(self, wrapped):
        own = {k: v.detach().cpu().clone() for k, v in wrapped.state_dict().items()}
        parts = self._gather(own)
        if not self.first:
            return {}
        merged = {}
        for part in parts:
            merged.update(part)
        return merged

    def load_full_state_dict(self, wrapped, state):
        own = wrapped.state_dict().keys()
        wrapped.load_state_dict({k: state[k] for k in own})

    def optimizer_state_dict(self, wrapped, opt):
        own = get_optimizer_state_dict(wrapped, opt, options=_PER_STAGE)
        own = {"state": {k: _cpu(v) for k, v in own["state"].items()}, "param_groups": own["param_groups"]}
        parts = self._gather(own)
        if not self.first:
            return {}
        return merge_optimizer_states(parts)

    def load_optimizer_state_dict(self, wrapped, opt, state):
        own = {name for name, _ in wrapped.named_parameters()}
        part = {
            "state": {k: v for k, v in state["state"].items() if k in own},
            "param_groups": [
                {**g, "params": [k for k in g["params"] if k in own]} for g in state["param_groups"]
            ],
        }
        set_optimizer_state_dict(wrapped, opt, part, options=_PER_STAGE)

    def gather_masks(self, weights, masks):
        held = {n: m.cpu() for n, m in masks.items() if n in self._held}
        parts = self._gather(held)
        if not self.first:
            return {}
        merged = {}
        for part in parts:
            merged.update(part)
        return {n: merged[n] for n in weights}

    def local_masks(self, weights, full):
        return {
            n: full[n] if n in self._held else torch.ones_like(w, dtype=torch.bool)
            for n, w in weights.items()
        }


def merge_optimizer_states(parts: list[dict]) -> dict:
    """One optimizer state dict (keyed by parameter name) from every stage's: the states side by
    side, each parameter group's names concatenated (hyper-parameters are equal on all stages)."""
    state: dict = {}
    groups: list[dict] = []
    for part in parts:
        state.update(part["state"])
        for i, g in enumerate(part["param_groups"]):
            if i == len(groups):
                groups.append({**g, "params": list(g["params"])})
            else:
                groups[i]["params"].extend(g["params"])
    return {"state": state, "param_groups": groups}


def _cpu(v):
    if isinstance(v, dict):
        return {k: _cpu(x) for k, x in v.items()}
    return v.detach().cpu().clone() if torch.is_tensor(v) else v


def _send(t: torch.Tensor, dst: int) -> None:
    header = torch.zeros(_MAX_DIMS + 1, dtype=torch.int64, device=t.device)
    header[0] = t.dim()
    header[1 : t.dim() + 1] = torch.tensor(t.shape, dtype=torch.int64)
    dist.send(header, dst)
    dist.send(t.contiguous(), dst)


def _recv(src: int, device: torch.device) -> torch.Tensor:
    header = torch.zeros(_MAX_DIMS + 1, dtype=torch.int64, device=device)
    dist.recv(header, src)
    shape = header[1 : int(header[0]) + 1].tolist()
    t = torch.empty(shape, dtype=torch.float32, device=device)
    dist.recv(t, src)
    return t
