"""Sweeps' pure parts (issue 18): request validation naming the bad path or value, expansion
(grid order, seeded random draws), the Pareto front and the best trial under an accuracy drop."""

from __future__ import annotations

import pytest

from service.errors import SpecError
from service.sweeps.front import best_under_drop, dominates, metric_of, pareto_front
from service.sweeps.plan import (
    Objective,
    baseline_spec,
    check_request,
    parse_request,
    planned_params,
    random_params,
    trial_count,
    trial_spec,
)

BASE = {
    "name": "x",
    "model": {"name": "mlp"},
    "data": {"name": "digits"},
    "train": {"epochs": 1},
    "compression": {"pruning": {"final_sparsity": 0.5, "end_step": 10}, "quantization": {"mode": "ptq"}},
}
GRID = {"compression.pruning.final_sparsity": [0.5, 0.9], "compression.quantization.bits": [8, 4]}


def req(**over):
    return parse_request({"name": "s", "base": BASE, "grid": GRID, **over})


def field_of(exc: pytest.ExceptionInfo) -> str:
    return exc.value.errors[0]["field"]


def test_grid_expands_every_combination_first_path_slowest():
    r = req()
    assert check_request(r) == 4
    assert [planned_params(r, i) for i in range(4)] == [
        {"compression.pruning.final_sparsity": 0.5, "compression.quantization.bits": 8},
        {"compression.pruning.final_sparsity": 0.5, "compression.quantization.bits": 4},
        {"compression.pruning.final_sparsity": 0.9, "compression.quantization.bits": 8},
        {"compression.pruning.final_sparsity": 0.9, "compression.quantization.bits": 4},
    ]


def test_trial_and_baseline_specs():
    r = req()
    spec = trial_spec(r, 3, planned_params(r, 3), "dense-1")
    assert spec["name"] == "s-t003"
    assert spec["compression"]["pruning"] == {"final_sparsity": 0.9, "end_step": 10}
    assert spec["compression"]["quantization"] == {"mode": "ptq", "bits": 4}
    assert spec["compression"]["baseline_job"] == "dense-1"
    assert BASE["compression"]["quantization"] == {"mode": "ptq"}  # the base is not modified
    dense = baseline_spec(r)
    assert dense["name"] == "s-dense" and "compression" not in dense


def test_a_path_into_a_null_section_creates_it():
    base = {**BASE, "compression": {"quantization": {"mode": "ptq"}}}
    r = parse_request({"name": "s", "base": base, "grid": {"compression.pruning.final_sparsity": [0.7]}})
    assert check_request(r) == 1
    assert trial_spec(r, 0, planned_params(r, 0), None)["compression"]["pruning"] == {"final_sparsity": 0.7}


@pytest.mark.parametrize(
    ("grid", "field", "words"),
    [
        (
            {"compression.pruning.final_sparsty": [0.5]},
            "grid.compression.pruning.final_sparsty",
            "final_sparsity",
        ),
        ({"compresion.pruning": [1]}, "grid.compresion.pruning", "compression"),
        ({"compression.pruning": [0.5]}, "grid.compression.pruning", "is a section"),
        ({"precision.x": [1]}, "grid.precision.x", "is a value"),
        (
            {"compression.pruning.final_sparsity": [0.5, 1.5]},
            "grid.compression.pruning.final_sparsity[1]",
            "1.5",
        ),
        ({"compression.quantization.bits": [8, 3]}, "grid.compression.quantization.bits[1]", "bits"),
        ({"name": ["a"]}, "grid.name", "cannot be swept"),
        ({"compression.baseline_job": ["a"]}, "grid.compression.baseline_job", "cannot be swept"),
    ],
)
def test_a_bad_path_or_value_is_named(grid, field, words):
    with pytest.raises(SpecError) as e:
        check_request(parse_request({"name": "s", "base": BASE, "grid": grid}))
    assert field_of(e) == field
    assert words in str(e.value.message)


def test_free_form_args_are_checked_by_the_spec():
    ok = parse_request({"name": "s", "base": BASE, "grid": {"model.args.hidden": [[32], [64, 32]]}})
    assert check_request(ok) == 2
    with pytest.raises(SpecError) as e:
        check_request(parse_request({"name": "s", "base": BASE, "grid": {"model.args.nope": [1]}}))
    assert field_of(e) == "grid.model.args.nope[0]"


@pytest.mark.parametrize(
    ("over", "field"),
    [
        ({"method": "anneal"}, "method"),
        ({"random": {"train.lr": {"low": 0.1, "high": 0.2}}}, "random"),
        ({"grid": {}}, "grid"),
        ({"objective": ["accuracy up"]}, "objective.0.direction"),
        ({"objective": ["loss min"]}, "objective.0.metric"),
        ({"max_concurrent": 0}, "max_concurrent"),
        ({"extra": 1}, "extra"),
        ({"method": "tpe", "grid": {}, "random": {"train.lr": {"low": 0.1, "high": 0.2}}}, "max_trials"),
        (
            {"method": "random", "grid": {}, "random": {"train.lr": {"low": 0.3, "high": 0.2}}, "samples": 2},
            "random.train.lr.high",
        ),
        # booleans are not numbers, nor numbers booleans (the JSON Schema's types; pydantic's lax
        # mode would read false as 0)
        ({"early_stopping": {"grace_steps": False}}, "early_stopping.grace_steps"),
        ({"max_concurrent": True}, "max_concurrent"),
        ({"baseline": 1}, "baseline"),
    ],
)
def test_request_fields_are_named(over, field):
    with pytest.raises(SpecError) as e:
        req(**over)
    assert field_of(e) == field


def test_limits_on_trials():
    assert check_request(req(), max_trials=4) == 4
    with pytest.raises(SpecError) as e:
        check_request(req(), max_trials=3)
    assert field_of(e) == "grid" and "at most 3" in e.value.message
    with pytest.raises(SpecError) as e:
        trial_count(req(max_trials=2))
    assert field_of(e) == "max_trials"


def test_random_draws_are_seeded_per_trial_and_inside_the_range():
    r = parse_request(
        {
            "name": "s",
            "base": BASE,
            "method": "random",
            "samples": 5,
            "grid": {"compression.quantization.bits": [4, 8]},
            "random": {
                "train.lr": {"low": 1e-4, "high": 1e-1, "log": True},
                "train.batch_size": {"low": 16, "high": 64},
            },
        }
    )
    assert check_request(r) == 5
    draws = [random_params(r, i) for i in range(5)]
    assert draws == [random_params(r, i) for i in range(5)]  # the same after a restart
    assert len({d["train.lr"] for d in draws}) == 5
    assert all(1e-4 <= d["train.lr"] <= 1e-1 for d in draws)
    assert all(isinstance(d["train.batch_size"], int) and 16 <= d["train.batch_size"] <= 64 for d in draws)
    assert {d["compression.quantization.bits"] for d in draws} <= {4, 8}
    other = parse_request({**r.model_dump(), "seed": 1})
    assert random_params(other, 0) != draws[0]


def test_random_range_of_a_non_number_is_refused():
    with pytest.raises(SpecError) as e:
        check_request(
            parse_request(
                {
                    "name": "s",
                    "base": BASE,
                    "method": "random",
                    "samples": 1,
                    "random": {"precision": {"low": 0, "high": 1}},
                }
            )
        )
    assert field_of(e) == "random.precision"


OBJ = [Objective.model_validate(x) for x in ("accuracy max", "size.ratio max", "latency_ms.compressed min")]


def p(acc, ratio, lat):
    return {"accuracy": acc, "size.ratio": ratio, "latency_ms.compressed": lat}


def test_dominance():
    assert dominates(p(0.9, 10, 1), p(0.9, 8, 1), OBJ)
    assert not dominates(p(0.9, 10, 1), p(0.9, 10, 1), OBJ)  # equal: neither
    assert not dominates(p(0.95, 8, 1), p(0.9, 10, 1), OBJ)  # a trade-off
    assert dominates(p(0.9, 10, 1), p(0.9, 10, 2), OBJ)  # latency is minimised


def test_pareto_front_value_by_value():
    points = [
        ("a", p(0.97, 4, 0.10)),
        ("b", p(0.95, 10, 0.10)),
        ("c", p(0.94, 9, 0.12)),  # dominated by b
        ("d", p(0.90, 30, 0.20)),
        ("e", p(0.95, 10, 0.10)),  # equal to b: both stay
        ("f", {"accuracy": 0.99, "size.ratio": 50}),  # no latency: not on the front
    ]
    assert pareto_front(points, OBJ) == ["a", "b", "d", "e"]
    assert pareto_front(points, OBJ[:1]) == ["f"]
    assert pareto_front([], OBJ) == []


def test_best_under_an_accuracy_drop_in_points():
    points = [
        ("a", p(0.97, 4, 0.1)),
        ("b", p(0.966, 10, 0.1)),
        ("c", p(0.95, 30, 0.1)),
        ("d", p(0.966, 10, 0.05)),
    ]
    assert best_under_drop(points, OBJ, 0.97, 0.0) == "a"
    assert best_under_drop(points, OBJ, 0.97, 0.5) == "d"  # same ratio as b, lower latency
    assert best_under_drop(points, OBJ, 0.97, 2.0) == "c"
    assert best_under_drop(points, OBJ, 0.99, 0.5) is None
    assert best_under_drop(points, OBJ, None, 0.5) is None


def test_metric_of_reads_dotted_report_keys():
    report = {"accuracy": 0.9, "size": {"ratio": 12.5}, "latency_ms": {"compressed": None}, "ok": True}
    assert metric_of(report, "size.ratio") == 12.5
    assert metric_of(report, "accuracy") == 0.9
    assert metric_of(report, "latency_ms.compressed") is None
    assert metric_of(report, "ok") is None and metric_of(report, "nope.x") is None


# --- what a sweep does next (service.sweeps.service.next_step) -------------------------------------

from service.sweeps.service import Step, next_step  # noqa: E402


@pytest.mark.parametrize(
    ("state", "baseline", "trials", "step"),
    [
        ("running", "running", [], Step(0)),  # trials wait for the dense baseline
        ("running", "succeeded", [], Step(2)),
        ("running", "failed", [], Step(2)),  # a failed baseline does not stop the sweep
        ("running", None, [("running", False)], Step(1)),
        ("running", None, [("queued", False), ("starting", False)], Step(0)),
        ("running", None, [("succeeded", True), ("failed", True), ("running", False)], Step(1)),
        ("running", None, [("succeeded", True)] * 3 + [("running", False)], Step(0)),  # all 4 created
        ("running", None, [("succeeded", True)] * 3 + [("failed", False)], Step(0)),  # not yet recorded
        ("running", None, [("succeeded", True)] * 3 + [("failed", True)], Step(0, "succeeded")),
        ("running", None, [("failed", True)] * 2 + [("cancelled", True)] * 2, Step(0, "failed")),
        ("cancelled", None, [], Step(0)),
        ("succeeded", None, [("succeeded", True)] * 4, Step(0)),
    ],
)
def test_next_step(state, baseline, trials, step):
    assert next_step(state, 4, 2, baseline, trials) == step


def test_tpe_asks_inside_the_space_and_the_same_again_from_the_same_history():
    from service.sweeps.search import Told, ask, check_tpe

    r = parse_request(
        {
            "name": "s",
            "base": BASE,
            "method": "tpe",
            "max_trials": 8,
            "grid": {"compression.quantization.bits": [4, 8]},
            "random": {"compression.pruning.final_sparsity": {"low": 0.5, "high": 0.95}},
            "objective": ["accuracy max", "size.ratio max"],
        }
    )
    assert check_request(r) == 8
    history = [
        Told({"compression.quantization.bits": 8, "compression.pruning.final_sparsity": 0.6}, [0.97, 10.0]),
        Told({"compression.quantization.bits": 4, "compression.pruning.final_sparsity": 0.9}, None),
        Told(
            {"compression.quantization.bits": 4, "compression.pruning.final_sparsity": 0.7},
            None,
            running=True,
        ),
    ]
    first = ask(r, history, 3)
    assert first == ask(r, history, 3)  # a restart asks again and gets the same trial
    assert first["compression.quantization.bits"] in (4, 8)
    assert 0.5 <= first["compression.pruning.final_sparsity"] <= 0.95
    assert ask(parse_request({**r.model_dump(), "seed": 2**40}), history, 3)  # above numpy's 32 bits
    with pytest.raises(SpecError) as e:
        check_tpe(parse_request({**r.model_dump(), "grid": {"model.args.hidden": [[32]]}}))
    assert field_of(e) == "grid.model.args.hidden[0]"


# --- early stopping (service.sweeps.stopping) ------------------------------------------------------

from service.sweeps.stopping import best_so_far, median_stop  # noqa: E402

DONE = [[(10, 0.80), (20, 0.90)], [(10, 0.70), (20, 0.95)], [(10, 0.60), (20, 0.85)]]


def test_best_so_far():
    assert best_so_far([(10, 0.5), (20, 0.4), (30, 0.7)], 25) == 0.5
    assert best_so_far([(10, 0.5)], 5) is None


@pytest.mark.parametrize(
    ("curve", "min_trials", "grace", "stop"),
    [
        ([(10, 0.69)], 3, 0, True),  # median at 10 of 0.80, 0.70, 0.60 is 0.70
        ([(10, 0.70)], 3, 0, False),  # at the median: kept
        ([(10, 0.5), (20, 0.89)], 3, 0, True),  # median at 20: 0.90
        ([(10, 0.5), (20, 0.90)], 3, 0, False),
        ([(10, 0.1)], 4, 0, False),  # only 3 finished trials
        ([(10, 0.1)], 3, 11, False),  # inside the grace period
        ([(5, 0.1)], 1, 0, False),  # no finished trial reached step 5 yet
        ([], 1, 0, False),
    ],
)
def test_median_stopping(curve, min_trials, grace, stop):
    assert median_stop(curve, DONE, min_trials, grace) is stop


# Every trial's step 0: the initial weights' score, which differs by seed or width alone.
DONE_FROM_0 = [[(0, 0.30), *c] for c in DONE]


@pytest.mark.parametrize(
    ("curve", "stop"),
    [
        ([(0, 0.10)], False),  # below the others at step 0, before any training: kept
        ([(0, 0.95), (10, 0.69)], True),  # a high start does not hide the trained score
        ([(0, 0.10), (10, 0.70)], False),
    ],
)
def test_median_stopping_ignores_step_0(curve, stop):
    assert median_stop(curve, DONE_FROM_0, 3, 0) is stop
