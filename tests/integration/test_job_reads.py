"""The API's read path of jobs (service/store/job_rows.py) and its reuse of rendered bodies
(api/job_bodies.py), on SQLite and PostgreSQL: the bytes are those FastAPI rendered from the ORM
job before, every change of the row shows in the next read whoever wrote it, and a tenant never
reads another's job. Metric pages, read as rows, are the ORM rendering to the byte too."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from fastapi import FastAPI
from pydantic import TypeAdapter

from api.job_bodies import JobBodies, metric_page
from api.routes.schemas import JobOut, JobPage, MetricPage
from service.artifacts import LocalArtifactStore
from service.job_service import JobService
from service.jobs import JobEvent, JobNotFound, JobState
from service.limits import Resources
from service.settings import Settings
from service.store.async_reads import AsyncReads
from service.store.db import Database
from service.store.job_rows import Statement, run
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


class Reads:
    """Runs a service read (a job_rows.Read) as the API can (api.deps.read_db): "thread" on the
    calling thread, as a request thread does; "loop" as the event loop does, on a SQLite file's
    inline engine or PostgreSQL's async pool (service/store/async_reads.py), one per database,
    on one event loop."""

    def __init__(self, how: str):
        self.how, self.runner, self.pools = how, asyncio.Runner(), {}

    def __call__(self, fn, *args):
        db = fn.__self__.store.db
        if self.how == "thread":
            return run(fn(*args))
        if db.is_sqlite:
            return run(fn(*args), inline=db.inline is not None)
        return self.runner.run(self.pool(db.url).run(fn(*args)))

    def pool(self, url: str) -> AsyncReads:
        if url not in self.pools:
            self.pools[url] = AsyncReads(url)
            self.runner.run(self.pools[url].open())
        return self.pools[url]

    def close(self) -> None:
        for reads in self.pools.values():
            self.runner.run(reads.close())
        self.runner.close()


@pytest.fixture(params=["thread", "loop"])
def read(request):
    reads = Reads(request.param)
    yield reads
    reads.close()


def body(read, svc, bodies, tenant, job_id) -> dict:
    return json.loads(bodies.body(read(svc.job_row, tenant, job_id)))


def test_the_body_is_the_orm_rendering_to_the_byte_in_every_state(svc, read):
    bodies = JobBodies()
    job_id = submit(svc, name="bytes", priority=3, train={"lr": 0.1, "epochs": 2})
    assert bodies.body(read(svc.job_row, "t", job_id)) == orm_body(svc, job_id)
    job = svc.store.get_job(job_id)
    svc.store.admit(job, f"{job_id}-1", Resources(2, 0))
    svc.store.transition(job_id, JobEvent.START, reason="running")
    svc.store.ingest(job_id, 0, [{"kind": "train", "step": 5, "loss": 0.25, "lr": 0.1, "note": [1]}])
    assert bodies.body(read(svc.job_row, "t", job_id)) == orm_body(svc, job_id)
    svc.store.transition(job_id, JobEvent.FAIL, error=("training_failed", "boom ✗"), reason="failed")
    got = bodies.body(read(svc.job_row, "t", job_id))
    assert got == orm_body(svc, job_id)
    assert json.loads(got)["error"] == {"code": "training_failed", "message": "boom ✗"}


def test_every_kind_of_write_shows_in_the_next_read(svc, read):
    bodies = JobBodies()
    job_id = submit(svc)
    first = body(read, svc, bodies, "t", job_id)
    assert first["state"] == "queued" and bodies.misses == 1
    assert body(read, svc, bodies, "t", job_id) == first and bodies.hits == 1  # unchanged row: reused

    svc.store.set_reason(job_id, "waiting behind 3 jobs")  # no version bump
    assert body(read, svc, bodies, "t", job_id)["reason"] == "waiting behind 3 jobs"

    job = svc.store.get_job(job_id)
    svc.store.admit(job, f"{job_id}-1", Resources(2, 0))
    after_admit = body(read, svc, bodies, "t", job_id)
    assert (after_admit["state"], after_admit["attempts"]) == ("starting", 1)

    svc.store.heartbeat(job_id, now=4_000_000_000.5)  # heartbeat only
    assert body(read, svc, bodies, "t", job_id)["heartbeat_at"] == "2096-10-02T07:06:40.500000Z"

    svc.store.transition(job_id, JobEvent.START)
    svc.store.ingest(job_id, 0, [{"kind": "train", "step": 7, "loss": 1.5}])  # progress only
    now = body(read, svc, bodies, "t", job_id)
    assert (now["state"], now["progress"]["step"], now["progress"]["loss"]) == ("running", 7, 1.5)
    svc.store.ingest(job_id, 1, [{"kind": "eval", "step": 8, "val_accuracy": 0.5}])
    assert body(read, svc, bodies, "t", job_id)["progress"]["val_accuracy"] == 0.5

    svc.cancel("t", job_id)
    assert body(read, svc, bodies, "t", job_id)["state"] == "cancelled"


def test_another_tenant_never_reads_the_job(svc, read):
    bodies = JobBodies()
    job_id = submit(svc, tenant="alice")
    body(read, svc, bodies, "alice", job_id)  # rendered and kept: the check still runs first
    with pytest.raises(JobNotFound):
        read(svc.job_row, "bob", job_id)
    with pytest.raises(JobNotFound):
        read(svc.job_row, "alice", "20990101-000000-deadbeef")
    assert read(svc.job_rows, "bob", None, None, 50).items == []


def test_two_services_on_one_database_see_each_others_writes(database_url, tmp_path, fake_ray, read):
    a = make_service(database_url, tmp_path / "a", fake_ray)
    b = make_service(database_url, tmp_path / "b", fake_ray)
    try:
        bodies_a, bodies_b = JobBodies(), JobBodies()
        job_id = submit(a)
        assert body(read, svc=b, bodies=bodies_b, tenant="t", job_id=job_id)["state"] == "queued"
        assert body(read, a, bodies_a, "t", job_id)["state"] == "queued"
        b.cancel("t", job_id)  # written through the other replica
        assert body(read, a, bodies_a, "t", job_id)["state"] == "cancelled"
        assert (
            json.loads(bodies_a.page(read(a.job_rows, "t", None, None, 50)).body)["items"][0]["state"]
            == "cancelled"
        )
        b.store.set_reason(job_id, "r2", state=JobState.CANCELLED)
        assert body(read, a, bodies_a, "t", job_id)["reason"] == "r2"
    finally:
        a.store.db.dispose()
        b.store.db.dispose()


@pytest.mark.parametrize("states", [None, ["queued"], ["cancelled"], ["queued", "cancelled", "queued"]])
def test_pages_are_the_store_pages_to_the_byte(svc, states, read):
    ids = [submit(svc, name=f"p{i}") for i in range(7)]
    svc.cancel("t", ids[2])
    svc.cancel("t", ids[5])
    submit(svc, tenant="other")
    bodies, ta = JobBodies(), TypeAdapter(JobPage)
    cursor, seen = None, []
    while True:
        rows = read(svc.job_rows, "t", states, cursor, 3)
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


def test_the_cache_is_bounded(svc, read):
    bodies = JobBodies(size=2)
    ids = [submit(svc, name=f"b{i}") for i in range(3)]
    for i in ids:
        bodies.body(read(svc.job_row, "t", i))
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


def terminate_other_connections(db: Database) -> int:
    """pg_terminate_backend on every other connection to the database, as a server restart or an
    idle timeout closes them; returns once the server has ended them all (how many it ended)."""
    others = "FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"
    # autocommit: inside a transaction, pg_stat_activity stays what it was when first read
    with db.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as admin:
        ended = admin.exec_driver_sql(f"SELECT count(pg_terminate_backend(pid)) {others}").scalar()
        deadline = time.monotonic() + 30
        while admin.exec_driver_sql(f"SELECT count(*) {others}").scalar():  # they end in their time
            assert time.monotonic() < deadline, "terminated backends still there after 30 s"
            time.sleep(0.05)
    return ended


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
        n = db.reads.pool.size()
        held = [db.reads.raw_connection() for _ in range(n)]  # n idle in the pool after this
        assert n >= 1 and all(c.dbapi_connection.autocommit for c in held)
        for c in held:
            c.close()
        assert terminate_other_connections(db) >= n
        assert db.reads.pool.checkedin() == n  # what the next read meets first: all closed
        assert run(svc.job_row("t", job_id)).id == job_id
        page = run(svc.metric_page("t", job_id, -1, None, 10))
        assert page.items == []
    finally:
        svc.store.db.dispose()


def test_postgres_loop_reads_run_in_autocommit_and_outlive_a_server_closing_their_connections(
    postgres_url, tmp_path, fake_ray
):
    """The same of the event loop's reads (service/store/async_reads.py): autocommit connections,
    no check before use, and a read that meets connections the server has closed answers from
    a new one; the same read without the retry fails."""
    svc = make_service(postgres_url, tmp_path, fake_ray)
    job_id = submit(svc)
    reads = AsyncReads(postgres_url)

    async def scenario():
        await reads.open()
        try:
            async with (
                reads.pool.connection() as a,
                reads.pool.connection() as b,
                reads.pool.connection() as c,
            ):
                assert a.autocommit and b.autocommit and c.autocommit
            assert await asyncio.to_thread(terminate_other_connections, svc.store.db) >= 3
            assert reads.pool.get_stats()["pool_available"] == 3  # what the next read meets: all closed
            row = await reads.run(svc.job_row("t", job_id))
            page = await reads.run(svc.metric_page("t", job_id, -1, None, 10))
            with pytest.raises(JobNotFound):
                await reads.run(svc.job_row("other", job_id))
            return row, page
        finally:
            await reads.close()

    try:
        row, page = asyncio.run(scenario())
        assert row.id == job_id and page.items == []
    finally:
        svc.store.db.dispose()


def test_postgres_loop_reads_at_the_same_time_share_queries_and_each_gets_its_own_job(
    postgres_url, tmp_path, fake_ray
):
    """Reads of jobs waiting on the loop together go out as one query (service/store/read_batches.py):
    each still gets its job's row as a read of its own would, another tenant's job and an unknown
    id are still not found, and a write committed between two rounds shows in the second."""
    svc = make_service(postgres_url, tmp_path, fake_ray)
    ids = [submit(svc, name=f"j{i}") for i in range(6)]
    theirs = submit(svc, tenant="other")
    reads = AsyncReads(postgres_url)
    sent: list[dict] = []
    query = reads.query

    async def counted(stmt, params):
        sent.append(params)
        return await query(stmt, params)

    reads.query = counted  # type: ignore[method-assign]
    want = ids * 5

    async def scenario():
        await reads.open()
        try:
            first = await asyncio.gather(*(reads.run(svc.job_row("t", j)) for j in want))
            svc.store.set_reason(ids[0], "changed between the rounds")
            again = await asyncio.gather(*(reads.run(svc.job_row("t", j)) for j in want))
            misses = await asyncio.gather(
                reads.run(svc.job_row("t", theirs)),
                reads.run(svc.job_row("t", "20990101-000000-deadbeef")),
                reads.run(svc.job_row("other", theirs)),
                return_exceptions=True,
            )
            return first, again, misses
        finally:
            await reads.close()

    try:
        first, again, misses = asyncio.run(scenario())
        alone = {j: run(svc.job_row("t", j)).values for j in ids}  # the thread path, one by one
        assert [r.values for r in again] == [alone[j] for j in want]
        assert [r.id for r in first] == want and first[1:6] == again[1:6]
        assert first[0].values != again[0].values
        assert again[0].job().reason == "changed between the rounds"
        assert [type(m) for m in misses[:2]] == [JobNotFound, JobNotFound] and misses[2].id == theirs
        batched = [p["keys"] for p in sent if "keys" in p]
        assert batched and max(len(k) for k in batched) == 6  # each job once per query
        assert len(sent) <= 2 * 4 + 3  # per round: one alone, then batches; not one query per read
    finally:
        svc.store.db.dispose()


def test_loop_reads_fail_after_their_wait_when_the_server_is_down():
    """No server where the URL points: the read fails with the pool's timeout once its wait is
    over; it neither hangs nor fails the pool's start (nothing listens on the discard port)."""
    from psycopg_pool import PoolTimeout

    from service.store.job_rows import JobRows

    url = "postgresql+psycopg://u@127.0.0.1:9/x"
    rows, reads = JobRows(Database(url)), AsyncReads(url, wait_s=0.5)

    async def scenario() -> float:
        await reads.open()
        try:
            t0 = time.monotonic()
            with pytest.raises(PoolTimeout):
                await reads.run(rows.get("20990101-000000-deadbeef"))
            return time.monotonic() - t0
        finally:
            await reads.close()

    assert 0.4 < asyncio.run(scenario()) < 5


def test_loop_reads_fail_while_postgresql_is_down_and_recover_once_it_is_back(tmp_path, fake_ray):
    """A server of its own, stopped at once as a crash would and started again: while it is
    down a loop read fails with the pool's timeout after its wait, not later; once it is back,
    reads answer again within seconds, through connections the pool makes anew."""
    from psycopg_pool import PoolTimeout

    from tests.plugins.postgres import start_postgres

    server = start_postgres()
    try:
        url = server.new_database()
        svc = make_service(url, tmp_path, fake_ray)
        job_id = submit(svc)
        reads = AsyncReads(url, wait_s=1.0)

        async def scenario() -> tuple[float, float]:
            await reads.open()
            try:
                await asyncio.gather(*(reads.run(svc.job_row("t", job_id)) for _ in range(4)))
                await asyncio.to_thread(server.halt)
                t0 = time.monotonic()
                with pytest.raises(PoolTimeout):
                    await reads.run(svc.job_row("t", job_id))
                failed_in = time.monotonic() - t0
                await asyncio.to_thread(server.start)
                up, deadline = time.monotonic(), time.monotonic() + 30
                while True:
                    try:
                        assert (await reads.run(svc.job_row("t", job_id))).id == job_id
                        return failed_in, time.monotonic() - up
                    except PoolTimeout:
                        assert time.monotonic() < deadline, "no read answered 30 s after the restart"
            finally:
                await reads.close()

        failed_in, recovered_in = asyncio.run(scenario())
        assert failed_in < 5 and recovered_in < 30
        svc.store.db.dispose()
    finally:
        server.stop()


def test_the_api_answers_503_while_postgresql_is_down_and_recovers_once_it_is_back(tmp_path):
    """A crashed database is an outage the client may wait out, not a fault of the request:
    while the server is down, reads (on the loop) and a submission (on the write engine) answer
    503 `database_unavailable` with a Retry-After, within the loop reads' wait; once the server
    is back the same requests answer as before, without restarting the API."""
    from service.store.async_reads import WAIT_S
    from tests.plugins.postgres import start_postgres

    server = start_postgres()
    try:
        with api_with_a_job(server.new_database(), tmp_path) as (_app, c, job_id):
            server.halt()
            for method, path in [("GET", f"/v1/jobs/{job_id}"), ("GET", "/v1/jobs"), ("POST", "/v1/jobs")]:
                t0 = time.monotonic()
                r = c.request(method, path, json=SPEC if method == "POST" else None)
                assert r.status_code == 503, (method, path, r.text)
                assert r.json()["error"]["code"] == "database_unavailable" and r.headers["Retry-After"]
                assert time.monotonic() - t0 < WAIT_S + 5, (method, path)
            server.start()
            deadline = time.monotonic() + 30
            while (r := c.get(f"/v1/jobs/{job_id}")).status_code != 200:
                assert r.status_code == 503 and time.monotonic() < deadline, r.text
                time.sleep(0.2)
            assert c.post("/v1/jobs", json=SPEC).status_code == 201
    finally:
        server.stop()


def test_on_postgres_the_api_reads_jobs_and_metrics_on_the_loop(postgres_url, tmp_path):
    """On PostgreSQL, GET /v1/jobs/{id}, the job list and a metric page read on the event loop
    through the app's async pool, opened and closed by its lifespan: they answer with the request
    threads out of service, and a job that is not there is still a 404."""
    with api_with_a_job(postgres_url, tmp_path) as (app, c, job_id):
        reads = app.state.async_reads
        assert reads is not None and not reads.pool.closed
        with without_request_threads(app):
            assert c.get(f"/v1/jobs/{job_id}").json()["id"] == job_id
            assert [j["id"] for j in c.get("/v1/jobs").json()["items"]] == [job_id]
            assert c.get(f"/v1/jobs/{job_id}/metrics").json() == {"items": [], "next_cursor": None}
            missing = c.get("/v1/jobs/20990101-000000-deadbeef")
            assert missing.status_code == 404 and missing.json()["error"]["code"] == "job_not_found"
    assert reads.pool.closed


@contextlib.contextmanager
def api_with_a_job(database_url: str, tmp_path) -> Iterator[tuple[FastAPI, httpx.Client, str]]:
    """The API served on `database_url` (Ray faked) with one job submitted: its app, a client of
    the job's tenant and the job's id."""
    from api.app import create_app
    from tests.plugins.fake_ray import FakeRay
    from tests.plugins.server import serve_app

    token = "reads-token-0123456789ab"
    settings = Settings(data_dir=tmp_path, database_url=database_url, api_tokens=f"{token}:t")
    app = create_app(settings, ray=FakeRay(cpu=1000), artifacts=LocalArtifactStore(tmp_path / "a"))
    with (
        serve_app(app) as url,
        httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=30) as c,
    ):
        yield app, c, c.post("/v1/jobs", json=SPEC).json()["id"]


@contextlib.contextmanager
def without_request_threads(app: FastAPI) -> Iterator[None]:
    """The app's request threads (api.deps.run_db) out of service: work sent there fails."""

    class Closed(ThreadPoolExecutor):
        def submit(self, *a, **kw):
            raise AssertionError("a job read went to the request threads")

    pool, app.state.db_pool = app.state.db_pool, Closed(1)
    try:
        yield
    finally:
        app.state.db_pool = pool


def test_an_api_process_opens_at_most_40_postgresql_connections():
    """README.md, "Several API replicas": 30 for writes and the loops, 8 for the reads on the
    event loop, 2 for the event streams' reads on threads (no connection is opened here)."""
    db = Database("postgresql+psycopg://u@127.0.0.1:9/x")
    writes, reads = (e.pool.size() + e.pool._max_overflow for e in (db.engine, db.reads))
    assert (writes, reads, AsyncReads("postgresql+psycopg://u@127.0.0.1:9/x").pool.max_size) == (30, 2, 8)


def test_the_read_path_works_on_an_in_memory_database(tmp_path, fake_ray):
    """An in-memory SQLite database has one connection per thread (SingletonThreadPool), no
    pool of a size to retry over: the reads of jobs, metric pages and events run on it."""
    svc = make_service("sqlite:///:memory:", tmp_path, fake_ray)
    try:
        job_id = submit(svc)
        assert run(svc.job_row("t", job_id)).id == job_id
        assert run(svc.metric_page("t", job_id, -1, None, 10)).items == []
        assert [type_ for _, type_, _ in svc.store.event_texts(job_id, -1)] == ["state"]
    finally:
        svc.store.db.dispose()


def test_get_job_reads_on_the_loop_and_waits_off_it_when_sqlite_is_locked(tmp_path, monkeypatch):
    """On SQLite, GET /v1/jobs/{id} and the job list read on the event loop (api.deps.read_db):
    they answer with the request threads out of service. A read the inline engine cannot make
    at once (sqlite3's "database is locked", stood in for here: a lock held by another process
    is what it meets) is redone on the request threads, and the answer is the same."""
    with api_with_a_job(f"sqlite:///{tmp_path / 'db.sqlite'}", tmp_path) as (app, c, job_id):
        with without_request_threads(app):
            assert c.get(f"/v1/jobs/{job_id}").json()["id"] == job_id
            assert [j["id"] for j in c.get("/v1/jobs").json()["items"]] == [job_id]

        locked = []
        real_rows = Statement.rows

        def rows(self, params, inline=False):
            if inline:
                locked.append(params.get("id"))
                raise sqlite3.OperationalError("database is locked")
            return real_rows(self, params, inline)

        monkeypatch.setattr(Statement, "rows", rows)
        r = c.get(f"/v1/jobs/{job_id}")
        assert r.status_code == 200 and r.json()["id"] == job_id and locked == [job_id]
        assert c.get("/v1/jobs/20990101-000000-deadbeef").status_code == 404  # not found stays 404


def orm_metric_page(svc, job_id, after, kinds, limit) -> bytes:
    """What `GET /v1/jobs/{id}/metrics` answered before: FastAPI's rendering of the ORM records."""
    page = svc.store.metrics(job_id, after, kinds, limit)
    items = [{"seq": m.seq, "kind": m.kind, "step": m.step, "data": m.data} for m in page.items]
    ta = TypeAdapter(MetricPage)
    return ta.dump_json(ta.validate_python({"items": items, "next_cursor": page.next_cursor}), by_alias=True)


def test_a_metric_page_is_the_orm_rendering_to_the_byte(svc, read):
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
        got = metric_page(read(svc.metric_page, "t", job_id, after, kinds, limit)).body
        assert got == orm_metric_page(svc, job_id, after, kinds, limit), (after, kinds, limit)
    nan = json.loads(metric_page(read(svc.metric_page, "t", job_id, 1, None, 1)).body)["items"][0]["data"]
    assert nan["loss"] is None and nan["grad_norm"] is None  # as before: JSON has no NaN
    with pytest.raises(JobNotFound):
        read(svc.metric_page, "other", job_id, -1, None, 10)


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
