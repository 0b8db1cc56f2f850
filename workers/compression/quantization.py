"""Quantization: int8 (and weight-only int4) for `compression.quantization`.

One entry point for training, `prepare(model, cfg)`, which swaps every Linear/Conv for a
fake-quantized subclass (same parameters, same names) *before* a strategy wraps the model (a
`FakeQuantizer` then drives it step by step), and one for export, `export_weights` /
`quantize_weight`, which turn weights into the integer codes and scales that the int8 ONNX graph
and the packed artifact both store. Training and export share `weight_scale` and
`fake_quantize_weight`, so the grid the model trained on is the grid that ships.

- weights: per-output-channel symmetric, codes in [-qmax, qmax] (127 for 8 bits, 7 for 4).
  Symmetric with zero point 0, so quantize(0) == 0 and pruned weights stay exactly zero.
- activations (`qat`, 8 bits): the input of every quantized layer, per-tensor affine uint8 with
  an EMA min/max observer (the ranges onnxruntime's QDQ graph then uses, see workers.onnx_export).
- `fixed`: weights on the fixed grid round(w * Q) / Q (per-tensor scale 1/Q); `ptq`: nothing at
  training time, weights rounded and activations calibrated at export.

Why not torchao: torchao 0.18's QAT (`QATConfig` with `IntxFakeQuantizeConfig`) swaps only
nn.Linear (LeNet-5's and the ConvNet's convolutions would train unquantized), recomputes every
scale from each batch (no observers to freeze, and no scale or zero point in the state dict, so
a checkpoint cannot hold the quantizer state), and exports to ONNX as float arithmetic
(ReduceMin/Round/Clip) instead of QuantizeLinear/DequantizeLinear — onnxruntime runs it in fp32
(the TorchScript exporter fails on it outright; torchao #777, #3392). `torch.ao.quantization` is
deprecated. So the fake quantization here is torch's core ops (`torch.fake_quantize_per_channel_
affine` / `_per_tensor_affine`, straight-through gradients) in small modules of our own.
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from service.spec import QuantizationSpec
from workers.compression.protocol import BaseMethod
from workers.compression.pruning import out_axis, prunable_weights
from workers.pack import QuantizedWeight, kmeans_1d

log = logging.getLogger(__name__)

ReduceMax = Callable[[torch.Tensor], torch.Tensor]

ACT_QMIN, ACT_QMAX = 0, 255  # uint8 activations: what onnxruntime's CPU int8 kernels (U8S8) take
EMA = 0.01  # observer averaging constant (torch.ao's MovingAverageMinMaxObserver default)
OBSERVER_WARMUP = 50  # observers start this many steps before fake quantization does
FREEZE_FRACTION = 0.8  # default: observers freeze 80% of the way from start_step to the end
_FP16_TINY = float(torch.finfo(torch.float16).smallest_normal) * 2.0**-10  # smallest subnormal
SCALE_MANTISSA_BITS = 4  # weight scales: float16 values with this many mantissa bits (see _ceil_scale)


def qmax(bits: int) -> int:
    """Largest code of a symmetric signed grid: 127 for int8, 7 for int4 (-qmax..qmax keeps the
    grid symmetric around an exact zero, as onnxruntime's symmetric int8 weights are)."""
    return 2 ** (bits - 1) - 1


# --- the schedule (pure) ------------------------------------------------------------------------


@dataclass(frozen=True)
class QuantSchedule:
    start: int  # fake quantization on from this step
    observe_from: int  # activation observers update from this step ...
    freeze_at: int  # ... until this one (exclusive)


def schedule(cfg: QuantizationSpec, total_steps: int, pruning_end: int | None = None) -> QuantSchedule:
    """When fake quantization starts and when the activation observers run.

    Observers warm up before the start so the first fake-quantized step already has ranges; they
    freeze for the last part of training (default: the last 20% of the QAT phase, never before
    the last pruning mask update, which changes the activations) so the final steps train against
    the exact ranges that are exported."""
    start = cfg.start_step
    if cfg.freeze_step is not None:
        freeze = cfg.freeze_step
    else:
        freeze = start + math.ceil(FREEZE_FRACTION * max(total_steps - start, 1))
        freeze = max(freeze, pruning_end or 0)
    return QuantSchedule(start=start, observe_from=max(0, start - OBSERVER_WARMUP), freeze_at=freeze)


# --- weights (pure) -----------------------------------------------------------------------------


def _ceil_scale(s: torch.Tensor) -> torch.Tensor:
    """The smallest float16 value with SCALE_MANTISSA_BITS mantissa bits that is >= s, as float32.

    Why a coarse grid: scales are a large part of a pruned, quantized model's packed bytes (one
    per output channel, next to ~1 bit per weight for positions and ~4 for shared codes). Held as
    float16 with 6 trailing zero bits they entropy-code to about half of a free float16, and a
    scale at most 2^-4 above max|w|/qmax costs under 0.1 bit of the code range. Rounding *up*
    keeps every code within [-qmax, qmax]; the grid is exact in float32, float16 and ONNX."""
    s = s.float().clamp(_FP16_TINY, float(torch.finfo(torch.float16).max) / 2)
    h = s.to(torch.float16)
    h = torch.where(h.float() < s, torch.nextafter(h, torch.full_like(h, math.inf)), h)
    drop = 10 - SCALE_MANTISSA_BITS  # float16 bit patterns of positive values order like the values
    bits = h.view(torch.int16).int()
    bits = ((bits + (1 << drop) - 1) >> drop) << drop
    return bits.to(torch.int16).view(torch.float16).float()


def weight_scale(w: torch.Tensor, bits: int, axis: int = 0) -> torch.Tensor:
    """Per-output-channel scale max|w_c| / qmax, rounded up onto the scale grid (float32); the
    channels lie along `axis` (1 for transformers' Conv1D, stored (in, out)). An all-zero
    (pruned) channel gets the smallest scale: its codes are 0 either way."""
    w = w.detach().float().movedim(axis, 0)
    absmax = w.abs().reshape(w.shape[0], -1).amax(dim=1)
    return _ceil_scale(absmax / qmax(bits))


def fixed_scale(w: torch.Tensor, q: float, axis: int = 0) -> torch.Tensor:
    """`fixed` mode: one grid 1/Q for every channel."""
    return torch.full((w.shape[axis],), 1.0 / q, dtype=torch.float32, device=w.device)


def fake_quantize_weight(w: torch.Tensor, scale: torch.Tensor, bits: int, axis: int = 0) -> torch.Tensor:
    """codes * scale with straight-through gradients (zero outside the grid's range)."""
    zero = torch.zeros(scale.shape, dtype=torch.int32, device=w.device)
    q = qmax(bits)
    return torch.fake_quantize_per_channel_affine(w.float(), scale.to(w.device), zero, axis, -q, q)


def _per_channel(scale: torch.Tensor, ndim: int, axis: int = 0) -> torch.Tensor:
    shape = [1] * ndim
    shape[axis] = -1
    return scale.reshape(shape)


def quantize_weight(w: torch.Tensor, bits: int, fixed: float | None = None, axis: int = 0) -> QuantizedWeight:
    """The integer form of a weight: codes (int8 storage, the weight's own layout) and scales per
    output channel (along `axis`), such that codes * scale is bit for bit what
    `fake_quantize_weight` gives (the QAT forward)."""
    w = w.detach().float().cpu()
    scale = fixed_scale(w, fixed, axis) if fixed is not None else weight_scale(w, bits, axis)
    fq = fake_quantize_weight(w, scale, bits, axis)
    # fq is code * scale in float32, so dividing by the scale recovers the integer exactly.
    codes = torch.round(fq / _per_channel(scale, w.dim(), axis)).to(torch.int8)
    q = QuantizedWeight(codes, scale, bits, axis)
    assert torch.equal(dequantize(q), fq)
    return q


def dequantize(q: QuantizedWeight) -> torch.Tensor:
    return q.codes.float() * _per_channel(q.scale.float(), q.codes.dim(), q.axis)


def share_codes(q: QuantizedWeight, index_bits: int) -> QuantizedWeight:
    """Weight sharing (Deep Compression's second stage) on the integer grid: the nonzero codes of
    a layer are clustered (k-means, linear initialisation) to at most 2**index_bits shared codes.
    Staying on the grid keeps the int8 ONNX graph and the packed file identical; zeros (pruned
    weights) stay zero."""
    codes = q.codes.numpy().astype(np.int16)
    nz = codes != 0
    if not nz.any():
        return q
    centroids, idx = kmeans_1d(codes[nz].astype(np.float32), 2**index_bits)
    shared = np.round(centroids).astype(np.int16)
    # A centroid rounding to 0 would silently prune more: keep it on the nearest nonzero code.
    shared = np.where(shared == 0, np.where(centroids >= 0, 1, -1), shared)
    out = codes.copy()
    out[nz] = shared[idx]
    return QuantizedWeight(torch.from_numpy(out.astype(np.int8)), q.scale, q.bits, q.axis)


# --- activations ---------------------------------------------------------------------------------


def activation_qparams(lo: float, hi: float) -> tuple[float, int]:
    """uint8 affine (scale, zero point) for a range, with 0 exactly representable — the formula
    onnxruntime's quantizer uses for asymmetric uint8 activations."""
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    scale = np.float32((hi - lo) / (ACT_QMAX - ACT_QMIN))
    if scale == 0:
        return 1.0, 0
    zp = int(np.clip(np.round(ACT_QMIN - lo / scale), ACT_QMIN, ACT_QMAX))
    return float(scale), zp


class ActivationFakeQuant(nn.Module):
    """Per-tensor uint8 fake quantization with an EMA min/max observer.

    A forward only records the batch's range; `FakeQuantizer.end_step` folds the range of the
    global batch (reduced across data-parallel ranks) into the EMA once per step, so every rank
    holds the same ranges and the result does not depend on the worker count. All state is in
    buffers: it is checkpointed with the model and restored bit for bit."""

    def __init__(self):
        super().__init__()
        self.register_buffer("min_val", torch.zeros(()))
        self.register_buffer("max_val", torch.zeros(()))
        self.register_buffer("scale", torch.ones(()))
        self.register_buffer("zero_point", torch.zeros((), dtype=torch.int32))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))
        self.register_buffer("enabled", torch.zeros((), dtype=torch.bool))
        self.register_buffer("observing", torch.zeros((), dtype=torch.bool))
        # This step's range, not state: folded into the EMA and reset by end_step.
        self.register_buffer("batch_min", torch.full((), math.inf), persistent=False)
        self.register_buffer("batch_max", torch.full((), -math.inf), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and bool(self.observing):
            lo, hi = torch.aminmax(x.detach().float())
            self.batch_min.copy_(torch.minimum(self.batch_min, lo))
            self.batch_max.copy_(torch.maximum(self.batch_max, hi))
        if not bool(self.enabled):
            return x
        scale, zp = self.scale, self.zero_point
        if not bool(self.initialized):  # start_step 0: no history yet, use this batch's range
            s, z = activation_qparams(float(self.batch_min), float(self.batch_max))
            scale = torch.tensor(s, device=x.device)
            zp = torch.tensor(z, dtype=torch.int32, device=x.device)
        return torch.fake_quantize_per_tensor_affine(x.float(), scale, zp, ACT_QMIN, ACT_QMAX).to(x.dtype)

    @torch.no_grad()
    def fold(self, lo: float, hi: float) -> None:
        if not (math.isfinite(lo) and math.isfinite(hi)):
            return  # this layer saw no data this step (another pipeline stage's)
        if bool(self.initialized):
            self.min_val += EMA * (lo - self.min_val)
            self.max_val += EMA * (hi - self.max_val)
        else:
            self.min_val.fill_(lo)
            self.max_val.fill_(hi)
            self.initialized.fill_(True)
        s, z = activation_qparams(float(self.min_val), float(self.max_val))
        self.scale.fill_(s)
        self.zero_point.fill_(z)

    def reset_batch(self) -> None:
        self.batch_min.fill_(math.inf)
        self.batch_max.fill_(-math.inf)


class WeightFakeQuant(nn.Module):
    """Per-channel symmetric fake quantization of a weight. The scale follows the weight at every
    step (max|w_c| / qmax, exactly what export computes from the final weights) rather than being
    frozen: a frozen scale would clip weights that grow and waste codes on weights that shrink
    under pruning. `fixed` mode uses the constant grid 1/Q instead."""

    def __init__(self, bits: int, fixed: float | None = None, axis: int = 0):
        super().__init__()
        self.bits = bits
        self.fixed = fixed
        self.axis = axis  # output-channel axis of the weight (1 for transformers' Conv1D)
        self.register_buffer("enabled", torch.zeros((), dtype=torch.bool))

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if not bool(self.enabled):
            return w
        a = self.axis
        scale = fixed_scale(w, self.fixed, a) if self.fixed is not None else weight_scale(w, self.bits, a)
        return fake_quantize_weight(w, scale, self.bits, a).to(w.dtype)


class _FakeQuantized:
    """Mixin for the swapped layers: fake-quantize the input (if observed) and the weight."""

    weight_quant: WeightFakeQuant
    input_quant: ActivationFakeQuant | None

    def _inputs(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.input_quant is not None:
            x = self.input_quant(x)
        return x, self.weight_quant(self.weight)


class FakeQuantLinear(_FakeQuantized, nn.Linear):
    def forward(self, x):
        x, w = self._inputs(x)
        return F.linear(x, w, self.bias)


class FakeQuantConv1d(_FakeQuantized, nn.Conv1d):
    def forward(self, x):
        x, w = self._inputs(x)
        return self._conv_forward(x, w, self.bias)


class FakeQuantConv2d(_FakeQuantized, nn.Conv2d):
    def forward(self, x):
        x, w = self._inputs(x)
        return self._conv_forward(x, w, self.bias)


class FakeQuantConv3d(_FakeQuantized, nn.Conv3d):
    def forward(self, x):
        x, w = self._inputs(x)
        return self._conv_forward(x, w, self.bias)


SWAPS = {
    nn.Linear: FakeQuantLinear,
    nn.Conv1d: FakeQuantConv1d,
    nn.Conv2d: FakeQuantConv2d,
    nn.Conv3d: FakeQuantConv3d,
}


def _swap_for(cls: type) -> type:
    """The fake-quantized class of a layer class; transformers' Conv1D (weight (in, out), so
    `x @ w + b`) gets one on first use, where transformers is loaded already."""
    if cls not in SWAPS:
        from transformers.pytorch_utils import Conv1D

        if not issubclass(cls, Conv1D):
            raise TypeError(f"no fake-quantized form of {cls.__name__}")

        def forward(self, x):
            x, w = self._inputs(x)
            out = torch.addmm(self.bias, x.reshape(-1, x.size(-1)), w)
            return out.view(*x.shape[:-1], self.nf)

        SWAPS[cls] = type("FakeQuantHFConv1D", (_FakeQuantized, cls), {"forward": forward})
    return SWAPS[cls]


class FakeQuantizer:
    """The training-time side of `qat` and `fixed`: turns fake quantization on at the schedule's
    start and drives the activation observers of the fake-quantized layers a module holds (all of
    them, or a pipeline stage's). Its state lives in those layers' buffers."""

    def __init__(self, module: nn.Module, sched: QuantSchedule, reduce_max: ReduceMax | None = None):
        self.layers = OrderedDict((n, m) for n, m in module.named_modules() if isinstance(m, _FakeQuantized))
        self.sched = sched
        self.reduce_max = reduce_max
        self.observers = [m.input_quant for m in self.layers.values() if m.input_quant is not None]

    def begin_step(self, step: int) -> None:
        """Set the flags of `step` (a pure function of it, so a resumed run sets the same)."""
        on = step >= self.sched.start
        watch = self.sched.observe_from <= step < self.sched.freeze_at
        for m in self.layers.values():
            m.weight_quant.enabled.fill_(on)
            if m.input_quant is not None:
                m.input_quant.enabled.fill_(on)
                m.input_quant.observing.fill_(watch)

    @torch.no_grad()
    def end_step(self) -> None:
        """Fold this step's activation ranges into the observers, over the global batch."""
        active = [o for o in self.observers if bool(o.observing)]
        if not active:
            return
        ranges = torch.stack([torch.stack([-o.batch_min, o.batch_max]) for o in active])
        if self.reduce_max is not None:  # max of -min is -(min of min): one collective for both
            ranges = self.reduce_max(ranges)
        for o, (neg_lo, hi) in zip(active, ranges.tolist(), strict=True):
            o.fold(-neg_lo, hi)
            o.reset_batch()

    def activation_ranges(self) -> dict[str, tuple[float, int]]:
        """(scale, zero point) of each layer's input, by layer name: what the int8 graph uses."""
        return {
            n: (float(m.input_quant.scale), int(m.input_quant.zero_point))
            for n, m in self.layers.items()
            if m.input_quant is not None and bool(m.input_quant.initialized)
        }


def quantized_layers(model: nn.Module) -> OrderedDict[str, nn.Module]:
    """Linear and Conv layers by name: what quantization covers (the same set pruning sees)."""
    modules = dict(model.named_modules())
    return OrderedDict((n, modules[n]) for n in prunable_weights(model))


def prepare(model: nn.Module, cfg: QuantizationSpec) -> int:
    """Make `model` fake-quantized in place for `qat` / `fixed` (`none` and `ptq` train in float);
    returns the number of layers swapped. Call before any strategy wraps, shards or splits the
    model: the swapped layers keep their parameters and names, so pruning, checkpoints and
    safetensors see the same weights, and they travel into every strategy's layout."""
    if cfg.mode not in ("qat", "fixed"):
        return 0
    layers = quantized_layers(model)
    # bits 4 is weight-only, and `fixed` rounds weights only: activations stay float there.
    observe = cfg.mode == "qat" and cfg.bits == 8
    for m in layers.values():
        device = m.weight.device
        axis = out_axis(m)
        m.__class__ = _swap_for(type(m))
        fixed = cfg.scale if cfg.mode == "fixed" else None
        m.weight_quant = WeightFakeQuant(cfg.bits, fixed, axis).to(device)
        m.input_quant = ActivationFakeQuant().to(device) if observe else None
    log.info("fake quantization on %d layers (%s, %d bits)", len(layers), cfg.mode, cfg.bits)
    return len(layers)


def dist_reduce_max(dist) -> ReduceMax | None:
    """Element-wise max over the data-parallel ranks (None in a single process)."""
    if not dist.active:
        return None
    import torch.distributed as td

    def reduce(t: torch.Tensor) -> torch.Tensor:
        out = t.to(dist.device).clone()
        td.all_reduce(out, op=td.ReduceOp.MAX)
        return out.to(t.device)

    return reduce


def export_weights(model: nn.Module, cfg: QuantizationSpec) -> OrderedDict[str, QuantizedWeight]:
    """The integer weights of every quantized layer, by layer name (the weight is `<name>.weight`),
    with weight sharing applied when `codebook_bits` asks for it."""
    fixed = cfg.scale if cfg.mode == "fixed" else None
    out: OrderedDict[str, QuantizedWeight] = OrderedDict()
    weights = prunable_weights(model)
    for name, w in weights.items():
        q = quantize_weight(w, cfg.bits, fixed, weights.out_axis[name])
        if cfg.codebook_bits is not None:
            q = share_codes(q, cfg.codebook_bits)
        out[name] = q
    return out


# --- the method (workers.compression.protocol) -------------------------------------------------


class QuantizationMethod(BaseMethod):
    """`compression.quantization` (qat / fixed at training time; ptq acts at export only). Its
    state (observer ranges, flags) lives in the fake-quantized layers' buffers, so it travels
    with the model's state dict: nothing of its own to checkpoint."""

    name = "quantization"

    def __init__(self, cfg: QuantizationSpec, pruning_end: int | None):
        self.cfg = cfg
        self.pruning_end = pruning_end
        self.quantized = 0
        self.fake_quant: FakeQuantizer | None = None

    @classmethod
    def from_spec(cls, spec) -> QuantizationMethod | None:
        from workers.compression.schedules import pruning_end

        q = spec.compression.quantization
        return None if q.mode == "none" else cls(q, pruning_end(spec))

    def convert(self, model: nn.Module) -> None:
        # Before the strategy wraps, shards or splits the model: the swapped layers then travel
        # with their weights into every strategy's layout.
        self.quantized = prepare(model, self.cfg)

    def attach(self, ctx) -> None:
        if not self.quantized:
            return
        # Observers see this rank's share of the global batch: their ranges are max-reduced
        # across ranks. Pipeline stages each see the whole batch (and hold different layers).
        reduce = None if ctx.strategy.name == "pipeline" else dist_reduce_max(ctx.dist)
        sched = schedule(self.cfg, ctx.total_steps, self.pruning_end)
        self.fake_quant = FakeQuantizer(ctx.module, sched, reduce)

    def before_forward(self, step: int) -> None:
        if self.fake_quant is not None:
            self.fake_quant.begin_step(step)

    def after_backward(self) -> None:
        if self.fake_quant is not None:
            self.fake_quant.end_step()
