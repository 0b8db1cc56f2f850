"""bench.finetune's pure parts: the jobs it runs per seed, the aggregation over seeds and the
verdict on issue 13's targets (no training here)."""

from __future__ import annotations

import pytest

from bench import finetune as ft
from service.spec import parse_spec


def _row(model, arm, seed, value, ratio=1.1, sparsity=0.0, metric="accuracy", baseline=None):
    return {
        "model": model,
        "arm": arm,
        "seed": seed,
        "steps": 100,
        "metric": metric,
        "value": value,
        "baseline": baseline,
        "sparsity": sparsity,
        "packed_bytes": 1000,
        "ratio": ratio,
        "artifact": "model.onnx",
    }


def test_job_specs_same_plan_and_budget_and_parent_init():
    plan = ft.PLANS["resnet"]
    jobs = {arm: (job_id, spec) for arm, job_id, spec in ft.job_specs("resnet", plan, 1)}
    assert list(jobs) == list(ft.ARMS)
    parent_id, parent = jobs["parent"]
    assert parent["compression"] == {} and parent["train"]["max_steps"] == plan.parent_steps
    _, tune = jobs["finetune"]
    _, cont = jobs["dense_continue"]
    _, scratch = jobs["scratch"]
    _, total = jobs["scratch_total"]
    assert tune["model"]["init"] == cont["model"]["init"] == {"job": parent_id}
    # The control: the fine-tune job without its compression, nothing else changed.
    assert cont["compression"] == {} and tune["compression"] != {}
    assert cont["train"] == tune["train"]
    assert "init" not in scratch["model"] and "init" not in total["model"]
    # Same plan, same budget: the two B-step jobs differ only in their initial weights.
    assert tune["compression"] == scratch["compression"]
    assert tune["train"] == scratch["train"] == {**parent["train"], "max_steps": plan.compress_steps}
    assert total["train"]["max_steps"] == plan.parent_steps + plan.compress_steps
    for spec in (parent, tune, cont, scratch, total):
        parse_spec(spec)  # every spec is a valid job spec


def test_compression_for_scales_the_schedule_with_the_job():
    plan = ft.PLANS["resnet"]
    c = ft.compression_for(plan, 1000)
    assert c["pruning"]["start_step"] == round(plan.prune_from * 1000)
    assert c["pruning"]["end_step"] == round(plan.prune_to * 1000)
    assert c["pruning"]["final_sparsity"] == plan.sparsity
    assert c["quantization"] == {"mode": "qat", "bits": 8, "start_step": round(plan.qat * 1000)}


def _resnet_rows(ft_values, ratio=11.6, sparsity=0.8):
    rows = []
    for seed, (p, f) in enumerate(zip([0.98, 0.97, 0.99], ft_values, strict=True)):
        rows.append(_row("resnet", "parent", seed, p))
        rows.append(_row("resnet", "finetune", seed, f, ratio=ratio, sparsity=sparsity, baseline=p))
    return rows


def test_summarise_means_spread_and_delta_against_own_parent():
    s = {x["arm"]: x for x in ft.summarise(_resnet_rows([0.97, 0.97, 0.97]))}
    assert s["finetune"]["value"]["mean"] == pytest.approx(0.97)
    assert s["finetune"]["value"]["std"] == 0.0
    assert s["finetune"]["vs_parent"]["mean"] == pytest.approx(-1.0)  # -1, 0, -2 points
    assert s["finetune"]["vs_parent"]["min"] == pytest.approx(-2.0)
    assert s["finetune"]["baseline"] == pytest.approx(0.98)
    assert s["parent"]["baseline"] is None


@pytest.mark.parametrize(
    ("values", "ratio", "sparsity", "passed"),
    [
        ([0.975, 0.965, 0.985], 11.6, 0.8, [True, True]),  # -0.5 point, 11.6x
        ([0.965, 0.955, 0.975], 11.6, 0.8, [False, True]),  # -1.5 points
        ([0.98, 0.97, 0.99], 9.5, 0.8, [True, False]),  # not 10x smaller
        ([0.98, 0.97, 0.99], 11.6, 0.7, [False, False]),  # 80% not reached
    ],
)
def test_resnet_targets(values, ratio, sparsity, passed):
    targets = ft.check_targets(ft.summarise(_resnet_rows(values, ratio, sparsity)))
    assert [t["passed"] for t in targets] == passed


def test_perplexity_target_is_relative_and_lower_is_better(monkeypatch):
    plan = ft.Plan("gpt2", {}, {}, {}, 10, 10, 0.5, 0.1, 0.6, None, metric="perplexity")
    monkeypatch.setitem(ft.PLANS, "gpt2", plan)

    def verdict(ppl):
        rows = [
            _row("gpt2", "parent", 0, 10.0, metric="perplexity"),
            _row("gpt2", "finetune", 0, ppl, sparsity=0.5, metric="perplexity"),
        ]
        summary = ft.summarise(rows)
        assert summary[1]["vs_parent"]["mean"] == pytest.approx(100 * (ppl / 10 - 1))
        assert summary[1]["vs_continue"] is None  # no control run: no column, no second line
        (t,) = [t for t in ft.check_targets(summary) if t["model"] == "gpt2"]
        return t["passed"]

    assert verdict(10.4) and verdict(9.0)
    assert not verdict(10.6)


def test_dense_continue_isolates_the_cost_of_compression(monkeypatch):
    """The fine-tuned model beats its parent (it trained B steps more) but loses 10% against the
    same B steps of dense training: the issue's target still reads against the parent (PASS), the
    informational line against the control (FAIL)."""
    plan = ft.Plan("gpt2", {}, {}, {}, 10, 10, 0.5, 0.1, 0.6, None, metric="perplexity")
    monkeypatch.setitem(ft.PLANS, "gpt2", plan)
    rows = []
    for seed, (p, c, f) in enumerate([(10.0, 8.0, 8.8), (12.0, 10.0, 11.0)]):
        rows.append(_row("gpt2", "parent", seed, p, metric="perplexity"))
        rows.append(_row("gpt2", "dense_continue", seed, c, metric="perplexity", baseline=p))
        rows.append(_row("gpt2", "finetune", seed, f, sparsity=0.5, metric="perplexity", baseline=p))
    s = {x["arm"]: x for x in ft.summarise(rows)}
    assert s["finetune"]["vs_parent"]["mean"] == pytest.approx(-10.1667, abs=1e-3)  # -12%, -8.33%
    assert s["finetune"]["vs_continue"]["mean"] == pytest.approx(10.0)  # +10% on both seeds
    assert s["dense_continue"]["vs_parent"]["mean"] == pytest.approx(-18.333, abs=1e-3)
    assert s["dense_continue"]["vs_continue"] is None and s["parent"]["vs_parent"] is None
    parent_t, control_t = ft.check_targets(list(s.values()))
    assert parent_t["passed"] and not parent_t.get("informational")
    assert control_t["informational"] and not control_t["passed"]
    assert "vs dense_continue" in control_t["target"]
    assert "+10.00% perplexity" in control_t["measured"]  # (9.9 / 9.0 - 1) on the seed means
    assert "vs dense_continue (same seed)" in ft.table(list(s.values()))


def test_last_eval_change_says_whether_the_parent_flattened():
    assert ft.last_eval_change("perplexity", [[88, 9.0], [176, 8.0], [264, 7.9]]) == pytest.approx(-1.25)
    assert ft.last_eval_change("accuracy", [[22, 0.95], [44, 0.97]]) == pytest.approx(2.0)
    assert ft.last_eval_change("perplexity", [[88, 9.0]]) is None
    rows = [
        _row("gpt2", "parent", s, 8.0, metric="perplexity") | {"evals": [[1, 10.0], [2, 9.8]]} for s in (0, 1)
    ]
    (parent,) = ft.summarise(rows)
    assert parent["last_eval_change"]["mean"] == pytest.approx(-2.0)
