"""The registry's ResNet: shapes, depth validation, BatchNorm folding (float and on the trained
int8 grid), the pipeline refusal, a pruned + QAT digits job whose int8 ONNX export is measured
in onnxruntime, and DDP / FSDP on 2 gloo processes."""

from __future__ import annotations

import onnx
import pytest
import torch
from torch import nn

from service.artifacts import JobArtifacts, LocalArtifactStore
from service.errors import ConfigError, SpecError
from service.spec import parse_spec
from workers import export
from workers.compression import quantization as quant
from workers.compression.pruning import prunable_weights
from workers.data import load_dataset
from workers.data.info import DataInfo
from workers.models import build_model
from workers.models.folding import fold_batchnorm, has_batchnorm
from workers.models.resnet import ResNet
from workers.models.stages import require_stages
from workers.pack import QuantizedWeight
from workers.session import LocalSession
from workers.train_loop import train

DIGITS = DataInfo("image", (64,), "float32", 10, (1, 8, 8), mean=4.9, std=6.0)
RGB = DataInfo("image", (3 * 16 * 16,), "float32", 7, (3, 16, 16))

SPEC = {
    "name": "resnet",
    "model": {"name": "resnet", "args": {"depth": 8, "width": 8}},
    "data": {"name": "digits"},
    "train": {"epochs": 3, "batch_size": 64, "lr": 0.05},
    "compression": {
        "pruning": {"final_sparsity": 0.8, "start_step": 5, "end_step": 40, "frequency": 5},
        "quantization": {"mode": "qat", "start_step": 40},
    },
    "checkpoint": {"every_steps": 1000},
}


def _bn_stats(model: nn.Module, info: DataInfo) -> nn.Module:
    """Random affine BatchNorm parameters (some gammas negative) and running statistics from a
    few training-mode batches, then eval mode: folding must hold for any of them."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.weight.copy_(torch.randn(m.num_features, generator=g))
                m.bias.copy_(torch.randn(m.num_features, generator=g))
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.rand(16, *info.input_shape, generator=g) * 16)
    return model.eval()


@pytest.mark.parametrize("info", [DIGITS, RGB], ids=["digits-1x8x8", "rgb-3x16x16"])
@pytest.mark.parametrize("depth", [8, 14])
def test_logits_shape_and_depth(info, depth):
    model = build_model("resnet", {"depth": depth, "width": 4}, info, seed=0)
    assert model(torch.rand(5, *info.input_shape)).shape == (5, info.num_classes)
    blocks = [m for m in model.modules() if type(m).__name__ == "BasicBlock"]
    assert len(blocks) == 3 * (depth - 2) // 6
    # widths w, 2w, 4w; 1x1 conv + BN shortcuts exactly where the shape changes (stages 2 and 3)
    assert model.fc.in_features == 16
    assert [n for n, _ in model.named_modules() if n.endswith("shortcut.conv")] == [
        "layer2.0.shortcut.conv",
        "layer3.0.shortcut.conv",
    ]
    assert has_batchnorm(model)


@pytest.mark.parametrize("depth", [9, 10, 12])
def test_bad_depth_names_the_field_and_the_allowed_values(depth):
    with pytest.raises(SpecError) as e:
        parse_spec({**SPEC, "model": {"name": "resnet", "args": {"depth": depth}}})
    assert "model.args.depth" in str(e.value) and "8, 14, 20" in str(e.value)
    with pytest.raises(ValueError, match=r"model\.args\.depth: .*8, 14, 20"):
        ResNet(DIGITS, depth=depth)


def test_vector_data_is_refused_for_resnet():
    errs = str(_spec_error({**SPEC, "data": {"name": "synthetic", "args": {"n_features": 60}}}))
    assert "model.name" in errs and "image" in errs


def _spec_error(d):
    with pytest.raises(SpecError) as e:
        parse_spec(d)
    return e.value


def test_pipeline_is_refused_at_submission_naming_the_strategy():
    spec = {**SPEC, "parallel": {"strategy": "pipeline", "workers": 2, "pipeline_microbatches": 4}}
    errs = str(_spec_error(spec))
    assert "parallel.strategy" in errs and "cannot run as a pipeline" in errs


def test_pipeline_is_refused_with_a_config_error_naming_the_model():
    model = build_model("resnet", {"depth": 8, "width": 4}, DIGITS)
    with pytest.raises(ConfigError, match="model 'resnet' cannot run as a pipeline.*use ddp or fsdp"):
        require_stages(model, 2)


def test_folded_batchnorm_computes_the_same_in_eval_mode():
    model = _bn_stats(build_model("resnet", {"depth": 14, "width": 6}, RGB, seed=0), RGB)
    folded, q = fold_batchnorm(model)
    assert q == {} and not has_batchnorm(folded) and has_batchnorm(model)  # the input is untouched
    # the folded layers keep the trained names: export finds them by those
    assert list(prunable_weights(folded)) == list(prunable_weights(model))
    x = torch.rand(32, *RGB.input_shape) * 4
    with torch.no_grad():
        want, got = model(x), folded(x)
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-4), (got - want).abs().max()
    # not a trivial pass: the BatchNorms change the output
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.reset_running_stats()
        assert not torch.allclose(model(x), want, atol=1e-2)


def test_folding_keeps_the_trained_int8_codes_and_zeros():
    model = _bn_stats(build_model("resnet", {"depth": 8, "width": 6}, DIGITS, seed=0), DIGITS)
    with torch.no_grad():  # prune a third of every conv, and zero one BatchNorm's gamma channel
        for w in prunable_weights(model).values():
            w[torch.rand(w.shape) < 0.33] = 0
        model.stem.conv.bn.weight[0] = 0
    qweights = {n: quant.quantize_weight(w, 8) for n, w in prunable_weights(model).items()}
    with torch.no_grad():  # the model as deployed: every layer on its int8 grid
        for n, qw in qweights.items():
            model.get_submodule(n).weight.copy_(quant.dequantize(qw))
    folded, fq = fold_batchnorm(model, qweights)
    assert set(fq) == set(qweights)
    for n, qw in qweights.items():
        f = fq[n]
        assert isinstance(f, QuantizedWeight) and f.bits == 8
        # same codes up to sign per channel (zeros stay zeros), and the graph's weight is exactly
        # codes * scale: what onnxruntime's quantizer will round back to these codes
        if n == "fc":  # no BatchNorm after it: as trained
            assert f is qw
        elif n != "stem.conv.conv":
            assert torch.equal(f.codes.abs(), qw.codes.abs()) and not torch.equal(f.codes, qw.codes)
        assert torch.equal(folded.get_submodule(n).weight, quant.dequantize(f))
        assert bool((f.scale > 0).all())
    stem = fq["stem.conv.conv"]
    assert not stem.codes[0].any() and torch.equal(
        stem.codes[1:].abs(), qweights["stem.conv.conv"].codes[1:].abs()
    )
    x = torch.rand(64, 64) * 16
    with torch.no_grad():
        assert torch.allclose(folded(x), model(x), rtol=1e-4, atol=1e-4)


def test_batchnorm_outside_a_conv_bn_pair_is_an_export_error():
    from service.errors import ExportError

    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    with pytest.raises(ExportError, match="BatchNorm"):
        fold_batchnorm(model)


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """One small pruned + QAT job on digits, exported (the test module's expensive part)."""
    spec = parse_spec(SPEC)
    data = load_dataset(spec.data)
    store = LocalArtifactStore(tmp_path_factory.mktemp("resnet"))
    summary = train(spec, data, LocalSession(store, "r"))
    rep = export.export(spec, data, store, "r", summary["step"], {"steps": summary["step"]}, 3)
    return rep, JobArtifacts(store, "r")


def test_pruned_qat_resnet_trains_and_its_int8_export_is_measured(job):
    rep, arts = job
    # 3 epochs of a ResNet-8 at width 8 with pruning to 80% (measured ~0.94 on this machine)
    assert rep["float_accuracy"] >= 0.8
    assert rep["accuracy_source"].startswith("model.int8.onnx")
    assert abs(rep["accuracy"] - rep["float_accuracy"]) <= 0.03
    assert rep["sparsity"]["global"] == pytest.approx(0.8, abs=0.01)
    assert rep["quantization"]["layers"] == 10  # 9 convs (stem, 6 in blocks, 2 shortcuts) + fc
    assert rep["warnings"] == []
    for name in ("model.onnx", "model.int8.onnx"):
        ops = {n.op_type for n in onnx.load_from_string(arts.get_bytes(name)).graph.node}
        assert "BatchNormalization" not in ops and "Conv" in ops or "QLinearConv" in ops
    int8 = onnx.load_from_string(arts.get_bytes("model.int8.onnx"))
    assert sum(n.op_type == "DequantizeLinear" for n in int8.graph.node) >= 10


# --- DDP and FSDP (2 gloo processes) ----------------------------------------------------------


def test_ddp_and_fsdp_train_resnet_with_the_same_masks(tmp_path):
    from tests.unit.test_parallel_strategies import Runs, _with

    spec = {
        **SPEC,
        "train": {"epochs": 1, "max_steps": 6, "batch_size": 32, "lr": 0.05, "log_every_steps": 1},
        "compression": {
            "pruning": {"final_sparsity": 0.5, "start_step": 2, "end_step": 4, "frequency": 2},
            "quantization": {"mode": "qat", "start_step": 3},
        },
    }
    runs = Runs(tmp_path)
    ddp = runs.run(_with(spec, "ddp", 2), "ddp")
    fsdp = runs.run(_with(spec, "fsdp", 2), "fsdp")
    la = [r["loss"] for r in ddp if r["kind"] == "train"]
    lb = [r["loss"] for r in fsdp if r["kind"] == "train"]
    assert len(la) == len(lb) == 6
    assert la == pytest.approx(lb, rel=1e-3)
    a, b = runs.final("ddp"), runs.final("fsdp")
    for k in a["pruner"]["masks"]:
        assert torch.equal(a["pruner"]["masks"][k], b["pruner"]["masks"][k]), k
        assert torch.all(a["model"][f"{k}.weight"][~a["pruner"]["masks"][k]] == 0)
    # rank 0's BatchNorm running statistics are checkpointed under both
    for k in a["model"]:
        if "running_" in k:
            assert torch.allclose(a["model"][k], b["model"][k], rtol=1e-3, atol=1e-5), k


@pytest.mark.parametrize("structure", ["unstructured", "channel"])
def test_pruning_reaches_resnet_convs_and_the_fold_keeps_their_zeros(structure):
    from service.spec import PruningSpec
    from workers.compression.pruning import Pruner
    from workers.models import output_layer

    model = _bn_stats(build_model("resnet", {"depth": 8, "width": 8}, DIGITS, seed=0), DIGITS)
    skip = (output_layer(model),) if structure == "channel" else ()
    assert skip in ((), ("fc",))
    cfg = PruningSpec(schedule="oneshot", final_sparsity=0.6, start_step=0, structure=structure)
    pruner = Pruner(cfg, prunable_weights(model, skip=skip))
    pruner.update(0)
    pruner.apply_()
    weights = prunable_weights(model, skip=skip)
    assert any(n.endswith("shortcut.conv") for n in weights) and len(weights) == 9 + (not skip)
    zeros = sum(int((w == 0).sum()) for w in weights.values())
    assert zeros / sum(w.numel() for w in weights.values()) == pytest.approx(0.6, abs=0.02)
    if structure == "channel":  # whole filters, every conv keeps at least one
        for w in weights.values():  # (global scope: a layer may keep all of its filters)
            dead = (w.flatten(1) == 0).all(dim=1)
            assert torch.equal((w == 0).flatten(1).any(dim=1), dead) and not dead.all()
    folded, _ = fold_batchnorm(model)
    for n, w in prunable_weights(folded, skip=skip).items():
        assert torch.equal(w == 0, weights[n] == 0), n
