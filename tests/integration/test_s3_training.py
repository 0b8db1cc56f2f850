"""A job whose artifacts live in S3: `slimtrain run` with SLIMTRAIN_ARTIFACT_URI=s3://..., a
dataset from `data.uri: s3://...`, real Ray Train workers uploading checkpoints straight into the
bucket (the loopback S3 server; the Ray cluster has no AWS variables, so the credentials can only
travel in the job's config), and a resume that skips a corrupt and a half-written checkpoint."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import ray
from sklearn.datasets import load_digits

from service.artifacts import JobArtifacts
from service.spec import load_spec_file
from tests.conftest import ROOT
from tests.plugins.s3 import CREDENTIALS
from workers.checkpoint import dir_name, list_checkpoints, load_folder, load_latest
from workers.driver import run_job

pytestmark = pytest.mark.integration
PREFIX = "runs"
SPEC = """
name: digits-mlp-s3
model: {{name: mlp}}
data: {{uri: "s3://{bucket}/datasets/digits.npz", val_fraction: 0.2}}
train: {{epochs: 3, max_steps: 60, batch_size: 64, lr: 0.05, momentum: 0.9, seed: 0}}
parallel: {{strategy: ddp, workers: 2}}
precision: fp32
compression:
  pruning: {{schedule: cubic, final_sparsity: 0.5, start_step: 10, end_step: 40, frequency: 10}}
checkpoint: {{every_steps: 20, keep: 3}}
retries: 0
"""
STEPS = (20, 40, 60)


@pytest.fixture(scope="module")
def job(ray_cluster, s3_server, tmp_path_factory):
    bucket = s3_server.new_bucket()
    digits = load_digits()
    buf = io.BytesIO()
    np.savez(buf, X=digits.data.astype(np.float32), y=digits.target)
    s3_server.client().put_object(Bucket=bucket, Key="datasets/digits.npz", Body=buf.getvalue())
    tmp = tmp_path_factory.mktemp("s3job")
    spec_path = tmp / "spec.yaml"
    spec_path.write_text(SPEC.format(bucket=bucket))
    env = {
        **os.environ,
        **s3_server.env,
        "SLIMTRAIN_ARTIFACT_URI": f"s3://{bucket}/{PREFIX}",
        "SLIMTRAIN_RAY_ADDRESS": ray_cluster["address"],
        "SLIMTRAIN_DATA_DIR": str(tmp / "data"),
    }
    proc = subprocess.run(
        [sys.executable, "-m", "api.cli", "run", str(spec_path), "--json"],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    return {
        "bucket": bucket,
        "store": s3_server.store(bucket, PREFIX),
        "job_id": report["job_id"],
        "report": report,
        "spec_path": spec_path,
        "data_dir": tmp / "data",
    }


def _verified_steps(store, job_id) -> list[int]:
    """Steps of the job's checkpoints whose files all match their manifest."""
    good = []
    for step, name in list_checkpoints(JobArtifacts(store, job_id)):
        with tempfile.TemporaryDirectory() as tmp:
            store.download_prefix(f"{job_id}/checkpoints/{name}/", Path(tmp))
            try:
                load_folder(Path(tmp))
            except Exception:
                continue
            good.append(step)
    return sorted(good)


def test_run_writes_checkpoints_artifacts_and_manifest_to_the_bucket(job, s3_server):
    rep, store, job_id = job["report"], job["store"], job["job_id"]
    assert rep["steps"] == 60 and rep["accuracy"] >= 0.8
    assert rep["sparsity"]["global"] == pytest.approx(0.5, abs=0.01)
    assert rep["data"] == f"s3://{job['bucket']}/datasets/digits.npz"
    keys = {
        o["Key"]
        for page in s3_server.client().get_paginator("list_objects_v2").paginate(Bucket=job["bucket"])
        for o in page.get("Contents", [])
    }
    base = f"{PREFIX}/{job_id}/"
    names = (
        "spec.json",
        "metrics.jsonl",
        "model.safetensors",
        "model.packed",
        "report.json",
        "manifest.json",
    )
    assert {base + n for n in names} <= keys
    for step in STEPS:
        for f in ("state.pt", "rng.pt", "meta.json", "manifest.json"):
            assert f"{base}checkpoints/{dir_name(step)}/{f}" in keys
    arts = JobArtifacts(store, job_id)
    listed = {e["name"] for e in arts.get_json("manifest.json")["artifacts"]}
    assert listed == set(names) - {"manifest.json"}
    assert arts.verify_manifest() == []
    assert _verified_steps(store, job_id) == list(STEPS)
    # nothing went to the local data folder
    assert not (job["data_dir"] / "artifacts").exists()


def test_ray_workers_have_no_credentials_of_their_own(job):
    """So the uploads above reached the bucket through the job's config alone."""

    @ray.remote(num_cpus=0)
    def worker_env():
        return os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("SLIMTRAIN_S3_ENDPOINT_URL")

    key, endpoint = ray.get(worker_env.remote())
    assert key != CREDENTIALS.access_key and endpoint is None


def test_resume_skips_corrupt_and_half_written_checkpoints(job, s3_server, monkeypatch):
    """Corrupt the newest checkpoint (a flipped byte) and cut the next one short (its manifest,
    written last, missing): the rerun resumes from step 20, writes verified checkpoints again,
    and ends with weights bit-identical to the uninterrupted run's."""
    store, job_id, bucket = job["store"], job["job_id"], job["bucket"]
    arts = JobArtifacts(store, job_id)
    weights = arts.get_bytes("model.safetensors")
    client = s3_server.client()
    state_key = f"{PREFIX}/{job_id}/checkpoints/{dir_name(60)}/state.pt"
    state = bytearray(client.get_object(Bucket=bucket, Key=state_key)["Body"].read())
    state[len(state) // 2] ^= 0xFF
    client.put_object(Bucket=bucket, Key=state_key, Body=bytes(state))
    client.delete_object(Bucket=bucket, Key=f"{PREFIX}/{job_id}/checkpoints/{dir_name(40)}/manifest.json")
    assert _verified_steps(store, job_id) == [20]
    assert load_latest(store, job_id).step == 20

    # The driver reads the s3:// dataset with its own environment, as `slimtrain run` does.
    for k, v in s3_server.env.items():
        monkeypatch.setenv(k, v)
    rep = run_job(load_spec_file(job["spec_path"]), job_id, store)
    assert [a["resumed_from"] for a in rep["attempts"]] == [20]
    assert arts.get_bytes("model.safetensors") == weights
    assert rep["accuracy"] == job["report"]["accuracy"]
    assert _verified_steps(store, job_id) == list(STEPS)
    assert arts.verify_manifest() == []
