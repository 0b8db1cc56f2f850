"""Wanda: activation-aware pruning (`compression.pruning.criterion: wanda`).

Sun, Liu, Bair & Kolter (2023), "A Simple and Effective Pruning Approach for Large Language
Models": a weight W_ij is worth |W_ij| * ||X_j||_2, where X_j is the j-th input feature of its
layer over calibration data, and weights compete only within their output row i (each row keeps
the same share). Trained language models carry a few input features far larger than the rest
(after LayerNorm gains, GELU): a small weight on such a feature moves the output more than a
large weight on a quiet one, which magnitude alone cannot see.

Statistics: forward pre-hooks on the pruned Linear layers (and transformers' Conv1D) sum the
squares of each input feature and count the rows, over `calibration_batches` training batches
(those of the steps from the mask update on, `Context.inputs`), run in eval mode without
gradients. Each rank measures its share of the batches, and the sums are all-reduced, so every
rank derives the same masks: DDP replicas from the same whole weights, FSDP ranks their own rows
of the same masks, pipeline stages the layers they hold (a layer's sums come from its stage).

Nothing else is kept: the masks (in the pruner's state) are the result; a resumed run that
reaches a later update recalibrates on the same batches with the same weights. Calibration
forwards draw no random numbers (eval mode), so the run's RNG stream is untouched.

`scores`, `row_masks` are pure (tensors in, tensors out); `InputStats` and `Wanda` do the I/O.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from service.errors import ConfigError
from service.spec import PruningSpec
from workers.compression import nm
from workers.compression.protocol import Context

log = logging.getLogger(__name__)


# --- pure --------------------------------------------------------------------------------------


def scores(weight: torch.Tensor, sumsq: torch.Tensor, out_axis: int = 0) -> torch.Tensor:
    """|W_ij| * ||X_j||_2, with ||X_j||_2 = sqrt(sumsq_j) the input feature's norm over the
    calibration rows. `weight` is (out, in) for a Linear, (in, out) for a transformers Conv1D
    (`out_axis` 1)."""
    if weight.dim() != 2:
        raise ValueError(f"wanda scores 2-D weights (Linear, Conv1D); got shape {tuple(weight.shape)}")
    norm = sumsq.detach().double().clamp_min(0).sqrt().float().to(weight.device)
    shape = (1, -1) if out_axis == 0 else (-1, 1)
    return weight.detach().float().abs() * norm.view(shape)


def row_masks(
    score: torch.Tensor, sparsity: float, out_axis: int = 0, alive: torch.Tensor | None = None
) -> torch.Tensor:
    """Keep, in every output row, all but the round(sparsity * width) lowest scores.

    `alive` (the current mask) ranks every live weight above every pruned one, so a mask only
    shrinks; ties keep the lower input index (a stable sort: the same on every rank)."""
    s = score.detach().float().movedim(out_axis, 0)
    rows, width = s.shape
    if s.numel() == 0:
        return torch.ones_like(score, dtype=torch.bool)
    if alive is not None:
        s = torch.where(alive.movedim(out_axis, 0), s, torch.full_like(s, -1.0))
    keep_n = width - round(sparsity * width)
    order = torch.sort(s, dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(width, device=order.device).expand_as(order))
    keep = rank < keep_n
    if alive is not None:
        keep &= alive.movedim(out_axis, 0)
    return keep.movedim(0, out_axis).contiguous()


def masks_for(
    weight: torch.Tensor,
    sumsq: torch.Tensor,
    sparsity: float,
    out_axis: int = 0,
    alive: torch.Tensor | None = None,
    structure: tuple[int, int] | None = None,
) -> torch.Tensor:
    """The wanda mask of one whole weight: per output row, or N:M along the input axis (the
    top N of every M by wanda score) when `structure` is (N, M)."""
    score = scores(weight, sumsq, out_axis)
    if structure is None:
        return row_masks(score, sparsity, out_axis, alive)
    group = structure[1]
    keep = round((1.0 - sparsity) * group)  # a multiple of 1/M (schedules.target_sparsity)
    return nm.nm_mask(score, keep, group, nm.in_axis(2, out_axis), alive)


# --- statistics --------------------------------------------------------------------------------


def in_features(weight: torch.Tensor, out_axis: int) -> int:
    """Width of a weight's input axis (from its global shape: whole, sharded, or a pipeline
    stage's empty placeholder, which keeps the trailing dims)."""
    return int(weight.shape[1 - out_axis])


class InputStats:
    """Per input feature: the sum of squares of the inputs of each named layer, and the count
    of rows (tokens, samples) summed. A context manager: hooks live only inside it."""

    def __init__(self, modules: dict[str, nn.Module], widths: dict[str, int]):
        self.modules = modules  # the layers this rank holds (a pipeline stage: its own)
        self.sumsq = {n: torch.zeros(w, dtype=torch.float64) for n, w in widths.items()}
        self.count = dict.fromkeys(widths, 0.0)
        self._handles: list = []

    def _hook(self, name: str):
        def pre(module, args):
            x = args[0].detach()
            flat = x.reshape(-1, x.shape[-1]).double()
            self.sumsq[name] += flat.pow(2).sum(0).cpu()
            self.count[name] += float(flat.shape[0])

        return pre

    def __enter__(self) -> InputStats:
        self._handles = [m.register_forward_pre_hook(self._hook(n)) for n, m in self.modules.items()]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def all_reduce(self, reduce_sum) -> None:
        """Sum over ranks, in one collective: every rank then holds the same statistics."""
        names = list(self.sumsq)
        flat = torch.cat([self.sumsq[n] for n in names] + [torch.tensor([self.count[n] for n in names])])
        flat = reduce_sum(flat.double())
        pos = 0
        for n in names:
            w = self.sumsq[n].numel()
            self.sumsq[n] = flat[pos : pos + w].clone()
            pos += w
        for i, n in enumerate(names):
            self.count[n] = float(flat[pos + i])


# --- the criterion the pruner calls ------------------------------------------------------------


class Wanda:
    """The masks of a pruner's update, by wanda score (workers.compression.pruning.Pruner)."""

    def __init__(self, ctx: Context, cfg: PruningSpec, weights):
        from workers.compression.pruning import axes_of

        self.ctx, self.cfg, self.weights = ctx, cfg, weights
        self.axes = axes_of(weights)
        if ctx.inputs is None:
            raise ConfigError(
                "compression.pruning.criterion: `wanda` calibrates on training batches held in "
                "memory, and this dataset streams; set data.streaming to off (or criterion magnitude)"
            )
        held = dict(ctx.module.named_modules())
        self.modules = {n: held[n] for n in weights if n in held}
        for n, w in weights.items():
            m = self.modules.get(n)
            kind = type(m).__name__ if m is not None else None
            if w.dim() != 2 or (m is not None and not isinstance(m, nn.Linear) and self.axes[n] == 0):
                raise ConfigError(
                    f"compression.pruning.criterion: `wanda` scores Linear layers' input features; "
                    f"layer {n!r} is a {kind or 'layer'} with a {w.dim()}-D weight; exclude it "
                    "(compression.pruning.exclude) or use criterion magnitude"
                )
        self.last: dict = {}

    def calibrate(self, step: int) -> InputStats:
        """Input statistics over the batches of steps step .. step + calibration_batches - 1."""
        ctx = self.ctx
        widths = {n: in_features(w, self.axes[n]) for n, w in self.weights.items()}
        module = ctx.module
        was_training = module.training
        module.eval()  # no dropout: no random draws, and the statistics of the served model
        try:
            with torch.no_grad(), InputStats(self.modules, widths) as stats:
                for x in ctx.inputs(step, self.cfg.calibration_batches):
                    ctx.strategy.infer(ctx.model, x)
        finally:
            module.train(was_training)
        stats.all_reduce(ctx.dist.all_reduce_sum)  # DDP shares of the batch, pipeline stages
        return stats

    def masks(self, step: int, sparsity: float, current: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """New masks for target `sparsity` at `step` (intersected with `current` by the pruner)."""
        from workers.compression.pruning import _gather_mask, _local, _sharded

        stats = self.calibrate(step)
        structure = self.cfg.nm()
        out = {}
        for n, w in self.weights.items():
            ax = self.axes[n]
            if stats.count[n] == 0:
                raise ConfigError(
                    f"compression.pruning.criterion: `wanda` saw no input reach layer {n!r} over "
                    f"{self.cfg.calibration_batches} calibration batches; exclude it "
                    "(compression.pruning.exclude) or use criterion magnitude"
                )
            if _sharded(w) and ax == 1:
                # FSDP shards dim 0, a Conv1D's input axis: a row spans ranks. The mask is
                # computed on the gathered weight (the same on every rank), each rank keeping
                # its own part of it.
                from torch.distributed.tensor import distribute_tensor

                whole = masks_for(
                    w.detach().full_tensor(),
                    stats.sumsq[n],
                    sparsity,
                    ax,
                    _gather_mask(w, current[n]),
                    structure,
                ).to(torch.uint8)
                local = distribute_tensor(whole, w.device_mesh, w.placements, src_data_rank=None)
                out[n] = local.to_local().to(torch.bool)
                continue
            # Whole rows here (a Linear's dim-0 shards, a pipeline stage's layers; empty
            # placeholders give empty masks).
            out[n] = masks_for(_local(w), stats.sumsq[n], sparsity, ax, current[n], structure)
        rows = int(max(stats.count.values()))  # tokens (or samples) the layers saw
        self.last = {"criterion": "wanda", "calibration_rows": rows}
        log.info("wanda at step %d: masks from %d calibration rows", step, rows)
        return out
