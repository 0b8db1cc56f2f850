"""QAT through real Ray Train: LeNet-5 on digits, 2 DDP workers, pruned to 90% then fake-quantized;
the job ends with an int8 ONNX model whose onnxruntime accuracy is within a point of PyTorch's."""

from __future__ import annotations

import json

import onnx
import pytest
import torch

from service.artifacts import JobArtifacts, LocalArtifactStore
from service.spec import parse_spec
from workers import onnx_export, pack, report
from workers.checkpoint import load_latest
from workers.data import load_dataset
from workers.driver import run_job

pytestmark = pytest.mark.integration

SPEC = {
    "name": "digits-lenet5-gmp90-qat",
    "model": {"name": "lenet5"},
    "data": {"name": "digits", "val_fraction": 0.2},
    "train": {"epochs": 12, "batch_size": 64, "lr": 0.05, "momentum": 0.9, "seed": 0},
    "parallel": {"strategy": "ddp", "workers": 2},
    "precision": "fp32",
    "compression": {
        "pruning": {
            "schedule": "cubic",
            "final_sparsity": 0.9,
            "start_step": 20,
            "end_step": 160,
            "frequency": 20,
        },
        "quantization": {"mode": "qat", "bits": 8, "start_step": 160},
    },
    "checkpoint": {"every_steps": 100, "keep": 2},
    "retries": 0,
}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return LocalArtifactStore(tmp_path_factory.mktemp("quant"))


@pytest.fixture(scope="module")
def qat(ray_cluster, store):
    return run_job(parse_spec(SPEC), "qat", store)


def test_int8_onnx_accuracy_is_within_a_point_of_the_float_model(qat, store):
    arts = JobArtifacts(store, "qat")
    graph = arts.get_bytes("model.int8.onnx")
    ops = {n.op_type for n in onnx.load_from_string(graph).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv", "Gemm"} <= ops
    data = load_dataset(parse_spec(SPEC).data)
    measured = report.onnx_accuracy(onnx_export.session(graph), data)["accuracy"]
    assert measured == qat["accuracy"]
    assert abs(qat["accuracy"] - qat["float_accuracy"]) <= 0.01
    assert qat["accuracy"] >= 0.9
    assert qat["warnings"] == []


def test_report_and_artifacts(qat, store):
    assert qat["steps"] == 264
    assert qat["sparsity"]["global"] == pytest.approx(0.9, abs=0.005)
    assert qat["quantization"]["mode"] == "qat" and qat["quantization"]["start_step"] == 160
    assert set(qat["quantization"]["input_qparams"]) == {
        "features.conv1",
        "features.conv2",
        "classifier.fc1",
        "classifier.fc2",
        "classifier.fc3",
    }
    assert qat["size"]["ratio"] >= 10
    arts = JobArtifacts(store, "qat")
    names = set(arts.get_json("manifest.json")["files"])
    assert {"model.onnx", "model.int8.onnx", "model.packed", "model.safetensors", "report.json"} <= names
    assert arts.verify_manifest() == []
    assert json.loads(arts.get_bytes("report.json"))["accuracy"] == qat["accuracy"]


def test_ranks_agreed_and_the_quantizer_state_is_in_the_checkpoint(qat, store):
    text = JobArtifacts(store, "qat").get_bytes("metrics.jsonl").decode()
    updates = [r for r in map(json.loads, text.splitlines()) if r.get("event") == "mask_update"]
    assert updates and all(len(set(u["mask_checksums"])) == 1 for u in updates)
    state = load_latest(store, "qat").state["model"]
    for layer in ("features.conv1", "classifier.fc3"):
        assert bool(state[f"{layer}.weight_quant.enabled"])
        assert bool(state[f"{layer}.input_quant.initialized"])
        assert float(state[f"{layer}.input_quant.scale"]) > 0


def test_packed_weights_keep_the_masks(qat, store):
    arts = JobArtifacts(store, "qat")
    rebuilt = pack.rebuild(arts.get_bytes("model.packed")).state_dict()
    masks = load_latest(store, "qat").state["pruner"]["masks"]
    for name, mask in masks.items():
        w = rebuilt[f"{name}.weight"]
        assert torch.all(w[~mask] == 0), name
