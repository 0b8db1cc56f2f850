"""How the driver words and classifies a failed Ray Train run, and counts attempts across drivers."""

import json

import pytest
from ray.train.v2.api.exceptions import ControllerError, WorkerGroupError

from service.errors import ConfigError, MaskMismatchError, TrainingDiverged
from workers.driver import Attempts, training_failure


def _wrapped(exc: BaseException) -> BaseException:
    """An exception as Ray hands it over: a wrapper whose __cause__ is the worker's own."""
    outer = RuntimeError("ray wrapper")
    outer.__cause__ = exc
    return outer


@pytest.mark.parametrize(
    "failures,message,retryable,code",
    [
        ({1: RuntimeError("boom")}, "training failed: rank 1: RuntimeError: boom", True, "training_failed"),
        # the lowest failed rank speaks for the group
        (
            {2: OSError("disk"), 0: ValueError("x\nlast line")},
            "training failed: rank 0: ValueError: last line",
            True,
            "training_failed",
        ),
        (
            {0: _wrapped(TrainingDiverged("training diverged by step 10"))},
            "training failed: rank 0: training diverged by step 10",
            True,
            "diverged",
        ),
        (
            {1: _wrapped(ConfigError("checkpoint has no pruning masks"))},
            "training failed: rank 1: checkpoint has no pruning masks",
            False,
            "config_error",
        ),
        (
            {0: MaskMismatchError("masks differ")},
            "training failed: rank 0: masks differ",
            False,
            "mask_mismatch",
        ),
    ],
)
def test_worker_failures_are_worded_and_classified(failures, message, retryable, code):
    err = training_failure(WorkerGroupError("workers failed", failures), attempts=1)
    assert (err.message, err.retryable, err.code) == (message, retryable, code)


def test_a_controller_failure_names_its_cause():
    err = training_failure(ControllerError(RuntimeError("scheduling failed")), attempts=1)
    assert (err.message, err.retryable) == ("training failed: RuntimeError: scheduling failed", True)


def test_in_run_restarts_are_counted_and_long_foreign_messages_cut():
    err = training_failure(WorkerGroupError("w", {0: RuntimeError("x" * 500)}), attempts=3)
    assert err.message == f"training failed after 3 attempts: rank 0: RuntimeError: {'x' * 200}..."


def test_attempts_continue_the_count_of_earlier_drivers():
    lines = [
        json.dumps({"kind": "event", "event": "start", "resumed_from": None, "time": 1.0}),
        json.dumps({"kind": "train", "step": 10}),
        "not json",
        json.dumps({"kind": "event", "event": "start", "resumed_from": 40, "time": 2.0}),
    ]
    seen = Attempts.of_lines(lines)
    assert seen.items == [
        {"attempt": 1, "resumed_from": None, "time": 1.0},
        {"attempt": 2, "resumed_from": 40, "time": 2.0},
    ]
    rec = {"kind": "event", "event": "start", "resumed_from": 80}
    seen.observe(rec)
    assert rec["attempt"] == 3 and Attempts.of_lines([]).items == []


def test_the_rank_that_died_speaks_for_the_group_not_the_peer_it_cut_off():
    from ray.exceptions import ActorDiedError
    from ray.train.v2._internal.exceptions import WorkerHealthCheckFailedError

    died = WorkerHealthCheckFailedError(
        "The actor is dead because its worker process has died.", ActorDiedError()
    )
    peer = RuntimeError("[gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:1234")
    err = training_failure(WorkerGroupError("w", {0: peer, 1: died}), attempts=1)
    # Ray's health-check error ends with the actor's own death message
    assert err.message == (
        "training failed: rank 1: WorkerHealthCheckFailedError: "
        "The actor died unexpectedly before finishing this task."
    )
    assert err.retryable
    # our own diagnosis outranks a death
    diverged = _wrapped(TrainingDiverged("training diverged by step 10"))
    err = training_failure(WorkerGroupError("w", {0: died, 2: diverged}), attempts=1)
    assert (err.message, err.code) == ("training failed: rank 2: training diverged by step 10", "diverged")
