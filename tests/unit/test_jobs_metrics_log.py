"""A resubmitted driver continues its job's metrics.jsonl instead of starting it over: the API has
ingested lines by number, and earlier attempts' records belong to the job's series."""

from __future__ import annotations

import json

from service.artifacts import JobArtifacts, LocalArtifactStore
from workers.driver import MetricsLog


def test_metrics_log_continues_an_existing_series(tmp_path):
    arts = JobArtifacts(LocalArtifactStore(tmp_path), "job")
    first = MetricsLog(arts)
    first.add({"kind": "train", "step": 10})
    first.flush(force=True)
    second = MetricsLog(arts)  # the next attempt's driver
    second.add({"kind": "train", "step": 20})
    second.flush(force=True)
    lines = arts.get_bytes("metrics.jsonl").decode().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [10, 20]


def test_metrics_log_of_a_new_job_starts_empty(tmp_path):
    log = MetricsLog(JobArtifacts(LocalArtifactStore(tmp_path), "new"))
    assert log.lines == [] and not log.dirty
