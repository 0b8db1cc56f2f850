"""Masks: thresholds, scopes, structures, and that nothing revives a pruned weight."""

from collections import OrderedDict

import pytest
import torch
from torch import nn

from service.errors import ConfigError, MaskMismatchError
from service.spec import PruningSpec
from tests.thread_ranks import run_on_two_ranks
from workers.compression.pruning import (
    Pruner,
    channel_masks,
    kth_smallest,
    prunable_weights,
    threshold_masks,
    unstructured_masks,
    verify_masks_agree,
)
from workers.precision import Precision


def weights(seed=0):
    g = torch.Generator().manual_seed(seed)
    return OrderedDict(
        a=torch.randn(40, 30, generator=g),
        b=torch.randn(20, 40, generator=g) * 3,
        c=torch.randn(8, 3, 3, 3, generator=g) * 0.5,
    )


def test_kth_smallest_is_exact():
    g = torch.Generator().manual_seed(1)
    xs = [torch.rand(1000, generator=g), torch.rand(333, generator=g) * 2]
    flat = torch.sort(torch.cat(xs)).values
    for k in (1, 2, 17, 500, 1333):
        assert kth_smallest(xs, k) == flat[k - 1].item()


def test_kth_smallest_across_shards_matches_gathered():
    """Two 'ranks' (threads) each hold a shard; sums meet at a barrier, as an all-reduce would."""
    g = torch.Generator().manual_seed(2)
    full = torch.rand(10_000, generator=g)
    shards = [full[:3000], full[3000:]]
    results = run_on_two_ranks(
        lambda rank, reduce_sum: kth_smallest([shards[rank]], 9000, reduce_sum=reduce_sum)
    )
    expected = torch.sort(full).values[8999].item()
    assert results == [expected, expected]


def test_global_scope_hits_target_exactly_and_spreads_unevenly():
    w = weights()
    masks = unstructured_masks(w, 0.7, "global")
    n = sum(x.numel() for x in w.values())
    pruned = sum(int((~m).sum()) for m in masks.values())
    assert pruned == round(0.7 * n)
    per_layer = {k: float((~m).float().mean()) for k, m in masks.items()}
    # b has 3x larger weights: global magnitude pruning spares it
    assert per_layer["b"] < 0.5 < per_layer["a"]
    # and the threshold is one number: every kept |w| exceeds every pruned |w|
    kept = torch.cat([w[k].abs()[m] for k, m in masks.items()])
    gone = torch.cat([w[k].abs()[~m] for k, m in masks.items()])
    assert kept.min() > gone.max()


def test_layer_scope_prunes_each_layer_to_target():
    w = weights()
    masks = unstructured_masks(w, 0.6, "layer")
    for k, m in masks.items():
        assert int((~m).sum()) == round(0.6 * w[k].numel())


def test_channel_masks_zero_whole_channels():
    w = weights()
    for scope in ("layer", "global"):
        masks = channel_masks(w, 0.5, scope)
        for m in masks.values():
            rows = m.reshape(m.shape[0], -1)
            assert bool((rows.all(1) | (~rows).all(1)).all()), "a channel is partly pruned"
            assert rows.all(1).sum() >= 1
        if scope == "layer":
            assert int((~masks["a"].reshape(40, -1).all(1)).sum()) == 20
    total = sum(x.numel() for x in w.values())
    pruned = sum(int((~m).sum()) for m in channel_masks(w, 0.5, "global").values())
    # within one channel of the target (the widest channel has 40 weights); a layer that would
    # lose every channel keeps its strongest one
    assert abs(pruned - 0.5 * total) <= 40


def test_channel_multiple_rounds_each_layers_kept_channels_up_to_the_strongest():
    # channel c of each layer has RMS c + 1: the strongest channels are the last ones
    rows = {"a": 64, "b": 32, "c": 6}
    w = {
        n: (torch.arange(r, dtype=torch.float32) + 1).repeat_interleave(9).reshape(r, 1, 3, 3)
        for n, r in rows.items()
    }
    kept = lambda masks: {n: m.reshape(m.shape[0], -1).all(1) for n, m in masks.items()}  # noqa: E731
    # 40% of 64 is 25.6 -> 26 pruned, 38 kept -> 40; of 32: 13 pruned, 19 kept -> 24; of 6: 2
    # pruned, 4 kept -> 8 is more than the layer has: all 6 kept
    for n, want in kept(channel_masks(w, 0.4, "layer", multiple=8)).items():
        assert want.tolist() == [c >= rows[n] - {"a": 40, "b": 24, "c": 6}[n] for c in range(rows[n])], n
    # a count already a multiple stays: 50% of 64 and 32 keeps 32 and 16
    got = kept(channel_masks(w, 0.5, "layer", multiple=8))
    assert (int(got["a"].sum()), int(got["b"].sum())) == (32, 16)
    # global scope rounds each layer's share the same way, upwards
    plain = kept(channel_masks(w, 0.4, "global"))
    rounded = kept(channel_masks(w, 0.4, "global", multiple=8))
    for n in rows:
        assert int(rounded[n].sum()) == min(rows[n], -(-int(plain[n].sum()) // 8) * 8), n
        assert bool((plain[n] <= rounded[n]).all()), n  # only channels come back, none go
    one, plain = kept(channel_masks(w, 0.4, "layer", multiple=1)), kept(channel_masks(w, 0.4, "layer"))
    assert all(torch.equal(one[n], plain[n]) for n in rows)


def test_threshold_masks_prune_below_theta_std_and_only_shrink():
    w = weights()
    alive = {k: torch.ones_like(v, dtype=torch.bool) for k, v in w.items()}
    m1 = threshold_masks(w, alive, 1.0)
    for k in w:
        assert torch.equal(m1[k], w[k].abs() >= w[k].std(unbiased=False))
    m2 = threshold_masks(w, m1, 0.5)
    for k in w:
        assert not (m2[k] & ~m1[k]).any()


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 10))


def _cfg(**kw):
    return PruningSpec(**{"schedule": "oneshot", "final_sparsity": 0.8, "start_step": 0, **kw})


def test_layer_sparsity_gives_the_named_layers_their_own_target_on_the_same_schedule():
    def pruned(**kw) -> dict[str, int]:
        p = Pruner(PruningSpec(**kw), prunable_weights(_model()))
        p.update(kw["end_step"] if kw["schedule"] != "oneshot" else 0)
        return {n: int((~m).sum()) for n, m in p.masks.items()}

    # layer "0" (600 weights) to 0.25, layer "2" (300) to final_sparsity 0.8
    base = {"scope": "layer", "final_sparsity": 0.8, "start_step": 0, "layer_sparsity": {"0": 0.25}}
    assert pruned(**base, schedule="oneshot") == {"0": 150, "2": 240}
    # half-way along a linear ramp 0 -> 0.8 the target is 0.4: layer "0" gets 0.4 * 0.25 / 0.8
    mid = Pruner(PruningSpec(**base, schedule="linear", end_step=10), prunable_weights(_model()))
    mid.update(5)
    assert {n: int((~m).sum()) for n, m in mid.masks.items()} == {"0": round(0.125 * 600), "2": 120}
    # patterns, first match wins; channels: whole rows of each layer, to each layer's own target
    ch = {**base, "structure": "channel", "layer_sparsity": {"[0-1]": 0.5, "*": 0.0}}
    p = Pruner(PruningSpec(**ch, schedule="oneshot"), prunable_weights(_model()))
    p.update(0)
    rows = {n: int((~m.all(1)).sum()) for n, m in p.masks.items()}
    assert rows == {"0": 15, "2": 0}
    # without layer_sparsity the targets are the schedule's, one number
    assert Pruner(_cfg(scope="layer"), prunable_weights(_model())).layer_targets(0.5) == 0.5


def test_layer_sparsity_naming_no_pruned_layer_is_a_config_error():
    cfg = _cfg(scope="layer", layer_sparsity={"0": 0.5, "features.*": 0.5})
    with pytest.raises(
        ConfigError, match=r"'features\.\*' matches no pruned layer; the pruned layers are 0, 2"
    ):
        Pruner(cfg, prunable_weights(_model()))


def test_prunable_weights_skip_biases_norms_and_excluded():
    m = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Conv1d(4, 4, 1), nn.Linear(4, 2))
    assert list(prunable_weights(m)) == ["0", "2", "3"]
    assert list(prunable_weights(m, exclude=["3"])) == ["0", "2"]
    assert list(prunable_weights(m, exclude=["*"])) == []


@pytest.mark.parametrize("opt_name", ["sgd", "adamw"])
def test_momentum_and_weight_decay_never_revive_pruned_weights(opt_name):
    model = _model()
    if opt_name == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.99, weight_decay=0.1)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.1)
    x, y = torch.randn(64, 20), torch.randint(0, 10, (64,))
    # build up optimizer state (momentum / Adam moments) before pruning
    for _ in range(5):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    pruner = Pruner(_cfg(), prunable_weights(model))
    pruner.update(0, opt)
    for _ in range(20):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        pruner.mask_grads_()
        opt.step()
        pruner.apply_()
        for name, w in pruner.weights.items():
            assert torch.all(w[~pruner.masks[name]] == 0)
    # and the optimizer state no longer carries anything at pruned positions
    for name, w in pruner.weights.items():
        for v in opt.state[w].values():
            if torch.is_tensor(v) and v.shape == w.shape:
                assert torch.all(v[~pruner.masks[name]] == 0)


def test_fp16_skipped_steps_keep_masks():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    prec = Precision("fp16", torch.device("cpu"))
    pruner = Pruner(_cfg(), prunable_weights(model))
    pruner.update(0, opt)
    x, y = torch.randn(8, 20), torch.randint(0, 10, (8,))
    skipped = 0
    for i in range(6):
        opt.zero_grad()
        with prec.autocast():
            loss = nn.functional.cross_entropy(model(x), y)
        prec.backward(loss * (float("inf") if i % 2 else 1.0))
        prec.unscale_(opt)
        pruner.mask_grads_()
        skipped += not prec.step(opt)
        pruner.apply_()
        for name, w in pruner.weights.items():
            assert torch.all(w[~pruner.masks[name]] == 0)
    assert skipped == 3


def test_pruner_state_roundtrip_and_checksum():
    model = _model()
    p = Pruner(_cfg(), prunable_weights(model))
    p.update(0)
    state = p.state_dict()
    other = Pruner(_cfg(), prunable_weights(_model()))
    assert other.checksum() != p.checksum()
    other.load_state_dict(state)
    assert other.checksum() == p.checksum() and other.last_update == 0
    glob, layers = p.sparsity()
    assert glob == pytest.approx(0.8, abs=1 / 900) and set(layers) == {"0", "2"}


def test_masks_never_grow_back():
    model = _model()
    p = Pruner(
        PruningSpec(schedule="cubic", final_sparsity=0.9, start_step=0, end_step=40, frequency=10),
        prunable_weights(model),
    )
    prev = None
    for step in range(0, 41):
        p.maybe_update(step)
        if prev is not None:
            for k in p.masks:
                assert not (p.masks[k] & ~prev[k]).any()
        prev = {k: v.clone() for k, v in p.masks.items()}
        with torch.no_grad():  # perturb weights so magnitudes reorder between updates
            for w in p.weights.values():
                w.add_(torch.randn_like(w) * 0.5)
            p.apply_()
    assert p.sparsity()[0] == pytest.approx(0.9, abs=1e-3)


def test_mask_mismatch_fails_loudly():
    verify_masks_agree([7, 7, 7])
    with pytest.raises(MaskMismatchError, match="differ between ranks"):
        verify_masks_agree([7, 8])


def test_preflight_refuses_a_layer_sparsity_entry_that_names_no_layer(tmp_path):
    from service.artifacts import LocalArtifactStore
    from service.spec import parse_spec
    from workers.driver import preflight

    pruning = {"scope": "layer", "end_step": 100, "frequency": 10, "layer_sparsity": {"net.fc9": 0.2}}
    spec = parse_spec(
        {
            "name": "p",
            "model": {"name": "mlp"},
            "data": {"name": "digits"},
            "compression": {"pruning": pruning},
        }
    )
    with pytest.raises(
        ConfigError, match=r"layer_sparsity: 'net.fc9' matches no pruned layer; the pruned layers are "
    ):
        preflight(spec, LocalArtifactStore(tmp_path))
