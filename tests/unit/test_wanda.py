"""Wanda (`compression.pruning.criterion: wanda`): the score value by value on hand-made weights
and activations, per-row and N:M masks, statistics summed across ranks (two thread replicas with
different halves of the batch derive the masks one process derives from the whole batch), the
spec's 422s, and the issue's test: on the tiny gpt trained briefly on the stdlib-sources text,
50% one-shot wanda beats magnitude pruning's held-out perplexity, no fine-tune. Then a job
started from those weights (`model.init`) prunes one-shot at its first step and fine-tunes with
the masks held. No Ray."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
from safetensors.torch import save as st_save
from torch import nn

from service.artifacts import JobArtifacts, LocalArtifactStore
from service.errors import SpecError
from service.spec import parse_spec
from service.uploads import resolve_init
from tests.thread_ranks import Meeting, run_threads
from workers import train_loop
from workers.checkpoint import load_latest
from workers.compression import nm
from workers.compression.wanda import InputStats, masks_for, row_masks, scores
from workers.data import load_dataset
from workers.data import sharding as sh
from workers.parallel import Dist
from workers.session import LocalSession

# --- the score, value by value -----------------------------------------------------------------


def test_score_is_abs_weight_times_input_feature_norm():
    w = torch.tensor([[1.0, -2.0, 0.5], [-3.0, 0.25, 4.0]])  # (out 2, in 3)
    sumsq = torch.tensor([4.0, 0.25, 9.0])  # ||X_j|| = 2, 0.5, 3
    expected = torch.tensor([[2.0, 1.0, 1.5], [6.0, 0.125, 12.0]])
    assert torch.equal(scores(w, sumsq), expected)
    # transformers' Conv1D stores the same layer (in, out): the same scores, transposed
    assert torch.equal(scores(w.T, sumsq, out_axis=1), expected.T)


def test_score_from_activations_collected_by_the_hooks():
    layer = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, -1.0], [0.5, 2.0]]))
    x = torch.tensor([[[1.0, 2.0], [3.0, 0.0]], [[0.0, 2.0], [4.0, 0.0]]])  # (batch 2, tokens 2, in 2)
    with torch.no_grad(), InputStats({"l": layer}, {"l": 2}) as stats:
        layer(x)
    assert stats.sumsq["l"].tolist() == [1 + 9 + 0 + 16, 4 + 0 + 4 + 0]  # 26, 8
    assert stats.count["l"] == 4  # tokens
    layer(x)  # outside the context: no hook any more
    assert stats.count["l"] == 4
    s = scores(layer.weight, stats.sumsq["l"])
    assert torch.allclose(
        s, torch.tensor([[math.sqrt(26), math.sqrt(8)], [0.5 * math.sqrt(26), 2 * math.sqrt(8)]])
    )


def test_rows_keep_their_own_share_and_activation_beats_magnitude():
    # Row 0: magnitude would prune the 0.1 (smallest |w|), but its input is 100x louder.
    w = torch.tensor([[0.1, 1.0, 2.0, 3.0], [5.0, 4.0, 0.2, 0.1]])
    sumsq = torch.tensor([1e4, 1.0, 1.0, 1.0])  # norms 100, 1, 1, 1
    m = masks_for(w, sumsq, 0.5)
    assert m.tolist() == [[True, False, False, True], [True, True, False, False]]
    assert (m.sum(1) == 2).all()  # every row keeps half: the comparison group is the row


def test_row_masks_ties_keep_the_lower_index_and_pruned_weights_stay_pruned():
    s = torch.tensor([[1.0, 1.0, 1.0, 1.0]])
    assert row_masks(s, 0.5).tolist() == [[True, True, False, False]]
    alive = torch.tensor([[False, True, True, True]])
    # the dead weight counts towards the row's pruned share and never comes back
    assert row_masks(torch.tensor([[9.0, 1.0, 2.0, 3.0]]), 0.5, alive=alive).tolist() == [
        [False, False, True, True]
    ]
    assert row_masks(s, 0.0).all()


def test_two_of_four_by_wanda_score():
    w = torch.tensor([[0.1, 1.0, 2.0, 3.0, 1.0, 1.0, 1.0, 1.0]])
    sumsq = torch.tensor([1e4, 1.0, 1.0, 1.0, 1.0, 4.0, 9.0, 0.25])
    m = masks_for(w, sumsq, 0.5, structure=(2, 4))
    assert m.tolist() == [[True, False, False, True, False, True, True, False]]
    assert nm.compliance(w * m, 2, 4) == 1.0
    # Conv1D layout: groups run along its input axis (dim 0)
    assert torch.equal(masks_for(w.T.contiguous(), sumsq, 0.5, out_axis=1, structure=(2, 4)), m.T)


# --- spec ----------------------------------------------------------------------------------------

BASE = {"name": "w", "model": {"name": "gpt"}, "data": {"name": "text"}}


@pytest.mark.parametrize(
    ("pruning", "model", "field", "says"),
    [
        (
            {"criterion": "wanda", "structure": "channel"},
            "gpt",
            "compression.pruning.structure",
            "unstructured",
        ),
        (
            {"criterion": "wanda", "calibration_batches": 0},
            "gpt",
            "compression.pruning.calibration_batches",
            "1",
        ),
        ({"calibration_batches": 4}, "gpt", "compression.pruning.calibration_batches", "wanda"),
        ({"criterion": "wanda", "scope": "global"}, "gpt", "compression.pruning.scope", "layer"),
        (
            {"criterion": "wanda", "schedule": "threshold", "threshold": 1.0},
            "gpt",
            "compression.pruning.schedule",
            "oneshot",
        ),
        (
            {"criterion": "wanda"},
            "lenet5",
            "compression.pruning.criterion",
            "gpt, hf_causal_lm, hf_seq_cls, mlp",
        ),
        ({"criterion": "obs"}, "gpt", "compression.pruning.criterion", "magnitude"),
    ],
)
def test_spec_refuses_what_wanda_cannot_serve(pruning, model, field, says):
    data = {"name": "digits"} if model == "lenet5" else {"name": "text"}
    with pytest.raises(SpecError) as e:
        parse_spec({**BASE, "model": {"name": model}, "data": data, "compression": {"pruning": pruning}})
    assert [x["field"] for x in e.value.errors] == [field]
    assert says in e.value.errors[0]["message"]


def test_spec_defaults():
    pr = parse_spec({**BASE, "compression": {"pruning": {}}}).compression.pruning
    assert (pr.criterion, pr.calibration_batches) == ("magnitude", None)
    pr = parse_spec({**BASE, "compression": {"pruning": {"criterion": "wanda", "structure": "2:4"}}})
    pr = pr.compression.pruning
    assert (pr.criterion, pr.calibration_batches, pr.scope, pr.nm()) == ("wanda", 8, "layer", (2, 4))


# --- ranks ---------------------------------------------------------------------------------------


@dataclass
class ThreadRank(Dist):
    """One of two data-parallel ranks on threads: each reads its half of every batch
    (data_shard), and `all_reduce_sum` / `all_gather_object` meet the other's."""

    meeting: Meeting | None = None

    def all_reduce_sum(self, t):
        parts = self.meeting.meet(self.rank, t.clone())
        return parts[0] + parts[1]

    def all_gather_object(self, obj) -> list:
        return self.meeting.meet(self.rank, obj)


MLP = {
    "name": "wanda-mlp",
    "model": {"name": "mlp", "args": {"hidden": [32]}},
    "data": {"name": "digits"},
    "train": {"max_steps": 4, "batch_size": 64},
    "compression": {
        "pruning": {
            "criterion": "wanda",
            "schedule": "oneshot",
            "final_sparsity": 0.6,
            "calibration_batches": 3,
        }
    },
}


def test_ranks_with_different_data_derive_the_masks_of_the_whole_batch():
    spec = parse_spec(MLP)
    data = load_dataset(spec.data)
    one = train_loop.build(spec, data, Dist())
    one.method("pruning").on_step(0, one.optimizer)
    whole = one.pruner.masks

    meeting = Meeting(timeout=60)
    runs = [train_loop.build(spec, data, ThreadRank(rank=r, world_size=2, meeting=meeting)) for r in range(2)]
    events = run_threads(lambda r: runs[r].method("pruning").on_step(0, runs[r].optimizer), meeting)
    assert events[0] == events[1] and len(set(events[0]["mask_checksums"])) == 1
    assert events[0]["calibration_rows"] == 3 * 64  # both halves of 3 batches, summed
    for name in whole:
        assert torch.equal(runs[0].pruner.masks[name], whole[name]), name
        assert torch.equal(runs[1].pruner.masks[name], whole[name]), name

    # Without the reduction, a rank's half of the data gives other masks: the test can fail.
    half = train_loop.build(spec, data, Dist(rank=0, world_size=2))
    half.method("pruning").on_step(0, half.optimizer)
    assert any(not torch.equal(half.pruner.masks[n], whole[n]) for n in whole)


# --- the tiny gpt: wanda vs magnitude at 50%, then a job from its weights ----------------------

GPT = {
    "name": "gpt-parent",
    "model": {"name": "gpt", "args": {"n_layer": 2, "n_head": 4, "n_embd": 64}},
    "data": {"name": "text", "args": {"block_size": 64, "max_chars": 200_000}},
    "train": {
        "max_steps": 300,
        "batch_size": 32,
        "optimizer": "adamw",
        "lr": 0.003,
        "weight_decay": 0.1,
        "warmup_steps": 30,
        "grad_clip_norm": 1.0,
        "log_every_steps": 100,
        "eval_every_steps": 1000,
        "seed": 0,
    },
    "checkpoint": {"every_steps": 1000},
}


def _child(criterion: str, **pruning) -> dict:
    # The output head stays dense, as in the paper (and examples/text-gpt.yaml): only the
    # transformer blocks' layers are pruned, by either criterion.
    pr = {
        "schedule": "oneshot",
        "final_sparsity": 0.5,
        "start_step": 0,
        "exclude": ["head.lm_head"],
        **pruning,
    }
    if criterion == "wanda":
        pr["criterion"] = "wanda"
    return {**GPT, "name": f"gpt-{criterion}", "compression": {"pruning": pr}}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return LocalArtifactStore(tmp_path_factory.mktemp("wanda"))


@pytest.fixture(scope="module")
def text():
    return load_dataset(parse_spec(GPT).data)


@pytest.fixture(scope="module")
def parent(store, text):
    """The dense gpt after 300 steps, published as job `gpt-parent`'s weights."""
    # One thread: this model's matmuls are too small to gain from two, and on a shared
    # machine two threads ran a step 5x slower (0.37 s vs 0.07 s at load 2.5).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train_loop.train(parse_spec(GPT), text, LocalSession(store, "gpt-parent"))
    finally:
        torch.set_num_threads(threads)
    state = load_latest(store, "gpt-parent").state["model"]
    store.put_bytes("gpt-parent/model.safetensors", st_save({k: v.contiguous() for k, v in state.items()}))
    JobArtifacts(store, "gpt-parent").write_manifest()
    return state


def _pruned_perplexity(spec_dict: dict, text, state) -> tuple[float, dict]:
    run = train_loop.build(parse_spec(spec_dict), text, Dist(), init_state=state)
    event = run.method("pruning").on_step(0, run.optimizer)
    return train_loop.evaluate(run)["val_perplexity"], event


def with_outlier_features(state: dict, n_layer: int, channels: int = 4, factor: float = 16.0) -> dict:
    """The same function with the outlier features of trained language models (LLM.int8,
    Dettmers et al. 2022): in each block, the `channels` features its LayerNorms already amplify
    most (largest |gain|) are made `factor` times louder (gain and bias), and the input columns
    of the Linear that reads them `factor` times smaller. Outputs are unchanged (up to float
    rounding); the weights on the loud features now look small, as they do in large models."""
    out = {k: v.clone() for k, v in state.items()}
    for b in range(n_layer):
        for ln, reader in (("ln1", "attn.qkv"), ("ln2", "fc")):
            gain = out[f"blocks.{b}.{ln}.weight"]
            loud = gain.abs().topk(channels).indices
            gain[loud] *= factor
            out[f"blocks.{b}.{ln}.bias"][loud] *= factor
            out[f"blocks.{b}.{reader}.weight"][:, loud] /= factor
    return out


def test_wanda_beats_magnitude_at_half_sparsity_on_the_tiny_gpt(text, parent):
    ppl: dict[str, float] = {}
    for label, state in (("plain", parent), ("outliers", with_outlier_features(parent, 2))):
        dense = train_loop.build(parse_spec(GPT), text, Dist(), init_state=state)
        ppl[f"{label} dense"] = train_loop.evaluate(dense)["val_perplexity"]
        ppl[f"{label} wanda"], ev = _pruned_perplexity(_child("wanda"), text, state)
        ppl[f"{label} magnitude global"], _ = _pruned_perplexity(_child("magnitude"), text, state)
        ppl[f"{label} magnitude layer"], _ = _pruned_perplexity(
            _child("magnitude", scope="layer"), text, state
        )
        assert ev["sparsity"] == pytest.approx(0.5, abs=1e-6) and ev["criterion"] == "wanda"
        assert ev["calibration_rows"] == 8 * 32 * 64  # default calibration_batches x batch x tokens
    print("held-out perplexity, 50% one-shot, no fine-tune:", {k: round(v, 3) for k, v in ppl.items()})
    assert ppl["plain dense"] < 30, "the parent learned the text (chance is 256)"
    # Rescaling features changes nothing the model computes, nor any wanda score (|W_ij|/c * c||X_j||).
    assert ppl["outliers dense"] == pytest.approx(ppl["plain dense"], rel=1e-4)
    assert ppl["outliers wanda"] == pytest.approx(ppl["plain wanda"], rel=1e-3)
    # With outlier features (what a trained language model has) magnitude prunes the weights
    # that carry them; wanda keeps them.
    assert ppl["outliers wanda"] < ppl["outliers magnitude layer"]
    assert ppl["outliers wanda"] < ppl["outliers magnitude global"]
    # On the plain tiny gpt (max/median feature norm 1.4-6: too uniform to matter) the criteria
    # are about even; wanda is no worse than per-layer magnitude by more than 1%.
    assert ppl["plain wanda"] < 1.01 * ppl["plain magnitude layer"]


def test_a_job_from_init_weights_prunes_at_its_first_step_and_keeps_the_masks(store, text, parent):
    spec = resolve_init(
        parse_spec(
            {
                **_child("wanda", calibration_batches=4),
                "name": "gpt-child",
                "model": {**GPT["model"], "init": {"job": "gpt-parent"}},
                "train": {
                    **GPT["train"],
                    "max_steps": 20,
                    "lr": 0.0005,
                    "warmup_steps": 0,
                    "eval_every_steps": 20,
                },
            },
            submitted=True,
        ),
        "default",
        store,
    )
    session = LocalSession(store, "gpt-child")
    train_loop.train(spec, text, session)
    updates = [r for r in session.records if r.get("event") == "mask_update"]
    assert [u["step"] for u in updates] == [0] and updates[0]["calibration_rows"] == 4 * 32 * 64
    baseline = [r for r in session.records if r["kind"] == "eval" and r.get("baseline")]
    assert len(baseline) == 1

    # The masks are those of the score of the parent's weights on the batches of steps 0..3,
    # recomputed here apart from the pruner; after 20 fine-tuning steps they still hold.
    model = train_loop.build(parse_spec(GPT), text, Dist(), init_state=parent).module.eval()
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "head.lm_head"}
    perm = sh.epoch_permutation(text.info.n_train, 0, 0)
    with torch.no_grad(), InputStats(linears, {n: m.in_features for n, m in linears.items()}) as stats:
        for step in range(4):
            model(text.x_train[sh.global_batch(perm, step, 32)])
    final = load_latest(store, "gpt-child").state["model"]
    for name, m in linears.items():
        expected = masks_for(parent[f"{name}.weight"], stats.sumsq[name], 0.5)
        w = final[f"{name}.weight"]
        assert torch.equal(w[~expected], torch.zeros_like(w[~expected])), name
        assert (w[expected] != 0).float().mean() > 0.99, name  # the kept weights still train
        assert (expected.sum(1) == m.in_features // 2).all(), name
    # The short fine-tune recovers part of what the one-shot pruning cost.
    just_pruned, _ = _pruned_perplexity(_child("wanda", calibration_batches=4), text, parent)
    tuned = [r for r in session.records if r["kind"] == "eval" and r["step"] == 20][0]["val_perplexity"]
    print(
        f"held-out perplexity: parent {baseline[0]['val_perplexity']:.3f}, "
        f"pruned {just_pruned:.3f}, after 20 steps {tuned:.3f}"
    )
    assert baseline[0]["val_perplexity"] < just_pruned and tuned < just_pruned


# --- FSDP on real process groups (gloo, 2 processes) ---------------------------------------------


def _fsdp_wanda(rank, world, root: str):
    from tests.unit.test_parallel_strategies import GPT as GPT_SMALL
    from tests.unit.test_parallel_strategies import HF_GPT2, _with

    pruning = {"criterion": "wanda", "schedule": "oneshot", "calibration_batches": 2, "exclude": ["lm_head"]}
    cases = [  # a Linear's dim-0 shards hold whole rows (17 over 2 ranks: uneven); a GPT-2 Conv1D
        # (in, out) is sharded along its input axis, cutting its rows (and 2:4 groups)
        ({"name": "mlp", "args": {"hidden": [36, 17]}}, {"name": "digits"}, "unstructured"),
        (HF_GPT2, GPT_SMALL["data"], "2:4"),
    ]
    for model, data_spec, structure in cases:
        spec = {
            "name": "w",
            "model": model,
            "data": data_spec,
            "train": {"max_steps": 2, "batch_size": 16},
            "compression": {"pruning": {**pruning, "structure": structure}},
        }
        data = load_dataset(parse_spec(spec).data)
        run = train_loop.build(parse_spec(_with(spec, "fsdp", world)), data, Dist(rank, world))
        event = run.method("pruning").on_step(0, run.optimizer)
        masks = run.strategy.gather_masks(run.pruner.weights, run.pruner.masks)
        if rank == 0:
            # One process on the whole batches: the same masks.
            one = train_loop.build(parse_spec(spec), data, Dist())
            expected = one.method("pruning").on_step(0, one.optimizer)
            assert event["calibration_rows"] == expected["calibration_rows"]
            assert event["sparsity"] == pytest.approx(expected["sparsity"], abs=1e-9)
            assert masks.keys() == one.pruner.masks.keys()
            for n, m in one.pruner.masks.items():
                assert torch.equal(masks[n].cpu(), m), n


def test_fsdp_ranks_derive_the_masks_of_one_process(tmp_path):
    from tests.unit.test_parallel_strategies import spawn

    spawn(_fsdp_wanda, str(tmp_path), tmp=tmp_path)
