"""The driver's step-0 evaluation (workers.initial_eval) in one process, no Ray: it scores what
the training loop would have scored before its first step, its record carries `baseline` only
with model.init, and its thread hands over the record once, or its error. Through the driver on
a real Ray head: tests/integration/test_models_upload.py."""

import json
import threading
from concurrent.futures import Future

import pytest
import torch
from safetensors.torch import save as st_save

from service.artifacts import LocalArtifactStore
from service.errors import ConfigError
from service.spec import parse_spec
from service.uploads import model_key, resolve_init
from workers import init_weights
from workers.data import load_dataset
from workers.initial_eval import InitialEval, evaluate_into, has_step0, step0_record
from workers.models import build_model
from workers.session import LocalSession
from workers.train_loop import evaluate_initial, train

BASE = {
    "name": "step0",
    "model": {"name": "mlp", "args": {"hidden": [32]}},
    "data": {"name": "digits"},
    "train": {"epochs": 1, "batch_size": 64, "lr": 0.05},
    "checkpoint": {"every_steps": 1000},
}
# Fake-quantized layers from step 0 and a pruning schedule that starts there: the step-0 model is
# the converted one, before any mask.
COMPRESSED = {
    **BASE,
    "model": {**BASE["model"], "init": {"uri": "store://models/parent"}},
    "compression": {
        "pruning": {"final_sparsity": 0.5, "start_step": 0, "end_step": 10, "frequency": 5},
        "quantization": {"mode": "qat", "bits": 8, "start_step": 0},
    },
}


class Streamed:
    streamed = True


@pytest.fixture(scope="module")
def digits():
    return load_dataset(parse_spec(BASE).data)


@pytest.fixture(scope="module")
def store(tmp_path_factory, digits):
    store = LocalArtifactStore(tmp_path_factory.mktemp("step0"))
    spec = parse_spec(BASE)
    # Trained-looking weights: a model of another seed, so a loader that ignored them would differ.
    state = build_model(spec.model.name, spec.model.args, digits.info, seed=7).state_dict()
    store.put_bytes(model_key("default", "parent"), st_save({k: v.contiguous() for k, v in state.items()}))
    return store


def test_the_drivers_step0_equals_the_loops_own_on_a_compressed_job(store, digits):
    spec = resolve_init(parse_spec(COMPRESSED, submitted=True), "default", store)
    session = LocalSession(store, "loop")
    train(spec, digits, session)  # the loop evaluates step 0 itself: the caller did not
    loop = [r for r in session.records if r["kind"] == "eval" and r["step"] == 0]
    assert len(loop) == 1 and loop[0]["baseline"] is True
    scores = evaluate_initial(spec, digits, init_weights.load_init_state(spec, store))
    assert step0_record(spec, scores) == {k: v for k, v in loop[0].items() if k != "time"}
    # For every strategy: the driver scores the plain model, which FSDP shards and pipeline splits.
    for strategy in ("fsdp", "pipeline"):
        other = spec.model_copy(update={"parallel": spec.parallel.model_copy(update={"strategy": strategy})})
        assert evaluate_initial(other, digits, init_weights.load_init_state(spec, store)) == scores


def test_a_loop_told_step0_is_scored_does_not_score_it(store, digits):
    spec = resolve_init(parse_spec(COMPRESSED, submitted=True), "default", store)
    session = LocalSession(store, "told")
    train(spec, digits, session, step0_evaluated=True)
    evals = [r for r in session.records if r["kind"] == "eval"]
    assert evals and all(r["step"] > 0 for r in evals)


def test_without_init_the_record_is_the_fresh_model_not_a_baseline(store, digits):
    spec = parse_spec(BASE)
    rec = step0_record(spec, evaluate_initial(spec, digits, None))
    assert "baseline" not in rec and rec["kind"] == "eval" and rec["step"] == 0
    assert init_weights.baseline_of([rec], digits.info.kind) is None
    # A fresh 10-class classifier: near chance, its loss near ln 10.
    assert rec["val_accuracy"] < 0.3 and 1.8 < rec["val_loss"] < 2.9
    # The seed decides the model: the same spec scores the same, another seed otherwise.
    assert evaluate_initial(spec, digits, None) == {k: rec[k] for k in ("val_loss", "val_accuracy")}
    reseeded = parse_spec({**BASE, "train": {**BASE["train"], "seed": 5}})
    assert evaluate_initial(reseeded, digits, None)["val_loss"] != rec["val_loss"]


@pytest.mark.timeout(60)  # take(wait=True) waits unbounded, as the driver does
def test_the_record_is_handed_over_once_and_only_when_asked_to_wait_or_ready(digits):
    spec = parse_spec(BASE)
    gate = threading.Event()
    ev = InitialEval(spec, Streamed(), None, [])  # no thread of its own: the test's, held back

    def held(future):
        gate.wait(10)
        evaluate_into(future, spec, digits, None)

    ev.evaluated, ev._future = True, Future()
    ready = threading.Event()
    ev.on_ready(ready.set)  # wakes the driver's pump
    threading.Thread(target=held, args=(ev._future,), daemon=True).start()
    assert ev.take(wait=False) is None and not ready.is_set()  # not scored yet: the pump goes on
    threading.Timer(0.2, gate.set).start()  # released while take() waits, as in the driver
    rec = ev.take(wait=True)
    assert rec["step"] == 0 and "val_loss" in rec and ready.wait(5)
    assert ev.take(wait=True) is None  # once


def test_an_error_in_the_evaluation_is_raised_to_the_driver(digits):
    spec = parse_spec({**BASE, "model": {**BASE["model"], "init": {"uri": "store://models/parent"}}})
    ev = InitialEval(spec, digits, {"fc.weight": torch.zeros(1)}, [])  # weights that do not fit
    assert ev.evaluated
    with pytest.raises(ConfigError, match="model.init"):
        ev.take(wait=True)


def test_streamed_data_and_an_earlier_attempts_step0_start_no_evaluation(digits):
    spec = parse_spec(BASE)
    streamed = InitialEval(spec, Streamed(), None, [])
    assert not streamed.evaluated and streamed.take(wait=True) is None  # the workers score it
    lines = [
        json.dumps({"kind": "phase", "phase": "preparing"}),
        "not json",
        json.dumps({"kind": "eval", "step": 0}),
    ]
    assert has_step0(lines) and not has_step0(lines[:2])
    again = InitialEval(spec, digits, None, lines)
    assert again.evaluated and again.take(wait=True) is None  # written by an earlier attempt


def test_the_driver_reads_the_init_weights_once_and_scores_them(store, digits):
    """The preflight's read of model.init is the one the step-0 evaluation scores: a large
    checkpoint on S3 is fetched once per attempt."""
    from workers.driver import preflight

    reads: list[str] = []

    class Counting(LocalArtifactStore):
        def get_bytes(self, key):
            reads.append(key)
            return super().get_bytes(key)

    counting = Counting(store.root)
    spec = resolve_init(parse_spec(COMPRESSED, submitted=True), "default", counting)
    reads.clear()
    prepared = preflight(spec, counting)
    ev = InitialEval(spec, prepared.data, prepared.init_state, [])
    rec = ev.take(wait=True)
    assert reads.count(model_key("default", "parent")) == 1
    assert rec["baseline"] is True
    assert {k: rec[k] for k in ("val_loss", "val_accuracy")} == evaluate_initial(
        spec, digits, init_weights.load_init_state(spec, store)
    )
