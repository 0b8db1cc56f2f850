"""Pieces shared by the registry models."""

from __future__ import annotations

import torch
from torch import nn


class InputAdapter(nn.Module):
    """Raw features in, normalised and shaped tensors out. Mean and std are buffers, so they are
    saved with the weights and travel inside the exported graph."""

    def __init__(self, mean: float, std: float, shape: tuple[int, ...]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(float(mean)))
        self.register_buffer("std", torch.tensor(float(std)))
        self.shape = tuple(shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x.float() - self.mean) / self.std
        return x.reshape(x.shape[0], *self.shape)
