"""Quantization primitives, value by value: grids, error bounds, the fixed-point formula, weight
sharing, observer arithmetic and the schedule."""

import math

import pytest
import torch
from torch import nn

from service.spec import QuantizationSpec
from workers.compression import quantization as qz


def _weights(shape=(16, 32), seed=0, prune=0.0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(*shape, generator=g) * torch.logspace(-2, 0, shape[0]).reshape(
        -1, *[1] * (len(shape) - 1)
    )
    if prune:
        w[w.abs() < w.abs().flatten().kthvalue(int(prune * w.numel())).values] = 0
    return w


@pytest.mark.parametrize(
    ("bits", "expected"),
    [(8, 127), (4, 7)],
)
def test_qmax(bits, expected):
    assert qz.qmax(bits) == expected


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("shape", [(16, 32), (6, 3, 5, 5)])
def test_weight_fake_quant_error_is_at_most_half_a_step(bits, shape):
    w = _weights(shape)
    scale = qz.weight_scale(w, bits)
    per = scale.reshape(-1, *[1] * (w.dim() - 1))
    # the scale covers the channel's largest weight, and is on the float16 grid
    absmax = w.abs().reshape(w.shape[0], -1).amax(1)
    assert torch.all(scale * qz.qmax(bits) >= absmax)
    assert torch.all(scale * qz.qmax(bits) <= absmax * (1 + 2**-qz.SCALE_MANTISSA_BITS))
    # on the scale grid: float16 values with SCALE_MANTISSA_BITS mantissa bits
    assert torch.equal(scale.half().float(), scale)
    low = (1 << (10 - qz.SCALE_MANTISSA_BITS)) - 1
    assert torch.all((scale.half().view(torch.int16) & low) == 0)
    fq = qz.fake_quantize_weight(w, scale, bits)
    assert torch.all((fq - w).abs() <= per / 2 + 1e-7)
    codes = torch.round(fq / per)
    assert codes.abs().max() <= qz.qmax(bits)


def test_zero_weights_stay_exactly_zero():
    w = _weights(prune=0.8)
    q = qz.quantize_weight(w, 8)
    assert torch.equal(q.codes == 0, w == 0)
    assert torch.equal(qz.dequantize(q) == 0, w == 0)
    # a fully pruned channel: a valid (tiny) scale and all-zero codes
    w[3] = 0
    q = qz.quantize_weight(w, 8)
    assert q.scale[3] > 0 and torch.all(q.codes[3] == 0)


@pytest.mark.parametrize("bits", [8, 4])
def test_codes_times_scale_is_bitwise_the_training_forward(bits):
    w = _weights((8, 24), seed=3)
    q = qz.quantize_weight(w, bits)
    assert q.codes.dtype == torch.int8 and q.bits == bits
    assert torch.equal(qz.dequantize(q), qz.fake_quantize_weight(w, qz.weight_scale(w, bits), bits))


@pytest.mark.parametrize("q_scale", [16.0, 64.0, 128.0])
def test_fixed_mode_is_round_w_times_q_over_q(q_scale):
    w = _weights((8, 24), seed=1) * 0.5
    q = qz.quantize_weight(w, 8, fixed=q_scale)
    expected = torch.round(w * q_scale).clamp(-127, 127) / q_scale
    assert torch.equal(qz.dequantize(q), expected)
    assert torch.all(q.scale == 1.0 / q_scale)


def test_fixed_mode_clips_at_the_grid_edge():
    w = torch.tensor([[0.5, -3.0, 2.999, 0.01]])
    q = qz.quantize_weight(w, 8, fixed=64.0)  # grid edge 127/64 = 1.984375
    assert qz.dequantize(q).tolist() == [[0.5, -127 / 64, 127 / 64, 0.015625]]


def test_fixed_grid_with_a_non_power_of_two():
    w = _weights((4, 10), seed=2) * 0.3
    got = qz.dequantize(qz.quantize_weight(w, 8, fixed=100.0))
    assert torch.allclose(got, torch.round(w * 100).clamp(-127, 127) / 100, atol=1e-7, rtol=0)


def test_straight_through_gradient():
    w = _weights((4, 8)).requires_grad_()
    qz.fake_quantize_weight(w, qz.weight_scale(w, 8), 8).sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))


@pytest.mark.parametrize("k", [1, 2, 4])
def test_weight_sharing_keeps_zeros_and_uses_few_codes(k):
    q = qz.quantize_weight(_weights((16, 64), prune=0.7), 8)
    s = qz.share_codes(q, k)
    assert torch.equal(s.codes == 0, q.codes == 0)
    assert len(torch.unique(s.codes[s.codes != 0])) <= 2**k
    assert torch.equal(s.scale, q.scale)
    if k == 4:  # 16 shared codes: every code moves by less than a tenth of the grid
        assert (s.codes.int() - q.codes.int()).abs().max() < 13


@pytest.mark.parametrize(
    ("lo", "hi", "scale", "zp"),
    [
        (0.0, 2.55, 0.01, 0),
        (-1.0, 1.0, 2 / 255, 127),  # 127.49999 in float32, as onnxruntime computes it
        (1.0, 2.0, 2 / 255, 0),  # the range always holds 0
        (-2.0, -1.0, 2 / 255, 255),
        (0.0, 0.0, 1.0, 0),
    ],
)
def test_activation_qparams(lo, hi, scale, zp):
    s, z = qz.activation_qparams(lo, hi)
    assert s == pytest.approx(scale, rel=1e-6) and z == zp


def test_activation_fake_quant_error_bound_and_zero():
    m = qz.ActivationFakeQuant()
    x = torch.linspace(-1.5, 3.0, 1001)
    m.train()
    m.observing.fill_(True)
    m(x)
    m.fold(float(m.batch_min), float(m.batch_max))
    m.enabled.fill_(True)
    y = m(x)
    assert torch.all((y - x).abs() <= float(m.scale) / 2 + 1e-6)
    assert m(torch.zeros(3)).eq(0).all()


def test_observer_ema_and_freeze():
    m = qz.ActivationFakeQuant().train()
    m.observing.fill_(True)
    m.fold(-1.0, 1.0)
    assert (float(m.min_val), float(m.max_val)) == (-1.0, 1.0)
    m.fold(-3.0, 5.0)
    assert float(m.min_val) == pytest.approx(-1.0 + qz.EMA * -2.0)
    assert float(m.max_val) == pytest.approx(1.0 + qz.EMA * 4.0)
    before = float(m.scale)
    m.observing.fill_(False)
    m(torch.full((4,), 100.0))  # frozen: a huge batch changes nothing
    assert math.isinf(float(m.batch_max)) and float(m.scale) == before


@pytest.mark.parametrize(
    ("cfg", "total", "pruning_end", "expected"),
    [
        ({"mode": "qat", "start_step": 100}, 200, None, (100, 50, 180)),
        ({"mode": "qat", "start_step": 0}, 10, None, (0, 0, 8)),
        ({"mode": "qat", "start_step": 100}, 200, 190, (100, 50, 190)),
        ({"mode": "qat", "start_step": 20, "freeze_step": 40}, 200, None, (20, 0, 40)),
        ({"mode": "fixed", "start_step": 5, "scale": 64.0}, 100, None, (5, 0, 81)),
    ],
)
def test_schedule(cfg, total, pruning_end, expected):
    s = qz.schedule(QuantizationSpec(**cfg), total, pruning_end)
    assert (s.start, s.observe_from, s.freeze_at) == expected


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.fc = nn.Linear(4 * 6 * 6, 3)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1))


def test_prepare_keeps_names_parameters_and_puts_state_in_buffers():
    m = _Tiny()
    params = {n: p for n, p in m.named_parameters()}
    assert qz.prepare(m, QuantizationSpec(mode="qat", start_step=2)) == 2
    assert isinstance(m.conv, nn.Conv2d) and isinstance(m.fc, nn.Linear)
    assert {n: p for n, p in m.named_parameters()} == params  # the very same Parameter objects
    keys = set(m.state_dict())
    assert {"conv.weight", "fc.bias", "fc.input_quant.scale", "fc.input_quant.zero_point"} <= keys
    assert {"conv.weight_quant.enabled", "conv.input_quant.enabled", "fc.input_quant.min_val"} <= keys
    assert not any("batch_" in k for k in keys)  # per-step scratch is not state


def test_fake_quant_is_inert_before_start_and_on_after():
    torch.manual_seed(0)
    m, ref = _Tiny(), _Tiny()
    ref.load_state_dict(m.state_dict())
    qz.prepare(m, QuantizationSpec(mode="qat", start_step=3))
    fq = qz.FakeQuantizer(m, qz.schedule(QuantizationSpec(mode="qat", start_step=3), 10))
    x = torch.randn(5, 1, 8, 8)
    m.train()
    for step in range(3):
        fq.begin_step(step)
        assert torch.equal(m(x), ref(x))
        fq.end_step()
    fq.begin_step(3)
    y = m(x)
    assert not torch.equal(y, ref(x)) and torch.allclose(y, ref(x), atol=0.05)
    assert set(fq.activation_ranges()) == {"conv", "fc"}


def test_weight_only_and_fixed_have_no_activation_observers():
    for cfg in (QuantizationSpec(mode="qat", bits=4), QuantizationSpec(mode="fixed", scale=64.0)):
        m = _Tiny()
        qz.prepare(m, cfg)
        assert m.fc.input_quant is None and m.conv.input_quant is None
    m = _Tiny()
    assert qz.prepare(m, QuantizationSpec(mode="ptq")) == 0
    assert type(m.fc) is nn.Linear


def test_masks_hold_under_fake_quant_with_the_pruner():
    from service.spec import PruningSpec
    from workers.compression.pruning import Pruner, prunable_weights

    torch.manual_seed(0)
    m = _Tiny()
    qz.prepare(m, QuantizationSpec(mode="qat", start_step=0))
    pr = Pruner(PruningSpec(schedule="oneshot", final_sparsity=0.8, start_step=0), prunable_weights(m))
    pr.update(0)
    fq = qz.FakeQuantizer(m, qz.schedule(QuantizationSpec(mode="qat"), 20))
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 3, (16,))
    for step in range(5):
        fq.begin_step(step)
        opt.zero_grad()
        nn.functional.cross_entropy(m(x), y).backward()
        fq.end_step()
        pr.mask_grads_()
        opt.step()
        pr.apply_()
    for name, mask in pr.masks.items():
        layer = dict(m.named_modules())[name]
        assert torch.all(layer.weight[~mask] == 0)
        deployed = qz.dequantize(qz.quantize_weight(layer.weight, 8))
        assert torch.all(deployed[~mask] == 0)
