"""What report.json says about running the exported model: multiply-accumulates counted from the
ONNX graph (checked against hand counts), the exported model's parameters, and which artifact to
deploy (a pure function of accuracies and latencies, checked value by value). Latency figures
themselves are never asserted on (they belong to bench/compression)."""

import pytest
import torch
from torch import nn

from service.spec import parse_spec
from workers import export, onnx_export, report
from workers.data import load_dataset
from workers.data.info import DataInfo
from workers.models import build_model
from workers.session import LocalSession
from workers.train_loop import train


def _graph(model: nn.Module, x: torch.Tensor):
    return onnx_export.to_onnx(model.eval(), x)


def test_macs_of_a_tiny_mlp_by_hand():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    with torch.no_grad():
        model[0].weight.view(-1)[:5] = 0.0  # 5 of the first layer's 12 weights pruned
    g = report.graph_macs(_graph(model, torch.randn(2, 4)))
    # 4 x 3 + 3 x 2 products per sample; without the zero weights: 7 + 6.
    assert g == {"macs": 18, "macs_nonzero_weights": 13, "uncounted": []}


def test_macs_of_a_conv_net_by_hand_and_per_sample():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),  # out 4x5x5 = 100 elements, each over 2 x 3 x 3 = 18
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, stride=2, groups=2),  # out 4x2x2 = 16, each over 4/2 x 3 x 3 = 18
        nn.Flatten(),
        nn.Linear(16, 3),  # 48
    )
    with torch.no_grad():
        model[2].weight[0] = 0.0  # one filter of 18 weights out of 72: a quarter of that conv
    m = _graph(model, torch.randn(2, 2, 5, 5))
    dense = 100 * 18 + 16 * 18 + 48
    assert report.graph_macs(m)["macs"] == dense
    assert report.graph_macs(m)["macs_nonzero_weights"] == dense - 16 * 18 // 4
    # the count is per sample whatever batch the input shape names: the batch multiplies it
    assert report.graph_macs(m, (8, 2, 5, 5))["macs"] == 8 * dense
    section = report.flops_section(m, (2, 5, 5), "model.onnx")
    assert section["macs"] == dense and section["flops"] == 2 * dense
    assert section["effective_macs_nonzero_weights"] == dense - 72
    assert section["per"] == "sample: input [1, 2, 5, 5]"


def test_macs_of_the_tiny_gpt_count_attention_matmuls():
    info = DataInfo("tokens", (8,), "int64", 256)
    model = build_model("gpt", {"n_layer": 1, "n_head": 2, "n_embd": 16}, info, seed=0)
    m = _graph(model, torch.zeros(2, 8, dtype=torch.long))
    t, c, v = 8, 16, 256
    expected = (
        t * 3 * c * c  # qkv
        + 2 * (t * t * (c // 2)) * 2  # q @ k^T and att @ v, two heads of 8
        + t * c * c  # proj
        + 2 * t * 4 * c * c  # fc, fc_proj
        + t * v * c  # lm_head
    )
    assert report.graph_macs(m, (1, 8))["macs"] == expected == 59392


def test_node_macs_refuses_unknown_shapes_and_ops():
    assert report.node_macs("MatMul", [None, (3, 4)], (2, 4), {}) is None
    assert report.node_macs("Gemm", [(3, 5), (3, 4)], (5, 4), {"transA": 1}) == 5 * 4 * 3
    with pytest.raises(ValueError, match="Add"):
        report.node_macs("Add", [(1,), (1,)], (1,), {})


def _cands(**arts):
    return {name: {"accuracy": acc, "latency_ms": {1: b1, 64: b64}} for name, (acc, b1, b64) in arts.items()}


FP32 = "model.onnx"
INT8 = "model.int8.onnx"


@pytest.mark.parametrize(
    "int8, chosen, speedup, why",
    [
        # 2x faster at both batches, 0.5 point lost: int8
        (
            (0.895, 0.5, 5.0),
            INT8,
            2.0,
            "batch 1 2.00x, batch 64 2.00x vs model.onnx, accuracy 0.8950 (-0.50 points)",
        ),
        # exactly one point lost is within the gate (accuracies are ratios of counts)
        ((0.89, 0.5, 5.0), INT8, 2.0, "accuracy 0.8900 (-1.00 points)"),
        # 1.1 points lost: refused however fast
        ((0.889, 0.1, 1.0), FP32, 1.0, "model.int8.onnx loses 1.10 points of accuracy (gate 1.00)"),
        # slower at batch 1, faster at 64: geometric mean sqrt(0.8 * 1.6) = 1.13 >= 1.05
        ((0.9, 1.25, 6.25), INT8, (0.8 * 1.6) ** 0.5, "batch 1 0.80x, batch 64 1.60x"),
        # 4% faster: within noise, fp32 stays
        ((0.9, 1 / 1.04, 10 / 1.04), FP32, 1.0, "is not faster (batch 1 1.04x, batch 64 1.04x"),
        # more accurate and faster
        ((0.91, 0.8, 8.0), INT8, 1.25, "(+1.00 points)"),
    ],
)
def test_choose_deploy_value_by_value(int8, chosen, speedup, why):
    d = report.choose_deploy(_cands(**{FP32: (0.9, 1.0, 10.0), INT8: int8}), FP32)
    assert d["artifact"] == chosen
    assert d["speedup"] == pytest.approx(speedup)
    assert why in d["why"]


def test_choose_deploy_picks_the_fastest_of_those_within_the_gate():
    d = report.choose_deploy(
        _cands(
            **{
                FP32: (0.9, 1.0, 10.0),
                "a.onnx": (0.9, 0.5, 5.0),  # 2x
                "b.onnx": (0.85, 0.1, 1.0),  # 10x, but 5 points lost
                "c.onnx": (0.895, 0.4, 4.0),  # 2.5x
            }
        ),
        FP32,
    )
    assert d["artifact"] == "c.onnx" and d["speedup"] == pytest.approx(2.5)
    alone = report.choose_deploy(_cands(**{FP32: (0.9, 1.0, 10.0)}), FP32)
    assert alone == {"artifact": FP32, "why": "model.onnx: the only artifact", "speedup": 1.0}


QAT = {
    "name": "qat-speed",
    "model": {"name": "mlp", "args": {"hidden": [64, 32]}},
    "data": {"name": "digits"},
    "train": {"epochs": 2, "batch_size": 64, "lr": 0.05},
    "compression": {"quantization": {"mode": "qat", "start_step": 20}},
    "checkpoint": {"every_steps": 1000},
}


@pytest.fixture(scope="module")
def qat_report(tmp_path_factory):
    from service.artifacts import LocalArtifactStore

    store = LocalArtifactStore(tmp_path_factory.mktemp("speed"))
    spec = parse_spec(QAT)
    data = load_dataset(spec.data)
    summary = train(spec, data, LocalSession(store, "q"))
    return export.export(spec, data, store, "q", summary["step"], {"steps": summary["step"]}, 5)


def test_quantized_report_states_flops_params_latency_and_deploy(qat_report):
    rep = qat_report
    # mlp 64 -> 64 -> 32 -> 10: Gemm products per sample, dense (nothing pruned)
    macs = 64 * 64 + 64 * 32 + 32 * 10
    assert rep["flops"]["macs"] == macs and rep["flops"]["flops"] == 2 * macs
    assert rep["flops"]["effective_macs_nonzero_weights"] == macs
    assert rep["params"]["exported"] == rep["params"]["total"] == macs + 64 + 32 + 10
    lat = rep["latency_ms"]
    for key in ("dense", "compressed", "dense_batch64", "compressed_batch64"):
        assert lat[key] > 0, key
    assert set(rep["latency_setup"]["speedup"]) == {"batch1", "batch64"}
    deploy = rep["deploy"]
    assert deploy["artifact"] in ("model.onnx", "model.int8.onnx") and deploy["why"]
    # the choice is the pure function's over the report's own figures
    fp32_acc = rep["quantization"]["fp32_onnx_accuracy"]
    again = report.choose_deploy(
        {
            "model.onnx": {"accuracy": fp32_acc, "latency_ms": {1: lat["dense"], 64: lat["dense_batch64"]}},
            "model.int8.onnx": {
                "accuracy": rep["accuracy"],
                "latency_ms": {1: lat["compressed"], 64: lat["compressed_batch64"]},
            },
        },
        "model.onnx",
    )
    assert again == deploy


def test_the_int8_default_keeps_accuracy_within_the_gate(qat_report):
    """The int8 export onnxruntime runs by default is within report.GAP_WARNING of the fp32 graph
    and of the PyTorch model it was exported from (the QAT codes, exactly: check_codes)."""
    rep = qat_report
    assert rep["accuracy_source"].startswith("model.int8.onnx")
    assert rep["quantization"]["fp32_onnx_accuracy"] - rep["accuracy"] <= report.GAP_WARNING
    assert rep["float_accuracy"] - rep["accuracy"] <= report.GAP_WARNING
    assert not rep["warnings"]
