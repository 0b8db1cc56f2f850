"""Jobs whose artifacts live in S3 (the loopback S3 server).

`slimtrain run` with SLIMTRAIN_ARTIFACT_URI=s3://..., a dataset from `data.uri: s3://...`, real
Ray Train workers uploading checkpoints straight into the bucket (the session's Ray cluster has no
AWS variables, so the credentials can only travel in the job's config), and a resume that skips a
corrupt and a half-written checkpoint. Then the cluster setup end to end: the API on PostgreSQL
and S3, a job submitted over REST, its checkpoints, artifacts and manifest in the bucket."""

from __future__ import annotations

import hashlib
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
import sqlalchemy
import yaml
from sklearn.datasets import load_digits

from api.client import Client
from service.artifacts import JobArtifacts
from service.records import PARTS
from service.spec import load_spec_file
from tests.conftest import ROOT, wait_for
from tests.plugins.s3 import CREDENTIALS
from tests.plugins.server import ApiProcess
from tests.raycluster import start_head
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


def _upload_digits(s3_server, bucket: str) -> None:
    digits = load_digits()
    buf = io.BytesIO()
    np.savez(buf, X=digits.data.astype(np.float32), y=digits.target)
    s3_server.client().put_object(Bucket=bucket, Key="datasets/digits.npz", Body=buf.getvalue())


@pytest.fixture(scope="module")
def job(ray_cluster, s3_server, tmp_path_factory):
    bucket = s3_server.new_bucket()
    _upload_digits(s3_server, bucket)
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
    listed = set(arts.get_json("manifest.json")["files"])
    # every object of the job but the checkpoints (each has its own) and the manifest itself
    job_objects = {k[len(base) :] for k in keys if k.startswith(base) and not k.endswith("/")}
    # (the metrics parts are the live stream that metrics.jsonl, which is listed, holds whole)
    assert listed == {n for n in job_objects if not n.startswith(("checkpoints/", PARTS))} - {"manifest.json"}
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
    # the report lists every start of the job: the first run's, then this rerun's from step 20
    assert [a["resumed_from"] for a in rep["attempts"]] == [None, 20]
    assert arts.get_bytes("model.safetensors") == weights
    assert rep["accuracy"] == job["report"]["accuracy"]
    assert _verified_steps(store, job_id) == list(STEPS)
    assert arts.verify_manifest() == []


# The cluster setup: API + PostgreSQL + S3 + a Ray head whose node carries its own AWS variables
# (the scheduler never puts credentials into a Ray job's runtime_env, which Ray's dashboard
# shows), as the compose and KubeRay heads do. The session's cluster has none, so this test
# starts its own head with them; the training workers still get the store through the config.

TOKEN = "s3-api-token-0123456789abcdef"


def test_api_job_on_postgres_and_s3(s3_server, postgres_url, tmp_path):
    bucket = s3_server.new_bucket()
    _upload_digits(s3_server, bucket)
    head = start_head(num_cpus=2, tag="s3api", env={**os.environ, **s3_server.env})
    env = {
        **os.environ,
        **s3_server.env,
        "SLIMTRAIN_DATA_DIR": str(tmp_path / "data"),
        "SLIMTRAIN_DATABASE_URL": postgres_url,
        "SLIMTRAIN_ARTIFACT_URI": f"s3://{bucket}/{PREFIX}",
        "SLIMTRAIN_RAY_ADDRESS": head.address,
        "SLIMTRAIN_RAY_DASHBOARD_URL": head.dashboard_url,
        "SLIMTRAIN_API_TOKENS": f"{TOKEN}:s3",
        # the operator allows the folder the data lies in (s3:// is refused by default)
        "SLIMTRAIN_S3_ALLOWED_PREFIXES": f"s3://{bucket}/datasets",
        "SLIMTRAIN_DRIVER_PYTHON": sys.executable,
        "SLIMTRAIN_SCHEDULER_INTERVAL_S": "0.2",
        "SLIMTRAIN_INGEST_INTERVAL_S": "0.25",
    }
    api = ApiProcess(env, tmp_path / "api.log")
    try:
        api.start()
        c = Client(api.url, TOKEN)
        job_id = c.submit(yaml.safe_load(SPEC.format(bucket=bucket)))["id"]
        final = wait_for(
            lambda: (j := c.job(job_id))["state"] in ("succeeded", "failed", "cancelled") and j,
            300,
            0.5,
            "the job to finish",
        )
        assert final["state"] == "succeeded", f"{final}\n{c.logs(job_id)[-3000:]}\n{api.log_tail()}"
        report = c.report(job_id)
        assert report["steps"] == 60 and report["sparsity"]["global"] == pytest.approx(0.5, abs=0.01)

        # everything in the bucket, verified against the manifests
        store = s3_server.store(bucket, PREFIX)
        arts = JobArtifacts(store, job_id)
        assert arts.verify_manifest() == []
        assert _verified_steps(store, job_id) == list(STEPS)
        manifest = arts.get_json("manifest.json")["files"]
        assert {"spec.json", "metrics.jsonl", "model.safetensors", "model.packed", "report.json"} <= set(
            manifest
        )
        # the API lists and streams them from S3, byte for byte as the manifest says
        listed = {a["name"] for a in c.artifacts(job_id)}
        # the manifest covers every artifact; checkpoints carry their own, and outcome.json is
        # the entrypoint's note to the reconciler, written after the job's artifacts are complete;
        # the metrics parts are the live stream that metrics.jsonl holds whole
        artifacts = {n for n in listed if not n.startswith(("checkpoints/", PARTS))}
        assert set(manifest) == artifacts - {"manifest.json", "outcome.json"}
        dest = c.download(job_id, "model.safetensors", tmp_path / "dl" / "model.safetensors")
        assert hashlib.sha256(dest.read_bytes()).hexdigest() == manifest["model.safetensors"]["sha256"]
        assert not (tmp_path / "data" / "artifacts").exists()

        # and the record is PostgreSQL's
        engine = sqlalchemy.create_engine(postgres_url)
        try:
            with engine.connect() as conn:
                row = conn.execute(
                    sqlalchemy.text("SELECT state, attempts FROM jobs WHERE id = :id"), {"id": job_id}
                ).one()
        finally:
            engine.dispose()
        assert tuple(row) == ("succeeded", 1)
    finally:
        api.stop()
        head.stop()
