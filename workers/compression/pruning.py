"""Magnitude pruning with masks that every rank agrees on and no optimizer can undo.

Masks are hard: the pruned entries of a weight are multiplied by zero after every optimizer step
(including steps the fp16 GradScaler skipped), their gradients are zeroed before the step, and
the optimizer's running state (momentum, Adam moments) is zeroed at pruned positions when masks
change, so neither momentum nor weight decay can revive a pruned weight.

A threshold is the exact k-th smallest (float32) score. Where a rank holds the whole tensors a
threshold spans (single process, DDP, a pipeline stage's own layers under layer scope) it is
selected locally in one pass (`kth_smallest_local`). Where they are spread over ranks (FSDP
shards, a global threshold over several pipeline stages) a bisection over the scores' bit
patterns finds it without gathering them, each of its ~31 probes a count summed across ranks
with `reduce_sum` (`kth_smallest_bisect`). Both return the same number, so every strategy
derives the same masks from the same weights.
"""

from __future__ import annotations

import fnmatch
import logging
import math
import sys
import zlib
from collections import OrderedDict
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from service.errors import ConfigError, MaskMismatchError
from service.spec import JobSpec, PruningSpec
from workers.compression import nm, schedules
from workers.compression.protocol import BaseMethod, Context

log = logging.getLogger(__name__)

PRUNABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
ReduceSum = Callable[[torch.Tensor], torch.Tensor]


def _local(t: torch.Tensor) -> torch.Tensor:
    """The part of a (possibly sharded DTensor) parameter that lives on this rank."""
    return t.to_local() if hasattr(t, "to_local") else t


def _sharded(t: torch.Tensor) -> bool:
    """Whether `t` is spread over ranks (an FSDP DTensor). Every other parameter a strategy
    hands the pruner is whole on the rank that holds it (pipeline stages hold whole layers, and
    empty placeholders for the other stages' ones)."""
    return hasattr(t, "to_local")


def _hf_conv1d() -> type | None:
    """transformers' Conv1D (GPT-2), when transformers is loaded: a Linear whose weight is stored
    (in, out). Looked up, never imported: a model holding one has imported it already."""
    mod = sys.modules.get("transformers.pytorch_utils")
    return getattr(mod, "Conv1D", None)


def is_prunable(module: nn.Module) -> bool:
    conv1d = _hf_conv1d()
    return isinstance(module, PRUNABLE) or (conv1d is not None and isinstance(module, conv1d))


def out_axis(module: nn.Module) -> int:
    """The weight's output-feature axis: 1 for transformers' Conv1D (stored (in, out)), else 0."""
    conv1d = _hf_conv1d()
    return 1 if conv1d is not None and isinstance(module, conv1d) else 0


class LayerWeights(OrderedDict):
    """Prunable weights by layer name, with each weight's output axis (`out_axis`, 0 unless the
    layer stores its weight (in, out)): what channel pruning and quantization cut along."""

    out_axis: dict[str, int]


def prunable_weights(model: nn.Module, exclude: list[str] = (), skip: tuple[str, ...] = ()) -> LayerWeights:
    """Weights of Linear and Conv layers (and transformers' Conv1D), by module name. Biases and
    norms are never pruned. A weight shared by two layers (tied embeddings) is listed once."""
    out = LayerWeights()
    out.out_axis = {}
    seen: set[int] = set()
    for name, module in model.named_modules():
        if is_prunable(module) and selected(name, exclude, skip) and id(module.weight) not in seen:
            seen.add(id(module.weight))
            out[name] = module.weight
            out.out_axis[name] = out_axis(module)
    return out


def batchnorm_after(parent: nn.Module, child: str) -> tuple[str, nn.Module] | None:
    """(name, module) of the BatchNorm right after `child` in the Sequential `parent`: the one
    that normalizes its output channels; None when none follows it there."""
    if not isinstance(parent, nn.Sequential):
        return None
    order = list(parent._modules)
    i = order.index(child) + 1
    if i < len(order) and isinstance(parent._modules[order[i]], nn.modules.batchnorm._BatchNorm):
        return order[i], parent._modules[order[i]]
    return None


def channel_followers(model: nn.Module, names) -> dict[str, list[nn.Parameter]]:
    """For each conv among `names` (layers whose output channels `structure: channel` prunes):
    the per-channel parameters masked with its filters, its bias and, where a BatchNorm follows
    it in the same Sequential, that BatchNorm's scale and shift (`channel_slim` slims the same
    pairs). Why: a filter removed with its bias kept still outputs a constant, and the next
    padded conv turns a constant into a map (zero padding at the border) that export must add
    after that conv (`channel_slim.Offset`): an extra pass over the activations that also stops
    onnxruntime fusing the conv with its ReLU: 1.28x the slim convnet's batch-64 time
    (bench/compression/widths.py, "offset maps"). Zeroed with its filter, the channel outputs
    zero through ReLU (or any activation with f(0) = 0) and leaves nothing to add."""
    wanted = set(names)
    out: dict[str, list[nn.Parameter]] = {}
    for parent_name, parent in model.named_modules():
        for child, m in parent.named_children():
            name = f"{parent_name}.{child}" if parent_name else child
            if name not in wanted or not isinstance(m, PRUNABLE) or m.weight.dim() < 3:
                continue
            params = [m.bias] if m.bias is not None else []
            after = batchnorm_after(parent, child)
            if after is not None and after[1].affine:
                params += [after[1].weight, after[1].bias]
            if params:
                out[name] = params
    return out


def axes_of(weights) -> dict[str, int]:
    """Output axis of each weight (0 where the mapping does not say)."""
    given = getattr(weights, "out_axis", {})
    return {n: given.get(n, 0) for n in weights}


def selected(name: str, exclude: list[str] = (), skip: tuple[str, ...] = ()) -> bool:
    """Whether the prunable layer `name` is pruned: not skipped, matching no `exclude` pattern."""
    return name not in skip and not any(fnmatch.fnmatchcase(name, pat) for pat in exclude)


# --- thresholds (pure) --------------------------------------------------------------------------


def kth_smallest(
    scores: list[torch.Tensor],
    k: float,
    weights: list[torch.Tensor] | None = None,
    reduce_sum: ReduceSum | None = None,
) -> float:
    """Smallest tau with sum(weight * [score <= tau]) >= k, over non-negative float32 scores
    (`weights` default to 1). `reduce_sum` sums counts across the ranks that share the scores;
    without it the scores are all here and the threshold is selected locally."""
    if reduce_sum is None:
        return kth_smallest_local(scores, k, weights)
    return kth_smallest_bisect(scores, k, weights, reduce_sum)


def kth_smallest_local(
    scores: list[torch.Tensor], k: float, weights: list[torch.Tensor] | None = None
) -> float:
    """`kth_smallest` of scores that are all on this rank, by a two-pass radix selection.

    Counts (or weights) are histogrammed by the high 16 bits of the float32 bit patterns, the
    bucket where the running count reaches k is found, and its members are histogrammed by the
    low 16 bits: two passes, whatever the ties. Selections that compare values degrade on the
    runs of exact zeros that pruning leaves (numpy's introselect took 25-37 ms instead of 3 on
    0.8 M scores with 78-90% zeros; torch.kthvalue 6-15 ms; this 5-7 ms; the bisection 50-100).

    Returns exactly what `kth_smallest_bisect` returns, as it counts the same bit patterns:
    negative patterns (which non-negative scores never have) count as at or below every tau,
    NaN never does, k <= 0 gives 0.0, and a k beyond the finite scores +inf. Weighted counts are
    exact while the weights are whole numbers (fan-ins), as in the bisection."""
    if k <= 0:
        return 0.0
    bits = torch.cat([s.detach().float().reshape(-1) for s in scores]).view(torch.int32)
    bits = bits.clamp_min(0)
    w = None
    if weights is not None:
        w = torch.cat([x.detach().double().reshape(-1) for x in weights]).to(bits.device)
    target = torch.tensor([float(k)], dtype=torch.float64, device=bits.device)
    high = bits >> 16
    counts = torch.bincount(high, weights=w, minlength=1 << 15).double().cumsum(0)
    j = int(torch.searchsorted(counts, target))
    if j >= counts.numel():
        return math.inf
    below = float(counts[j - 1]) if j else 0.0
    members = high == j
    w2 = None if w is None else w[members]
    low = torch.bincount(bits[members] & 0xFFFF, weights=w2, minlength=1 << 16).double().cumsum(0)
    i = int(torch.searchsorted(low, target - below))
    tau_bits = (j << 16) | i
    if tau_bits > 0x7F800000:  # past +inf: the k-th pattern is a NaN, which never counts
        return math.inf
    return float(torch.tensor(tau_bits, dtype=torch.int32).view(torch.float32))


def kth_smallest_bisect(
    scores: list[torch.Tensor],
    k: float,
    weights: list[torch.Tensor] | None = None,
    reduce_sum: ReduceSum | None = None,
) -> float:
    """`kth_smallest` by bisection on the float32 bit pattern (monotonic for non-negative
    floats): exact in at most 32 probes, each a pass over the scores and, with `reduce_sum`, a
    count summed across ranks, so shards find the global threshold without being gathered."""
    bits = [s.detach().float().contiguous().view(torch.int32) for s in scores]
    w = [None] * len(bits) if weights is None else [x.double() for x in weights]

    # The count lives where the scores do: NCCL reduces only GPU tensors, and adding a GPU sum
    # into a CPU tensor in place is a device error (found by bench.gpu_check on an H200).
    device = bits[0].device if bits else torch.device("cpu")

    def count(tau_bits: int) -> float:
        c = torch.zeros((), dtype=torch.float64, device=device)
        for b, wt in zip(bits, w, strict=True):
            sel = b <= tau_bits
            c += sel.sum() if wt is None else wt[sel].sum()
        return float(reduce_sum(c) if reduce_sum else c)

    lo, hi = 0, 0x7F800000  # 0.0 .. +inf
    while lo < hi:
        mid = (lo + hi) // 2
        if count(mid) >= k:
            hi = mid
        else:
            lo = mid + 1
    return float(torch.tensor(lo, dtype=torch.int32).view(torch.float32))


def _group_reduce(
    weights: dict[str, torch.Tensor], names: list[str], scope: str, reduce_sum: ReduceSum | None
) -> ReduceSum | None:
    """The reduction a threshold over `names` needs: none where this rank holds all of it.

    Under layer scope an unsharded layer is whole here or wholly elsewhere (pipeline), so its
    threshold is local; a global threshold with a reduction spans other ranks' layers. The
    choice depends only on the strategy and the scope, so every rank makes the same one and the
    ranks' collectives stay in step."""
    if reduce_sum is None:
        return None
    if scope == "layer" and not any(_sharded(weights[n]) for n in names):
        return None
    return reduce_sum


Sparsity = float | dict[str, float]
"""One target for every layer, or (layer scope) each layer's own: `Pruner.layer_targets`."""


def _target(sparsity: Sparsity, name: str) -> float:
    return sparsity[name] if isinstance(sparsity, dict) else sparsity


def unstructured_masks(
    weights: dict[str, torch.Tensor], sparsity: Sparsity, scope: str, reduce_sum: ReduceSum | None = None
) -> dict[str, torch.Tensor]:
    """Keep |w| > tau, tau the k-th smallest |w| with k = round(sparsity * n)."""
    scores = {n: _local(w).detach().abs() for n, w in weights.items()}
    groups = [list(scores)] if scope == "global" else [[n] for n in scores]
    masks = {}
    for names in groups:
        n_total = _total([scores[n].numel() for n in names], reduce_sum)
        k = round(_target(sparsity, names[0]) * n_total)
        if k <= 0:
            masks.update({n: torch.ones_like(scores[n], dtype=torch.bool) for n in names})
            continue
        red = _group_reduce(weights, names, scope, reduce_sum)
        tau = kth_smallest([scores[n] for n in names], k, reduce_sum=red)
        masks.update({n: scores[n] > tau for n in names})
    return masks


def channel_masks(
    weights: dict[str, torch.Tensor],
    sparsity: Sparsity,
    scope: str,
    reduce_sum: ReduceSum | None = None,
    axes: dict[str, int] | None = None,
    units: dict[str, torch.Tensor] | None = None,
    multiple: int = 1,
) -> dict[str, torch.Tensor]:
    """Prune whole output channels (rows of a Linear, filters of a Conv, columns of a
    transformers Conv1D: `axes` gives each weight's output axis) by RMS norm.

    RMS (L2 / sqrt(fan-in)) rather than L2 makes channels of layers with different fan-in
    comparable under global scope; the target counts weights, so a channel weighs its size.
    Every layer keeps at least its strongest channel. `units` (layer -> unit id of each output
    channel) prunes channels in units, all or none, scored by the unit's RMS: whole attention
    heads of a fused qkv (workers.compression.channel_slim.channel_plan), so that export can
    delete them. `multiple`: each layer's kept channels are then rounded up to a multiple of it
    (its next-strongest channels come back), as kernels compute channels in blocks (units are
    not rounded: a head is already a block)."""
    axes = axes or {}
    units = units or {}
    world = _total([1.0], reduce_sum)  # ranks sharing the weights (1 without a reduction)
    rms, sizes = {}, {}
    replicated: set[str] = set()  # layers whose every channel's norm every rank holds
    for n, w in weights.items():
        ax = axes.get(n, 0)
        lw = _local(w).detach().float()
        if _sharded(w) and (ax or n in units):
            # FSDP shards dim 0: a Conv1D's *input* axis (each rank holds part of every output
            # column), or rows that a unit (head) spans. Each rank adds its part of every
            # channel's sum of squares into a whole-layer vector, summed across ranks, after
            # which every rank holds all channels' (units') norms; counted with weight 1/world,
            # they count once in total.
            here = _channels_here(w, ax)
            sq = torch.zeros(w.shape[ax], dtype=torch.float64, device=lw.device)
            sq[here.to(lw.device)] = lw.double().movedim(ax, 0).flatten(1).pow(2).sum(dim=1)
            sq = (reduce_sum(sq) if reduce_sum else sq).cpu()
            count = torch.full((w.shape[ax],), float(w.numel() // w.shape[ax]), dtype=torch.float64)
            if n in units:
                sq, count = (
                    torch.zeros(int(units[n].max()) + 1, dtype=torch.float64).index_add_(0, units[n], t)
                    for t in (sq, count)
                )
            rms[n] = (sq / count).sqrt().float().to(lw.device)
            sizes[n] = (count / world).float()
            replicated.add(n)
            continue
        flat = lw.movedim(ax, 0).flatten(1)  # not reshape(rows, -1): a rank may hold no rows of a layer
        if n in units and flat.shape[0]:
            unit = units[n].to(flat.device)
            count = torch.bincount(unit).double() * flat.shape[1]
            sq = torch.zeros(len(count), dtype=torch.float64, device=flat.device)
            sq.index_add_(0, unit, flat.double().pow(2).sum(dim=1))
            rms[n] = (sq / count).sqrt().float()
            sizes[n] = count.float().cpu()
            continue
        rms[n] = flat.pow(2).mean(dim=1).sqrt()
        sizes[n] = torch.full((flat.shape[0],), float(flat.shape[1]))

    def reduction(names: list[str], scope: str) -> ReduceSum | None:
        if scope == "layer" and all(x in replicated for x in names):
            return None  # every rank holds the whole layer's norms: select locally
        return _group_reduce(weights, names, scope, reduce_sum)

    def channels(n: str) -> float:
        return float(rms[n].numel()) if n in replicated else _total([rms[n].numel()], reduce_sum)

    groups = [list(rms)] if scope == "global" else [[n] for n in rms]
    keep: dict[str, torch.Tensor] = {}
    for names in groups:
        if scope == "global":  # the target counts weights: a channel weighs its fan-in
            wts = [sizes[n] for n in names]
            k = _target(sparsity, names[0]) * _total([float(sizes[n].sum()) for n in names], reduce_sum)
        else:  # whole channels of this layer: round(sparsity * channels)
            wts = None
            k = round(_target(sparsity, names[0]) * channels(names[0]))
        if k <= 0:
            keep.update({n: torch.ones_like(rms[n], dtype=torch.bool) for n in names})
            continue
        tau = kth_smallest([rms[n] for n in names], k, weights=wts, reduce_sum=reduction(names, scope))
        keep.update({n: rms[n] > tau for n in names})
    for n, kp in keep.items():
        if not _total([int(kp.sum())], reduce_sum):
            # Keep the layer alive: its strongest channel(s) survive. The max is the k-th
            # smallest with k = all channels, so sharded rows need no gather either.
            best = kth_smallest([rms[n]], channels(n), reduce_sum=reduction([n], "layer"))
            kp |= rms[n] >= best
    for n, kp in keep.items():
        if multiple == 1 or n in units:
            continue
        total = channels(n)
        kept = float(kp.sum()) if n in replicated else _total([int(kp.sum())], reduce_sum)
        # Rounded up, never down: rounding must not prune more than the schedule asks.
        want = min(total, math.ceil(kept / multiple - 1e-9) * multiple)
        if want >= total:
            keep[n] = torch.ones_like(kp)
        elif want > kept:  # the strongest `want` channels: the others are the (total - want) smallest
            tau = kth_smallest([rms[n]], total - want, reduce_sum=reduction([n], "layer"))
            keep[n] = rms[n] > tau
    out = {}
    for n, w in weights.items():
        lw = _local(w).movedim(axes.get(n, 0), 0)
        rows = keep[n]
        if n in units:  # each channel here takes its unit's verdict
            rows = rows[units[n][_channels_here(w, axes.get(n, 0))].to(rows.device)]
        m = rows.reshape(-1, *([1] * (lw.dim() - 1))).expand_as(lw)
        out[n] = m.movedim(0, axes.get(n, 0)).contiguous().clone()
    return out


def _channels_here(w: torch.Tensor, axis: int) -> torch.Tensor:
    """Indices (in the whole layer) of the channels along `axis` this rank holds of `w`: all of
    them, except along a sharded axis (FSDP's dim 0), where they are the rank's own rows."""
    if not (_sharded(w) and axis == 0):
        return torch.arange(w.shape[axis])
    from torch.distributed.tensor import distribute_tensor

    # The row numbers cut like the weight; no communication (every rank holds them all).
    ids = torch.arange(w.shape[0], device=_local(w).device)
    return distribute_tensor(ids, w.device_mesh, w.placements, src_data_rank=None).to_local().cpu()


def nm_masks(
    weights: dict[str, torch.Tensor],
    masks: dict[str, torch.Tensor],
    keep: int,
    group: int,
    axes: dict[str, int] | None = None,
) -> dict[str, torch.Tensor]:
    """N:M masks (`keep` of every `group` along each weight's input axis, by |w|), within the
    current `masks`. Groups never span ranks: FSDP shards dim 0, which is the output axis of a
    Linear or Conv (whole rows here, so the groups along dim 1 are local); a transformers Conv1D
    stores (in, out), so its dim-0 shards would cut groups, and its mask is computed on the
    gathered weight (every rank the same), each rank keeping its own rows of it."""
    axes = axes or {}
    out = {}
    for name, w in weights.items():
        ax = nm.in_axis(w.dim(), axes.get(name, 0))
        if _sharded(w) and ax == 0:
            from torch.distributed.tensor import distribute_tensor

            full = w.detach().full_tensor()
            alive = _gather_mask(w, masks[name])
            whole = nm.nm_mask(full.abs(), keep, group, ax, alive).to(torch.uint8)
            local = distribute_tensor(whole, w.device_mesh, w.placements, src_data_rank=None).to_local()
            out[name] = local.to(torch.bool)
            continue
        out[name] = nm.nm_mask(_local(w).detach().abs(), keep, group, ax, masks[name])
    return out


def _gather_mask(w: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
    """The whole mask of a sharded weight from this rank's part (a collective)."""
    from torch.distributed.tensor import DTensor

    # gloo gathers no bool tensors: masks travel as bytes
    part = local.to(device=w.device, dtype=torch.uint8)
    whole = DTensor.from_local(
        part, w.device_mesh, w.placements, shape=w.shape, stride=w.stride(), run_check=False
    )
    return whole.full_tensor().to(torch.bool)


def threshold_masks(
    weights: dict[str, torch.Tensor],
    masks: dict[str, torch.Tensor],
    theta: float,
    reduce_sum: ReduceSum | None = None,
) -> dict[str, torch.Tensor]:
    """Han et al.: prune |w| < theta * std of the layer's surviving weights (masks only shrink)."""
    out = {}
    for n, w in weights.items():
        lw = _local(w).detach().float()
        alive = masks[n]
        s = torch.stack([alive.sum().double(), lw[alive].double().sum(), lw[alive].double().pow(2).sum()])
        if reduce_sum:
            s = reduce_sum(s)
        cnt, tot, sq = (float(x) for x in s)
        std = (max(sq / cnt - (tot / cnt) ** 2, 0.0)) ** 0.5 if cnt else 0.0
        out[n] = alive & (lw.abs() >= theta * std)
    return out


def _total(values: list[float], reduce_sum: ReduceSum | None) -> float:
    t = torch.tensor(float(sum(values)), dtype=torch.float64)
    return float(reduce_sum(t) if reduce_sum else t)


# --- the stateful pruner ------------------------------------------------------------------------


def layer_scales(cfg: PruningSpec, names: list[str]) -> dict[str, float]:
    """layer -> its final sparsity / final_sparsity under `layer_sparsity` (1 for the layers no
    entry matches; the first matching entry wins); {} without it. An entry matching no pruned
    layer is a configuration error: a misspelt name would otherwise prune at final_sparsity."""
    if not cfg.layer_sparsity:
        return {}
    for pat in cfg.layer_sparsity:
        if not any(fnmatch.fnmatchcase(n, pat) for n in names):
            shown = ", ".join(names[:20]) + (f" and {len(names) - 20} more" if len(names) > 20 else "")
            raise ConfigError(
                f"compression.pruning.layer_sparsity: {pat!r} matches no pruned layer; the pruned "
                f"layers are {shown}"
            )
    scales = {}
    for n in names:
        final = next(
            (v for pat, v in cfg.layer_sparsity.items() if fnmatch.fnmatchcase(n, pat)), cfg.final_sparsity
        )
        scales[n] = final / cfg.final_sparsity
    return scales


class Pruner:
    """Holds the masks of one model and applies its schedule.

    `named_weights` are the prunable parameters (whole or sharded); `reduce_sum` sums a tensor
    across the ranks that share those weights' shards (None when each rank holds them whole)."""

    def __init__(
        self,
        cfg: PruningSpec,
        named_weights: OrderedDict[str, nn.Parameter],
        reduce_sum: ReduceSum | None = None,
        criterion=None,
        followers: dict[str, list[nn.Parameter]] | None = None,
    ):
        if not named_weights:
            raise ConfigError(
                "compression.pruning: the model has no prunable Linear/Conv layers left after `exclude`"
            )
        self.cfg = cfg
        self.weights = named_weights
        self.reduce_sum = reduce_sum
        # criterion.masks(step, sparsity, masks) -> new masks, where a criterion other than
        # magnitude chooses them (`wanda`, workers.compression.wanda); None: magnitude.
        self.criterion = criterion
        # layer -> per-output-channel parameters zeroed with its channels (`channel_followers`);
        # their masks follow the layer's, so they are not state of their own.
        self.followers = {n: ps for n, ps in (followers or {}).items() if n in named_weights}
        self.masks = {n: torch.ones_like(_local(w), dtype=torch.bool) for n, w in named_weights.items()}
        self._float_masks: list[torch.Tensor] = []
        self.last_update: int | None = None
        # layer -> unit of each output channel, pruned together (`channel_masks`); set by the method
        self.units: dict[str, torch.Tensor] = {}
        self.scales = layer_scales(cfg, list(named_weights))
        self._refresh()

    def layer_targets(self, s: float) -> Sparsity:
        """The schedule's target `s` for every layer, or each layer's under `layer_sparsity`
        (s <= final_sparsity, so a layer's stays <= its own final value, below 1)."""
        return {n: s * k for n, k in self.scales.items()} if self.scales else s

    # schedule

    def target(self, step: int) -> float | None:
        return schedules.scheduled_sparsity(self.cfg, step)

    def maybe_update(self, step: int, optimizer: torch.optim.Optimizer | None = None) -> bool:
        """Recompute masks when `step` is an update step of the schedule; returns whether it did."""
        if not schedules.is_update_step(self.cfg, step) or self.last_update == step:
            return False
        self.update(step, optimizer)
        return True

    def update(self, step: int, optimizer: torch.optim.Optimizer | None = None) -> None:
        cfg = self.cfg
        if cfg.schedule == "threshold":
            new = threshold_masks(
                self.weights, self.masks, schedules.threshold_at(cfg, step), self.reduce_sum
            )
        else:
            s = schedules.target_sparsity(cfg, step)
            if self.criterion is not None:
                new = self.criterion.masks(step, s, self.masks)
            elif cfg.structure == "unstructured":
                new = unstructured_masks(self.weights, self.layer_targets(s), cfg.scope, self.reduce_sum)
            elif cfg.nm() is not None:
                group = cfg.nm()[1]
                keep = round((1.0 - s) * group)  # s is a multiple of 1/M here (schedules.target_sparsity)
                new = nm_masks(self.weights, self.masks, keep, group, axes_of(self.weights))
            else:
                new = channel_masks(
                    self.weights,
                    self.layer_targets(s),
                    cfg.scope,
                    self.reduce_sum,
                    axes_of(self.weights),
                    self.units,
                    cfg.channel_multiple,
                )
        # Masks only shrink: a weight pruned once stays pruned (with ties at zero it could
        # otherwise flip back in and out).
        self.masks = {n: self.masks[n] & new[n] for n in self.masks}
        self.last_update = step
        self._refresh()
        self.apply_()
        if optimizer is not None:
            self.prune_optimizer_state_(optimizer)

    # enforcement (hot path: foreach ops, one kernel per list)

    def _refresh(self) -> None:
        # What the masks hold at zero: the weights, then the followers of channel-pruned layers
        # (a channel is kept while any of its weights is: the row's `any`; local rows of a
        # sharded weight and of its 1-D followers are the same dim-0 chunk).
        targets, masks = list(self.weights.values()), list(self.masks.values())
        for n, ps in self.followers.items():
            row = self.masks[n].flatten(1).any(dim=1)
            targets += ps
            masks += [row] * len(ps)
        self._targets = targets
        self._params = [_local(t) for t in targets]
        self._float_masks = [m.to(p.dtype) for m, p in zip(masks, self._params, strict=True)]

    @torch.no_grad()
    def apply_(self) -> None:
        torch._foreach_mul_(self._params, self._float_masks)

    @torch.no_grad()
    def mask_grads_(self) -> None:
        grads, masks = [], []
        for w, m in zip(self._targets, self._float_masks, strict=True):
            if w.grad is not None:
                grads.append(_local(w.grad))
                masks.append(m.to(w.grad.dtype))
        if grads:
            torch._foreach_mul_(grads, masks)

    @torch.no_grad()
    def prune_optimizer_state_(self, optimizer: torch.optim.Optimizer) -> None:
        for w, m in zip(self._targets, self._float_masks, strict=True):
            for value in optimizer.state.get(w, {}).values():
                if torch.is_tensor(value):
                    lv = _local(value)
                    if lv.shape == m.shape:
                        lv.mul_(m.to(lv.dtype))

    # measurement

    def sparsity(self) -> tuple[float, dict[str, float]]:
        """(global, per-layer) fraction of zero weights, measured on the weights themselves."""
        zeros = torch.tensor(
            [float((_local(w) == 0).sum()) for w in self.weights.values()], dtype=torch.float64
        )
        sizes = torch.tensor([float(_local(w).numel()) for w in self.weights.values()], dtype=torch.float64)
        if self.reduce_sum:
            zeros, sizes = self.reduce_sum(zeros), self.reduce_sum(sizes)
        layers = {n: float(z / s) for n, z, s in zip(self.weights, zeros, sizes, strict=True)}
        return float(zeros.sum() / sizes.sum()), layers

    def checksum(self) -> int:
        """CRC32 of the packed masks, in layer order: equal on every rank holding equal masks."""
        crc = 0
        for name, m in self.masks.items():
            crc = zlib.crc32(name.encode(), crc)
            crc = zlib.crc32(np.packbits(m.cpu().numpy().ravel()).tobytes(), crc)
        return crc

    # persistence

    def state_dict(self) -> dict:
        return {
            "masks": {n: m.clone() for n, m in self.masks.items()},
            "last_update": -1 if self.last_update is None else self.last_update,
        }

    def load_state_dict(self, state: dict) -> None:
        missing = set(self.masks) ^ set(state["masks"])
        if missing:
            raise ConfigError(f"checkpoint masks do not match the model's layers: {sorted(missing)}")
        self.masks = {n: state["masks"][n].to(torch.bool) for n in self.masks}
        self.last_update = None if state["last_update"] < 0 else int(state["last_update"])
        self._refresh()
        self.apply_()


def verify_masks_agree(checksums: list[int]) -> None:
    """All ranks' mask checksums must be equal (DDP) — a mismatch fails the job loudly."""
    if len(set(checksums)) > 1:
        raise MaskMismatchError(
            f"pruning masks differ between ranks (checksums by rank: {checksums}); "
            "stopping before the replicas diverge"
        )


# --- the method (workers.compression.protocol) -------------------------------------------------


class PruningMethod(BaseMethod):
    """`compression.pruning`: masks recomputed on the schedule, held through every step."""

    name = "pruning"
    state_key = "pruner"  # the checkpoint key since before the protocol: old checkpoints load

    def __init__(self, cfg: PruningSpec):
        self.cfg = cfg
        self.skip: tuple[str, ...] = ()
        self.units: dict[str, torch.Tensor] = {}  # channel units (gpt heads), from `convert`
        self.pruner: Pruner | None = None
        self.ctx: Context | None = None

    @classmethod
    def from_spec(cls, spec: JobSpec) -> PruningMethod | None:
        pr = spec.compression.pruning
        return None if pr is None else cls(pr)

    def convert(self, model: nn.Module) -> None:
        from workers.models import output_layer

        # A channel-pruned output layer would delete classes: it is never channel-pruned.
        self.skip = (output_layer(model),) if self.cfg.structure == "channel" else ()
        if self.cfg.structure == "channel":
            from workers.compression.channel_slim import channel_plan

            # Prune only what export can delete (residual widths stay; gpt heads go whole).
            plan_skip, self.units = channel_plan(model)
            self.skip += tuple(n for n in plan_skip if n not in self.skip)

    def attach(self, ctx: Context) -> None:
        self.ctx = ctx
        s = ctx.strategy
        weights = s.prunable(ctx.model, self.cfg.exclude, self.skip)
        criterion = None
        if self.cfg.criterion == "wanda":
            from workers.compression.wanda import Wanda  # it builds on this module

            criterion = Wanda(ctx, self.cfg, weights)
        followers = (
            channel_followers(s.unwrap(ctx.model), weights) if self.cfg.structure == "channel" else None
        )
        self.pruner = Pruner(self.cfg, weights, s.pruner_reduce(), criterion, followers)
        self.pruner.units = {n: u for n, u in self.units.items() if n in weights}

    def on_step(self, step: int, optimizer: torch.optim.Optimizer) -> dict | None:
        p, ctx = self.pruner, self.ctx
        if not p.maybe_update(step, optimizer):
            return None
        checksums = ctx.dist.all_gather_object(p.checksum())
        if ctx.strategy.masks_must_match():
            verify_masks_agree(checksums)
        sparsity, _ = p.sparsity()
        return {
            "event": "mask_update",
            "step": step,
            "target_sparsity": p.target(step),
            "sparsity": sparsity,
            "mask_checksums": checksums,
            **(p.criterion.last if p.criterion is not None else {}),
        }

    def after_backward(self) -> None:
        self.pruner.mask_grads_()

    def after_optimizer_step(self) -> None:
        # Also after a step the GradScaler skipped: pruned weights stay exactly 0.
        self.pruner.apply_()

    def start_part(self) -> dict:
        # The whole schedule, so a chart can draw the target ahead of the run.
        return {"target_curve": schedules.target_curve(self.cfg, self.ctx.total_steps)}

    def train_part(self, step: int) -> dict:
        sparsity = self.pruner.sparsity()[0]  # a collective with sharded or staged weights
        # The target of the masks this record measures: those of the last update at or before
        # the step just trained (step - 1); the update at `step` has not happened yet.
        return {"sparsity": sparsity, "target_sparsity": self.pruner.target(step - 1)}

    def state_dict(self) -> dict:
        state = self.pruner.state_dict()
        # Masks are stored whole, like the model: a restart may use another strategy's layout.
        state["masks"] = self.ctx.strategy.gather_masks(self.pruner.weights, state["masks"])
        return state

    def load_state_dict(self, state: dict | None) -> None:
        if state is None:
            raise ConfigError("checkpoint has no pruning masks but the spec prunes")
        # Sharded strategies keep their part.
        masks = self.ctx.strategy.local_masks(self.pruner.weights, state["masks"])
        self.pruner.load_state_dict({**state, "masks": masks})

    @classmethod
    def finalize(cls, spec: JobSpec, model: nn.Module, example: torch.Tensor) -> nn.Module:
        pr = spec.compression.pruning
        if pr is None or pr.structure != "channel":
            return model
        from workers.compression.channel_slim import slim, slimmable
        from workers.models import output_layer

        if not slimmable(model):
            # HuggingFace models other than GPT-2 (no graph, no known blocks): shipped masked.
            log.warning("structure: channel: %s is exported with dense shapes", type(model).__name__)
            return model
        # The removed channels leave the model: what ships is the smaller one.
        return slim(model, example, skip=(output_layer(model),))[0]

    @classmethod
    def conform(cls, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        from workers.compression.channel_slim import conform

        conform(model, state)

    @classmethod
    def report_part(cls, spec: JobSpec, model: nn.Module) -> dict[str, dict]:
        pr = spec.compression.pruning
        if pr is not None and pr.structure == "channel":
            from workers.compression.channel_slim import structure_report

            return {"structure": structure_report(model)}
        if pr is None or pr.nm() is None:
            return {}
        return {"sparsity": {"nm_compliance": nm_compliance(prunable_weights(model, pr.exclude), *pr.nm())}}


def nm_compliance(weights: LayerWeights, n: int, m: int) -> dict:
    """report.sparsity.nm_compliance: per layer, the fraction of its groups of M along the input
    axis holding at most N non-zeros (1.0: N:M sparse); `min` over the layers."""
    axes = axes_of(weights)
    layers = {
        name: nm.compliance(w.detach(), n, m, nm.in_axis(w.dim(), axes[name])) for name, w in weights.items()
    }
    return {"pattern": f"{n}:{m}", "min": min(layers.values(), default=1.0), "layers": layers}
