"""ONNX export of every registry model: fp32, int8 QDQ and weight-only int4 graphs that
onnxruntime loads, take raw features with any batch size, and hold exactly our integer weights."""

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from service.errors import ExportError
from workers import onnx_export
from workers.compression import quantization as qz
from workers.compression.pruning import prunable_weights
from workers.data.info import DataInfo
from workers.models import build_model

IMAGE = DataInfo("image", (64,), "float32", 10, (1, 8, 8), mean=4.9, std=6.0)
TOKENS = DataInfo("tokens", (16,), "int64", 256)
MODELS = {
    "mlp": ({"hidden": [32, 16]}, IMAGE),
    "lenet5": ({}, IMAGE),
    "convnet": ({"channels": [4, 8], "hidden": 16}, IMAGE),
    "gpt": ({"n_layer": 1, "n_head": 2, "n_embd": 16}, TOKENS),
}


def _inputs(info: DataInfo, n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if info.kind == "tokens":
        return torch.randint(0, info.num_classes, (n, *info.input_shape), generator=g)
    return torch.randint(0, 17, (n, 64), generator=g).float()  # digits' raw pixel values 0-16


def _deployed(name: str, bits: int):
    """A registry model whose quantized layers hold code * scale, and those codes."""
    args, info = MODELS[name]
    model = build_model(name, args, info, seed=0).eval()
    return model, _on_grid(model, bits), info


def _on_grid(model, bits: int) -> dict:
    """Put `model`'s quantized layers on their integer grid in place; return the codes."""
    q = {n: qz.quantize_weight(w, bits) for n, w in prunable_weights(model).items()}
    with torch.no_grad():
        for n, w in prunable_weights(model).items():
            w.copy_(qz.dequantize(q[n]))
    return q


@pytest.fixture(scope="module", params=list(MODELS))
def exported(request):
    model, q, info = _deployed(request.param, 8)
    return request.param, model, q, info, onnx_export.to_onnx(model, _inputs(info, 4))


def test_fp32_graph_is_self_contained_with_a_dynamic_batch(exported):
    name, model, _, info, graph = exported
    inp = graph.graph.input[0]
    assert inp.name == onnx_export.INPUT
    assert inp.type.tensor_type.shape.dim[0].dim_param  # symbolic batch axis
    expected = onnx.TensorProto.INT64 if info.kind == "tokens" else onnx.TensorProto.FLOAT
    assert inp.type.tensor_type.elem_type == expected
    sess = onnx_export.session(graph)
    for n in (1, 3, 70):
        x = _inputs(info, n, seed=n)
        with torch.no_grad():
            ref = model(x).numpy()
        got = onnx_export.predict(sess, x.numpy())
        assert got.shape == ref.shape
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)


def test_int8_graph_holds_our_codes_and_tracks_the_model(exported):
    name, model, q, info, graph = exported
    calib = [_inputs(info, 32, seed=s).numpy() for s in range(4)]
    weights = prunable_weights(model)
    int8 = onnx_export.quantize_int8(graph, weights, q, {}, calib)  # check_codes runs inside
    ops = {n.op_type for n in int8.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    nodes = onnx_export.layer_nodes(graph, weights)
    assert len(nodes) == len(q)
    x = _inputs(info, 64, seed=9)
    got = onnx_export.predict(onnx_export.session(int8), x.numpy())
    with torch.no_grad():
        ref = model(x).numpy()
    agree = (got.argmax(-1) == ref.argmax(-1)).mean()
    assert agree > 0.8, agree
    # a graph whose codes differ from ours is refused
    tampered = onnx.ModelProto()
    tampered.CopyFrom(int8)
    for init in tampered.graph.initializer:
        if init.name.endswith("_quantized"):
            arr = numpy_helper.to_array(init).copy()
            arr.flat[np.flatnonzero(arr)[0]] += 1
            init.CopyFrom(numpy_helper.from_array(arr, init.name))
            break
    with pytest.raises(ExportError, match="differ from the packed ones"):
        onnx_export.check_codes(tampered, nodes, q)


def _worst_case(name: str):
    """A model whose quantized layers all hold positive codes of 114 to 127, and inputs at the top
    of their range: a pair of u8 * s8 products reaches 2 * 255 * 127, far past int16, where
    onnxruntime's U8S8 kernels on CPUs without VNNI saturate. (Random, not constant, values:
    layers are found in the graph by their weights' values.)"""
    args, info = MODELS[name]
    model = build_model(name, args, info, seed=0).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for w in prunable_weights(model).values():
            w.copy_(0.01 * (0.9 + 0.1 * torch.rand(w.shape, generator=g)))
    q = _on_grid(model, 8)
    x = _inputs(info, 32, seed=3)
    if info.kind != "tokens":
        x[:16] = 16.0  # digits' largest pixel value everywhere
    return model, q, info, x


def _cpu_has_vnni() -> bool:
    """Whether this x86 CPU multiplies u8 x s8 into int32 (AVX-VNNI, AVX-512 VNNI, AMX), where
    onnxruntime's U8S8 kernels are exact."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return False
    return bool(flags & {"avx_vnni", "avx512_vnni", "amx_int8"})


# quantization.kernels -> how the weight codes are stored: (dtype, zero point)
STORAGE = {"portable": (np.uint8, onnx_export.WEIGHT_ZERO_POINT), "vnni": (np.int8, 0)}


@pytest.mark.parametrize(
    ("name", "kernels"), [*((n, "portable") for n in MODELS), ("mlp", "vnni"), ("lenet5", "vnni")]
)
def test_int8_graph_runs_exactly_its_qdq_arithmetic_on_this_cpu(name, kernels):
    """The fused int8 kernels onnxruntime picks for this CPU compute what the QDQ graph says
    (DequantizeLinear then float ops: onnxruntime with graph optimisation off), even when every
    product is at the top of the grid. U8S8 weights failed this on AVX2 (and cost the digits QAT
    mlp of test_export 1.1 points); on a CPU with VNNI the arithmetic test cannot fail, so the
    storage is checked as well: `portable` stores the codes as uint8 with zero point 128
    (onnxruntime's exact U8U8 kernels); `vnni` as int8 with zero point 0 (U8S8), whose
    arithmetic is checked only where the CPU has VNNI (elsewhere it may saturate: why the
    default is `portable`)."""
    import onnxruntime as ort

    model, q, info, x = _worst_case(name)
    weights = prunable_weights(model)
    graph = onnx_export.to_onnx(model, x[:4])
    int8 = onnx_export.quantize_int8(graph, weights, q, {}, [x.numpy()], kernels=kernels)
    inits = {i.name: numpy_helper.to_array(i) for i in int8.graph.initializer}
    producers = {o: n for n in int8.graph.node for o in n.output}
    dtype, zero_point = STORAGE[kernels]
    for ln in onnx_export.layer_nodes(graph, weights).values():
        dq = producers[next(n for n in int8.graph.node if n.name == ln.node).input[1]]
        assert inits[dq.input[0]].dtype == dtype, ln.node
        assert (inits[dq.input[2]] == zero_point).all(), ln.node
    if kernels == "vnni" and not _cpu_has_vnni():
        pytest.skip("no VNNI on this CPU: onnxruntime's U8S8 kernels may saturate here")
    fused = onnx_export.predict(onnx_export.session(int8), x.numpy())
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    plain = ort.InferenceSession(int8.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    reference = onnx_export.predict(plain, x.numpy())
    np.testing.assert_allclose(fused, reference, rtol=1e-4, atol=1e-4 * np.abs(reference).max())


@pytest.mark.parametrize("name", ["mlp", "lenet5", "gpt"])
def test_weight_only_int4_graph_computes_with_the_dequantized_weights(name):
    model, q, info = _deployed(name, 4)
    graph = onnx_export.to_onnx(model, _inputs(info, 4))
    int4 = onnx_export.quantize_weights_only(graph, prunable_weights(model), q)
    int4_inits = [i for i in int4.graph.initializer if i.data_type == onnx.TensorProto.INT4]
    # the codes, two per byte; scales are float, zero points implicit
    assert sorted(len(i.raw_data) for i in int4_inits) == sorted(
        (qw.codes.numel() + 1) // 2 for qw in q.values()
    )
    float_weights = {n.name for n in graph.graph.initializer} - {n.name for n in int4.graph.initializer}
    assert len(float_weights) == len(q)  # every float weight was replaced by its codes
    x = _inputs(info, 5)
    with torch.no_grad():
        ref = model(x).numpy()
    got = onnx_export.predict(onnx_export.session(int4), x.numpy())
    # onnxruntime fuses DequantizeLinear(int4) + MatMul into MatMulNBits, whose default accuracy
    # level computes with int8-quantized activations: close, not bitwise (Gemm/Conv stay float).
    np.testing.assert_allclose(got, ref, atol=5e-3 if name == "gpt" else 1e-4)


def test_activation_overrides_follow_range_keeping_ops_upstream():
    model, q, info = _deployed("lenet5", 8)
    graph = onnx_export.to_onnx(model, _inputs(info, 4))
    nodes = onnx_export.layer_nodes(graph, prunable_weights(model))
    ranges = {"features.conv2": (0.05, 0), "classifier.fc1": (0.1, 0)}
    ov = onnx_export.activation_overrides(graph, nodes, ranges)
    producer = {o: n for n in graph.graph.node for o in n.output}

    def upstream(layer):
        """(producer op, scale) of each overridden tensor from the layer's input upwards."""
        out, t = [], nodes[layer].input
        while t in ov:
            out.append((producer[t].op_type, float(ov[t][0]["scale"])))
            if producer[t].op_type == "Conv":  # the producing layer: the chain ends there
                break
            t = producer[t].input[0]
        return out

    # conv2 reads MaxPool(Relu(conv1)): conv1's output is quantized on conv2's input grid
    assert upstream("features.conv2") == [("MaxPool", pytest.approx(0.05))] + [
        ("Relu", pytest.approx(0.05)),
        ("Conv", pytest.approx(0.05)),
    ]
    # fc1 reads Reshape(MaxPool(Relu(conv2)))
    assert [op for op, _ in upstream("classifier.fc1")] == ["Reshape", "MaxPool", "Relu", "Conv"]
    assert all(s == pytest.approx(0.1) for _, s in upstream("classifier.fc1"))
    # a grid that does not clip at 0 must not swallow the Relu
    ov = onnx_export.activation_overrides(graph, nodes, {"features.conv2": (0.05, 10)})
    assert len(ov) == 2


def test_an_ast_thread_race_in_the_exporter_is_retried_and_other_errors_are_not(monkeypatch):
    """CPython 3.11's AST converter shares its recursion counter between threads, so a parse in
    another thread can fail the exporter's own (python/cpython#106905): that error is retried."""
    calls = []
    raced = SystemError("AST constructor recursion depth mismatch (before=159, after=65)")

    def flaky(model, example):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("export failed") from raced
        return "graph"

    monkeypatch.setattr(onnx_export, "_to_onnx", flaky)
    assert onnx_export.to_onnx(None, None) == "graph" and len(calls) == 2

    def broken(model, example):
        calls.append(1)
        raise SystemError("something else")

    calls.clear()
    monkeypatch.setattr(onnx_export, "_to_onnx", broken)
    with pytest.raises(SystemError, match="something else"):
        onnx_export.to_onnx(None, None)
    assert len(calls) == 1

    def always(model, example):
        calls.append(1)
        raise raced

    calls.clear()
    monkeypatch.setattr(onnx_export, "_to_onnx", always)
    with pytest.raises(SystemError, match="recursion depth"):
        onnx_export.to_onnx(None, None)
    assert len(calls) == onnx_export._AST_RACE_TRIES
