"""A job's first metric: the driver scores the initial model on the validation split (step 0)
while Ray starts the worker group.

Why in the driver: the worker group is up 5.5-12 s after the data is loaded, each of its processes
importing torch and Ray Train (bench/README, "Submit -> first metric"). The driver already holds
torch, the data and the spec, so its step-0 `eval` record is the first metric a client sees,
seconds before the first train record. With `model.init` the record is the report's baseline
(`baseline: true`) and the workers skip their own step-0 evaluation; without it, it is the fresh
model's loss and accuracy (a classifier of C classes starts near ln C), the start of the
validation curves.

Data held in memory only: a streamed validation split is read by the workers (the driver holds
a sample), so a streamed job's step 0 stays theirs.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future

from service.spec import JobSpec
from workers.data import Dataset
from workers.metrics_log import decoded


def has_step0(lines: list[str]) -> bool:
    """Whether an earlier attempt of the job already wrote a step-0 evaluation."""
    return any(rec.get("kind") == "eval" and rec.get("step") == 0 for rec in decoded(lines))


def step0_record(spec: JobSpec, scores: dict) -> dict:
    rec = {"kind": "eval", "step": 0, **scores}
    if spec.model.init is not None:
        rec["baseline"] = True  # workers.init_weights.baseline_of reads it into the report
    return rec


def evaluate_into(future: Future, spec: JobSpec, data: Dataset, init_state: dict | None) -> None:
    """The step-0 record into `future`, or the error that stopped it."""
    from workers.train_loop import evaluate_initial

    try:
        scores = evaluate_initial(spec, data, init_state)
        future.set_result(step0_record(spec, scores))
    except BaseException as e:  # raised in the driver's thread by InitialEval.take
        future.set_exception(e)


class InitialEval:
    """One step-0 evaluation on a thread of its own; the driver's record pump takes its record.

    `evaluated`: whether the job's step 0 is (or was, in an earlier attempt) scored here, so the
    workers skip theirs. `take(wait)` returns the record once, waiting for it when `wait` (the
    workers' first records are ready, and the step-0 point must come before them: the
    dashboard's curves drop every point at or after a step seen again). An error in the
    evaluation is raised there, as the driver's own."""

    def __init__(self, spec: JobSpec, data: Dataset, init_state: dict | None, lines: list[str]):
        """`init_state`: the model.init weights the preflight read (None without init)."""
        streamed = getattr(data, "streamed", False)
        self.evaluated = not streamed
        self._future: Future | None = None
        if streamed or has_step0(lines):
            return
        # The thread holds its own reference: take() lets go of the attribute as it waits.
        self._future = Future()
        threading.Thread(
            target=evaluate_into, args=(self._future, spec, data, init_state), name="step0-eval", daemon=True
        ).start()

    def on_ready(self, fn: Callable[[], None]) -> None:
        """Call `fn` (on the evaluation's thread) once its record or error is ready."""
        if self._future is not None:
            self._future.add_done_callback(lambda _f: fn())

    def take(self, wait: bool) -> dict | None:
        if self._future is None or not (wait or self._future.done()):
            return None
        future, self._future = self._future, None
        return future.result()
