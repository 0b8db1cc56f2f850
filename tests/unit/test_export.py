"""The end of a job in one process: a QAT job on digits exports verified artifacts and a report
whose accuracy is the int8 ONNX model's, measured in onnxruntime."""

import shutil
import time

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from safetensors.torch import load

from service.artifacts import JobArtifacts, LocalArtifactStore
from service.errors import ExportError
from service.spec import parse_spec
from tests.artifact_reading import onnx_weight_zeros, packed_zeros
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
PRUNED = {**SPEC, "name": "pruned", "compression": {"pruning": SPEC["compression"]["pruning"]}}


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


@pytest.fixture(scope="module")
def pruned(store, digits):
    return _job(store, "pruned", PRUNED, digits)


@pytest.fixture(scope="module")
def dense(store, digits):
    return _job(store, "dense", {**SPEC, "compression": {}}, digits)


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
            zero_point = inits[dq.input[2]].astype(np.float32)  # 128: uint8 storage (U8U8)
            deq = (codes - zero_point.reshape(-1, 1)) * scale.reshape(-1, 1)
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
    assert zeros / total == pytest.approx(qat["sparsity"]["trained_global"])


def _param_names(digits) -> set[str]:
    spec = parse_spec(SPEC)
    return {n for n, _ in build_model(spec.model.name, spec.model.args, digits.info).named_parameters()}


def _check_counts(rep: dict, packed: dict, graph: dict, digits) -> None:
    """The report's sparsity and params against the independent decodes of model.packed and the
    runtime graph (`graph`: layer name -> (zeros, size))."""
    layers = {f"layers.fc{i}" for i in (1, 2, 3)}
    assert set(rep["sparsity"]["layers"]) == layers == set(graph)
    for layer in layers:
        zeros, size = packed[f"{layer}.weight"]
        assert graph[layer] == (zeros, size), layer
        assert rep["sparsity"]["layers"][layer] == zeros / size, layer
    zeros = sum(packed[f"{layer}.weight"][0] for layer in layers)
    total = sum(packed[f"{layer}.weight"][1] for layer in layers)
    assert rep["sparsity"]["global"] == zeros / total
    assert rep["sparsity"]["measured_on"] == "model.packed"
    params = _param_names(digits)
    assert rep["params"]["total"] == sum(packed[n][1] for n in params)
    assert rep["params"]["nonzero"] == sum(packed[n][1] - packed[n][0] for n in params)


def test_pruned_weights_are_zero_in_model_packed_and_the_int8_graph(qat, store, digits):
    """The report's counts are the zeros model.packed and model.int8.onnx hold, read here with
    readers of our own, not with the tensors the report was computed from."""
    arts = JobArtifacts(store, "qat")
    packed = packed_zeros(arts.get_bytes("model.packed"))
    codes = onnx_weight_zeros(arts.get_bytes("model.int8.onnx"))
    graph = {name.removesuffix(".weight_quantized"): zs for name, zs in codes.items()}
    _check_counts(qat, packed, graph, digits)
    assert qat["sparsity"]["global"] >= qat["sparsity"]["trained_global"]  # rounding only adds zeros
    assert qat["sparsity"]["global"] == pytest.approx(0.8, abs=0.01)


def test_pruned_weights_are_zero_in_model_packed_and_model_onnx(pruned, store, digits):
    arts = JobArtifacts(store, "pruned")
    packed = packed_zeros(arts.get_bytes("model.packed"))
    graph = {
        name.removesuffix(".weight"): zs
        for name, zs in onnx_weight_zeros(arts.get_bytes("model.onnx")).items()
    }
    _check_counts(pruned, packed, graph, digits)
    assert pruned["sparsity"]["global"] == pruned["sparsity"]["trained_global"]
    assert pruned["sparsity"]["global"] == pytest.approx(0.8, abs=0.01)


def _copy_job(store, src: str, dst: str) -> None:
    """A second job with `src`'s final checkpoint: exported again without touching `src`'s files."""
    shutil.copytree(store.root / src / "checkpoints", store.root / dst / "checkpoints")


def _tamper_codes(monkeypatch, change):
    """Quantized weights whose first layer's codes went through `change` (codes -> codes)."""
    original = export.quant.export_weights

    def patched(model, cfg):
        out = original(model, cfg)
        name = next(iter(out))
        qw = out[name]
        out[name] = pack.QuantizedWeight(change(qw.codes.clone()), qw.scale, qw.bits)
        return out

    monkeypatch.setattr(export.quant, "export_weights", patched)


def test_a_code_rounded_to_zero_counts_in_the_report(qat, store, digits, monkeypatch):
    """A zero that only the artifact has (a weight quantized to code 0) is in report.sparsity:
    the counts come from what ships, not from the float weights."""
    _copy_job(store, "qat", "qat-rounded")

    def zero_one(codes):
        codes.view(-1)[int(codes.view(-1).nonzero()[0])] = 0
        return codes

    _tamper_codes(monkeypatch, zero_one)
    rep = export.export(
        parse_spec(SPEC), digits, store, "qat-rounded", qat["steps"], {"steps": qat["steps"]}, 3
    )
    assert rep["params"]["nonzero"] == qat["params"]["nonzero"] - 1
    layers = qat["sparsity"]["layers"]
    first = next(iter(layers))
    assert rep["sparsity"]["layers"][first] > layers[first]
    assert {n: v for n, v in rep["sparsity"]["layers"].items() if n != first} == {
        n: v for n, v in layers.items() if n != first
    }
    assert rep["sparsity"]["global"] > qat["sparsity"]["global"]
    assert rep["sparsity"]["trained_global"] == qat["sparsity"]["trained_global"]  # the floats as trained


def test_a_pruned_weight_revived_in_the_artifact_fails_the_export(qat, store, digits, monkeypatch):
    _copy_job(store, "qat", "qat-revived")

    def revive_one(codes):
        codes.view(-1)[int((codes.view(-1) == 0).nonzero()[0])] = 1
        return codes

    _tamper_codes(monkeypatch, revive_one)
    with pytest.raises(ExportError, match="pruned weight"):
        export.export(
            parse_spec(SPEC), digits, store, "qat-revived", qat["steps"], {"steps": qat["steps"]}, 3
        )


def test_a_pruned_float_weight_revived_in_model_packed_fails_the_export(pruned, store, digits, monkeypatch):
    _copy_job(store, "pruned", "pruned-revived")
    original = export.deployed_state

    def revived(state, qweights):
        out = original(state, qweights)
        w = out["layers.fc1.weight"].clone()
        w.view(-1)[int((w.view(-1) == 0).nonzero()[0])] = 0.5
        return {**out, "layers.fc1.weight": w}

    monkeypatch.setattr(export, "deployed_state", revived)
    with pytest.raises(ExportError, match="layers.fc1: 1 pruned weight"):
        export.export(
            parse_spec(PRUNED),
            digits,
            store,
            "pruned-revived",
            pruned["steps"],
            {"steps": pruned["steps"]},
            3,
        )


def test_latency_compares_two_artifacts_or_says_there_is_one(qat, dense):
    setup = qat["latency_setup"]
    assert (setup["dense"], setup["compressed"], setup["same_artifact"]) == (
        "model.onnx",
        "model.int8.onnx",
        False,
    )
    lat = qat["latency_ms"]
    assert setup["speedup"] == {
        "batch1": lat["dense"] / lat["compressed"],
        "batch64": lat["dense_batch64"] / lat["compressed_batch64"],
    }
    assert setup["statistic"].endswith("interleaved")
    # Nothing quantized: model.onnx is the runtime artifact; one measurement, no speed-up.
    setup = dense["latency_setup"]
    assert (setup["compressed"], setup["same_artifact"], setup["speedup"]) == ("model.onnx", True, None)
    lat = dense["latency_ms"]
    assert lat["dense"] == lat["compressed"] > 0 and lat["dense_batch64"] == lat["compressed_batch64"] > 0


def test_dense_accuracy_from_a_baseline_job(qat, dense, store, digits):
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
    assert "compression.baseline_job 'nope' has no report with an accuracy" in rep["warnings"]


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


def test_throughput_is_global_samples_over_the_loops_wall_clock(store, digits, monkeypatch):
    """samples_per_second divides every rank's samples by the loop's wall clock, which includes
    what happens between steps (here a slow evaluation), not by the time inside train_step."""
    from workers import train_loop

    evaluate = train_loop.evaluate

    def slow_evaluate(run):
        time.sleep(0.5)
        return evaluate(run)

    monkeypatch.setattr(train_loop, "evaluate", slow_evaluate)
    spec = parse_spec({**SPEC, "compression": {}, "train": {**SPEC["train"], "epochs": 2}})
    summary = train(spec, digits, LocalSession(store, "throughput"))
    assert summary["samples"] == summary["step"] * 64
    assert summary["wall_seconds"] >= summary["train_seconds"] + 2 * 0.5  # two epoch-end evaluations
    assert summary["samples_per_second"] == summary["samples"] / summary["wall_seconds"]
    assert summary["devices"] == ["cpu"]  # one rank, on the CPU: where it trained, by rank
