"""LeNet-5 for small grayscale images: 8x8 (scikit-learn digits) and 28x28 (MNIST-sized) alike.

The second convolution keeps its classic valid padding when the map is large enough (28x28 ->
400 features, the paper's shape) and pads otherwise, so 8x8 inputs still reach the classifier."""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from workers.data.info import DataInfo
from workers.models.common import InputAdapter


class LeNet5(nn.Module):
    output_layer = "classifier.fc3"

    def __init__(self, info: DataInfo, activation: str = "relu"):
        super().__init__()
        if info.image_shape is None:
            raise ValueError("lenet5 needs image-shaped input (C, H, W)")
        c, h, w = info.image_shape
        act = nn.ReLU if activation == "relu" else nn.Tanh
        self.input = InputAdapter(info.mean, info.std, (c, h, w))
        pad2 = 0 if min(h, w) // 2 >= 10 else 2
        self.features = nn.Sequential(
            OrderedDict(
                conv1=nn.Conv2d(c, 6, 5, padding=2),
                act1=act(),
                pool1=nn.MaxPool2d(2),
                conv2=nn.Conv2d(6, 16, 5, padding=pad2),
                act2=act(),
                pool2=nn.MaxPool2d(2),
            )
        )
        with torch.no_grad():
            n_flat = self.features(torch.zeros(1, c, h, w)).numel()
        self.classifier = nn.Sequential(
            OrderedDict(
                fc1=nn.Linear(n_flat, 120),
                act1=act(),
                fc2=nn.Linear(120, 84),
                act2=act(),
                fc3=nn.Linear(84, info.num_classes),
            )
        )

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
