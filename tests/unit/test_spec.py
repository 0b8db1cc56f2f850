"""The job spec: defaults, formats, and errors that name the field and what is allowed."""

import json
from pathlib import Path

import pytest

from service.errors import SpecError
from service.spec import JobSpec, json_schema, load_spec_file, load_spec_text, parse_spec

BASE = {"name": "x", "model": {"name": "lenet5"}, "data": {"name": "digits"}}


def errors(d):
    with pytest.raises(SpecError) as e:
        parse_spec(d)
    return {x["field"]: x["message"] for x in e.value.errors}


def test_only_name_model_data_required_and_defaults_documented():
    s = parse_spec(BASE)
    assert s.train.epochs == 10 and s.parallel.strategy == "ddp" and s.precision == "fp32"
    assert s.compression.pruning is None and s.compression.quantization.mode == "none"
    assert s.retries == 2 and s.checkpoint.every_steps == 100
    for name, field in JobSpec.model_fields.items():
        if name not in ("name", "model", "data"):
            assert not field.is_required()
    assert errors({}) == {
        "name": "required field missing",
        "model": "required field missing",
        "data": "required field missing",
    }


def test_yaml_and_json_load_the_same():
    y = "name: x\nmodel: {name: lenet5}\ndata: {name: digits}\nprecision: bf16\n"
    j = json.dumps({**BASE, "precision": "bf16"})
    assert load_spec_text(y) == load_spec_text(j)


def test_design_example_validates():
    y = """
name: digits-lenet5-gmp90-int8
model: {name: lenet5, args: {}}
data: {name: digits, args: {}, val_fraction: 0.2}
train: {epochs: 30, batch_size: 64, optimizer: sgd, lr: 0.05, momentum: 0.9,
        weight_decay: 0.0005, lr_schedule: cosine, seed: 0}
parallel: {strategy: ddp, workers: 2, gpus_per_worker: 0, pipeline_microbatches: 4}
precision: bf16
compression:
  pruning: {schedule: cubic, initial_sparsity: 0.0, final_sparsity: 0.9,
            start_step: 50, end_step: 600, frequency: 25,
            scope: global, structure: unstructured}
  clipping: {max_abs: 1.0}
  quantization: {mode: qat, bits: 8, start_step: 600}
checkpoint: {every_steps: 100, keep: 3}
retries: 2
priority: 0
"""
    s = load_spec_text(y)
    assert s.compression.pruning.final_sparsity == 0.9 and s.compression.quantization.mode == "qat"


@pytest.mark.parametrize(
    "patch,field,needle",
    [
        ({"bogus": 1}, "bogus", "unknown field"),
        ({"train": {"bogus": 1}}, "train.bogus", "unknown field"),
        ({"model": {"name": "resnet"}}, "model.name", "allowed: mlp, lenet5, convnet, gpt"),
        ({"model": {"name": "mlp", "args": {"depth": 3}}}, "model.args.depth", "unknown argument"),
        (
            {"model": {"name": "mlp", "args": {"hidden": [0]}}},
            "model.args.hidden.0",
            "greater than or equal to 1",
        ),
        ({"data": {"name": "mnist"}}, "data.name", "allowed: digits, synthetic, text"),
        ({"data": {"name": "digits", "uri": "s3://b/k.npz"}}, "data", "exactly one of"),
        ({"data": {"uri": "file:///etc/passwd"}}, "data.uri", "s3://bucket/key.npz"),
        ({"data": {"uri": "store://datasets/../../x.npz"}}, "data.uri", "'..'"),
        ({"train": {"optimizer": "adam"}}, "train.optimizer", "'sgd' or 'adamw'"),
        ({"train": {"lr_schedule": "poly"}}, "train.lr_schedule", "'constant', 'cosine' or 'step'"),
        ({"precision": "fp8"}, "precision", "'fp32', 'fp16' or 'bf16'"),
        ({"parallel": {"strategy": "pipeline", "workers": 1}}, "parallel.workers", "at least 2 workers"),
        ({"parallel": {"workers": 3}}, "train.batch_size", "not divisible by parallel.workers (3)"),
        ({"parallel": {"strategy": "tp"}}, "parallel.strategy", "'ddp', 'fsdp' or 'pipeline'"),
        (
            {"compression": {"pruning": {"start_step": 50, "end_step": 50}}},
            "compression.pruning.end_step",
            "greater than start_step (50)",
        ),
        (
            {"compression": {"pruning": {"final_sparsity": 1.0}}},
            "compression.pruning.final_sparsity",
            "less than 1",
        ),
        (
            {"compression": {"pruning": {"final_sparsity": -0.1}}},
            "compression.pruning.final_sparsity",
            "greater than or equal to 0",
        ),
        (
            {"compression": {"pruning": {"initial_sparsity": 0.5, "final_sparsity": 0.3}}},
            "compression.pruning.initial_sparsity",
            "must not exceed final_sparsity",
        ),
        (
            {"compression": {"pruning": {"schedule": "threshold"}}},
            "compression.pruning.threshold",
            "required",
        ),
        (
            {"compression": {"pruning": {"scope": "model"}}},
            "compression.pruning.scope",
            "'global' or 'layer'",
        ),
        (
            {"compression": {"pruning": {"structure": "block"}}},
            "compression.pruning.structure",
            "'unstructured' or 'channel'",
        ),
        ({"compression": {"clipping": {"max_abs": 0}}}, "compression.clipping.max_abs", "greater than 0"),
        (
            {"compression": {"quantization": {"mode": "int4"}}},
            "compression.quantization.mode",
            "'none', 'ptq'",
        ),
        ({"model": {"name": "gpt"}}, "model.name", "takes tokens data"),
        ({"name": "../evil"}, "name", "pattern"),
        ({"retries": -1}, "retries", "greater than or equal to 0"),
    ],
)
def test_errors_name_the_field_and_what_is_allowed(patch, field, needle):
    errs = errors({**BASE, **patch})
    assert field in errs, errs
    assert needle in errs[field]


def test_not_a_mapping_and_bad_yaml():
    with pytest.raises(SpecError, match="mapping"):
        load_spec_text("- a\n- b\n")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_spec_text("name: [unclosed\n")


def test_json_schema_exported():
    schema = json_schema()
    assert schema["additionalProperties"] is False
    assert set(schema["required"]) == {"name", "model", "data"}
    assert "PruningSpec" in schema["$defs"]
    pr = schema["$defs"]["PruningSpec"]["properties"]
    assert pr["schedule"]["enum"] == ["cubic", "linear", "oneshot", "threshold"]


def test_synthetic_square_features_are_images():
    s = parse_spec({**BASE, "data": {"name": "synthetic", "args": {"n_features": 64}}})
    assert s.data.kind == "image"
    errs = errors({**BASE, "data": {"name": "synthetic", "args": {"n_features": 60}}})
    assert "takes image data" in errs["model.name"]


EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "examples").glob("*.yaml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_every_example_passes_the_drivers_preflight(path, tmp_path):
    """The examples are what users copy: each must load, and pass every check the driver makes
    before a worker starts (data, model, steps vs schedule, pipeline stages)."""
    from service.artifacts import LocalArtifactStore
    from workers.driver import preflight

    spec = load_spec_file(path)
    _, steps_per_epoch, total = preflight(spec, LocalArtifactStore(tmp_path))
    assert steps_per_epoch > 0 and total >= steps_per_epoch
