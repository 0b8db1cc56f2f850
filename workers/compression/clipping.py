"""Weight clipping: clamp Linear/Conv weights to [-max_abs, max_abs] after every step."""

from __future__ import annotations

import torch
from torch import nn

from workers.compression.pruning import _local


@torch.no_grad()
def clip_weights_(weights: list[nn.Parameter], max_abs: float) -> None:
    # clamp keeps exact zeros at zero, so clipping never undoes a pruning mask.
    for w in weights:
        _local(w).clamp_(-max_abs, max_abs)
