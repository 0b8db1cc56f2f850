"""The API's read path of jobs (service/store/job_rows.py) and its reuse of rendered bodies
(api/job_bodies.py), on SQLite and PostgreSQL: the bytes are those FastAPI rendered from the ORM
job before, every change of the row shows in the next read whoever wrote it, and a tenant never
reads another's job. Metric pages, read as rows, are the ORM rendering to the byte too."""

from __future__ import annotations

import json
import sqlite3
import time

import httpx
import pytest
from pydantic import TypeAdapter

from api.job_bodies import JobBodies, metric_page
from api.routes.schemas import JobOut, JobPage, MetricPage
from service.artifacts import LocalArtifactStore
from service.job_service import JobService
from service.jobs import JobEvent, JobNotFound, JobState
from service.limits import Resources
from service.settings import Settings
from service.store.db import Database
from service.store.repo import Store

pytestmark = pytest.mark.integration

SPEC = {"name": "j", "model": {"name": "mlp"}, "data": {"name": "digits"}, "parallel": {"workers": 2}}


def make_service(url, tmp_path, fake_ray) -> JobService:
    db = Database(url)
    db.upgrade()
    settings = Settings(data_dir=tmp_path, database_url=url, driver_python="py")
    return JobService(settings, Store(db), fake_ray, LocalArtifactStore(tmp_path / "artifacts"))


@pytest.fixture
def svc(database_url, tmp_path, fake_ray):
    s = make_service(database_url, tmp_path, fake_ray)
    yield s
    s.store.db.dispose()


def submit(svc, tenant="t", **over) -> str:
    job, _ = svc.submit(tenant, json.dumps({**SPEC, **over}).encode())
    return job.id


def orm_body(svc, job_id) -> bytes:
    """What `GET /v1/jobs/{id}` answered before: FastAPI's rendering of JobOut.of(ORM job)."""
    ta = TypeAdapter(JobOut)
    return ta.dump_json(ta.validate_python(JobOut.of(svc.store.get_job(job_id))), by_alias=True)


def body(svc, bodies, tenant, job_id) -> dict:
    # as GET /v1/jobs/{id} reads: on the event-loop engine where there is one (a SQLite file)
    return json.loads(bodies.body(svc.job_row(tenant, job_id, inline=True)))


def test_the_body_is_the_orm_rendering_to_the_byte_in_every_state(svc):
    bodies = JobBodies()
    job_id = submit(svc, name="bytes", priority=3, train={"lr": 0.1, "epochs": 2})
    assert bodies.body(svc.job_row("t", job_id)) == orm_body(svc, job_id)
    job = svc.store.get_job(job_id)
    svc.store.admit(job, f"{job_id}-1", Resources(2, 0))
    svc.store.transition(job_id, JobEvent.START, reason="running")
    svc.store.ingest(job_id, 0, [{"kind": "train", "step": 5, "loss": 0.25, "lr": 0.1, "note": [1]}])
    assert bodies.body(svc.job_row("t", job_id)) == orm_body(svc, job_id)
    svc.store.transition(job_id, JobEvent.FAIL, error=("training_failed", "boom ✗"), reason="failed")
    got = bodies.body(svc.job_row("t", job_id))
    assert got == orm_body(svc, job_id)
    assert json.loads(got)["error"] == {"code": "training_failed", "message": "boom ✗"}


def test_every_kind_of_write_shows_in_the_next_read(svc):
    bodies = JobBodies()
    job_id = submit(svc)
    first = body(svc, bodies, "t", job_id)
    assert first["state"] == "queued" and bodies.misses == 1
    assert body(svc, bodies, "t", job_id) == first and bodies.hits == 1  # unchanged row: reused

    svc.store.set_reason(job_id, "waiting behind 3 jobs")  # no version bump
    assert body(svc, bodies, "t", job_id)["reason"] == "waiting behind 3 jobs"

    job = svc.store.get_job(job_id)
    svc.store.admit(job, f"{job_id}-1", Resources(2, 0))
    after_admit = body(svc, bodies, "t", job_id)
    assert (after_admit["state"], after_admit["attempts"]) == ("starting", 1)

    svc.store.heartbeat(job_id, now=4_000_000_000.5)  # heartbeat only
    assert body(svc, bodies, "t", job_id)["heartbeat_at"] == "2096-10-02T07:06:40.500000Z"

    svc.store.transition(job_id, JobEvent.START)
    svc.store.ingest(job_id, 0, [{"kind": "train", "step": 7, "loss": 1.5}])  # progress only
    now = body(svc, bodies, "t", job_id)
    assert (now["state"], now["progress"]["step"], now["progress"]["loss"]) == ("running", 7, 1.5)
    svc.store.ingest(job_id, 1, [{"kind": "eval", "step": 8, "val_accuracy": 0.5}])
    assert body(svc, bodies, "t", job_id)["progress"]["val_accuracy"] == 0.5

    svc.cancel("t", job_id)
    assert body(svc, bodies, "t", job_id)["state"] == "cancelled"


def test_another_tenant_never_reads_the_job(svc):
    bodies = JobBodies()
    job_id = submit(svc, tenant="alice")
    body(svc, bodies, "alice", job_id)  # rendered and kept: the check still runs first
    with pytest.raises(JobNotFound):
        svc.job_row("bob", job_id)
    with pytest.raises(JobNotFound):
        svc.job_row("alice", "20990101-000000-deadbeef")
    assert svc.job_rows("bob", None, None, 50).items == []


def test_two_services_on_one_database_see_each_others_writes(database_url, tmp_path, fake_ray):
    a = make_service(database_url, tmp_path / "a", fake_ray)
    b = make_service(database_url, tmp_path / "b", fake_ray)
    try:
        bodies_a, bodies_b = JobBodies(), JobBodies()
        job_id = submit(a)
        assert body(svc=b, bodies=bodies_b, tenant="t", job_id=job_id)["state"] == "queued"
        assert body(a, bodies_a, "t", job_id)["state"] == "queued"
        b.cancel("t", job_id)  # written through the other replica
        assert body(a, bodies_a, "t", job_id)["state"] == "cancelled"
        assert (
            json.loads(bodies_a.page(a.job_rows("t", None, None, 50, inline=True)).body)["items"][0]["state"]
            == "cancelled"
        )
        b.store.set_reason(job_id, "r2", state=JobState.CANCELLED)
        assert body(a, bodies_a, "t", job_id)["reason"] == "r2"
    finally:
        a.store.db.dispose()
        b.store.db.dispose()


@pytest.mark.parametrize("states", [None, ["queued"], ["cancelled"], ["queued", "cancelled", "queued"]])
def test_pages_are_the_store_pages_to_the_byte(svc, states):
    ids = [submit(svc, name=f"p{i}") for i in range(7)]
    svc.cancel("t", ids[2])
    svc.cancel("t", ids[5])
    submit(svc, tenant="other")
    bodies, ta = JobBodies(), TypeAdapter(JobPage)
    cursor, seen = None, []
    while True:
        rows = svc.job_rows("t", states, cursor, 3, inline=True)
        orm = svc.store.list_jobs("t", list(dict.fromkeys(states)) if states else None, cursor, 3)
        assert [r.id for r in rows.items] == [j.id for j in orm.items]
        assert rows.next_cursor == orm.next_cursor
        want = JobPage(items=[JobOut.of(j) for j in orm.items], next_cursor=orm.next_cursor)
        assert bodies.page(rows).body == ta.dump_json(ta.validate_python(want), by_alias=True)
        seen += [r.id for r in rows.items]
        if rows.next_cursor is None:
            break
        cursor = rows.next_cursor
    expected = [
        i for i in reversed(ids) if states is None or (i in (ids[2], ids[5])) == ("cancelled" in states)
    ]
    if states == ["queued", "cancelled", "queued"]:
        expected = list(reversed(ids))
    assert seen == expected


def test_the_cache_is_bounded(svc):
    bodies = JobBodies(size=2)
    ids = [submit(svc, name=f"b{i}") for i in range(3)]
    for i in ids:
        bodies.body(svc.job_row("t", i))
    assert list(bodies._cache) == ids[1:]


def test_the_event_loop_engine_is_sqlite_files_only_and_never_writes(database_url, tmp_path, fake_ray):
    svc = make_service(database_url, tmp_path, fake_ray)
    try:
        db = svc.store.db
        if not db.is_sqlite:  # PostgreSQL's reads cross a socket: never on the loop
            assert db.inline is None
            return
        conn = db.inline.raw_connection()
        try:
            with pytest.raises(sqlite3.OperationalError, match="readonly"):
                conn.cursor().execute("DELETE FROM jobs")
            assert conn.cursor().execute("PRAGMA busy_timeout").fetchone() == (0,)
        finally:
            conn.close()
    finally:
        svc.store.db.dispose()
    assert Database("sqlite:///:memory:").inline is None  # one database per connection


def test_postgres_reads_run_in_autocommit_and_outlive_a_server_closing_their_connections(
    postgres_url, tmp_path, fake_ray
):
    """PostgreSQL's read engine (service.store.db._pg_read_engine) runs each SELECT in autocommit
    and does not ping before it. A read that meets connections the server has closed (here:
    pg_terminate_backend on every idle one in the pool, as a server restart or an idle timeout
    leaves them) drops each and answers from a new one; the same read without the retry fails."""
    svc = make_service(postgres_url, tmp_path, fake_ray)
    try:
        db = svc.store.db
        job_id = submit(svc)
        held = [db.reads.raw_connection() for _ in range(3)]  # three idle in the pool after this
        assert all(c.dbapi_connection.autocommit for c in held)
        for c in held:
            c.close()
        others = "FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"
        # autocommit: inside a transaction, pg_stat_activity stays what it was when first read
        with db.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as admin:
            assert admin.exec_driver_sql(f"SELECT count(pg_terminate_backend(pid)) {others}").scalar() >= 3
            deadline = time.monotonic() + 30
            while admin.exec_driver_sql(f"SELECT count(*) {others}").scalar():  # they end in their time
                assert time.monotonic() < deadline, "terminated backends still there after 30 s"
                time.sleep(0.05)
        assert db.reads.pool.checkedin() == 3  # what the next read meets first: all closed
        assert svc.job_row("t", job_id).id == job_id
        page = svc.metric_page("t", job_id, -1, None, 10)
        assert page.items == []
    finally:
        svc.store.db.dispose()


def test_the_read_path_works_on_an_in_memory_database(tmp_path, fake_ray):
    """An in-memory SQLite database has one connection per thread (SingletonThreadPool), no
    pool of a size to retry over: the reads of jobs, metric pages and events run on it."""
    svc = make_service("sqlite:///:memory:", tmp_path, fake_ray)
    try:
        job_id = submit(svc)
        assert svc.job_row("t", job_id).id == job_id
        assert svc.metric_page("t", job_id, -1, None, 10).items == []
        assert [type_ for _, type_, _ in svc.store.event_texts(job_id, -1)] == ["state"]
    finally:
        svc.store.db.dispose()


def test_get_job_reads_on_the_loop_and_waits_off_it_when_sqlite_is_locked(tmp_path, monkeypatch):
    """On SQLite, GET /v1/jobs/{id} and the job list read on the event loop (api.deps.read_db):
    they answer with the request threads out of service. A read the inline engine cannot make
    at once (sqlite3's "database is locked", stood in for here: a lock held by another process
    is what it meets) is redone on the request threads, and the answer is the same."""
    from concurrent.futures import ThreadPoolExecutor

    from api.app import create_app
    from service.store.job_rows import JobRows
    from tests.plugins.fake_ray import FakeRay
    from tests.plugins.server import serve_app

    token = "reads-token-0123456789ab"
    settings = Settings(
        data_dir=tmp_path, database_url=f"sqlite:///{tmp_path / 'db.sqlite'}", api_tokens=f"{token}:t"
    )
    app = create_app(settings, ray=FakeRay(cpu=1000), artifacts=LocalArtifactStore(tmp_path / "a"))
    with (
        serve_app(app) as url,
        httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=30) as c,
    ):
        job_id = c.post("/v1/jobs", json=SPEC).json()["id"]
        pool = app.state.db_pool

        class Closed(ThreadPoolExecutor):
            def submit(self, *a, **kw):
                raise AssertionError("a job read went to the request threads")

        app.state.db_pool = Closed(1)
        assert c.get(f"/v1/jobs/{job_id}").json()["id"] == job_id
        assert [j["id"] for j in c.get("/v1/jobs").json()["items"]] == [job_id]
        app.state.db_pool = pool

        locked = []
        real_get = JobRows.get

        def get(self, job_id, inline=False):
            if inline:
                locked.append(job_id)
                raise sqlite3.OperationalError("database is locked")
            return real_get(self, job_id, inline)

        monkeypatch.setattr(JobRows, "get", get)
        r = c.get(f"/v1/jobs/{job_id}")
        assert r.status_code == 200 and r.json()["id"] == job_id and locked == [job_id]
        assert c.get("/v1/jobs/20990101-000000-deadbeef").status_code == 404  # not found stays 404


def orm_metric_page(svc, job_id, after, kinds, limit) -> bytes:
    """What `GET /v1/jobs/{id}/metrics` answered before: FastAPI's rendering of the ORM records."""
    page = svc.store.metrics(job_id, after, kinds, limit)
    items = [{"seq": m.seq, "kind": m.kind, "step": m.step, "data": m.data} for m in page.items]
    ta = TypeAdapter(MetricPage)
    return ta.dump_json(ta.validate_python({"items": items, "next_cursor": page.next_cursor}), by_alias=True)


def test_a_metric_page_is_the_orm_rendering_to_the_byte(svc):
    job_id = submit(svc, name="metrics")
    records = [
        {"kind": "train", "step": 1, "loss": 0.25, "lr": 1e-3, "sparsity": {"fc1.weight": 0.5}},
        {"kind": "eval", "step": 1, "val_accuracy": 0.9, "note": "naïve ✓"},
        {"kind": "train", "step": 2, "loss": float("nan"), "grad_norm": float("inf")},
        {"kind": "phase", "phase": "exporting"},
        {"event": "start", "resumed_from": None, "ranks": [0, 1]},
    ]
    svc.store.ingest(job_id, 0, records)
    for after, kinds, limit in [
        (-1, None, 1000),
        (-1, None, 2),
        (1, None, 2),
        (3, None, 2),
        (-1, ["train"], 1000),
        (-1, ["train", "eval"], 1),
        (0, ["train", "eval", "train"], 1000),
        (-1, ["event"], 1000),
        (4, None, 10),
    ]:
        got = metric_page(svc.metric_page("t", job_id, after, kinds, limit)).body
        assert got == orm_metric_page(svc, job_id, after, kinds, limit), (after, kinds, limit)
    nan = json.loads(metric_page(svc.metric_page("t", job_id, 1, None, 1)).body)["items"][0]["data"]
    assert nan["loss"] is None and nan["grad_norm"] is None  # as before: JSON has no NaN
    with pytest.raises(JobNotFound):
        svc.metric_page("other", job_id, -1, None, 10)


def test_records_with_nan_and_infinity_are_stored_on_every_database(svc):
    """A diverged job's records hold NaN: PostgreSQL's json refused the whole batch, so none of
    its records was ever stored there. Now each such number is stored as null, as the API
    already rendered it."""
    job_id = submit(svc, name="diverged")
    rec = {
        "kind": "train",
        "step": 3,
        "loss": float("nan"),
        "hist": [1.0, float("-inf")],
        "g": {"n": float("inf")},
    }
    assert svc.store.ingest(job_id, 0, [rec])
    want = {"kind": "train", "step": 3, "loss": None, "hist": [1.0, None], "g": {"n": None}}
    assert [m.data for m in svc.store.metrics(job_id).items] == [want]
    (data,) = [json.loads(d) for _, type_, d in svc.store.event_texts(job_id, 0) if type_ == "metric"]
    assert data == {**want, "seq": 0}
