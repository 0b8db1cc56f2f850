"""BatchNorm folding for export: conv followed by BatchNorm (eval mode) is one conv.

Why: the ONNX exporter's optimizer fuses Conv + BatchNormalization on its own, so the graph's
conv weights are no longer the trained ones and the export cannot find its layers by value
(`onnx_export.layer_nodes`); and an int8 conv must carry the BatchNorm in its weights and bias
to run as one quantized kernel. So export folds first, under the conv's own name, and the graph
is built from the folded model.

A quantized conv folds exactly onto its trained grid: with k = gamma / sqrt(var + eps) per
output channel, code * scale * k = (code * sign k) * (scale * |k|), so the folded layer keeps
its trained codes (signs flipped where gamma < 0) on scales multiplied by |k|, and its weight is
set to exactly those codes times those scales. Zero codes (pruned weights) stay zero.

The pattern folded is a Sequential with children `conv` (Conv1d/2d/3d) and `bn` (a BatchNorm),
which the registry's ResNet builds; a BatchNorm anywhere else is an ExportError, not a graph
whose layers silently differ from the model's.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from service.errors import ExportError
from workers.pack import QuantizedWeight

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def _pairs(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name of the conv, its conv_bn Sequential) for every conv + BatchNorm pair."""
    return [
        (f"{name}.conv" if name else "conv", m)
        for name, m in model.named_modules()
        if isinstance(getattr(m, "conv", None), _CONVS)
        and isinstance(getattr(m, "bn", None), nn.modules.batchnorm._BatchNorm)
    ]


@torch.no_grad()
def _bn_factor(bn: nn.modules.batchnorm._BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """(k, shift): bn(y) = y * k + shift per channel, in eval mode."""
    k = bn.weight.float() / torch.sqrt(bn.running_var.float() + bn.eps)
    return k, bn.bias.float() - bn.running_mean.float() * k


@torch.no_grad()
def fold_batchnorm(
    model: nn.Module, qweights: dict[str, QuantizedWeight] | None = None
) -> tuple[nn.Module, dict[str, QuantizedWeight]]:
    """A copy of `model` in eval mode with each conv + BatchNorm folded into a conv with a bias
    under the conv's name (layer names stay the trained model's), and `qweights` (by layer name)
    moved onto the folded grid. The folded model's outputs equal `model`'s in eval mode up to
    float rounding. A model without BatchNorm comes back as is (not copied)."""
    qweights = dict(qweights or {})
    if not has_batchnorm(model):
        return model, qweights
    out = copy.deepcopy(model).eval()
    pairs = _pairs(out)
    for name, seq in pairs:
        conv, bn = seq.conv, seq.bn
        k, shift = _bn_factor(bn)
        shape = (-1, *([1] * (conv.weight.dim() - 1)))
        if name in qweights:
            qw = qweights[name]
            sign = torch.where(k < 0, -1, 1).to(torch.int8)
            codes = qw.codes * sign.reshape(shape)
            codes[k == 0] = 0  # a channel BatchNorm zeroes: no weights (its output is the shift)
            scale = torch.where(k == 0, qw.scale.float(), qw.scale.float() * k.abs())
            qweights[name] = QuantizedWeight(codes, scale, qw.bits)
            weight = codes.float() * scale.reshape(shape)
        else:
            weight = conv.weight.float() * k.reshape(shape)
        bias = conv.bias.float() * k if conv.bias is not None else torch.zeros_like(k)
        fused = type(conv)(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            stride=conv.stride,
            padding=conv.padding,
            dilation=conv.dilation,
            groups=conv.groups,
            bias=True,
            padding_mode=conv.padding_mode,
        ).to(conv.weight.device)
        fused.weight.copy_(weight)
        fused.bias.copy_(bias + shift)
        seq.conv = fused
        seq.bn = nn.Identity()
    if has_batchnorm(out):
        left = [n for n, m in out.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        raise ExportError(
            f"BatchNorm layer(s) {left} follow no conv in a conv_bn pair and cannot be folded for export"
        )
    return out, qweights
