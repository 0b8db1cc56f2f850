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
        ({"model": {"name": "resnet50"}}, "model.name", "allowed: mlp, lenet5, convnet, gpt, resnet"),
        ({"model": {"name": "mlp", "args": {"depth": 3}}}, "model.args.depth", "unknown argument"),
        (
            {"model": {"name": "mlp", "args": {"hidden": [0]}}},
            "model.args.hidden.0",
            "greater than or equal to 1",
        ),
        ({"data": {"name": "mnist"}}, "data.name", "allowed: digits, synthetic, text"),
        ({"data": {"name": "digits", "uri": "s3://b/k.npz"}}, "data", "exactly one of"),
        ({"data": {"uri": "file:///etc/passwd"}}, "data.uri", "s3://bucket/key.npz"),
        ({"data": {"uri": "s3://b/../../x.npz"}}, "data.uri", "'..'"),
        # store:// names one dataset of the caller's (PUT /v1/datasets/NAME), never a path
        ({"data": {"uri": "store://datasets/../../x.npz"}}, "data.uri", "store://datasets/<name>"),
        # (a/b.npz is shard b.npz of the set a: docs/data.md, "Shards")
        ({"data": {"uri": "store://datasets/a/b/c.npz"}}, "data.uri", "store://datasets/<name>"),
        ({"data": {"uri": "store://_tenants/bob/datasets/x.npz"}}, "data.uri", "a dataset you uploaded"),
        ({"train": {"optimizer": "adam"}}, "train.optimizer", "'sgd' or 'adamw'"),
        ({"train": {"lr_schedule": "poly"}}, "train.lr_schedule", "'constant', 'cosine' or 'step'"),
        ({"precision": "fp8"}, "precision", "'fp32', 'fp16' or 'bf16'"),
        ({"parallel": {"strategy": "pipeline", "workers": 1}}, "parallel.workers", "at least 2 workers"),
        (
            {"parallel": {"workers": 2, "gpus_per_worker": 0.5}},
            "parallel.gpus_per_worker",
            "NCCL cannot run two ranks of a job",
        ),
        ({"parallel": {"gpus_per_worker": 1.5}}, "parallel.gpus_per_worker", "only whole GPUs"),
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
        (
            {"compression": {"pruning": {"layer_sparsity": {"fc1": 0.5}}}},
            "compression.pruning.layer_sparsity",
            "per-layer targets need scope `layer`",
        ),
        (
            {"compression": {"pruning": {"scope": "layer", "layer_sparsity": {"fc1": 1.0}}}},
            "compression.pruning.layer_sparsity.fc1",
            "less than 1",
        ),
        (
            {
                "compression": {
                    "pruning": {"scope": "layer", "structure": "2:4", "layer_sparsity": {"fc1": 0.5}}
                }
            },
            "compression.pruning.layer_sparsity",
            "allowed with criterion magnitude, structure unstructured or channel",
        ),
        (
            {
                "compression": {
                    "pruning": {"scope": "layer", "final_sparsity": 0.0, "layer_sparsity": {"a": 0.5}}
                }
            },
            "compression.pruning.layer_sparsity",
            "final_sparsity must be above 0",
        ),
        (
            {"compression": {"pruning": {"channel_multiple": 8}}},
            "compression.pruning.channel_multiple",
            "only used by structure `channel` (structure is 'unstructured')",
        ),
        (
            {"compression": {"pruning": {"structure": "channel", "channel_multiple": 0}}},
            "compression.pruning.channel_multiple",
            "greater than or equal to 1",
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


def test_a_store_name_needs_no_ending_and_is_read_only_once_resolved():
    from service.errors import ConfigError

    # the upload recorded the format; resolution at submission fills it in
    spec = parse_spec({**BASE, "data": {"uri": "store://datasets/digits"}}, submitted=True)
    assert spec.data.format is None
    with pytest.raises(ConfigError, match="data.uri: store://datasets/digits was not resolved"):
        spec.data.location("data.uri")
    assert (
        spec.data.model_copy(update={"resolved_uri": "k/data.npz"}).location("data.uri")
        == "store://k/data.npz"
    )
    assert parse_spec({**BASE, "data": {"uri": "s3://b/k.npz"}}).data.location("data.uri") == "s3://b/k.npz"
    # a client that could set the resolved keys would read any tenant's data
    for data in (
        {"uri": "store://datasets/x.npz", "resolved_uri": "_tenants/bob/datasets/x.npz/data.npz"},
        {"uri": "s3://b/x.txt", "tokenizer": "s3://b/t.json", "resolved_tokenizer": "s3://b/t.json"},
    ):
        with pytest.raises(SpecError) as e:
            parse_spec({**BASE, "data": data}, submitted=True)
        field = next(k for k in data if k.startswith("resolved"))
        assert e.value.errors[0]["field"] == f"data.{field}", e.value.errors


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
    prepared = preflight(spec, LocalArtifactStore(tmp_path))
    assert prepared.steps_per_epoch > 0 and prepared.total_steps >= prepared.steps_per_epoch


# --- unknown fields: the nearest known name, or the allowed ones -------------------------------


@pytest.mark.parametrize(
    "patch,field,message",
    [
        (
            {"compression": {"pruning": {"final_sparsty": 0.9}}},
            "compression.pruning.final_sparsty",
            "unknown field `final_sparsty`; did you mean `final_sparsity`?",
        ),
        ({"trian": {"epochs": 2}}, "trian", "unknown field `trian`; did you mean `train`?"),
        (
            {"compression": {"quantisation": {"mode": "qat"}}},
            "compression.quantisation",
            "unknown field `quantisation`; did you mean `quantization`?",
        ),
        (
            {"checkpoint": {"zzz": 1}},
            "checkpoint.zzz",
            "unknown field `zzz`; allowed: every_steps, keep",
        ),
        (
            {"model": {"name": "mlp", "args": {"hiden": [10]}}},
            "model.args.hiden",
            "unknown argument `hiden`; did you mean `hidden`?",
        ),
        (
            {"data": {"name": "synthetic", "args": {"qqq": 1}}},
            "data.args.qqq",
            "unknown argument `qqq`; allowed: n_samples, n_features, n_classes, n_informative, "
            "class_sep, seed, vocab_size",
        ),
    ],
)
def test_unknown_fields_suggest_the_nearest_name(patch, field, message):
    assert errors({**BASE, **patch})[field] == message


def test_yaml_errors_name_the_file(tmp_path):
    path = tmp_path / "my-job.yaml"
    path.write_text("name: x\nmodel: {name: lenet5\ndata: {name: digits}\n")
    with pytest.raises(SpecError) as e:
        load_spec_file(path)
    assert "<unicode string>" not in e.value.message
    assert e.value.message.startswith(f"{path}: not valid YAML or JSON: line ")
    assert e.value.errors == [{"field": "(file)", "message": e.value.message}]  # what the CLI shows
    # text without a file is named as such
    with pytest.raises(SpecError) as e:
        load_spec_text("name: [unclosed\n")
    assert e.value.message == (
        "spec: not valid YAML or JSON: line 2, column 1: expected ',' or ']', but got '<stream end>' "
        "(while parsing a flow sequence at line 1, column 7)"
    )


# --- steps: known at submit for the built-in datasets ------------------------------------------


def test_builtin_dataset_sizes_match_the_loaders():
    """The constants the API counts steps with are the loaders' sizes."""
    import sysconfig

    from sklearn.datasets import load_digits

    from service import spec as S
    from workers.data import load_dataset

    assert len(load_digits().data) == S.DIGITS_SAMPLES
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    assert sum(p.stat().st_size for p in stdlib.glob("*.py")) >= S.TEXT_CORPUS_FLOOR
    cases = [
        {"name": "digits"},
        {"name": "digits", "val_fraction": 0.1},
        {"name": "synthetic", "args": {"n_samples": 1001}, "val_fraction": 0.25},
        {"name": "text", "args": {"max_chars": 10_000, "block_size": 64}},
        {"name": "text", "args": {"max_chars": 12_345, "block_size": 8}, "val_fraction": 0.5},
    ]
    for data in cases:
        model = {"name": "gpt"} if data["name"] == "text" else {"name": "mlp"}
        spec = parse_spec({**BASE, "model": model, "data": data})
        assert S.known_train_samples(spec.data) == load_dataset(spec.data).info.n_train, data


def test_train_samples_are_unknown_for_uris_and_large_text():
    from service import spec as S

    assert S.known_train_samples(parse_spec({**BASE, "data": {"uri": "s3://b/k.npz"}}).data) is None
    big = {"name": "text", "args": {"max_chars": S.TEXT_CORPUS_FLOOR + 1}}
    assert S.known_train_samples(parse_spec({**BASE, "model": {"name": "gpt"}, "data": big}).data) is None


@pytest.mark.parametrize(
    "train,n_train,expected",
    [
        ({"epochs": 1, "batch_size": 64}, 1437, (22, 22)),
        ({"epochs": 30, "batch_size": 64}, 1437, (22, 660)),
        ({"epochs": 30, "batch_size": 64, "max_steps": 100}, 1437, (22, 100)),
        ({"epochs": 2, "batch_size": 64, "max_steps": 100}, 1437, (22, 44)),
        ({"epochs": 3, "batch_size": 2000}, 1437, (0, 0)),
        ({"epochs": 3, "batch_size": 1437}, 1437, (1, 3)),
    ],
)
def test_step_count(train, n_train, expected):
    from service.spec import TrainSpec, step_count

    assert step_count(TrainSpec(**train), n_train) == expected


def _schedule(compression=None, train=None):
    from service.spec import schedule_errors

    spec = parse_spec({**BASE, "train": train or {"epochs": 1}, "compression": compression or {}})
    return schedule_errors(spec, 1437)  # 1437 // 64 = 22 steps per epoch


@pytest.mark.parametrize(
    "compression,errs",
    [
        ({}, []),
        ({"pruning": {"start_step": 0, "end_step": 22, "frequency": 2}}, []),
        (
            {"pruning": {"start_step": 0, "end_step": 23, "frequency": 2}},
            [("compression.pruning.end_step", "23 is after the job's last step (22): 1 epoch of 22 steps")],
        ),
        ({"pruning": {"schedule": "oneshot", "start_step": 22, "end_step": 900}}, []),
        (
            {"pruning": {"schedule": "oneshot", "start_step": 23}},
            [("compression.pruning.start_step", "23 is after the job's last step (22): 1 epoch of 22 steps")],
        ),
        ({"quantization": {"mode": "qat", "start_step": 21}}, []),
        (
            {"quantization": {"mode": "qat", "start_step": 22}},
            [
                (
                    "compression.quantization.start_step",
                    "22 is at or after the job's last step (22): 1 epoch of 22 steps; "
                    "fake quantization would never run",
                )
            ],
        ),
        (
            {"quantization": {"mode": "fixed", "scale": 8, "start_step": 30}},
            [
                (
                    "compression.quantization.start_step",
                    "30 is at or after the job's last step (22): 1 epoch of 22 steps; "
                    "fake quantization would never run",
                )
            ],
        ),
        ({"quantization": {"mode": "qat", "start_step": 2, "freeze_step": 22}}, []),
        (
            {"quantization": {"mode": "qat", "start_step": 2, "freeze_step": 23}},
            [
                (
                    "compression.quantization.freeze_step",
                    "23 is after the job's last step (22): 1 epoch of 22 steps",
                )
            ],
        ),
        (
            {
                "pruning": {"start_step": 0, "end_step": 40, "frequency": 2},
                "quantization": {"mode": "qat", "start_step": 40},
            },
            [
                ("compression.pruning.end_step", "40 is after the job's last step (22): 1 epoch of 22 steps"),
                (
                    "compression.quantization.start_step",
                    "40 is at or after the job's last step (22): 1 epoch of 22 steps; "
                    "fake quantization would never run",
                ),
            ],
        ),
    ],
)
def test_schedule_errors_value_by_value(compression, errs):
    assert [(e["field"], e["message"]) for e in _schedule(compression)] == errs


def test_schedule_errors_explain_a_max_steps_cap_and_a_batch_too_large():
    got = _schedule({"pruning": {"end_step": 200}}, {"epochs": 30, "max_steps": 100})
    assert got == [
        {
            "field": "compression.pruning.end_step",
            "message": "200 is after the job's last step (100): set by train.max_steps",
        }
    ]
    got = _schedule({"pruning": {"end_step": 200}}, {"epochs": 30, "batch_size": 2000})
    assert got == [
        {"field": "train.batch_size", "message": "2000 is larger than the training split (1437 samples)"}
    ]


def test_the_worker_counts_steps_with_the_same_function():
    """One piece of code: the driver's preflight raises the submit check's first error."""
    from service.errors import ConfigError
    from workers.train_loop import total_steps

    spec = parse_spec({**BASE, "train": {"epochs": 1}, "compression": {"pruning": {"end_step": 23}}})
    with pytest.raises(ConfigError) as e:
        total_steps(spec, 1437)
    assert (
        e.value.message
        == "compression.pruning.end_step: 23 is after the job's last step (22): 1 epoch of 22 steps"
    )
    assert total_steps(parse_spec({**BASE, "train": {"epochs": 2}}), 1437) == (22, 44)


def test_submit_check_refuses_a_schedule_past_the_last_step():
    from service.limits import check_limits
    from service.settings import Settings

    spec = parse_spec({**BASE, "train": {"epochs": 1}, "compression": {"pruning": {"end_step": 23}}})
    with pytest.raises(SpecError) as e:
        check_limits(spec, Settings())
    assert e.value.errors == [
        {
            "field": "compression.pruning.end_step",
            "message": "23 is after the job's last step (22): 1 epoch of 22 steps",
        }
    ]
    # unknown size (a uri): left to the driver's preflight
    check_limits(parse_spec({**spec.model_dump(), "data": {"uri": "s3://b/k.npz"}}), Settings())
