"""The metrics stream as append-only parts (workers.metrics_log, service.ingest): a resumed
driver continues the series without repeating or losing a record, the API reads each part
once from where it stopped (after a restart too), on a local folder and on S3."""

from __future__ import annotations

import json

import pytest

from service.artifacts import JobArtifacts, LocalArtifactStore
from service.ingest import Ingester
from service.records import METRICS, PARTS, list_parts, part_first, part_name
from service.store.db import Database
from service.store.repo import NewJob, Store
from workers.metrics_log import MetricsLog


class CountingStore(LocalArtifactStore):
    """A local store that counts what is read and listed: the proof that a tick reads only what
    is new."""

    def __init__(self, root):
        super().__init__(root)
        self.read_bytes = 0
        self.lists = 0

    def get_bytes(self, key):
        data = super().get_bytes(key)
        self.read_bytes += len(data)
        return data

    def list(self, prefix):
        self.lists += 1
        return super().list(prefix)


@pytest.fixture(params=["local", "s3"])
def artifacts(request, tmp_path):
    if request.param == "local":
        return CountingStore(tmp_path / "artifacts")
    server = request.getfixturevalue("s3_server")
    return server.store(server.new_bucket())


@pytest.fixture
def store(tmp_path):
    db = Database(f"sqlite:///{tmp_path / 'slimtrain.db'}")
    db.upgrade()
    s = Store(db)
    s.create_job(NewJob("job", "t", "j", {"name": "j"}, 0, 1))
    yield s
    db.dispose()


def steps(store: Store) -> list[int]:
    return [m.data["step"] for m in store.metrics("job", limit=10_000).items]


def write(log: MetricsLog, first: int, n: int) -> None:
    for step in range(first, first + n):
        log.add({"kind": "train", "step": step})
    log.flush(force=True)


def test_part_names_sort_in_sequence_order():
    assert part_name(0) == "metrics/part-000000000.jsonl"
    assert part_first(part_name(1234)) == 1234
    assert part_first("metrics.jsonl") is None and part_first("metrics/part-x.jsonl") is None
    assert sorted(part_name(n) for n in (10, 9, 100)) == [part_name(9), part_name(10), part_name(100)]


def test_each_flush_writes_only_the_new_records_once(artifacts):
    arts = JobArtifacts(artifacts, "job")
    log = MetricsLog(arts, interval=3600)
    write(log, 0, 3)
    log.add({"kind": "train", "step": 3})
    log.flush()  # within the interval: nothing written
    assert [first for first, _ in list_parts(arts)] == [0]
    log.flush(force=True)
    write(log, 4, 2)
    parts = list_parts(arts)
    assert [first for first, _ in parts] == [0, 3, 4]
    assert [len(arts.get_bytes(name).splitlines()) for _, name in parts] == [3, 1, 2]
    assert not arts.exists(METRICS)  # the artifact is written when the driver ends
    log.close()
    assert [json.loads(x)["step"] for x in arts.get_bytes(METRICS).splitlines()] == list(range(6))


def test_a_resumed_driver_continues_the_series_without_repeats(artifacts, store):
    arts = JobArtifacts(artifacts, "job")
    ingester = Ingester(store, artifacts)
    first = MetricsLog(arts)
    write(first, 0, 5)  # flushed before the checkpoint: durable
    first.add({"kind": "train", "step": 5})  # never flushed: the attempt dies here
    assert ingester.ingest_job("job") == 5
    second = MetricsLog(arts)  # the next attempt's driver
    assert len(second.lines) == 5 and not second.dirty
    write(second, 5, 3)
    assert ingester.ingest_job("job") == 3
    second.close()
    assert steps(store) == list(range(8))
    assert [m.seq for m in store.metrics("job").items] == list(range(8))
    assert len(arts.get_bytes(METRICS).splitlines()) == 8


def test_the_ingester_reads_from_the_stored_count_and_nothing_twice(tmp_path, store):
    artifacts = CountingStore(tmp_path / "artifacts")
    arts = JobArtifacts(artifacts, "job")
    log = MetricsLog(arts)
    ingester = Ingester(store, artifacts)
    write(log, 0, 100)
    assert ingester.ingest_job("job") == 100
    read, artifacts.lists = artifacts.read_bytes, 0
    assert ingester.ingest_job("job") == 0  # nothing new: one missed read, no listing
    assert artifacts.read_bytes == read and artifacts.lists == 0
    write(log, 100, 2)
    assert ingester.ingest_job("job") == 2
    assert artifacts.read_bytes - read == len(arts.get_bytes(part_name(100)))  # the new part alone
    assert artifacts.lists == 0
    # A second ingester (another replica, or this one restarted) stores nothing twice.
    other = Ingester(store, artifacts)
    assert other.ingest_job("job") == 0
    write(log, 102, 1)
    assert other.ingest_job("job") == 1 and ingester.ingest_job("job") == 0
    assert steps(store) == list(range(103))


def test_a_restarted_api_finds_its_place_with_one_listing(tmp_path, store):
    artifacts = CountingStore(tmp_path / "artifacts")
    log = MetricsLog(JobArtifacts(artifacts, "job"))
    write(log, 0, 4)
    write(log, 4, 4)
    assert Ingester(store, artifacts).ingest_job("job") == 8
    artifacts.lists = 0
    restarted = Ingester(store, artifacts)
    assert restarted.ingest_job("job") == 0 and artifacts.lists == 1
    assert restarted.ingest_job("job") == 0 and artifacts.lists == 1  # it knows where part 8 starts
    write(log, 8, 1)
    assert restarted.ingest_job("job") == 1
    assert steps(store) == list(range(9))


def test_a_series_an_older_driver_wrote_as_metrics_jsonl_carries_on(artifacts, store):
    arts = JobArtifacts(artifacts, "job")
    arts.put_bytes(
        METRICS, b"".join(json.dumps({"kind": "train", "step": s}).encode() + b"\n" for s in range(3))
    )
    ingester = Ingester(store, artifacts)
    assert store.ingest("job", 0, [{"kind": "train", "step": 0}])  # the API had read one line of it
    log = MetricsLog(arts)  # a new driver resumes the job: the old series becomes the first part
    assert list_parts(arts) == [(0, part_name(0))]
    write(log, 3, 2)
    assert ingester.ingest_job("job") == 4
    assert steps(store) == list(range(5))
    assert arts.name_of(arts.list(PARTS)[0].key) == part_name(0)


def test_a_bad_line_in_a_part_keeps_its_sequence_number(tmp_path, store):
    artifacts = LocalArtifactStore(tmp_path / "artifacts")
    arts = JobArtifacts(artifacts, "job")
    arts.put_bytes(part_name(0), b'{"kind": "train", "step": 0}\n')
    arts.put_bytes(part_name(1), b'not json\n{"kind": "train", "step": 2}\n')
    assert Ingester(store, artifacts).ingest_job("job") == 3
    items = store.metrics("job").items
    assert [m.seq for m in items] == [0, 1, 2]
    assert items[1].data == {"kind": "event", "event": "invalid_record", "line": 1}
