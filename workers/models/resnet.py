"""CIFAR-style ResNet (He et al. 2016, section 4.2): a 3x3 stem, three stages of BasicBlocks
(two 3x3 conv + BatchNorm each) at widths w, 2w, 4w, the last two starting with stride 2, then
global average pooling and one linear layer. `depth` = 6n + 2 (n blocks per stage): 8, 14, 20...

Shortcuts are identities, or a 1x1 conv + BatchNorm where a block changes the shape (option B of
the paper). Convolutions have no bias: the BatchNorm after each supplies it.

BatchNorm and compression: in training, pruning and fake quantization act on the raw conv weights
and BatchNorm runs after the conv, as usual. For the int8 graph the BatchNorms are folded into
their convs in eval mode (`workers.models.folding`): a per-output-channel scale and a bias. Per-channel
symmetric weight quantization commutes with a per-channel scale (the codes stay those trained,
the scale absorbs gamma / sigma), and a pruned weight stays exactly zero."""

from __future__ import annotations

from collections import OrderedDict

from torch import nn

from service.errors import ConfigError
from workers.data.info import DataInfo
from workers.models.common import InputAdapter

DEPTHS = "6n+2: 8, 14, 20, 26, 32, 44, 56, 110"


def blocks_per_stage(depth: int) -> int:
    if depth < 8 or (depth - 2) % 6:
        raise ValueError(f"model.args.depth: {depth} is not a CIFAR ResNet depth; allowed: {DEPTHS}")
    return (depth - 2) // 6


def conv_bn(cin: int, cout: int, k: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        OrderedDict(
            conv=nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, bias=False),
            bn=nn.BatchNorm2d(cout),
        )
    )


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = conv_bn(cin, cout, 3, stride)
        self.act1 = nn.ReLU()
        self.conv2 = conv_bn(cout, cout, 3, 1)
        self.shortcut = conv_bn(cin, cout, 1, stride) if stride != 1 or cin != cout else nn.Identity()
        self.act2 = nn.ReLU()

    def forward(self, x):
        return self.act2(self.conv2(self.act1(self.conv1(x))) + self.shortcut(x))


class ResNet(nn.Module):
    output_layer = "fc"

    def __init__(self, info: DataInfo, depth: int = 20, width: int = 16):
        super().__init__()
        if info.image_shape is None:
            raise ValueError("resnet needs image-shaped input (C, H, W)")
        n = blocks_per_stage(depth)
        c, h, w = info.image_shape
        self.input = InputAdapter(info.mean, info.std, (c, h, w))
        self.stem = nn.Sequential(OrderedDict(conv=conv_bn(c, width, 3, 1), act=nn.ReLU()))
        side, cin = min(h, w), width
        for s, cout in enumerate((width, 2 * width, 4 * width), start=1):
            # Downsample at the start of stages 2 and 3 while the map is big enough (8x8 digits:
            # 8 -> 4 -> 2); smaller maps keep their size.
            stride = 2 if s > 1 and side >= 2 else 1
            side = -(-side // stride)
            blocks = [BasicBlock(cin, cout, stride)] + [BasicBlock(cout, cout, 1) for _ in range(n - 1)]
            self.add_module(f"layer{s}", nn.Sequential(*blocks))
            cin = cout
        self.fc = nn.Linear(cin, info.num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        x = self.layer3(self.layer2(self.layer1(self.stem(self.input(x)))))
        return self.fc(x.mean(dim=(2, 3)))

    def pipeline_chain(self):
        # Refused rather than cut: each pipeline micro-batch would normalise with its own
        # BatchNorm statistics, and the stages' running statistics would not merge into one model.
        raise ConfigError(
            "parallel.strategy: model 'resnet' cannot run as a pipeline (BatchNorm statistics "
            "would be per micro-batch); use ddp or fsdp"
        )
