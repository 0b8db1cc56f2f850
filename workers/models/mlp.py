"""LeNet-300-100 shaped multilayer perceptron (Han et al.'s fully connected benchmark)."""

from __future__ import annotations

from collections import OrderedDict

from torch import nn

from workers.data.info import DataInfo
from workers.models.common import InputAdapter


class MLP(nn.Module):
    def __init__(self, info: DataInfo, hidden: list[int] = (300, 100), dropout: float = 0.0):
        super().__init__()
        if info.kind in ("tokens", "sequence"):  # token ids are not magnitudes
            raise ValueError("mlp takes feature vectors, not tokens")
        n_in = info.n_features
        self.input = InputAdapter(info.mean, info.std, (n_in,))
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        widths = [n_in, *hidden]
        for i in range(len(hidden)):
            layers[f"fc{i + 1}"] = nn.Linear(widths[i], widths[i + 1])
            layers[f"act{i + 1}"] = nn.ReLU()
            if dropout:
                layers[f"drop{i + 1}"] = nn.Dropout(dropout)
        self.output_layer = f"layers.fc{len(hidden) + 1}"
        layers[f"fc{len(hidden) + 1}"] = nn.Linear(widths[-1], info.num_classes)
        self.layers = nn.Sequential(layers)

    def forward(self, x):
        return self.layers(self.input(x))

    def pipeline_chain(self) -> list[tuple[str, nn.Module]]:
        """forward() as a chain of named modules, cut into pipeline stages by workers.models.stages."""
        return [("input", self.input), *((f"layers.{n}", m) for n, m in self.layers.named_children())]
