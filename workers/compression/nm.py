"""N:M semi-structured sparsity (`compression.pruning.structure: "N:M"`, e.g. "2:4").

In every group of M consecutive weights along a layer's *input* axis (per output row, and per
kernel position of a convolution) at most N are non-zero: the N with the highest scores
(|w| for magnitude pruning), ties going to the lower index so every rank that holds the same
weights picks the same ones. This is the layout NVIDIA's sparse tensor cores run (2:4,
`torch.sparse.to_sparse_semi_structured`); on CPU the report measures compliance only.

A layer whose input width is not a multiple of M ends in a partial group of r < M weights, which
keeps its top min(N, r): every group still holds at most N non-zeros (compliance is 1.0), but
such a layer is slightly denser than N/M and no 2:4 kernel takes it as it is.

Everything here is pure: tensors in, tensors out.
"""

from __future__ import annotations

import torch


def in_axis(weight_dim: int, out_axis: int) -> int:
    """The input-feature axis of a weight: 1 for Linear (out, in) and Conv (out, in, *k); 0 for
    transformers' Conv1D (in, out)."""
    if weight_dim < 2:
        raise ValueError("N:M sparsity needs a weight with an input axis (2 or more dimensions)")
    return 0 if out_axis == 1 else 1


def _grouped(t: torch.Tensor, axis: int, m: int, fill: float) -> tuple[torch.Tensor, int]:
    """`t` with `axis` moved last and padded with `fill` to a multiple of m, viewed as
    (..., groups, m); and the unpadded width."""
    moved = t.movedim(axis, -1)
    width = moved.shape[-1]
    pad = (-width) % m
    if pad:
        moved = torch.cat([moved, moved.new_full((*moved.shape[:-1], pad), fill)], dim=-1)
    return moved.reshape(*moved.shape[:-1], -1, m), width


def nm_mask(
    scores: torch.Tensor, n: int, m: int, axis: int = 1, alive: torch.Tensor | None = None
) -> torch.Tensor:
    """Boolean mask keeping the top `n` scores of every group of `m` along `axis`.

    `alive` (the current mask) ranks every live weight above every pruned one, so a mask only
    ever shrinks and a pruned weight (score 0) never displaces a live weight that is exactly 0.
    Ties go to the lower index: a stable sort, the same on every rank."""
    if scores.numel() == 0:  # a pipeline stage's placeholder for another stage's layer
        return torch.ones_like(scores, dtype=torch.bool)
    s = scores.detach().float()
    if alive is not None:
        # Live scores are >= 0; pruned ones go below all of them.
        s = torch.where(alive, s, torch.full_like(s, -1.0))
    groups, width = _grouped(s, axis, m, -float("inf"))
    order = torch.sort(groups, dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(m, device=order.device).expand_as(order))
    keep = (rank < n).reshape(*groups.shape[:-2], -1)[..., :width]
    keep = keep.movedim(-1, axis)
    if alive is not None:
        keep = keep & alive
    return keep.contiguous()


def group_nonzeros(weight: torch.Tensor, m: int, axis: int = 1) -> torch.Tensor:
    """Non-zero count of every group of `m` along `axis` (padding counts as zero)."""
    groups, _ = _grouped((weight != 0).to(torch.int32), axis, m, 0)
    return groups.sum(-1)


def compliance(weight: torch.Tensor, n: int, m: int, axis: int = 1) -> float:
    """Fraction of the groups of `m` along `axis` holding at most `n` non-zeros (1.0: the layer
    is N:M sparse)."""
    counts = group_nonzeros(weight, m, axis)
    return float((counts <= n).sum()) / counts.numel() if counts.numel() else 1.0


def keep_at(m: int, n: int, target_sparsity: float) -> int:
    """How many of every M a gradual N:M schedule keeps at `target_sparsity` (0 .. 1 - N/M):
    the densest N' >= N whose sparsity 1 - N'/M does not exceed the target, so the run ramps
    M:M -> (M-1):M -> ... -> N:M along the schedule's curve and reaches N:M exactly at its end."""
    pruned = int(target_sparsity * m + 1e-9)
    return max(n, m - pruned)
