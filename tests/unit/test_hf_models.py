"""HuggingFace models (workers/models/hf.py): built offline from a config dict, GPT-2's Conv1D
pruned and quantized along its output axis, tied embeddings counted and stored once, and the
exported artifacts read back independently of the code that wrote them."""

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from service import catalog
from service.artifacts import JobArtifacts, LocalArtifactStore
from service.errors import SpecError
from service.spec import PruningSpec, QuantizationSpec, parse_spec
from tests.artifact_reading import onnx_weight_zeros, packed_zeros
from workers import export, onnx_export, pack
from workers.compression import quantization as quant
from workers.compression.pruning import Pruner, channel_masks, prunable_weights
from workers.data import load_dataset
from workers.data.info import DataInfo
from workers.models import build_model
from workers.session import LocalSession
from workers.train_loop import train

GPT2 = {
    "model_type": "gpt2",
    "n_layer": 2,
    "n_head": 2,
    "n_embd": 32,
    "n_positions": 32,
    "resid_pdrop": 0.0,
    "embd_pdrop": 0.0,
    "attn_pdrop": 0.0,
}
BERT = {
    "model_type": "bert",
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "hidden_size": 32,
    "intermediate_size": 64,
    "max_position_embeddings": 32,
    "hidden_dropout_prob": 0.0,
    "attention_probs_dropout_prob": 0.0,
}
TOKENS = DataInfo(kind="tokens", input_shape=(16,), input_dtype="int64", num_classes=64)
CONV1D = (
    "transformer.h.0.attn.c_attn",
    "transformer.h.0.attn.c_proj",
    "transformer.h.0.mlp.c_fc",
    "transformer.h.0.mlp.c_proj",
)


def _gpt2(seed=0):
    return build_model("hf_causal_lm", {"config": GPT2}, TOKENS, seed=seed)


# --- building --------------------------------------------------------------------------------------


def test_config_keys_are_real_config_attributes():
    """The catalog's allowlist (checked at submission without transformers) names real fields."""
    from transformers import AutoConfig

    for mt, keys in catalog.HF_CONFIG_KEYS.items():
        fields = AutoConfig.for_model(mt).to_dict()
        assert not keys - set(fields) - {"model_type"}, mt


@pytest.mark.parametrize(
    "config,message",
    [
        ({**GPT2, "n_layr": 3}, "n_layr: unknown key for model_type gpt2; allowed:"),
        ({"n_layer": 2}, "model_type: required; allowed: gpt2, llama"),
        ({**GPT2, "model_type": "bert"}, "model_type: 'bert' is not supported here; allowed: gpt2, llama"),
        ({**GPT2, "n_head": 3}, "n_embd: 32 is not divisible by n_head (3)"),
        ({**GPT2, "n_layer": -1}, "n_layer: -1 is out of range"),
    ],
)
def test_bad_config_is_refused_at_submission_naming_the_key(config, message):
    spec = {
        "name": "x",
        "model": {"name": "hf_causal_lm", "args": {"config": config}},
        "data": {"name": "text"},
    }
    with pytest.raises(SpecError) as e:
        parse_spec(spec)
    assert f"model.args.config: {message}" in str(e.value)


def test_pipeline_is_refused_at_submission():
    spec = {
        "name": "x",
        "model": {"name": "hf_causal_lm", "args": {"config": GPT2}},
        "data": {"name": "text"},
        "parallel": {"strategy": "pipeline", "workers": 2},
        "train": {"batch_size": 32},
    }
    with pytest.raises(SpecError, match="parallel.strategy: model 'hf_causal_lm' cannot run as a pipeline"):
        parse_spec(spec)


@pytest.mark.parametrize(
    "config,message",
    [
        ({**GPT2, "vocab_size": 10}, "vocab_size: 10 is smaller than the data's vocabulary (64"),
        ({**GPT2, "eos_token_id": 64}, "eos_token_id: 64 is outside the vocabulary 0..63"),
        ({**GPT2, "n_positions": 8}, "n_positions: 8 is shorter than the data's sequences (16"),
    ],
)
def test_config_inconsistent_with_the_data_is_a_config_error(config, message):
    from service.errors import ConfigError

    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
        build_model("hf_causal_lm", {"config": config}, TOKENS)


def test_gpt2_and_llama_give_logits_and_keep_hf_key_names():
    x = torch.randint(0, 64, (3, 16))
    m = _gpt2().eval()
    assert m(x).shape == (3, 16, 64)
    keys = set(m.state_dict())
    assert "transformer.h.0.attn.c_attn.weight" in keys
    # Tied: stored once, as HuggingFace's own files do; loading fills the alias back in.
    assert "lm_head.weight" not in keys and m.lm_head.weight is m.transformer.wte.weight
    other = _gpt2(seed=1).eval()
    other.load_state_dict(m.state_dict())
    assert other.lm_head.weight is other.transformer.wte.weight and torch.equal(other(x), m(x))
    llama = {"model_type": "llama", "num_hidden_layers": 1, "num_attention_heads": 2, "hidden_size": 32}
    llama.update(intermediate_size=64, max_position_embeddings=32)
    lm = build_model("hf_causal_lm", {"config": llama}, TOKENS, seed=0)
    assert lm(x).shape == (3, 16, 64)


# --- Conv1D: pruned and quantized along its output axis -------------------------------------------


def test_conv1d_weights_are_prunable_with_their_output_axis_and_tied_listed_once():
    w = prunable_weights(_gpt2())
    assert set(CONV1D) <= set(w)
    assert all(w.out_axis[n] == 1 for n in CONV1D)
    assert w.out_axis["lm_head"] == 0
    # wte is lm_head's weight: one entry, so it is pruned once and counted once.
    assert sum(p is w["lm_head"] for p in w.values()) == 1
    assert len(w) == 2 * 4 + 1


def test_conv1d_channel_pruning_removes_whole_output_columns_value_by_value():
    name = "transformer.h.0.mlp.c_fc"  # weight (in 32, out 128)
    weights = prunable_weights(_gpt2())
    wt = {name: weights[name]}
    masks = channel_masks(wt, 0.25, "layer", axes={name: 1})
    m, w = masks[name], weights[name].detach()
    assert m.shape == (32, 128)
    kept = m.all(dim=0)
    assert torch.equal(m, kept.expand_as(m))  # every column all kept or all pruned
    assert int((~kept).sum()) == 32  # 25% of the 128 output features
    rms = w.pow(2).mean(dim=0).sqrt()  # an output feature's RMS over its 32 inputs
    assert float(rms[~kept].max()) <= float(rms[kept].min())


def test_conv1d_fake_quant_scales_are_per_output_column():
    model = _gpt2()
    cfg = QuantizationSpec(mode="qat")
    x = torch.randint(0, 64, (2, 16))
    ref = model.eval()(x)
    assert quant.prepare(model, cfg) == 9
    layer = model.transformer.h[0].mlp.c_fc
    w = layer.weight.detach()
    layer.weight_quant.enabled.fill_(True)
    fq = layer.weight_quant(layer.weight).detach()
    scale = w.abs().amax(dim=0) / 127  # per column (output feature) of the (in, out) weight
    codes = fq / quant._ceil_scale(scale)
    assert torch.equal(codes, codes.round()) and codes.abs().max() <= 127
    q = quant.quantize_weight(w, 8, axis=1)
    assert q.scale.shape == (128,) and torch.equal(quant.dequantize(q), fq)
    with torch.no_grad():  # disabled: the swapped layer computes exactly what Conv1D did
        layer.weight_quant.enabled.fill_(False)
        assert torch.allclose(model(x), ref, atol=1e-6)


def test_a_wider_gpt2s_tied_lm_head_is_an_initializer_of_its_matmul():
    """Above the exporter's constant-folding limit (8192 elements) the tied lm_head reached its
    MatMul through a Transpose node, and export failed: 'no node for layer(s) [lm_head]'."""
    info = DataInfo(kind="tokens", input_shape=(32,), input_dtype="int64", num_classes=256)
    model = build_model("hf_causal_lm", {"config": {**GPT2, "n_embd": 64}}, info).eval()
    x = torch.randint(0, 256, (2, 32))
    m = onnx_export.to_onnx(model, x)
    weights = prunable_weights(model)
    nodes = onnx_export.layer_nodes(m, weights)
    assert set(nodes) == set(weights) and "lm_head" in nodes
    inits = {i.name for i in m.graph.initializer}
    assert not [n for n in m.graph.node if n.op_type == "Transpose" and n.input[0] in inits]
    got = onnx_export.session(onnx_export.to_bytes(m)).run(None, {"input": x.numpy()})[0]
    np.testing.assert_allclose(got, model(x).detach().numpy(), atol=1e-5)


# --- jobs: train, export, read the artifacts back -------------------------------------------------


def _job(store, job_id, spec):
    spec = parse_spec(spec)
    data = load_dataset(spec.data)
    summary = train(spec, data, LocalSession(store, job_id))
    rep = export.export(spec, data, store, job_id, summary["step"], {"steps": summary["step"]}, 3)
    return rep, data


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return LocalArtifactStore(tmp_path_factory.mktemp("hf"))


@pytest.fixture(scope="module")
def gpt2_gmp50(store):
    spec = {
        "name": "gpt2",
        "model": {"name": "hf_causal_lm", "args": {"config": GPT2}},
        "data": {"name": "text", "args": {"block_size": 32, "max_chars": 20000}},
        "train": {"epochs": 1, "max_steps": 40, "batch_size": 16, "optimizer": "adamw", "lr": 0.003},
        "compression": {
            "pruning": {
                "final_sparsity": 0.5,
                "start_step": 5,
                "end_step": 30,
                "frequency": 5,
                "scope": "layer",
            },
            "quantization": {"mode": "qat", "start_step": 30},
        },
        "checkpoint": {"every_steps": 1000},
    }
    return _job(store, "gpt2", spec)


def test_gpt2_gmp50_every_conv1d_reaches_its_sparsity_in_the_exported_weights(gpt2_gmp50, store):
    rep, _ = gpt2_gmp50
    arts = JobArtifacts(store, "gpt2")
    packed = packed_zeros(arts.get_bytes("model.packed"))
    onnx_zeros = onnx_weight_zeros(arts.get_bytes("model.onnx"))
    conv1d = [n for n in packed if ".h." in n and n.endswith(".weight")]
    conv1d = [n for n in conv1d if "ln_" not in n]
    assert len(conv1d) == 8
    for name in conv1d:
        zeros, size = packed[name]
        assert zeros / size >= 0.5, name
        assert rep["sparsity"]["layers"][name.removesuffix(".weight")] >= 0.5
    # the fp32 graph holds the same zero counts (initializers found by size, independently)
    assert sum(z for z, _ in onnx_zeros.values()) >= sum(packed[n][0] for n in conv1d)


def test_gpt2_tied_embedding_is_counted_and_stored_once(gpt2_gmp50, store):
    rep, data = gpt2_gmp50
    state, _ = pack.unpack(JobArtifacts(store, "gpt2").get_bytes("model.packed"))
    assert "lm_head.weight" not in state and "transformer.wte.weight" in state
    model = build_model("hf_causal_lm", {"config": GPT2}, data.info)
    assert rep["params"]["total"] == sum(p.numel() for p in model.parameters()) == 34_688  # wte once
    assert rep["params"]["total"] == sum(t.numel() for t in state.values() if t.is_floating_point())
    assert "lm_head" in rep["sparsity"]["layers"] and "transformer.wte" not in rep["sparsity"]["layers"]


def test_gpt2_perplexity_is_the_int8_onnx_models(gpt2_gmp50, store):
    rep, data = gpt2_gmp50
    arts = JobArtifacts(store, "gpt2")
    assert rep["artifacts"]["onnx_quantized"] == "model.int8.onnx"
    sess = onnx_export.session(arts.get_bytes("model.int8.onnx"))
    x, y = data.x_val.numpy(), data.y_val.numpy()
    logits = np.concatenate([sess.run(None, {"input": x[i : i + 64]})[0] for i in range(0, len(x), 64)])
    lp = torch.log_softmax(torch.from_numpy(logits).float(), -1)
    nll = -lp.gather(-1, torch.from_numpy(y)[..., None]).mean()
    assert rep["perplexity"] == pytest.approx(float(nll.exp()), rel=1e-5)
    assert rep["input"]["vocab_size"] == 256 and rep["input"]["max_positions"] == 32
    assert rep["input"]["dtype"] == "int64" and rep["input"]["shape"] == ["batch", "seq"]
    # dynamic batch and sequence: any shorter length runs
    assert sess.run(None, {"input": x[:3, :7]})[0].shape == (3, 7, 256)
    g = onnx.load_from_string(arts.get_bytes("model.int8.onnx"))
    assert sum(n.op_type == "DequantizeLinear" for n in g.graph.node) >= 9


@pytest.fixture(scope="module")
def bert_int8(store):
    spec = {
        "name": "bert",
        "model": {"name": "hf_seq_cls", "args": {"config": BERT}},
        "data": {
            "name": "synthetic",
            "args": {"n_samples": 400, "n_features": 16, "n_classes": 2, "class_sep": 2.0, "vocab_size": 40},
        },
        "train": {"epochs": 2, "batch_size": 32, "optimizer": "adamw", "lr": 0.003},
        "compression": {"quantization": {"mode": "qat", "start_step": 10}},
        "checkpoint": {"every_steps": 1000},
    }
    return _job(store, "bert", spec)


def test_bert_exports_a_verified_int8_graph(bert_int8, store):
    rep, data = bert_int8
    arts = JobArtifacts(store, "bert")
    sess = onnx_export.session(arts.get_bytes("model.int8.onnx"))
    pred = sess.run(None, {"input": data.x_val.numpy()})[0].argmax(-1)
    assert rep["accuracy"] == pytest.approx(float((pred == data.y_val.numpy()).mean()))
    assert rep["quantization"]["layers"] == len(
        prunable_weights(build_model("hf_seq_cls", {"config": BERT}, data.info))
    )
    assert rep["input"]["vocab_size"] == 40 and rep["input"]["dtype"] == "int64"


def test_pruner_masks_a_conv1d_column_wise_under_channel_structure():
    model = _gpt2()
    cfg = PruningSpec(
        schedule="oneshot", final_sparsity=0.5, start_step=0, structure="channel", scope="layer"
    )
    pr = Pruner(cfg, prunable_weights(model, skip=("lm_head",)))
    pr.update(0)
    for name in CONV1D:
        m = pr.masks[name]
        assert torch.equal(m, m.all(dim=0).expand_as(m)), name
        assert float((~m).float().mean()) == pytest.approx(0.5, abs=0.02)


def test_weights_saved_by_huggingface_load_strictly_with_their_key_names(tmp_path):
    """model.init reads HuggingFace's own files (save_pretrained: tied lm_head left out, a
    sharded folder with model.safetensors.index.json) into the registry model, strictly."""
    from service.errors import ConfigError
    from workers import init_weights

    trained = _gpt2(seed=3).eval()
    trained.save_pretrained(tmp_path, max_shard_size="50KB")  # several shards and the index
    assert (tmp_path / "model.safetensors.index.json").exists()
    state = init_weights.read_state(str(tmp_path) + "/", lambda k: Path(k).read_bytes())
    model = init_weights.apply(_gpt2(seed=0).eval(), state)
    x = torch.randint(0, 64, (2, 16))
    assert torch.equal(model(x), trained(x))
    assert model.lm_head.weight is model.transformer.wte.weight
    state.pop("transformer.h.1.mlp.c_fc.weight")
    with pytest.raises(ConfigError, match=r"missing keys transformer\.h\.1\.mlp\.c_fc\.weight"):
        init_weights.apply(_gpt2(), state)
