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
    _, scratch = jobs["scratch"]
    _, total = jobs["scratch_total"]
    assert tune["model"]["init"] == {"job": parent_id}
    assert "init" not in scratch["model"] and "init" not in total["model"]
    # Same plan, same budget: the two B-step jobs differ only in their initial weights.
    assert tune["compression"] == scratch["compression"]
    assert tune["train"] == scratch["train"] == {**parent["train"], "max_steps": plan.compress_steps}
    assert total["train"]["max_steps"] == plan.parent_steps + plan.compress_steps
    for spec in (parent, tune, scratch, total):
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
        (t,) = [t for t in ft.check_targets(summary) if t["model"] == "gpt2"]
        return t["passed"]

    assert verdict(10.4) and verdict(9.0)
    assert not verdict(10.6)
