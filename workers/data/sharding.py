"""Which samples each rank trains on at each step: pure functions of (seed, epoch, step, rank).

Why not DistributedSampler: it strides the data across ranks and pads, so the global batch at a
given step depends on the worker count. Here the global batch at step t is the same slice of the
same per-epoch permutation whatever the worker count, and rank r takes the r-th contiguous part
of it. With gradients averaged across ranks, 1, 2 or 8 workers then follow the same trajectory
(up to float summation order), and a resumed run re-derives its position from the step alone.
"""

from __future__ import annotations

import torch


def steps_per_epoch(n_train: int, batch_size: int) -> int:
    """Full global batches per epoch (the ragged tail is dropped so every rank's slice is equal)."""
    return n_train // batch_size


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    g = torch.Generator().manual_seed((seed * 1_000_003 + epoch) % (2**63))
    return torch.randperm(n, generator=g)


def global_batch(perm: torch.Tensor, step_in_epoch: int, batch_size: int) -> torch.Tensor:
    return perm[step_in_epoch * batch_size : (step_in_epoch + 1) * batch_size]


def rank_slice(indices: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """Rank r's contiguous share of a global batch (the batch size is divisible by world size)."""
    per = len(indices) // world_size
    return indices[rank * per : (rank + 1) * per]


def eval_slice(n: int, rank: int, world_size: int) -> slice:
    """Rank r's contiguous share of the validation set (shares differ by at most one sample)."""
    return slice(rank * n // world_size, (rank + 1) * n // world_size)


def split_indices(n: int, val_fraction: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, val) indices. The split seed is fixed apart from the training seed, so runs with
    different seeds are scored on the same validation samples."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=g)
    n_val = max(1, round(n * val_fraction))
    return perm[n_val:], perm[:n_val]
