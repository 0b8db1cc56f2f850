"""The local exact selection gives the bisection's threshold, and runs wherever tensors are whole.

The bisection over float32 bit patterns is the reference (it is what sharded ranks still run);
the local selection must return the same number, so masks are unchanged value for value."""

import math
from collections import OrderedDict

import pytest
import torch
from torch import nn

from service.spec import PruningSpec
from tests.thread_ranks import run_on_two_ranks
from workers.compression import pruning
from workers.compression.pruning import (
    Pruner,
    channel_masks,
    kth_smallest,
    kth_smallest_bisect,
    kth_smallest_local,
    prunable_weights,
    unstructured_masks,
)


def _scores(seed, sizes=(1000, 333, 57), ties=False, zeros=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in sizes:
        s = torch.rand(n, generator=g) * (seed % 5 + 1)
        if ties:  # few distinct values: every threshold falls inside a run of equal scores
            s = (s * 4).floor() / 4
        s[:zeros] = 0.0
        out.append(s)
    return out


@pytest.mark.parametrize("seed", range(12))
def test_local_selection_equals_bisection(seed):
    xs = _scores(seed, ties=seed % 3 == 0, zeros=seed % 4 * 50)
    n = sum(x.numel() for x in xs)
    for k in (0, 1, 2, 17, n // 3, n // 2 + 1, n - 1, n, n + 1, 0.5, 17.2):
        assert kth_smallest_local(xs, k) == kth_smallest_bisect(xs, k), k


@pytest.mark.parametrize("seed", range(8))
def test_weighted_local_selection_equals_bisection(seed):
    xs = _scores(seed, sizes=(40, 20, 8), ties=seed % 2 == 0)
    g = torch.Generator().manual_seed(100 + seed)
    wts = [torch.randint(1, 300, (x.numel(),), generator=g).double() for x in xs]
    total = float(sum(w.sum() for w in wts))
    for frac in (0.0, 0.01, 0.3, 0.5, 0.77, 0.999, 1.0, 1.01):
        k = frac * total
        assert kth_smallest_local(xs, k, wts) == kth_smallest_bisect(xs, k, wts), frac


def test_local_selection_on_non_finite_scores_gives_the_bisection_threshold():
    x = torch.tensor([0.5, float("nan"), 0.1, float("inf"), 0.3])
    for k in range(0, 7):
        assert kth_smallest_local([x], k) == kth_smallest_bisect([x], k), k
    assert kth_smallest_local([x], 6) == math.inf  # more than the finite scores: nothing passes


def test_local_selection_counts_negative_patterns_as_the_bisection_does():
    # Scores are non-negative (|w|, RMS), but -0.0 and negatives must not break the selection.
    x = torch.tensor([-0.0, 0.5, -1.0, 0.2, 0.0, float("-nan")])
    for k in range(0, 8):
        assert kth_smallest_local([x], k) == kth_smallest_bisect([x], k), k


def test_local_selection_with_mostly_zeros_equals_bisection():
    """After a few updates most scores are exact zeros: the threshold often falls among them."""
    g = torch.Generator().manual_seed(5)
    x = torch.rand(200_000, generator=g)
    x[torch.randperm(x.numel(), generator=g)[:180_000]] = 0.0
    for k in (1, 179_999, 180_000, 180_001, 190_000, 200_000):
        assert kth_smallest_local([x], k) == kth_smallest_bisect([x], k), k


def test_local_selection_of_float64_and_bf16_scores_rounds_as_the_bisection_does():
    g = torch.Generator().manual_seed(3)
    x64 = torch.rand(5000, generator=g, dtype=torch.float64)
    xb = torch.rand(5000, generator=g).bfloat16()
    for x in (x64, xb):
        for k in (1, 2500, 4999):
            assert kth_smallest_local([x], k) == kth_smallest_bisect([x], k)


def test_local_selection_of_empty_scores():
    empty = [torch.empty(0), torch.empty(0, 3)]
    assert kth_smallest_local(empty, 0) == kth_smallest_bisect(empty, 0) == 0.0
    assert kth_smallest_local(empty, 1) == kth_smallest_bisect(empty, 1) == math.inf


def _weights(seed):
    g = torch.Generator().manual_seed(seed)
    w = OrderedDict(
        a=torch.randn(64, 48, generator=g),
        b=torch.randn(32, 64, generator=g) * 3,
        c=torch.randn(8, 3, 3, 3, generator=g) * 0.5,
    )
    w["a"][:4] = 0.0  # exact ties at zero, as pruned-and-kept-at-zero weights make
    w["b"][0, :10] = 0.25  # and a run of equal non-zero magnitudes
    return w


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("scope", ["global", "layer"])
def test_masks_of_the_local_path_equal_the_bisection_masks(seed, scope, monkeypatch):
    w = _weights(seed)
    for sparsity in (0.0, 0.3, 0.9, 0.999):
        fast = {
            "u": unstructured_masks(w, sparsity, scope),
            "c": channel_masks(w, sparsity, scope),
        }
        with monkeypatch.context() as m:
            m.setattr(pruning, "kth_smallest_local", pruning.kth_smallest_bisect)
            slow = {
                "u": unstructured_masks(w, sparsity, scope),
                "c": channel_masks(w, sparsity, scope),
            }
        for kind in fast:
            for name in w:
                assert torch.equal(fast[kind][name], slow[kind][name]), (kind, name, sparsity)
        n = sum(x.numel() for x in w.values())
        if scope == "global":
            assert sum(int((~m).sum()) for m in fast["u"].values()) == round(sparsity * n)


class _Calls:
    def __init__(self, fn):
        self.fn, self.n = fn, 0

    def __call__(self, *a, **kw):
        self.n += 1
        return self.fn(*a, **kw)


def _spy(monkeypatch):
    local, bisect = _Calls(pruning.kth_smallest_local), _Calls(pruning.kth_smallest_bisect)
    monkeypatch.setattr(pruning, "kth_smallest_local", local)
    monkeypatch.setattr(pruning, "kth_smallest_bisect", bisect)
    return local, bisect


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 10))


@pytest.mark.parametrize("structure", ["unstructured", "channel"])
@pytest.mark.parametrize("scope", ["global", "layer"])
def test_whole_tensors_take_the_local_path(monkeypatch, structure, scope):
    """Single process and DDP (no reduce_sum): no bisection at all."""
    local, bisect = _spy(monkeypatch)
    cfg = PruningSpec(schedule="oneshot", final_sparsity=0.8, start_step=0, scope=scope, structure=structure)
    Pruner(cfg, prunable_weights(_model())).update(0)
    assert local.n >= 1 and bisect.n == 0


def test_layer_scope_with_a_reduction_over_whole_layers_takes_the_local_path(monkeypatch):
    """Pipeline stages hold whole layers (or none of one): a layer's threshold needs no search
    across ranks. A global threshold over several stages' layers still does."""
    local, bisect = _spy(monkeypatch)
    weights = prunable_weights(_model())
    unstructured_masks(weights, 0.5, "layer", reduce_sum=lambda t: t)
    assert local.n == 2 and bisect.n == 0
    unstructured_masks(weights, 0.5, "global", reduce_sum=lambda t: t)
    assert bisect.n == 1


def test_sharded_ranks_keep_the_search_across_ranks():
    """Two 'ranks' (threads) each hold half of every layer; with reduce_sum the threshold is
    the bisection's, and equals the whole tensors' local selection."""
    w = _weights(0)
    halves = [OrderedDict((n, t.flatten()[r::2]) for n, t in w.items()) for r in (0, 1)]

    def work(rank, reduce_sum):
        return kth_smallest([x.abs() for x in halves[rank].values()], 3000, reduce_sum=reduce_sum)

    out = run_on_two_ranks(work)
    whole = kth_smallest_local([x.abs() for x in w.values()], 3000)
    assert out == [whole, whole]


def test_the_bisection_counts_on_the_scores_device():
    """NCCL reduces only GPU tensors, so the per-probe count must live where the scores do. No GPU
    here: scores on the meta device stand in for CUDA ones (what the check sees is the device of
    every tensor handed to the reduction). On an H200 a CPU count failed FSDP pruning at its first
    update (bench.gpu_check)."""
    seen = []

    def reduce_sum(t):
        seen.append(t.device)
        return torch.zeros((), dtype=torch.float64)  # meta holds no values: every probe counts 0

    scores = [torch.rand(10, device="meta"), torch.rand(5, device="meta")]
    assert kth_smallest_bisect(scores, 3, reduce_sum=reduce_sum) == math.inf
    assert seen and set(seen) == {torch.device("meta")}
