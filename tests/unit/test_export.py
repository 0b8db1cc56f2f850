"""The end of a job in one process: a QAT job on digits exports verified artifacts and a report
whose accuracy is the int8 ONNX model's, measured in onnxruntime."""

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from safetensors.torch import load

from service.artifacts import JobArtifacts, LocalArtifactStore
from service.spec import parse_spec
from workers import export, onnx_export, pack, report
from workers.data import load_dataset
from workers.models import build_model
from workers.session import LocalSession
from workers.train_loop import train

SPEC = {
    "name": "qat",
    "model": {"name": "mlp", "args": {"hidden": [64, 32]}},
    "data": {"name": "digits"},
    "train": {"epochs": 5, "batch_size": 64, "lr": 0.05},
    "compression": {
        "pruning": {"final_sparsity": 0.8, "start_step": 10, "end_step": 60, "frequency": 10},
        "quantization": {"mode": "qat", "start_step": 60},
    },
    "checkpoint": {"every_steps": 1000},
}


def _job(store, job_id, spec_dict, data):
    spec = parse_spec(spec_dict)
    summary = train(spec, data, LocalSession(store, job_id))
    return export.export(spec, data, store, job_id, summary["step"], {"steps": summary["step"]}, 5)


@pytest.fixture(scope="module")
def digits():
    return load_dataset(parse_spec(SPEC).data)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return LocalArtifactStore(tmp_path_factory.mktemp("export"))


@pytest.fixture(scope="module")
def qat(store, digits):
    return _job(store, "qat", SPEC, digits)


def test_report_keys(qat):
    design = {"accuracy", "sparsity", "params", "size", "latency_ms", "steps"}
    assert design <= set(qat)
    assert {"global", "layers"} <= set(qat["sparsity"])
    assert {"dense_bytes", "compressed_bytes", "ratio"} <= set(qat["size"])
    for key in ("dense", "compressed", "dense_batch64", "compressed_batch64"):
        assert qat["latency_ms"][key] > 0
    assert qat["quantization"]["mode"] == "qat" and qat["quantization"]["onnx"] == "model.int8.onnx"
    assert qat["quantization"]["freeze_step"] == 100  # 60 + ceil(0.8 * (110 - 60)): 5 epochs x 22
    assert qat["accuracy_source"].startswith("model.int8.onnx run in onnxruntime")
    assert qat["dense_accuracy"] is None  # compressed, and no baseline named


def test_accuracy_is_the_int8_onnx_models_and_within_a_point_of_pytorch(qat, store, digits):
    graph = JobArtifacts(store, "qat").get_bytes("model.int8.onnx")
    sess = onnx_export.session(graph)
    assert report.onnx_accuracy(sess, digits)["accuracy"] == qat["accuracy"]
    assert abs(qat["accuracy"] - qat["float_accuracy"]) <= 0.01
    assert qat["accuracy"] > 0.9
    assert qat["warnings"] == []


def test_packed_file_rebuilds_the_weights_the_int8_graph_computes_with(qat, store):
    arts = JobArtifacts(store, "qat")
    packed = arts.get_bytes("model.packed")
    assert qat["size"]["compressed_bytes"] == len(packed)
    assert qat["size"]["ratio"] == pytest.approx(qat["size"]["dense_bytes"] / len(packed))
    rebuilt = pack.rebuild(packed).state_dict()
    graph = onnx.load_from_string(arts.get_bytes("model.int8.onnx"))
    inits = {i.name: numpy_helper.to_array(i) for i in graph.graph.initializer}
    producers = {o: n for n in graph.graph.node for o in n.output}
    checked = 0
    for node in graph.graph.node:
        if node.op_type == "Gemm" and node.input[1] in producers:
            dq = producers[node.input[1]]
            codes, scale = inits[dq.input[0]].astype(np.float32), inits[dq.input[1]]
            deq = codes * scale.reshape(-1, 1)
            # the weight initializer was named after the layer: <layer>.weight_quantized
            name = dq.input[0].removesuffix("_quantized")
            assert np.array_equal(deq, rebuilt[name].numpy()), name
            checked += 1
    assert checked == 3


def test_safetensors_hold_the_trained_float_weights_only(qat, store, digits):
    state = load(JobArtifacts(store, "qat").get_bytes("model.safetensors"))
    assert not any("quant" in k for k in state)
    spec = parse_spec(SPEC)
    plain = build_model(spec.model.name, spec.model.args, digits.info)
    plain.load_state_dict(state)
    zeros = sum(int((state[f"layers.fc{i}.weight"] == 0).sum()) for i in (1, 2, 3))
    total = sum(state[f"layers.fc{i}.weight"].numel() for i in (1, 2, 3))
    assert zeros / total == pytest.approx(qat["sparsity"]["global"])


def test_dense_accuracy_from_a_baseline_job(qat, store, digits):
    dense = _job(store, "dense", {**SPEC, "compression": {}}, digits)
    assert dense["dense_accuracy"] == dense["accuracy"]  # a dense job is its own baseline
    assert dense["quantization"] == {"mode": "none"}
    assert dense["accuracy_source"].startswith("model.onnx run in onnxruntime")
    assert not JobArtifacts(store, "dense").exists("model.int8.onnx")
    spec = {**SPEC, "compression": {**SPEC["compression"], "baseline_job": "dense"}}
    assert export.export(parse_spec(spec), digits, store, "qat", qat["steps"], {"steps": qat["steps"]}, 3)[
        "dense_accuracy"
    ] == pytest.approx(dense["accuracy"])
    spec = {**SPEC, "compression": {**SPEC["compression"], "baseline_job": "nope"}}
    rep = export.export(parse_spec(spec), digits, store, "qat", qat["steps"], {"steps": qat["steps"]}, 3)
    assert rep["dense_accuracy"] is None
    assert rep["warnings"] == ["compression.baseline_job 'nope' has no report with an accuracy"]


@pytest.mark.parametrize(
    ("accuracy", "reference", "warned"),
    [(0.95, 0.96, False), (0.949, 0.96, True), (0.97, 0.96, False), (0.5, None, False)],
)
def test_gap_warnings(accuracy, reference, warned):
    out = report.gap_warnings(accuracy, reference, "the PyTorch model's")
    assert bool(out) == warned
    if warned:
        assert "1.10 points below the PyTorch model's (0.9600)" in out[0]


def test_deployed_state_puts_float_parts_on_the_float16_grid():
    state = {
        "w": torch.tensor([[0.1, 0.0], [1e5, -3.0]]),
        "b": torch.tensor([0.1, 1 / 3]),
        "i": torch.arange(3),
    }
    assert export.deployed_state(state, {}) == state  # a float model ships as trained
    from workers.compression.quantization import quantize_weight

    qw = quantize_weight(torch.tensor([[0.5, -0.25]]), 8)
    out = export.deployed_state({**state, "l.weight": torch.tensor([[0.5, -0.25]])}, {"l": qw})
    assert torch.equal(out["b"], state["b"].half().float())
    assert torch.equal(out["w"], state["w"])  # 1e5 is beyond float16: kept as is
    assert torch.equal(out["i"], state["i"])
    assert torch.equal(out["l.weight"], qw.codes.float() * qw.scale[:, None])
