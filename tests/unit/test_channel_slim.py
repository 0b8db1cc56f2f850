"""`structure: channel` ships a physically smaller model (issue 15 point 2): for each built-in
model the masked model and its slim form agree (removed channels with non-zero biases, BatchNorm
shifts and padded convs included), a registry model rebuilt from the slim weights is the slim
model, its ONNX export runs and matches; and one channel + QAT job ends with a smaller
model.onnx and an int8 graph of the slim model that runs in onnxruntime and agrees with it."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from service.artifacts import JobArtifacts, LocalArtifactStore
from service.spec import PruningSpec, parse_spec
from workers import export, onnx_export, train_loop
from workers.compression import channel_slim as cs
from workers.compression.pruning import Pruner, axes_of, channel_followers, channel_masks, prunable_weights
from workers.data import load_dataset
from workers.data.info import DataInfo
from workers.models import build_model, output_layer
from workers.models.folding import fold_batchnorm
from workers.parallel import Dist
from workers.session import LocalSession
from workers.train_loop import train

DIGITS = DataInfo("image", (64,), "float32", 10, (1, 8, 8), mean=4.9, std=6.0)
TOKENS = DataInfo("tokens", (16,), "int64", 50, None)
MODELS = {
    "mlp": ({"hidden": [48, 32]}, DIGITS),
    "lenet5": ({}, DIGITS),
    "convnet": ({"channels": [8, 16], "hidden": 32}, DIGITS),
    "resnet": ({"depth": 8, "width": 8}, DIGITS),
    "gpt": ({"n_layer": 2, "n_head": 4, "n_embd": 32}, TOKENS),
    # HuggingFace GPT-2: Conv1D layers (weight (in, out)), heads split from one c_attn, tied lm_head
    "hf_gpt2": (
        {
            "config": {
                "model_type": "gpt2",
                "n_layer": 2,
                "n_head": 4,
                "n_embd": 32,
                "n_positions": 16,
                "resid_pdrop": 0.0,
                "embd_pdrop": 0.0,
                "attn_pdrop": 0.0,
            }
        },
        TOKENS,
    ),
}
REGISTRY = {"hf_gpt2": "hf_causal_lm"}  # registry name of a case, where it differs from its key
# the fused qkv and MLP expansion of each transformer: what heads and hidden units leave
TRANSFORMER = {
    "gpt": ("attn.qkv", "fc", [f"blocks.{i}" for i in (0, 1)]),
    "hf_gpt2": ("attn.c_attn", "mlp.c_fc", [f"transformer.h.{i}" for i in (0, 1)]),
}


def _build(name: str, seed: int | None = None) -> nn.Module:
    args, info = MODELS[name]
    return build_model(REGISTRY.get(name, name), args, info, seed=seed)


def _masked(name: str) -> tuple[nn.Module, dict, torch.Tensor]:
    """A registry model with half of its prunable channels zeroed as training leaves them, its
    biases and BatchNorm statistics random (so removed channels output non-zero constants)."""
    info = MODELS[name][1]
    model = _build(name, seed=0).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(getattr(m, "bias", None), nn.Parameter):
                m.bias.copy_(torch.rand(m.bias.shape, generator=g) - 0.3)
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.rand(m.num_features, generator=g) - 0.3)
    skip, units = cs.channel_plan(model)
    weights = prunable_weights(model, skip=(*skip, output_layer(model)))
    masks = channel_masks(weights, 0.5, "layer", axes=axes_of(weights), units=units)
    with torch.no_grad():
        for n, mask in masks.items():
            weights[n].mul_(mask)
    if info.kind == "tokens":
        x = torch.randint(0, info.num_classes, (6, *info.input_shape), generator=g)
    else:
        x = torch.rand(6, *info.input_shape, generator=g) * 16
    return model, units, x


@pytest.mark.parametrize("name", list(MODELS))
def test_slim_model_equals_masked_model_and_exports(name):
    model, units, x = _masked(name)
    assert cs.slimmable(model)  # finalize ships it slim, not with dense shapes
    slim, info = cs.slim(model, x[:2], skip=(output_layer(model),))
    with torch.no_grad():
        want, got = model(x), slim(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert info["params_after"] < 0.75 * info["params_before"], info
    assert info["params_after"] == sum(p.numel() for p in slim.parameters())
    shrunk = {n: v for n, v in info["layers"].items() if v[1] < v[0]}
    assert shrunk and output_layer(model) not in shrunk
    if name in TRANSFORMER:  # whole heads went (q, k and v of each head together), MLP units
        qkv, fc, blocks = TRANSFORMER[name]
        assert set(shrunk) == {f"{b}.{n}" for b in blocks for n in (qkv, fc)}
        assert {n: v for n, v in shrunk.items() if n.endswith(qkv)} == {
            f"{b}.{qkv}": [96, 48] for b in blocks
        }
        assert set(units) == {f"{b}.{qkv}" for b in blocks}
    if name == "resnet":  # residual streams keep their width; the blocks' inner convs shrink
        assert all(n.endswith("conv1.conv") for n in shrunk)
    if name in ("lenet5", "convnet", "resnet"):  # padded convs saw removed constants
        assert any(isinstance(m, cs.Offset) for m in slim.modules())

    # A registry model rebuilt from the slim weights is the slim model, and the report says so.
    rebuilt = _build(name)
    cs.conform(rebuilt, slim.state_dict())
    rebuilt.load_state_dict(slim.state_dict())
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(x), got)
    part = cs.structure_report(rebuilt)
    assert part["slim"] and part["params_before"] == info["params_before"]
    assert part["params_after"] == info["params_after"] and part["layers"] == shrunk

    sess = onnx_export.session(onnx_export.to_onnx(slim, x))
    out = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    np.testing.assert_allclose(out, want.numpy(), rtol=1e-4, atol=1e-4)


def test_layers_that_cannot_shrink_are_not_channel_pruned():
    resnet, _, _ = _masked("resnet")
    skip, units = cs.channel_plan(resnet)
    # every producer of a residual stream: the stem, each block's last conv, the shortcuts
    assert set(skip) == {
        "stem.conv.conv",
        "layer1.0.conv2.conv",
        "layer2.0.conv2.conv",
        "layer2.0.shortcut.conv",
        "layer3.0.conv2.conv",
        "layer3.0.shortcut.conv",
    }
    assert units == {}
    gpt, _, _ = _masked("gpt")
    skip, units = cs.channel_plan(gpt)
    assert set(skip) == {f"blocks.{i}.{n}" for i in (0, 1) for n in ("attn.proj", "fc_proj")}
    assert units["blocks.0.attn.qkv"].tolist() == [r % 32 // 8 for r in range(96)]


@pytest.mark.parametrize("name", ["convnet", "resnet"])
def test_channel_pruning_zeroes_conv_biases_and_batchnorm_so_slim_needs_no_offset_maps(name):
    """Training under `structure: channel` holds a removed filter's bias (the convnet) or its
    BatchNorm's scale and shift (the resnet) at zero with the filter, through SGD with momentum
    and weight decay: the channel outputs exactly zero, so the slim model needs no `Offset`
    (an extra pass over the activations, docs/compression.md) and still equals the masked one."""
    model = _build(name, seed=0)
    with torch.no_grad():  # biases and shifts away from zero: a kept constant would show
        for m in model.modules():
            if isinstance(getattr(m, "bias", None), nn.Parameter):
                m.bias.add_(0.5)
    skip, units = cs.channel_plan(model)
    weights = prunable_weights(model, skip=(*skip, output_layer(model)))
    followers = channel_followers(model, weights)
    if name == "convnet":
        convs = [f"features.conv{i}" for i in ("1a", "1b", "2a", "2b")]
        assert {n: len(ps) for n, ps in followers.items()} == dict.fromkeys(convs, 1)
    else:  # bias-free convs: the BatchNorm after each pruned conv
        assert followers and all(len(ps) == 2 for ps in followers.values())
        assert all(n.endswith("conv1.conv") for n in followers)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=0.1)
    pruner = Pruner(
        PruningSpec(structure="channel", scope="layer", schedule="oneshot", final_sparsity=0.5, start_step=0),
        weights,
        followers=followers,
    )
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(16, 64, generator=g) * 16, torch.randint(0, 10, (16,), generator=g)
    model.train()
    for step in range(4):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        pruner.mask_grads_()
        opt.step()
        pruner.apply_()
        pruner.maybe_update(step, opt)
    for n, ps in followers.items():
        gone = ~pruner.masks[n].flatten(1).any(dim=1)
        assert gone.any(), n
        for p in ps:
            assert torch.all(p.detach()[gone] == 0), n
            assert torch.all(opt.state[p]["momentum_buffer"][gone] == 0), n
    model.eval()
    slim, _ = cs.slim(model, x[:2], skip=(output_layer(model),))
    assert not any(isinstance(m, cs.Offset) for m in slim.modules())
    with torch.no_grad():
        torch.testing.assert_close(slim(x), model(x), rtol=1e-5, atol=1e-5)


def _initializer_values(graph: bytes) -> int:
    return sum(int(np.prod(t.dims)) for t in onnx.load_from_string(graph).graph.initializer)


def test_channel_qat_job_exports_the_slim_model_as_onnx_and_int8(tmp_path):
    spec = parse_spec(
        {
            "name": "slim",
            "model": {"name": "resnet", "args": {"depth": 8, "width": 8}},
            "data": {"name": "digits"},
            "train": {"epochs": 2, "batch_size": 64, "lr": 0.05},
            "compression": {
                "pruning": {
                    "structure": "channel",
                    "final_sparsity": 0.5,
                    "start_step": 5,
                    "end_step": 25,
                    "frequency": 5,
                },
                "quantization": {"mode": "qat", "start_step": 25},
            },
            "checkpoint": {"every_steps": 1000},
        }
    )
    data = load_dataset(spec.data)
    store = LocalArtifactStore(tmp_path)
    summary = train(spec, data, LocalSession(store, "j"))
    rep = export.export(spec, data, store, "j", summary["step"], {"steps": summary["step"]}, 3)
    arts = JobArtifacts(store, "j")

    part = rep["structure"]
    assert part["slim"] and part["params_after"] < part["params_before"]
    assert rep["params"]["total"] == part["params_after"]
    dense = build_model("resnet", {"depth": 8, "width": 8}, data.info)
    assert part["params_before"] == sum(p.numel() for p in dense.parameters())
    # model.onnx is the slim model: fewer weights and bytes than the dense model's graph
    slim_onnx = arts.get_bytes("model.onnx")
    dense_onnx = onnx_export.to_bytes(onnx_export.to_onnx(fold_batchnorm(dense.eval())[0], data.x_val))
    assert _initializer_values(slim_onnx) < 0.75 * _initializer_values(dense_onnx)
    assert len(slim_onnx) < len(dense_onnx)
    # "dense" in the report is the unpruned architecture, not the slim model.onnx: its fp32
    # bytes, and its own graph timed beside the runtime artifact and the slim fp32 graph.
    assert rep["size"]["dense_bytes"] == 4 * part["params_before"]
    setup, latency = rep["latency_setup"], rep["latency_ms"]
    assert setup["dense"] == export.UNPRUNED_REFERENCE and not setup["same_artifact"]
    assert {"dense", "compressed", "model_onnx", "model_onnx_batch64"} <= set(latency)
    assert rep["deploy"]["artifact"] in ("model.onnx", "model.int8.onnx")

    # The int8 graph is the slim model's: it runs in onnxruntime and agrees with the slim
    # fake-quantized model the export finished from.
    model, _ = export.final_model(spec, data, store, "j", summary["step"])
    assert sum(p.numel() for p in model.parameters()) == part["params_after"]
    x = data.x_val[:128]
    with torch.no_grad():
        want = model(x).argmax(-1).numpy()
    sess = onnx_export.session(arts.get_bytes("model.int8.onnx"))
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0].argmax(-1)
    assert (got == want).mean() >= 0.9
    assert rep["quantization"]["onnx"] == "model.int8.onnx" and rep["accuracy"] > 0.5


# --- FSDP: heads pruned on shards (real process groups, gloo, 2 processes) -----------------------


def _fsdp_heads(rank, world, root: str):
    from tests.unit.test_parallel_strategies import GPT as GPT_RUN
    from tests.unit.test_parallel_strategies import HF_GPT2, _with

    pruning = {"structure": "channel", "schedule": "oneshot", "final_sparsity": 0.5}
    cases = [  # the gpt's qkv rows, whose heads span the dim-0 shards (96 rows, 48 a rank: a
        # head's q and k rows on rank 0, its v rows on rank 1), and GPT-2's c_attn, sharded along
        # its input axis (every rank holds part of every column)
        ({"name": "gpt", "args": {"n_layer": 2, "n_head": 4, "n_embd": 32}}, "global"),
        (HF_GPT2, "layer"),
    ]
    for model, scope in cases:
        spec = {
            "name": "c",
            "model": model,
            "data": GPT_RUN["data"],
            "train": {"max_steps": 2, "batch_size": 16},
            "compression": {"pruning": {**pruning, "scope": scope}},
        }
        data = load_dataset(parse_spec(spec).data)
        run = train_loop.build(parse_spec(_with(spec, "fsdp", world)), data, Dist(rank, world))
        assert run.pruner.units  # heads are pruning units under FSDP too
        event = run.method("pruning").on_step(0, run.optimizer)
        masks = run.strategy.gather_masks(run.pruner.weights, run.pruner.masks)
        state = run.strategy.full_state_dict(run.model)
        if rank != 0:
            continue
        # One process on the gathered weights: the same masks, whole heads.
        one = train_loop.build(parse_spec(spec), data, Dist())
        expected = one.method("pruning").on_step(0, one.optimizer)
        assert event["sparsity"] == pytest.approx(expected["sparsity"], abs=1e-9)
        assert masks.keys() == one.pruner.masks.keys()
        for n, m in one.pruner.masks.items():
            assert torch.equal(masks[n].cpu(), m), n
        # The FSDP job's gathered weights (what its checkpoint holds) slim like any other.
        plain = build_model(spec["model"]["name"], spec["model"].get("args", {}), data.info).eval()
        plain.load_state_dict(state)
        slim, info = cs.slim(plain, data.x_train[:2], skip=(output_layer(plain),))
        heads = [cs.n_heads(b.attn) for b in cs.transformer_blocks(slim)]
        assert sum(heads) < sum(cs.n_heads(b.attn) for b in cs.transformer_blocks(plain))
        assert info["params_after"] < info["params_before"]


def test_fsdp_prunes_whole_heads_on_shards_like_one_process_and_slims(tmp_path):
    from tests.unit.test_parallel_strategies import spawn

    spawn(_fsdp_heads, str(tmp_path), tmp=tmp_path)
