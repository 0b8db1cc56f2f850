"""The job state machine, retry policy, admission plan, limits and metric-line parsing: pure,
value by value."""

from __future__ import annotations

import itertools

import pytest

from service.ingest import parse_lines
from service.jobs import (
    TERMINAL,
    InvalidTransition,
    JobEvent,
    JobState,
    LimitExceeded,
    RetryPolicy,
    next_state,
    submission_id,
)
from service.limits import Resources, check_limits, demand, estimated_steps
from service.scheduler import plan
from service.settings import Settings
from service.spec import load_spec_file, parse_spec
from tests.conftest import ROOT

Q, ST, R, OK, F, C = (
    JobState.QUEUED,
    JobState.STARTING,
    JobState.RUNNING,
    JobState.SUCCEEDED,
    JobState.FAILED,
    JobState.CANCELLED,
)
ALLOWED = {
    (Q, JobEvent.ADMIT): ST,
    (Q, JobEvent.CANCEL): C,
    (Q, JobEvent.FAIL): F,
    (ST, JobEvent.START): R,
    (ST, JobEvent.SUCCEED): OK,
    (ST, JobEvent.FAIL): F,
    (ST, JobEvent.CANCEL): C,
    (ST, JobEvent.REQUEUE): Q,
    (R, JobEvent.SUCCEED): OK,
    (R, JobEvent.FAIL): F,
    (R, JobEvent.CANCEL): C,
    (R, JobEvent.REQUEUE): Q,
}


@pytest.mark.parametrize("state,event", list(itertools.product(JobState, JobEvent)))
def test_next_state_for_every_pair(state, event):
    if (state, event) in ALLOWED:
        assert next_state(state, event) is ALLOWED[(state, event)]
    else:
        with pytest.raises(InvalidTransition) as e:
            next_state(state, event)
        assert e.value.state == state and state.value in e.value.message


def test_terminal_states_allow_nothing_and_say_so():
    assert {OK, F, C} == TERMINAL
    assert [s for s in JobState if s.terminal] == [OK, F, C]
    assert [s for s in JobState if s.live] == [ST, R]
    with pytest.raises(InvalidTransition, match="cannot cancel a job that is succeeded; the job is finished"):
        next_state("succeeded", "cancel")
    with pytest.raises(InvalidTransition, match="allowed: admit, cancel, fail"):
        next_state("queued", "start")


def test_states_parse_from_strings():
    assert next_state("running", "requeue") is Q
    with pytest.raises(ValueError):
        next_state("paused", "cancel")


@pytest.mark.parametrize(
    "retries,used,permanent,resubmit",
    [
        (0, 1, False, False),  # no retries: one attempt only
        (2, 1, False, True),
        (2, 2, False, True),
        (2, 3, False, False),  # 1 + 2 attempts used
        (2, 1, True, False),  # a permanent failure (a ConfigError): never resubmitted
        (5, 0, False, True),
    ],
)
def test_retry_policy(retries, used, permanent, resubmit):
    policy = RetryPolicy.for_retries(retries)
    assert policy.max_attempts == retries + 1
    assert policy.resubmit(used, permanent=permanent) is resubmit


def test_submission_ids_keep_the_job_id_for_the_first_attempt():
    assert submission_id("20260101-000000-ab", 1) == "20260101-000000-ab"
    assert submission_id("20260101-000000-ab", 2) == "20260101-000000-ab-a2"
    assert submission_id("j", 11) == "j-a11"
    with pytest.raises(ValueError):
        submission_id("j", 0)


def cpu(n):
    return Resources(cpu=n)


def test_plan_admits_in_order_while_resources_last():
    d = plan([("a", cpu(1)), ("b", cpu(1)), ("c", cpu(1))], capacity=cpu(4), free=cpu(2))
    assert [(x.job_id, x.admit) for x in d] == [("a", True), ("b", True), ("c", False)]
    assert d[2].reason == "waiting for resources: needs 1 CPU; 0 CPU free"


def test_plan_blocks_behind_a_job_that_waits_so_big_jobs_are_not_starved():
    d = plan([("big", cpu(4)), ("small", cpu(1))], capacity=cpu(4), free=cpu(2))
    assert [x.admit for x in d] == [False, False]
    assert d[0].reason == "waiting for resources: needs 4 CPU; 2 CPU free"
    assert d[1].reason == "waiting behind higher-priority job big"


def test_plan_skips_a_job_that_can_never_fit():
    d = plan([("huge", cpu(64)), ("small", cpu(1))], capacity=cpu(2), free=cpu(2))
    assert d[0] == d[0].__class__(
        "huge", False, "cannot run on this cluster: needs 64 CPU; it has 2 CPU in total"
    )
    assert d[1].admit


def test_plan_counts_gpus():
    need = Resources(cpu=2, gpu=2)
    d = plan([("g", need)], capacity=Resources(cpu=8, gpu=1), free=Resources(cpu=8, gpu=1))
    assert not d[0].admit and "2 CPU, 2 GPU" in d[0].reason and "8 CPU, 1 GPU in total" in d[0].reason
    assert plan([("g", need)], Resources(8, 4), Resources(8, 2))[0].admit


def test_plan_reports_no_negative_free_room():
    d = plan([("a", cpu(1))], capacity=cpu(2), free=cpu(-1))
    assert d[0].reason == "waiting for resources: needs 1 CPU; 0 CPU free"


def _spec(**over):
    base = {"name": "x", "model": {"name": "mlp"}, "data": {"name": "digits"}}
    return parse_spec({**base, **over})


def test_demand_is_one_cpu_per_worker_plus_their_gpus():
    assert demand(_spec(parallel={"workers": 2})) == Resources(2, 0)
    assert demand(_spec(parallel={"workers": 4, "gpus_per_worker": 2})) == Resources(4, 8)
    assert demand(_spec(parallel={"workers": 1, "gpus_per_worker": 0.5})) == Resources(1, 0.5)


def test_estimated_steps_matches_the_engine_for_the_example():
    # the integration test of the engine runs this spec for exactly 660 steps
    assert estimated_steps(load_spec_file(ROOT / "examples" / "digits-gmp90.yaml")) == 660
    assert estimated_steps(_spec(train={"epochs": 2, "max_steps": 5})) == 5
    syn = _spec(
        data={"name": "synthetic", "args": {"n_samples": 1000}}, train={"epochs": 3, "batch_size": 100}
    )
    assert estimated_steps(syn) == 3 * 8  # 800 training samples / 100
    # text: 400,000 bytes in blocks of 64 -> 6249 samples, 4999 of them for training
    assert estimated_steps(_spec(model={"name": "gpt"}, data={"name": "text"})) == 10 * (4999 // 64)
    assert estimated_steps(_spec(data={"uri": "s3://b/k.npz"})) is None


def test_limits_name_each_field_above_them():
    s = Settings(max_workers=2, max_epochs=5, max_steps=100)
    check_limits(_spec(parallel={"workers": 2}, train={"epochs": 5, "max_steps": 100}), s)
    with pytest.raises(LimitExceeded) as e:
        check_limits(_spec(parallel={"workers": 4}, train={"epochs": 6}), s)
    assert e.value.errors == [
        {"field": "parallel.workers", "message": "4 is above this server's limit (2)"},
        {"field": "train.epochs", "message": "6 is above this server's limit (5)"},
        {"field": "train.epochs", "message": "the job would run 132 steps; this server's limit is 100"},
    ]
    with pytest.raises(LimitExceeded) as e:
        check_limits(_spec(train={"epochs": 5}), s)  # 5 x 22 = 110 steps
    assert e.value.errors == [
        {"field": "train.epochs", "message": "the job would run 110 steps; this server's limit is 100"}
    ]
    with pytest.raises(LimitExceeded) as e:
        # data of a size only loading tells: max_steps is the count
        check_limits(_spec(data={"uri": "s3://b/k.npz"}, train={"epochs": 1, "max_steps": 101}), s)
    assert [f["field"] for f in e.value.errors] == ["train.max_steps"]


def test_parse_lines_skips_what_was_ingested_and_the_incomplete_tail():
    data = b'{"kind": "train", "step": 10}\n{"kind": "eval", "step": 10}\n{"kind": "tr'
    assert parse_lines(data, 0) == [{"kind": "train", "step": 10}, {"kind": "eval", "step": 10}]
    assert parse_lines(data, 1) == [{"kind": "eval", "step": 10}]
    assert parse_lines(data, 2) == []
    assert parse_lines(b"", 0) == []


def test_parse_lines_keeps_numbering_across_bad_lines():
    data = b'{"kind": "train"}\nnot json\n[1, 2]\n{"kind": "eval"}\n'
    assert parse_lines(data, 0) == [
        {"kind": "train"},
        {"kind": "event", "event": "invalid_record", "line": 1},
        {"kind": "event", "event": "invalid_record", "line": 2},
        {"kind": "eval"},
    ]
