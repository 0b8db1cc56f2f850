"""The training loop in one process (no Ray): resume is exact, masks hold in every precision."""

import pytest
import torch

from service.artifacts import LocalArtifactStore
from service.errors import ConfigError
from service.spec import parse_spec
from workers.checkpoint import load_latest
from workers.data import load_dataset
from workers.session import LocalSession
from workers.train_loop import Faults, train

SPEC = {
    "name": "t",
    "model": {"name": "mlp", "args": {"hidden": [128, 64]}},
    "data": {"name": "digits"},
    "train": {"epochs": 4, "batch_size": 64, "lr": 0.05},
    "compression": {"pruning": {"final_sparsity": 0.8, "start_step": 10, "end_step": 70, "frequency": 10}},
    "checkpoint": {"every_steps": 20},
}


@pytest.fixture(scope="module")
def digits():
    return load_dataset(parse_spec(SPEC).data)


def _final(store, job):
    return load_latest(store, job).state


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_interrupted_and_resumed_equals_uninterrupted(tmp_path, digits, precision):
    spec = parse_spec({**SPEC, "precision": precision})
    store = LocalArtifactStore(tmp_path)
    train(spec, digits, LocalSession(store, "a"))
    with pytest.raises(RuntimeError, match="injected"):
        train(spec, digits, LocalSession(store, "b"), Faults(raise_at_step=53))
    session = LocalSession(store, "b")
    train(spec, digits, session)
    start = [r for r in session.records if r.get("event") == "start"][0]
    assert start["resumed_from"] == 40
    # the whole schedule rides on the start record, ending at the run's last step
    curve = start["target_curve"]
    assert [s for s, _ in curve] == [0, 11, 21, 31, 41, 51, 61, 71, 88]
    assert curve[-1] == (88, 0.8) and curve[-2] == (71, 0.8)
    # each train record measures the masks whose target it reports (global magnitude pruning
    # hits its target to within ties), so the chart's two lines meet
    for r in (r for r in session.records if r["kind"] == "train"):
        assert abs(r["sparsity"] - r["target_sparsity"]) < 0.005, r
    a, b = _final(store, "a"), _final(store, "b")
    assert a["step"] == b["step"] == 88
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for k in a["pruner"]["masks"]:
        assert torch.equal(a["pruner"]["masks"][k], b["pruner"]["masks"][k])


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_every_precision_trains_and_keeps_masks(tmp_path, digits, precision):
    spec = parse_spec({**SPEC, "precision": precision})
    session = LocalSession(LocalArtifactStore(tmp_path), "p")
    train(spec, digits, session)
    evals = [r for r in session.records if r["kind"] == "eval"]
    assert evals[-1]["val_accuracy"] > 0.85
    state = _final(session.store, "p")
    for name, mask in state["pruner"]["masks"].items():
        w = state["model"][f"{name}.weight"]
        assert torch.all(w[~mask] == 0)
    trains = [r for r in session.records if r["kind"] == "train"]
    assert trains[-1]["sparsity"] == pytest.approx(0.8, abs=0.005)


def test_schedule_past_the_last_step_is_a_config_error(tmp_path, digits):
    spec = parse_spec({**SPEC, "compression": {"pruning": {"start_step": 10, "end_step": 500}}})
    with pytest.raises(ConfigError, match="end_step: 500 is after the job's last step"):
        train(spec, digits, LocalSession(LocalArtifactStore(tmp_path), "c"))


def test_clipping_bounds_weights(tmp_path, digits):
    spec = parse_spec({**SPEC, "compression": {"clipping": {"max_abs": 0.05}}})
    session = LocalSession(LocalArtifactStore(tmp_path), "clip")
    train(spec, digits, session)
    state = _final(session.store, "clip")
    for k, v in state["model"].items():
        if k.endswith("weight"):
            assert v.abs().max() <= 0.05 + 1e-7, k
