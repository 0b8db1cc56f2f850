"""The training engine through real Ray Train, 2 workers, on scikit-learn's digits."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load

from service.artifacts import JobArtifacts, LocalArtifactStore
from service.spec import load_spec_file
from tests.artifact_reading import onnx_weight_zeros, packed_zeros
from tests.conftest import ROOT
from workers.driver import run_job

pytestmark = pytest.mark.integration
EXAMPLES = ROOT / "examples"


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return LocalArtifactStore(tmp_path_factory.mktemp("artifacts"))


@pytest.fixture(scope="module")
def gmp90(ray_cluster, store):
    spec = load_spec_file(EXAMPLES / "digits-gmp90.yaml")
    return run_job(spec, "gmp90", store)


def _records(store, job):
    text = JobArtifacts(store, job).get_bytes("metrics.jsonl").decode()
    return [json.loads(line) for line in text.splitlines()]


def _weights(store, job):
    return load(JobArtifacts(store, job).get_bytes("model.safetensors"))


def test_dense_lenet5_through_the_cli(ray_cluster, tmp_path):
    """`slimtrain run` end to end on the example spec: >= 0.95 validation accuracy."""
    env = {**os.environ, "SLIMTRAIN_RAY_ADDRESS": ray_cluster["address"]}
    out = tmp_path / "dense"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "api.cli",
            "run",
            str(EXAMPLES / "digits-dense.yaml"),
            "--out",
            str(out),
            "--json",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    assert report["accuracy"] >= 0.95
    assert report["sparsity"]["global"] < 0.01
    for name in (
        "spec.json",
        "metrics.jsonl",
        "model.safetensors",
        "model.packed",
        "report.json",
        "manifest.json",
    ):
        assert (out / name).is_file(), name
    assert JobArtifacts(LocalArtifactStore(tmp_path), "dense").verify_manifest() == []
    # the driver said what it was doing, in order, and the manifest covers the last word
    phases = [r["phase"] for r in _records(LocalArtifactStore(tmp_path), "dense") if r["kind"] == "phase"]
    assert phases == ["preparing", "waiting_for_workers", "training", "exporting", "verifying", "done"]
    # Helper processes Ray Train starts for every run and an attempt does not need were not
    # started (workers.driver): each would take CPU from the workers as they start. The
    # PreemptionWatcher passes node-drain notices the loop never reads; the PlacementGroupCleaner
    # guards against a controller dying while its driver lives on; the DatasetManager shards Ray
    # Datasets, which this job (data in memory) has none of.
    classes = _actor_classes_of_newest_job(ray_cluster["dashboard_url"])
    assert {"RayTrainWorker", "TrainController", "RelayBuffer"} <= classes, classes
    assert not {"PreemptionWatcher", "PlacementGroupCleaner", "DatasetManager"} & classes, classes


def _actor_classes_of_newest_job(dashboard_url: str) -> set[str]:
    """Class names of the actors of the Ray job that started last (the newest driver)."""
    from ray.util.state import list_actors

    actors = list_actors(address=dashboard_url, limit=10_000)
    # a job id is a little-endian counter in hex ("05000000" is job 5)
    newest = max({a.job_id for a in actors}, key=lambda j: int.from_bytes(bytes.fromhex(j), "little"))
    return {a.class_name for a in actors if a.job_id == newest}


def test_gmp90_reaches_target_sparsity_and_accuracy(gmp90):
    assert abs(gmp90["sparsity"]["global"] - 0.90) <= 0.005
    assert gmp90["accuracy"] >= 0.93
    assert gmp90["steps"] == 660
    keys = {"accuracy", "sparsity", "params", "size", "steps", "wall_seconds", "samples_per_second"}
    assert keys <= set(gmp90)
    assert gmp90["params"]["nonzero"] < gmp90["params"]["total"]
    assert gmp90["devices"] == ["cpu", "cpu"]  # both Ray Train workers, by rank
    assert gmp90["size"]["compressed_bytes"] < gmp90["size"]["dense_bytes"] / 5


def test_both_ranks_hold_identical_masks(gmp90, store):
    updates = [r for r in _records(store, "gmp90") if r.get("event") == "mask_update"]
    # cubic schedule from 50 to 600 every 25 steps: 23 updates, each checked on both ranks
    assert len(updates) == 23
    for u in updates:
        assert len(u["mask_checksums"]) == 2 and len(set(u["mask_checksums"])) == 1
    assert updates[-1]["step"] == 600 and updates[-1]["sparsity"] == pytest.approx(0.9, abs=1e-4)


def test_pruned_weights_are_exactly_zero_in_the_export(gmp90, store):
    """The report's sparsity is what model.packed and model.onnx hold, read with the tests' own
    decoders (not the tensors the report was computed from)."""
    arts = JobArtifacts(store, "gmp90")
    w = _weights(store, "gmp90")
    prunable = [k for k in w if k.endswith(".weight") and w[k].dim() >= 2]
    packed = packed_zeros(arts.get_bytes("model.packed"))
    zeros, total = sum(packed[k][0] for k in prunable), sum(packed[k][1] for k in prunable)
    assert gmp90["sparsity"]["global"] == zeros / total
    graph = onnx_weight_zeros(arts.get_bytes("model.onnx")).values()
    assert (sum(z for z, _ in graph), sum(n for _, n in graph)) == (zeros, total)
    assert zeros / total == pytest.approx(0.9, abs=0.005)


def test_worker_killed_mid_run_resumes_to_bit_identical_weights(gmp90, store, tmp_path):
    """kill -9 of rank 1 at step 430: Ray Train restarts the worker group, the loop resumes from
    the step-400 checkpoint, and the job ends with exactly the uninterrupted run's weights."""
    spec = load_spec_file(EXAMPLES / "digits-gmp90.yaml")
    faults = {"kill_at_step": 430, "kill_rank": 1, "once_file": str(tmp_path / "fired")}
    rep = run_job(spec, "gmp90-killed", store, faults=faults)
    assert (tmp_path / "fired").read_text() == "430"
    assert [a["resumed_from"] for a in rep["attempts"]] == [None, 400]
    a, b = _weights(store, "gmp90"), _weights(store, "gmp90-killed")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k].view(torch.int32), b[k].view(torch.int32)), f"{k} differs bitwise"
    assert rep["accuracy"] == gmp90["accuracy"]
