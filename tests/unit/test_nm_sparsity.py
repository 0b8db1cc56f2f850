"""N:M semi-structured sparsity: the mask function value by value, the spec's rules, the ramp, the
masks on sharded rows (thread ranks), through fp16 and momentum, and the report's compliance."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from service.errors import SpecError
from service.spec import PruningSpec, parse_spec
from tests.thread_ranks import run_on_two_ranks
from workers.compression import nm, schedules
from workers.compression.pruning import Pruner, nm_compliance, nm_masks, prunable_weights

BASE = {"name": "nm", "model": {"name": "mlp", "args": {"hidden": [16]}}, "data": {"name": "digits"}}

# --- the mask function (pure) -------------------------------------------------------------------


def test_top_n_of_every_m_along_the_input_axis():
    w = torch.tensor(
        [
            [0.1, -0.9, 0.3, 0.2, 5.0, 4.0, -3.0, 0.0],
            [1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, -0.5],  # ties go to the lower index
        ]
    )
    m = nm.nm_mask(w.abs(), 2, 4, axis=1)
    assert m[0].tolist() == [False, True, True, False, True, True, False, False]
    # 2nd row: [1,1,1,1] keeps indices 0,1; [0,0,0,-0.5] keeps -0.5 and the first 0 (index 4)
    assert m[1].tolist() == [True, True, False, False, True, False, False, True]


def test_first_row_value_by_value():
    w = torch.tensor([[0.1, -0.9, 0.3, 0.2, 5.0, 4.0, -3.0, 0.0]])
    assert nm.nm_mask(w.abs(), 2, 4).tolist() == [[False, True, True, False, True, True, False, False]]
    assert nm.nm_mask(w.abs(), 1, 4).tolist() == [[False, True, False, False, True, False, False, False]]
    assert nm.nm_mask(w.abs(), 3, 8).tolist() == [[False, False, False, False, True, True, True, False]]


def test_partial_last_group_keeps_at_most_n():
    w = torch.tensor([[4.0, 3.0, 2.0, 1.0, 7.0, 8.0, 9.0]])  # a group of 4, then one of 3
    assert nm.nm_mask(w, 2, 4).tolist() == [[True, True, False, False, False, True, True]]
    w = torch.tensor([[4.0, 3.0, 2.0, 1.0, 7.0]])  # a group of 1: kept
    assert nm.nm_mask(w, 2, 4).tolist() == [[True, True, False, False, True]]


def test_alive_ranks_live_weights_first_and_masks_only_shrink():
    w = torch.tensor([[0.0, 0.0, 0.0, 0.0]])  # all exactly zero: the live ones win the ties
    alive = torch.tensor([[False, True, False, True]])
    assert nm.nm_mask(w, 2, 4, alive=alive).tolist() == [[False, True, False, True]]
    w = torch.tensor([[9.0, 1.0, 8.0, 2.0]])
    alive = torch.tensor([[False, True, True, True]])  # index 0 was pruned: never revived
    assert nm.nm_mask(w, 2, 4, alive=alive).tolist() == [[False, False, True, True]]


def test_conv_groups_run_along_input_channels_and_conv1d_along_rows():
    w = torch.zeros(1, 4, 1, 2)  # (out, in, kh, kw): one group of 4 channels per kernel position
    w[0, :, 0, 0] = torch.tensor([1.0, 4.0, 3.0, 2.0])
    w[0, :, 0, 1] = torch.tensor([5.0, 1.0, 1.0, 6.0])
    m = nm.nm_mask(w, 2, 4, axis=1)
    assert m[0, :, 0, 0].tolist() == [False, True, True, False]
    assert m[0, :, 0, 1].tolist() == [True, False, False, True]
    t = torch.tensor([[1.0], [4.0], [3.0], [2.0]])  # transformers Conv1D: (in, out)
    assert nm.in_axis(2, out_axis=1) == 0 and nm.in_axis(4, out_axis=0) == 1
    assert nm.nm_mask(t, 2, 4, axis=0).flatten().tolist() == [False, True, True, False]


def test_compliance_counts_groups_with_at_most_n_nonzeros():
    w = torch.tensor([[1.0, 0.0, 2.0, 0.0, 1.0, 1.0, 1.0, 0.0]])
    assert nm.group_nonzeros(w, 4).tolist() == [[2, 3]]
    assert nm.compliance(w, 2, 4) == 0.5
    assert nm.compliance(w, 3, 4) == 1.0
    g = torch.Generator().manual_seed(0)
    w = torch.randn(8, 24, generator=g)
    assert nm.compliance(w * nm.nm_mask(w.abs(), 2, 4), 2, 4) == 1.0


# --- the spec -----------------------------------------------------------------------------------


def _errors(pruning: dict) -> dict:
    with pytest.raises(SpecError) as e:
        parse_spec({**BASE, "compression": {"pruning": pruning}})
    return {x["field"]: x["message"] for x in e.value.errors}


@pytest.mark.parametrize("bad", ["4:2", "0:4", "a:b", "2:2", "2:", "block"])
def test_bad_structures_name_the_field_and_what_is_allowed(bad):
    msg = _errors({"structure": bad})["compression.pruning.structure"]
    assert "'unstructured' or 'channel', or 'N:M' with whole numbers 0 < N < M" in msg


def test_nm_derives_final_sparsity_and_refuses_another():
    pr = parse_spec({**BASE, "compression": {"pruning": {"structure": "2:4"}}}).compression.pruning
    assert pr.nm() == (2, 4) and pr.final_sparsity == 0.5
    assert parse_spec({**BASE, "compression": {"pruning": {"structure": "2:4", "final_sparsity": 0.5}}})
    msg = _errors({"structure": "2:4", "final_sparsity": 0.8})["compression.pruning.final_sparsity"]
    assert "1 - 2/4 = 0.5" in msg


# --- the ramp (pure) ----------------------------------------------------------------------------


def test_keep_at_steps_down_to_n():
    assert [nm.keep_at(4, 2, s) for s in (0.0, 0.24, 0.25, 0.49, 0.5)] == [4, 4, 3, 3, 2]
    assert [nm.keep_at(8, 1, s) for s in (0.0, 0.125, 0.5, 0.875)] == [8, 7, 4, 1]


def test_cubic_nm_schedule_is_quantized_and_ends_at_n_over_m():
    cfg = PruningSpec(structure="2:4", start_step=0, end_step=100, frequency=10)
    targets = [schedules.target_sparsity(cfg, u) for u in range(0, 101, 10)]
    assert targets == [0.0, 0.0, 0.0] + [0.25] * 7 + [0.5]
    once = PruningSpec(structure="2:4", schedule="oneshot", start_step=5)
    assert schedules.target_sparsity(once, 4) == 0.0 and schedules.target_sparsity(once, 5) == 0.5


# --- the pruner ---------------------------------------------------------------------------------


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 3))


def test_pruner_ramps_through_3_of_4_to_2_of_4():
    model = _mlp()
    cfg = PruningSpec(structure="2:4", start_step=0, end_step=20, frequency=10)
    p = Pruner(cfg, prunable_weights(model))
    p.update(10)  # cubic at half way: 0.4375 -> 3:4
    assert nm_compliance(p.weights, 3, 4)["min"] == 1.0
    assert nm_compliance(p.weights, 2, 4)["min"] < 1.0
    p.update(20)
    report = nm_compliance(p.weights, 2, 4)
    assert report["pattern"] == "2:4" and report["min"] == 1.0
    # 12 inputs: exactly half; 10 inputs end in a partial group of 2 (kept whole)
    assert float((model[0].weight == 0).float().mean()) == 0.5
    assert int((model[2].weight != 0).sum()) == 3 * (2 + 2 + 2)


def test_masks_hold_through_fp16_scaler_skips_and_momentum():
    """Masks re-applied after every step, also one the GradScaler skipped; momentum at pruned
    positions is zeroed when masks change, so it cannot revive a weight."""
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = torch.randn(32, 12), torch.randint(0, 3, (32,))
    for _ in range(3):  # momentum builds up densely first
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    p = Pruner(PruningSpec(structure="2:4", schedule="oneshot", start_step=0), prunable_weights(model))
    p.update(0, opt)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**20)
    for i in range(4):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        scaler.scale(loss * (float("inf") if i == 1 else 1.0)).backward()  # step 1 is skipped
        scaler.unscale_(opt)
        p.mask_grads_()
        scaler.step(opt)
        scaler.update()
        p.apply_()
        assert nm_compliance(p.weights, 2, 4)["min"] == 1.0
    for name, w in p.weights.items():
        assert torch.all(w[~p.masks[name]] == 0)
        assert torch.all(opt.state[w]["momentum_buffer"][~p.masks[name]] == 0)


def test_sharded_rows_give_the_masks_of_the_whole_weight():
    """FSDP shards a Linear's rows: every group of M lies in one rank's rows, so two ranks
    holding halves (thread ranks, sums across them) cut exactly the whole weight's masks."""
    full = _mlp(3)
    whole = nm_masks(
        {n: w for n, w in prunable_weights(full).items()},
        {n: torch.ones_like(w, dtype=torch.bool) for n, w in prunable_weights(full).items()},
        2,
        4,
    )

    def shard(rank, reduce_sum):
        # a copy, not _mlp(3) again: torch's seed is global, and two threads seeding and drawing
        # at once built different weights
        model = copy.deepcopy(full)
        weights = {}
        for n, w in prunable_weights(model).items():
            rows = w.shape[0]
            lo, hi = (0, (rows + 1) // 2) if rank == 0 else ((rows + 1) // 2, rows)
            weights[n] = nn.Parameter(w.detach()[lo:hi].clone())
        p = Pruner(PruningSpec(structure="2:4", schedule="oneshot", start_step=0), weights, reduce_sum)
        p.update(0)
        return p.masks, p.sparsity()[0], p.checksum()

    (m0, s0, _), (m1, s1, _) = run_on_two_ranks(shard)
    for n in whole:
        assert torch.equal(torch.cat([m0[n], m1[n]]), whole[n]), n
    assert s0 == s1  # the sparsity both ranks report is the whole model's


def test_report_part_measures_the_exported_model():
    from workers.compression.pruning import PruningMethod

    spec = parse_spec({**BASE, "compression": {"pruning": {"structure": "2:4", "exclude": ["2"]}}})
    model = _mlp()
    assert PruningMethod.report_part(spec, model)["sparsity"]["nm_compliance"]["min"] < 1.0
    with torch.no_grad():
        model[0].weight.mul_(nm.nm_mask(model[0].weight.abs(), 2, 4))
    part = PruningMethod.report_part(spec, model)["sparsity"]["nm_compliance"]
    assert part == {"pattern": "2:4", "min": 1.0, "layers": {"0": 1.0}}  # "2" excluded
    assert PruningMethod.report_part(parse_spec({**BASE, "compression": {"pruning": {}}}), model) == {}


# --- FSDP on real process groups (gloo, 2 processes) --------------------------------------------

FSDP_MLP = {  # odd widths: uneven dim-0 shards (17 rows over 2 ranks)
    "name": "nm-fsdp",
    "model": {"name": "mlp", "args": {"hidden": [36, 17]}},
    "data": {"name": "digits"},
    "train": {"max_steps": 12, "batch_size": 64, "lr": 0.05, "log_every_steps": 4},
    "compression": {"pruning": {"structure": "2:4", "start_step": 2, "end_step": 8, "frequency": 2}},
    "parallel": {"strategy": "fsdp", "workers": 2},
    "precision": "fp16",
    "checkpoint": {"every_steps": 100},
}


def _fsdp_nm(rank, world, root: str):
    from service.artifacts import LocalArtifactStore
    from tests.unit.test_parallel_strategies import GPT, HF_GPT2, _with
    from workers.checkpoint import load_latest
    from workers.data import load_dataset
    from workers.models import build_model
    from workers.parallel import Dist, get_strategy
    from workers.session import LocalSession
    from workers.train_loop import train

    # 1. Masks on shards equal the gathered weight's: a Linear's groups lie in its rows; a GPT-2
    # Conv1D (in, out) is sharded along its *input* axis, where groups would be cut.
    for model_spec, data_spec in ((FSDP_MLP["model"], FSDP_MLP["data"]), (HF_GPT2, GPT["data"])):
        spec = parse_spec(_with({"name": "m", "model": model_spec, "data": data_spec}, "fsdp", world))
        info = load_dataset(spec.data).info
        strategy = get_strategy("fsdp")(Dist(rank, world), spec)
        wrapped = strategy.wrap(build_model(spec.model.name, spec.model.args, info, seed=0))
        full = strategy.full_state_dict(wrapped)
        pr = PruningSpec(structure="2:4", schedule="oneshot", start_step=0, exclude=["lm_head"])
        pruner = Pruner(pr, strategy.prunable(wrapped, pr.exclude, ()), strategy.pruner_reduce())
        pruner.update(0)
        masks = strategy.gather_masks(pruner.weights, pruner.masks)
        if rank == 0:
            tied = getattr(strategy.unwrap(wrapped), "_tied", {})
            weights = {n: full[tied.get(f"{n}.weight", f"{n}.weight")] for n in masks}
            ones = {n: torch.ones_like(w, dtype=torch.bool) for n, w in weights.items()}
            axes = {n: pruner.weights.out_axis[n] for n in masks}
            expect = nm_masks(weights, ones, 2, 4, axes)
            for n in expect:
                assert torch.equal(masks[n], expect[n]), n
            assert any(axes.values()) or model_spec is FSDP_MLP["model"]  # Conv1D layers were cut
    # 2. Trained under FSDP in fp16 (scaler skips, momentum): the final weights are 2:4.
    spec = parse_spec(FSDP_MLP)
    session = LocalSession(LocalArtifactStore(root), "nm", Dist(rank, world))
    train(spec, load_dataset(spec.data), session)
    if rank == 0:
        state = load_latest(session.store, "nm").state
        weights = {n: state["model"][f"{n}.weight"] for n in state["pruner"]["masks"]}
        for n, w in weights.items():
            assert nm.compliance(w, 2, 4, axis=1) == 1.0, n
            assert torch.all(w[~state["pruner"]["masks"][n]] == 0), n
        train_records = [r for r in session.records if r["kind"] == "train"]
        assert train_records[-1]["sparsity"] == pytest.approx(0.5, abs=0.02)


def test_fsdp_masks_equal_the_gathered_weights_and_training_keeps_2_of_4(tmp_path):
    from tests.unit.test_parallel_strategies import spawn

    spawn(_fsdp_nm, str(tmp_path), tmp=tmp_path)


def test_exported_int8_model_is_2_of_4_and_the_report_says_so(tmp_path):
    """The report measures the shipped model.packed, whose zeros export verifies position by
    position against the int8 graph (report.check_shipped_zeros)."""
    from service.artifacts import JobArtifacts, LocalArtifactStore
    from workers import export, pack
    from workers.data import load_dataset
    from workers.session import LocalSession
    from workers.train_loop import train

    spec = parse_spec(
        {
            **BASE,
            "train": {"max_steps": 16, "batch_size": 64, "lr": 0.05},
            "compression": {
                "pruning": {"structure": "2:4", "start_step": 2, "end_step": 10, "frequency": 4},
                "quantization": {"mode": "qat", "start_step": 8},
            },
        }
    )
    store, data = LocalArtifactStore(tmp_path), load_dataset(spec.data)
    summary = train(spec, data, LocalSession(store, "j"))
    rep = export.export(spec, data, store, "j", summary["step"], {}, 2)
    part = rep["sparsity"]["nm_compliance"]
    assert part == {"pattern": "2:4", "min": 1.0, "layers": {"layers.fc1": 1.0, "layers.fc2": 1.0}}
    rebuilt = pack.rebuild(JobArtifacts(store, "j").get_bytes("model.packed"))
    for name, w in prunable_weights(rebuilt).items():
        assert nm.compliance(w, 2, 4) == 1.0, name
        assert float((w == 0).float().mean()) >= 0.5, name
