"""FSDP and pipeline jobs through real Ray Train (2 workers, gloo): the flagship gpt on the text
corpus, gradual magnitude pruning to 90%, exported and reported like any DDP job."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load

from service.artifacts import JobArtifacts, LocalArtifactStore
from service.spec import parse_spec
from workers.checkpoint import load_latest
from workers.compression.pruning import unstructured_masks
from workers.driver import run_job

pytestmark = pytest.mark.integration


def _spec(strategy: str, **extra) -> dict:
    return {
        "name": f"text-gpt-gmp90-{strategy}",
        "model": {"name": "gpt", "args": {"n_layer": 2, "n_head": 2, "n_embd": 64}},
        "data": {"name": "text", "args": {"block_size": 32, "max_chars": 60_000}},
        "train": {
            "epochs": 1,
            "max_steps": 80,
            "batch_size": 16,
            "optimizer": "adamw",
            "lr": 0.003,
            "weight_decay": 0.0,
            "warmup_steps": 5,
            "eval_every_steps": 40,
            "grad_clip_norm": 1.0,
        },
        "compression": {
            "pruning": {"final_sparsity": 0.9, "start_step": 10, "end_step": 60, "frequency": 10}
        },
        "parallel": {"strategy": strategy, "workers": 2, "pipeline_microbatches": 4},
        "checkpoint": {"every_steps": 40, "keep": 2},
        **extra,
    }


SPECS = {
    "fsdp": _spec("fsdp", precision="bf16"),  # bf16 through FSDP's mixed-precision policy
    "pipeline": _spec(
        "pipeline", parallel={"strategy": "pipeline", "workers": 2, "pipeline_schedule": "1f1b"}
    ),
}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return LocalArtifactStore(tmp_path_factory.mktemp("parallel-artifacts"))


@pytest.fixture(scope="module", params=sorted(SPECS))
def job(request, ray_cluster, store):
    strategy = request.param
    report = run_job(parse_spec(SPECS[strategy]), f"gpt-{strategy}", store)
    return strategy, report


def _records(store, job_id):
    text = JobArtifacts(store, job_id).get_bytes("metrics.jsonl").decode()
    return [json.loads(line) for line in text.splitlines()]


def test_gmp90_reaches_target_and_loss_falls(job, store):
    strategy, rep = job
    assert rep["strategy"] == strategy and rep["workers"] == 2 and rep["steps"] == 80
    assert abs(rep["sparsity"]["global"] - 0.90) <= 0.005
    trains = [r for r in _records(store, f"gpt-{strategy}") if r["kind"] == "train"]
    assert trains[-1]["loss"] < trains[0]["loss"] - 1.0  # from ~ln(256) = 5.5 towards the corpus
    assert trains[-1]["sparsity"] == pytest.approx(0.9, abs=0.005)
    # the report scores the exported artifact: perplexity is exp of its validation loss
    assert rep["perplexity"] == pytest.approx(float(torch.tensor(rep["val_loss"]).exp()))
    assert rep["perplexity"] < 40


def test_masks_are_the_threshold_of_the_gathered_weights(job, store):
    strategy, _ = job
    state = load_latest(store, f"gpt-{strategy}").state
    masks = state["pruner"]["masks"]
    weights = {n: state["model"][f"{n}.weight"] for n in masks}
    expected = unstructured_masks(weights, 0.9, "global")
    assert list(masks) == list(expected)
    for n in masks:
        assert torch.equal(masks[n], expected[n]), n
    exported = load(JobArtifacts(store, f"gpt-{strategy}").get_bytes("model.safetensors"))
    for n, m in masks.items():
        assert torch.equal(exported[f"{n}.weight"] != 0, m), n
