"""Divergence: a run whose weights stop being finite fails with a readable, retryable error, and
never leaves a checkpoint of non-finite weights behind."""

import pickle

import pytest
import torch
from torch import nn

from service.artifacts import LocalArtifactStore
from service.errors import TrainingDiverged, TrainingFailed
from service.spec import parse_spec
from workers.checkpoint import load_latest
from workers.data import load_dataset
from workers.session import LocalSession
from workers.train_loop import nonfinite_weights, train

# A tiny gpt on the text corpus with plain SGD at lr 10 reaches NaN within ten steps; it logs
# less often than it checkpoints, so the checkpoint guard is what catches it.
DIVERGES = {
    "name": "diverges",
    "model": {"name": "gpt", "args": {"n_layer": 1, "n_embd": 32, "n_head": 2}},
    "data": {"name": "text"},
    "train": {"epochs": 1, "max_steps": 40, "batch_size": 16, "lr": 10.0, "log_every_steps": 20},
    "parallel": {"workers": 1},
    "precision": "fp32",
    "checkpoint": {"every_steps": 5},
}


@pytest.mark.parametrize(
    "values,expected",
    [
        ([[1.0, 2.0], [0.0]], 0),
        ([[1.0, float("nan")], [0.0]], 1),
        ([[float("inf")], [float("-inf")]], 2),
        ([[1.0, float("nan"), float("inf")], [3.0]], 1),  # counted per tensor
    ],
)
def test_nonfinite_weights_counts_tensors(values, expected):
    m = nn.Module()
    for i, v in enumerate(values):
        m.register_parameter(f"p{i}", nn.Parameter(torch.tensor(v)))
    assert nonfinite_weights(m) == expected


def test_nonfinite_weights_of_a_module_without_weights():
    assert nonfinite_weights(nn.ReLU()) == 0


def test_a_diverging_run_fails_without_a_nonfinite_checkpoint(tmp_path):
    spec = parse_spec(DIVERGES)
    store = LocalArtifactStore(tmp_path)
    session = LocalSession(store, "d")
    with pytest.raises(TrainingDiverged, match=r"training diverged by step \d+: .* lower train.lr") as e:
        train(spec, load_dataset(spec.data), session)
    assert e.value.retryable and e.value.code == "diverged"
    last = load_latest(store, "d")
    assert last is not None and last.step < 40
    for name, t in last.state["model"].items():
        assert torch.isfinite(t).all(), name


def test_training_errors_keep_their_retry_class_across_pickling():
    err = pickle.loads(pickle.dumps(TrainingFailed("rank 1: died", retryable=True, code="worker_failed")))
    assert (err.message, err.retryable, err.code) == ("rank 1: died", True, "worker_failed")
    assert not TrainingFailed("x").retryable and TrainingFailed("x").code == "training_failed"
    assert pickle.loads(pickle.dumps(TrainingDiverged("d"))).retryable
