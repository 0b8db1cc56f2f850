"""QAT in the training loop (one process): the quantizer's state is checkpointed, so a run
interrupted after fake quantization started resumes to bit-identical weights and quantizer state,
and pruned weights stay exactly zero under fake quantization."""

import pytest
import torch

from service.artifacts import LocalArtifactStore
from service.spec import parse_spec
from workers.checkpoint import load_latest
from workers.data import load_dataset
from workers.session import LocalSession
from workers.train_loop import Faults, train

SPEC = {
    "name": "q",
    "model": {"name": "mlp", "args": {"hidden": [64, 32]}},
    "data": {"name": "digits"},
    "train": {"epochs": 4, "batch_size": 64, "lr": 0.05},
    "compression": {
        "pruning": {"final_sparsity": 0.8, "start_step": 5, "end_step": 45, "frequency": 5},
        "quantization": {"mode": "qat", "start_step": 30, "freeze_step": 70},
    },
    "checkpoint": {"every_steps": 20},
}


@pytest.fixture(scope="module")
def digits():
    return load_dataset(parse_spec(SPEC).data)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_interrupted_qat_resumes_bit_identically(tmp_path, digits, precision):
    spec = parse_spec({**SPEC, "precision": precision})
    store = LocalArtifactStore(tmp_path)
    train(spec, digits, LocalSession(store, "a"))
    with pytest.raises(RuntimeError, match="injected"):
        train(spec, digits, LocalSession(store, "b"), Faults(raise_at_step=53))
    session = LocalSession(store, "b")
    train(spec, digits, session)
    assert [r["resumed_from"] for r in session.records if r.get("event") == "start"] == [40]
    a, b = load_latest(store, "a").state["model"], load_latest(store, "b").state["model"]
    assert a.keys() == b.keys()
    assert {"layers.fc1.input_quant.scale", "layers.fc1.input_quant.zero_point"} <= a.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # observers froze at step 70: the ranges of the last 18 steps are the exported ones
    assert bool(a["layers.fc2.input_quant.initialized"]) and not bool(a["layers.fc2.input_quant.observing"])
    assert bool(a["layers.fc2.weight_quant.enabled"])
    masks = load_latest(store, "a").state["pruner"]["masks"]
    for name, mask in masks.items():
        assert torch.all(a[f"{name}.weight"][~mask] == 0)
