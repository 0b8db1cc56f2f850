"""The job's first word comes before the driver's slow start: the entrypoint writes the `starting`
phase before it imports torch and Ray Train, and the driver continues that series (issue 17
point 1; the timing itself is bench/api/first_metric.py's, never a test's)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from service.artifacts import JobArtifacts, LocalArtifactStore
from service.outcome import read_outcome
from service.records import METRICS
from workers import entrypoint
from workers.metrics_log import load_series

ROOT = Path(__file__).resolve().parents[2]
JOB = "0123456789abcdef0123456789abcdef"
SPEC = {"name": "t", "model": {"name": "mlp"}, "data": {"name": "digits"}}


@pytest.fixture
def job(tmp_path, monkeypatch):
    store = LocalArtifactStore(tmp_path)
    arts = JobArtifacts(store, JOB)
    arts.put_json("spec.json", SPEC)
    monkeypatch.setenv("SLIMTRAIN_ARTIFACT_URI", tmp_path.as_uri())
    monkeypatch.setenv("SLIMTRAIN_ATTEMPT", "1")
    # The driver process's logging set-up would replace this test process's root handlers.
    monkeypatch.setattr(entrypoint.logs, "setup", lambda *a, **k: None)
    return arts


def test_the_starting_phase_is_written_before_the_driver_runs_and_the_driver_continues_it(job, monkeypatch):
    seen = {}

    def drive(spec, job_id, attempt, store, metrics, finish):
        # What a client can read when the driver only begins its imports: the starting phase.
        seen["series"] = [json.loads(x) for x in load_series(JobArtifacts(store, job_id))[0]]
        metrics.add({"kind": "train", "step": 1, "loss": 1.0})  # as run_job continues it
        return finish("succeeded")

    monkeypatch.setattr(entrypoint, "_drive", drive)
    assert entrypoint.main([JOB]) == 0
    [first] = seen["series"]
    assert (first["kind"], first["phase"]) == ("phase", "starting")
    whole = [json.loads(x) for x in job.get_bytes(METRICS).decode().splitlines()]
    assert [r["kind"] for r in whole] == ["phase", "train"]  # written once the driver ended
    assert read_outcome(job, 1).state == "succeeded"


def test_a_driver_that_fails_before_training_still_leaves_its_series_and_outcome(job, monkeypatch):
    def drive(spec, job_id, attempt, store, metrics, finish):
        return finish("retryable", "driver_error", "RuntimeError: no Ray cluster")

    monkeypatch.setattr(entrypoint, "_drive", drive)
    assert entrypoint.main([JOB]) == 1
    assert [json.loads(x)["phase"] for x in job.get_bytes(METRICS).decode().splitlines()] == ["starting"]
    assert read_outcome(job, 1).code == "driver_error"


def test_nothing_slow_is_imported_before_the_first_record():
    # What the entrypoint imports before it writes `starting`: were torch or Ray among it, the
    # first record would wait for them again. A fresh interpreter, since this one has both.
    code = "import sys, workers.entrypoint; print(sorted({'torch', 'ray'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.split() == ["[]"]
