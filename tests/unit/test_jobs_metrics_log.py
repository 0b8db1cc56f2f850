"""A resubmitted driver continues its job's metrics.jsonl instead of starting it over: the API has
ingested lines by number, and earlier attempts' records belong to the job's series."""

from __future__ import annotations

import json

from service.artifacts import JobArtifacts, LocalArtifactStore
from workers.metrics_log import MetricsLog
from workers.relay import RelayBuffer


def test_metrics_log_continues_an_existing_series(tmp_path):
    arts = JobArtifacts(LocalArtifactStore(tmp_path), "job")
    first = MetricsLog(arts)
    first.add({"kind": "train", "step": 10})
    first.flush(force=True)
    second = MetricsLog(arts)  # the next attempt's driver
    second.add({"kind": "train", "step": 20})
    second.close()  # the parts, then the whole series as metrics.jsonl
    lines = arts.get_bytes("metrics.jsonl").decode().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [10, 20]


def test_metrics_log_of_a_new_job_starts_empty(tmp_path):
    log = MetricsLog(JobArtifacts(LocalArtifactStore(tmp_path), "new"))
    assert log.lines == [] and not log.dirty


def test_relay_asks_for_durability_only_while_a_checkpoint_waits():
    """The handshake behind "records before a checkpoint are durable before it": mark() asks,
    drain() passes the request on, ack() answers it."""
    relay = RelayBuffer()
    relay.push([{"step": 1}, {"step": 2}])
    assert relay.drain() == ([{"step": 1}, {"step": 2}], False)  # nobody waits: flush at leisure
    relay.push([{"step": 3}])
    assert relay.mark() == 3  # a checkpoint waits for all three
    assert relay.durable_count() == 0
    assert relay.drain() == ([{"step": 3}], True)
    assert relay.drain() == ([], True)  # still owed until the driver acknowledges
    relay.ack(3)
    assert relay.durable_count() == 3
    assert relay.drain() == ([], False)
    relay.push([{"step": 4}])
    relay.ack(2)  # a late, smaller acknowledgement never lowers the count
    assert relay.durable_count() == 3
    assert relay.drain() == ([{"step": 4}], False)
