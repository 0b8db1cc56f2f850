"""A test-only slimtrain model plugin: a two-layer MLP with its own argument schema.

What a plugin must provide (service.catalog): `Args`, a pydantic model of the spec's
`model.args` (extra keys forbidden), and `build(args, info)` returning a torch module that takes
the dataset's raw features and returns logits, normalisation inside (the export contract)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field
from torch import nn


class Args(BaseModel):
    model_config = ConfigDict(extra="forbid")
    hidden: int = Field(default=32, ge=1, le=1024)


class ToyMLP(nn.Module):
    def __init__(self, info, hidden: int):
        super().__init__()
        n = 1
        for d in info.input_shape:
            n *= d
        self.mean, self.std = float(info.mean), float(info.std)
        self.fc1 = nn.Linear(n, hidden)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(hidden, info.num_classes)

    def forward(self, x):
        x = (x.float() - self.mean) / self.std
        return self.fc2(self.act(self.fc1(x.flatten(1))))


class _Plugin:
    Args = Args

    @staticmethod
    def build(args: dict, info) -> nn.Module:
        return ToyMLP(info, **args)


plugin = _Plugin()
