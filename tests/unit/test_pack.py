"""The packed artifact rebuilds the model exactly and is smaller than the dense weights."""

import pytest
import torch

from service.errors import CheckpointError
from service.spec import PruningSpec
from workers import pack
from workers.compression.pruning import Pruner, prunable_weights
from workers.data.info import DataInfo
from workers.models import build_model

INFO = DataInfo(
    kind="image",
    input_shape=(64,),
    input_dtype="float32",
    num_classes=10,
    image_shape=(1, 8, 8),
    mean=4.9,
    std=6.0,
)


def _pruned(name, sparsity):
    model = (
        build_model(name, {}, INFO, seed=0)
        if name == "lenet5"
        else build_model(name, {"hidden": [300, 100], "dropout": 0.0}, INFO, seed=0)
    )
    p = Pruner(
        PruningSpec(schedule="oneshot", final_sparsity=sparsity, start_step=0), prunable_weights(model)
    )
    p.update(0)
    return model


@pytest.mark.parametrize("name", ["lenet5", "mlp"])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.95])
def test_roundtrip_is_exact(name, sparsity):
    model = _pruned(name, sparsity)
    state = model.state_dict()
    meta = {
        "model": {"name": name, "args": {} if name == "lenet5" else {"hidden": [300, 100], "dropout": 0.0}},
        "data_info": INFO.to_dict(),
    }
    data = pack.pack(state, meta)
    rebuilt = pack.rebuild(data)
    for k, v in rebuilt.state_dict().items():
        assert torch.equal(v, state[k]), k
    x = torch.rand(5, 64) * 16
    assert torch.equal(rebuilt(x), model.eval()(x))


def test_sparse_is_much_smaller():
    dense = _pruned("mlp", 0.0)
    sparse = _pruned("mlp", 0.9)
    meta = {
        "model": {"name": "mlp", "args": {"hidden": [300, 100], "dropout": 0.0}},
        "data_info": INFO.to_dict(),
    }
    d = len(pack.pack(dense.state_dict(), meta))
    s = len(pack.pack(sparse.state_dict(), meta))
    assert s < d / 4


def test_int8_and_codebook_encodings_roundtrip():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 32, generator=g)
    w[w.abs() < 1.0] = 0
    scale = w.abs().amax(1) / 127
    codes = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    state, _ = pack.unpack(
        pack.pack(
            {"w": w, "v": w.clone()},
            {},
            quantized={"w": pack.QuantizedWeight(codes, scale)},
            codebooks={"v": 16},
        )
    )
    assert torch.equal(state["w"], codes.float() * scale[:, None])
    # codebook: nonzeros snap to at most 16 values, zeros stay zero
    assert torch.equal(state["v"] == 0, w == 0)
    assert len(torch.unique(state["v"][state["v"] != 0])) <= 16
    assert (state["v"] - w).abs().max() < 0.5


def test_corrupt_files_are_rejected():
    with pytest.raises(CheckpointError, match="bad magic"):
        pack.unpack(b"not a model")
    good = pack.pack({"w": torch.ones(3)}, {})
    with pytest.raises(CheckpointError, match="corrupt"):
        pack.unpack(good[:20] + b"\x00" * (len(good) - 20))


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("codebook_bits", [None, 2])
def test_quantized_model_roundtrips_to_identical_weights(bits, codebook_bits):
    from workers.compression import quantization as qz
    from workers.export import deployed_state

    model = _pruned("lenet5", 0.9)
    q = {
        n: (
            qz.share_codes(qz.quantize_weight(w, bits), codebook_bits)
            if codebook_bits
            else qz.quantize_weight(w, bits)
        )
        for n, w in prunable_weights(model).items()
    }
    state = deployed_state(model.state_dict(), q)
    meta = {"model": {"name": "lenet5", "args": {}}, "data_info": INFO.to_dict()}
    data = pack.pack(state, meta, quantized={f"{n}.weight": qw for n, qw in q.items()})
    rebuilt = pack.rebuild(data).state_dict()
    for k, v in state.items():
        assert torch.equal(rebuilt[k], v), k
        assert torch.equal(torch.signbit(rebuilt[k].float()), torch.signbit(v.float())), k
    # int8 codes + float16 scales + float16 biases: well under the fp32 sparse encoding
    assert len(data) < len(pack.pack(model.state_dict(), meta)) / 2


def test_float16_storage_only_when_exact():
    import json
    import struct

    import zstandard

    exact = torch.tensor([0.5, -0.0, 1024.0, 6.1035e-05]).half().float()
    inexact = torch.tensor([0.1, 1e-9, 70000.0])
    data = pack.pack({"a": exact, "b": inexact}, {})
    state, _ = pack.unpack(data)
    assert torch.equal(state["a"], exact) and torch.equal(state["b"], inexact)
    assert state["a"].dtype == state["b"].dtype == torch.float32
    assert torch.equal(torch.signbit(state["a"]), torch.signbit(exact))  # -0.0 stays -0.0
    payload = zstandard.ZstdDecompressor().decompress(data[len(pack.MAGIC) + 1 :])
    (n,) = struct.unpack_from("<I", payload)
    stored = {e["name"]: e["store"] for e in json.loads(payload[4 : 4 + n])["tensors"]}
    assert stored == {"a": "float16", "b": "float32"}
