"""Pipeline stages cut from registry models: pure partitioning, value by value, and stages that
compose to exactly the model with the model's own parameter names."""

import pytest
import torch

from service import catalog
from service.artifacts import LocalArtifactStore
from service.errors import ConfigError, SpecError
from service.spec import DataSpec, parse_spec
from workers.data import load_dataset
from workers.data.info import DataInfo
from workers.driver import preflight
from workers.models import build_model
from workers.models.stages import chain_of, cut_stage, max_stages, n_params, partition, units
from workers.parallel.fsdp import shard_units
from workers.parallel.pipeline import merge_optimizer_states


@pytest.mark.parametrize(
    ("costs", "n", "starts"),
    [
        ([1, 1, 1, 1], 1, [0]),
        ([1, 1, 1, 1], 2, [0, 2]),
        ([1, 1, 1, 1], 4, [0, 1, 2, 3]),
        ([5, 1, 1, 1], 2, [0, 1]),
        ([1, 1, 1, 5], 2, [0, 3]),
        ([3, 3, 3, 1, 1, 1], 3, [0, 1, 2]),  # largest part 6 whatever the cut: earliest cuts win
        ([41, 197, 197, 33], 2, [0, 2]),  # gpt: embed + block 0 | block 1 + head
        ([0, 0, 7], 2, [0, 1]),
    ],
)
def test_partition_minimises_the_largest_stage(costs, n, starts):
    assert partition(costs, n) == starts


@pytest.mark.parametrize("n", [0, 5])
def test_partition_refuses_impossible_cuts(n):
    with pytest.raises(ValueError, match="cannot cut 4 units"):
        partition([1, 1, 1, 1], n)


def _defaults(name):
    return catalog.BUILTIN_MODELS[name]().model_dump()


DIGITS = DataInfo("image", (64,), "float32", 10, (1, 8, 8), 4.9, 6.0)
TEXT = DataInfo("tokens", (16,), "int64", 256)
MODELS = [
    ("mlp", _defaults("mlp"), DIGITS, 3),
    ("lenet5", _defaults("lenet5"), DIGITS, 5),
    ("convnet", _defaults("convnet"), DIGITS, 6),
    ("gpt", {**_defaults("gpt"), "n_layer": 3, "n_embd": 32}, TEXT, 5),
]


def _input(info):
    g = torch.Generator().manual_seed(0)
    if info.kind == "tokens":
        return torch.randint(0, 256, (3, 16), generator=g)
    return torch.rand(3, 64, generator=g) * 16


@pytest.mark.parametrize(("name", "args", "info", "n_units"), MODELS)
def test_chain_is_the_forward_pass(name, args, info, n_units):
    model = build_model(name, args, info, seed=0).eval()
    x = _input(info)
    h = x
    for _, m in chain_of(model):
        h = m(h)
    assert torch.equal(h, model(x))
    us = units(chain_of(model))
    assert len(us) == max_stages(model) == n_units
    assert all(n_params(u) > 0 for u in us)  # no stage can end up without parameters


@pytest.mark.parametrize(("name", "args", "info", "n_units"), MODELS)
@pytest.mark.parametrize("n", [2, 3])
def test_stages_compose_to_the_model_under_its_own_names(name, args, info, n_units, n):
    reference = build_model(name, args, info, seed=0).eval()
    stages = [cut_stage(build_model(name, args, info, seed=0), n, i).eval() for i in range(n)]
    x = _input(info)
    h = x
    for s in stages:
        h = s(h)
    assert torch.allclose(h, reference(x), atol=1e-6)
    merged = {}
    for s in stages:
        own = s.state_dict()
        assert not own.keys() & merged.keys()  # every tensor lives on exactly one stage
        merged.update(own)
    full = reference.state_dict()
    assert merged.keys() == full.keys()
    assert all(torch.equal(merged[k], full[k]) for k in full)


def test_gpt_stages_put_embedding_first_and_head_last():
    model = build_model("gpt", {**_defaults("gpt"), "n_layer": 4}, TEXT, seed=0)
    stages = [
        cut_stage(build_model("gpt", {**_defaults("gpt"), "n_layer": 4}, TEXT, seed=0), 3, i)
        for i in range(3)
    ]
    names = [
        sorted(
            {
                k.split(".")[0] + ("." + k.split(".")[1] if k.startswith("blocks") else "")
                for k in s.state_dict()
            }
        )
        for s in stages
    ]
    assert names == [["blocks.0", "embed"], ["blocks.1", "blocks.2"], ["blocks.3", "head"]]
    assert max_stages(model) == 6


def test_too_many_stages_is_a_config_error_naming_workers():
    with pytest.raises(ConfigError, match=r"parallel.workers: LeNet5 splits into at most 5 pipeline stages"):
        cut_stage(build_model("lenet5", {}, DIGITS), 6, 0)


def test_model_without_a_chain_cannot_be_pipelined():
    with pytest.raises(ConfigError, match="parallel.strategy: Linear cannot be split"):
        chain_of(torch.nn.Linear(2, 2))


def test_fsdp_shards_each_block_and_each_top_level_stack():
    gpt = build_model("gpt", {**_defaults("gpt"), "n_layer": 3}, TEXT, seed=0)
    assert shard_units(gpt) == [gpt.embed, *gpt.blocks, gpt.head]
    lenet = build_model("lenet5", {}, DIGITS)
    assert shard_units(lenet) == [lenet.features, lenet.classifier]  # the input adapter has no parameters


def test_stage_optimizer_states_merge_by_name():
    a = {
        "state": {"x.w": {"step": 1}},
        "param_groups": [{"lr": 0.1, "params": ["x.w"]}, {"lr": 0.1, "params": []}],
    }
    b = {
        "state": {"y.w": {"step": 1}},
        "param_groups": [{"lr": 0.1, "params": ["y.w"]}, {"lr": 0.1, "params": ["y.b"]}],
    }
    merged = merge_optimizer_states([a, b])
    assert merged == {
        "state": {"x.w": {"step": 1}, "y.w": {"step": 1}},
        "param_groups": [{"lr": 0.1, "params": ["x.w", "y.w"]}, {"lr": 0.1, "params": ["y.b"]}],
    }
    assert a["param_groups"][0]["params"] == ["x.w"]  # inputs untouched


def test_text_gpt_chain_on_real_data():
    data = load_dataset(DataSpec(name="text", args={"block_size": 16, "max_chars": 10_000}))
    model = build_model("gpt", {**_defaults("gpt"), "n_embd": 32}, data.info, seed=0).eval()
    h = data.x_val[:2]
    for _, m in chain_of(model):
        h = m(h)
    assert torch.equal(h, model(data.x_val[:2]))


# --- combinations that cannot work are refused before training ----------------------------------

BASE = {"name": "p", "model": {"name": "gpt", "args": {"n_layer": 2}}, "data": {"name": "text"}}


@pytest.mark.parametrize(
    ("parallel", "field", "message"),
    [
        (
            {"strategy": "pipeline", "workers": 5, "pipeline_schedule": "gpipe", "pipeline_microbatches": 8},
            "parallel.workers",
            "gpt with n_layer=2 splits into at most 4 pipeline stages",
        ),
        (
            {"strategy": "pipeline", "workers": 4, "pipeline_schedule": "1f1b", "pipeline_microbatches": 2},
            "parallel.pipeline_microbatches",
            "schedule `1f1b` needs at least one microbatch per stage (4 workers)",
        ),
    ],
)
def test_spec_refuses_pipelines_that_cannot_run(parallel, field, message):
    with pytest.raises(SpecError) as e:
        parse_spec({**BASE, "train": {"batch_size": 64}, "parallel": parallel})
    assert [x["field"] for x in e.value.errors] == [field]
    assert message in e.value.errors[0]["message"]


@pytest.mark.parametrize("workers", [2, 4])
def test_spec_accepts_pipelines_that_fit(workers):
    spec = parse_spec({**BASE, "parallel": {"strategy": "pipeline", "workers": workers}})
    assert spec.parallel.pipeline_microbatches >= workers


def test_preflight_refuses_more_stages_than_layers(tmp_path):
    spec = parse_spec(
        {
            "name": "p",
            "model": {"name": "mlp", "args": {"hidden": [32]}},
            "data": {"name": "digits"},
            "parallel": {"strategy": "pipeline", "workers": 3, "pipeline_microbatches": 4},
        }
    )
    with pytest.raises(ConfigError, match="parallel.workers: MLP splits into at most 2 pipeline stages"):
        preflight(spec, LocalArtifactStore(tmp_path))
