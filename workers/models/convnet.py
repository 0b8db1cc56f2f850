"""A small VGG-style CNN: stages of two 3x3 convolutions and a 2x2 max-pool, then two linear
layers. No normalisation layers: batch statistics would tie the math to the per-rank batch and
break the equality between worker counts that the schedules rely on."""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from workers.data.info import DataInfo
from workers.models.common import InputAdapter


class ConvNet(nn.Module):
    output_layer = "classifier.fc2"

    def __init__(
        self, info: DataInfo, channels: list[int] = (32, 64), hidden: int = 128, dropout: float = 0.0
    ):
        super().__init__()
        if info.image_shape is None:
            raise ValueError("convnet needs image-shaped input (C, H, W)")
        c, h, w = info.image_shape
        self.input = InputAdapter(info.mean, info.std, (c, h, w))
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        side = min(h, w)
        for i, out in enumerate(channels, start=1):
            layers[f"conv{i}a"] = nn.Conv2d(c, out, 3, padding=1)
            layers[f"act{i}a"] = nn.ReLU()
            layers[f"conv{i}b"] = nn.Conv2d(out, out, 3, padding=1)
            layers[f"act{i}b"] = nn.ReLU()
            if side >= 2:
                layers[f"pool{i}"] = nn.MaxPool2d(2)
                side //= 2
            c = out
        self.features = nn.Sequential(layers)
        with torch.no_grad():
            n_flat = self.features(torch.zeros(1, *info.image_shape)).numel()
        head: OrderedDict[str, nn.Module] = OrderedDict(fc1=nn.Linear(n_flat, hidden), act1=nn.ReLU())
        if dropout:
            head["drop1"] = nn.Dropout(dropout)
        head["fc2"] = nn.Linear(hidden, info.num_classes)
        self.classifier = nn.Sequential(head)

    def forward(self, x):
        return self.classifier(self.features(self.input(x)).flatten(1))

    def pipeline_chain(self) -> list[tuple[str, nn.Module]]:
        """forward() as a chain of named modules, cut into pipeline stages by workers.models.stages;
        the unnamed link is the parameter-free flatten between the two halves."""
        return [
            ("input", self.input),
            *((f"features.{n}", m) for n, m in self.features.named_children()),
            ("", nn.Flatten(1)),
            *((f"classifier.{n}", m) for n, m in self.classifier.named_children()),
        ]
