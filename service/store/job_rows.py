"""The read path the API serves jobs from: `GET /v1/jobs/{id}`, the job list and a job's metric
records (`GET /v1/jobs/{id}/metrics`), and the events its SSE streams send.

One SELECT on a pooled DBAPI connection, with no ORM session, no SQLAlchemy `Connection` and
no transaction of our own around it (measured in bench/api: the ORM's `Session.get` costs
~540 us of CPU per job on SQLite, this ~30 us). A single statement reads one committed state
(SQLite in WAL mode, PostgreSQL in autocommit), the newest at the time it runs, so a change
committed by any process on the database shows in the next read.

The JSON columns come back as their text, undecoded: a `JobRow` is the row exactly as stored,
so two equal rows are the same job to the byte, which is what lets the API reuse a rendered
body (api/job_bodies.py) after checking it against the database on every request.

A read is a generator (`Read`): it yields each (statement, parameters) it needs and gets back
their rows, so one piece of logic (which statements, what the rows mean) serves every way the
API runs it: `run` here, on the calling thread (SQLite on the event loop or a request thread),
and `AsyncReads.run` on PostgreSQL's async pool on the event loop (service/store/async_reads.py)."""

from __future__ import annotations

import json
from collections.abc import Generator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from sqlalchemy import JSON, Select, String, Text, and_, any_, bindparam, cast, or_, select
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.pool import QueuePool

from service.store.db import Database
from service.store.models import Event, Job, Metric

_T = Job.__table__
_M = Metric.__table__
_E = Event.__table__
# Every column, in table order; JSON ones as their stored text (CAST is a no-op on SQLite, and
# PostgreSQL's `json`, the type of these columns, keeps its input text as it was written).
_COLUMNS = [cast(c, Text).label(c.name) if isinstance(c.type, JSON) else c for c in _T.c]
NAMES = tuple(c.name for c in _T.c)
_JSON = frozenset(c.name for c in _T.c if isinstance(c.type, JSON))
_INDEX = {name: i for i, name in enumerate(NAMES)}

T = TypeVar("T")
Query = tuple["Statement", dict[str, Any]]
Read = Generator[Query, list, T]  # yields what it reads, gets the rows back, returns its result


def run(read: Read[T], inline: bool = False) -> T:
    """Run `read` on this thread. `inline`: on the database's event-loop engine, as in
    `Statement.rows`."""
    try:
        stmt, params = next(read)
        while True:
            stmt, params = read.send(stmt.rows(params, inline))
    except StopIteration as done:
        return done.value


@dataclass(frozen=True, slots=True)
class JobRow:
    """One `jobs` row as the database holds it (`values` in the order of `NAMES`)."""

    values: tuple

    @property
    def id(self) -> str:
        return self.values[_INDEX["id"]]

    @property
    def tenant_id(self) -> str:
        return self.values[_INDEX["tenant_id"]]

    @property
    def created_at(self) -> float:
        return self.values[_INDEX["created_at"]]

    def job(self) -> Job:
        """The row as a detached `Job` (JSON columns decoded), for rendering; never to be added
        to a session."""
        kw: dict[str, Any] = {}
        for name, v in zip(NAMES, self.values, strict=True):
            kw[name] = json.loads(v) if name in _JSON and v is not None else v
        return Job(**kw)


@dataclass(frozen=True, slots=True)
class Batch:
    """How reads of one statement that run at the same time can share one query: `many` takes
    the list of their `key` parameters as its `keys` parameter and returns the rows of them all;
    a row answers the read whose key is in its column `column`. Used where a round trip costs
    more than the rows (PostgreSQL on the event loop: service/store/read_batches.py)."""

    many: Statement
    key: str
    column: int


class Statement:
    """A SELECT compiled once for the engine's dialect, run on a raw pooled DBAPI connection.
    `batch`: how concurrent runs of it may be answered by one query, where that pays."""

    def __init__(self, db: Database, stmt: Select, batch: Batch | None = None):
        self.db, self.batch = db, batch
        compiled = stmt.compile(dialect=db.engine.dialect, compile_kwargs={"render_postcompile": True})
        self.compiled, self.sql = compiled, str(compiled)
        self.positional = tuple(compiled.positiontup) if compiled.positional else None

    def args(self, params: dict[str, Any]) -> tuple | dict[str, Any]:
        """The DBAPI's parameters for `params`, in the dialect's paramstyle."""
        values = self.compiled.construct_params(params)  # adds what the dialect bound itself (OFFSET 0)
        return tuple(values[k] for k in self.positional) if self.positional is not None else values

    def rows(self, params: dict[str, Any], inline: bool = False) -> list[tuple]:
        """`inline`: on the database's event-loop engine (`Database.inline`), which fails with
        sqlite3.OperationalError rather than wait for a lock."""
        args = self.args(params)
        engine = self.db.inline if inline and self.db.inline is not None else self.db.reads
        # PostgreSQL's read engine does not ping a connection before use (db._pg_read_engine): a
        # read that finds its connection closed (a server restart, an idle timeout) drops it and
        # runs on the next. Each such failure is immediate, and the pool holds at most its size
        # of them; once it is empty the pool connects anew, and a server that is down fails that.
        pool = engine.pool
        tries = pool.size() + 2 if isinstance(pool, QueuePool) else 1  # in-memory SQLite: one connection
        for attempt in range(1, tries + 1):
            conn = engine.raw_connection()
            try:
                cur = conn.cursor()
                try:
                    cur.execute(self.sql, args)
                    return cur.fetchall()
                finally:
                    cur.close()
            except engine.dialect.loaded_dbapi.Error as e:
                if attempt == tries or not engine.dialect.is_disconnect(e, conn.dbapi_connection, None):
                    raise
                conn.invalidate(e)
            finally:
                conn.close()  # back to the pool (an invalidated one is discarded)
        raise AssertionError("unreachable: the last try returns or raises")


class JobRows:
    """`jobs` rows by id and by page, as the job list pages them (repo.Store.list_jobs)."""

    def __init__(self, db: Database):
        self.db = db
        batch = None
        if not db.is_sqlite:  # `= ANY(array)`: PostgreSQL's; SQLite's reads cost no round trip
            keys = bindparam("keys", type_=ARRAY(String))
            batch = Batch(Statement(db, select(*_COLUMNS).where(_T.c.id == any_(keys))), "id", _INDEX["id"])
        self._by_id = Statement(db, select(*_COLUMNS).where(_T.c.id == bindparam("id")), batch)
        self._pages: dict[tuple[int, bool], Statement] = {}

    def get(self, job_id: str) -> Read[JobRow | None]:
        rows = yield self._by_id, {"id": job_id}
        return JobRow(tuple(rows[0])) if rows else None

    def page(
        self,
        tenant: str,
        states: Sequence[str] | None,
        after: tuple[float, str] | None,
        limit: int,
    ) -> Read[list[JobRow]]:
        """Up to `limit` rows of the tenant, newest first (created_at, id), after the job `after`
        names; the same order and keyset condition as Store.list_jobs."""
        states = list(dict.fromkeys(states or ()))
        params: dict[str, Any] = {"tenant": tenant, "limit": limit}
        params.update({f"state_{i}": s for i, s in enumerate(states)})
        if after is not None:
            params["after_created"], params["after_id"] = after
        rows = yield self._page_statement(len(states), after is not None), params
        return [JobRow(tuple(r)) for r in rows]

    def _page_statement(self, n_states: int, has_cursor: bool) -> Statement:
        key = (n_states, has_cursor)
        if key not in self._pages:  # at most 2 x (number of states + 1) shapes
            q = select(*_COLUMNS).where(_T.c.tenant_id == bindparam("tenant"))
            if n_states:
                q = q.where(or_(*(_T.c.state == bindparam(f"state_{i}") for i in range(n_states))))
            if has_cursor:
                created, last = bindparam("after_created"), bindparam("after_id")
                q = q.where(or_(_T.c.created_at < created, and_(_T.c.created_at == created, _T.c.id < last)))
            q = q.order_by(_T.c.created_at.desc(), _T.c.id.desc()).limit(bindparam("limit"))
            self._pages[key] = Statement(self.db, q)
        return self._pages[key]


class MetricRows:
    """A job's metric records as (seq, kind, step, data as its stored JSON text), a page at a
    time in the order and with the cursor of Store.metrics. Without ORM objects: building one per
    record held the GIL beside the event loop that serves GET /v1/jobs/{id}, whose tail under
    many dashboards this shortened (bench/README.md, "Load and soak")."""

    def __init__(self, db: Database):
        self.db = db
        self._pages: dict[int, Statement] = {}

    def page(self, job_id: str, after: int, kinds: Sequence[str] | None, limit: int) -> Read[list[tuple]]:
        kinds = list(dict.fromkeys(kinds or ()))
        params: dict[str, Any] = {"job": job_id, "after": after, "limit": limit}
        params.update({f"kind_{i}": k for i, k in enumerate(kinds)})
        return (yield self._statement(len(kinds)), params)

    def _statement(self, n_kinds: int) -> Statement:
        if n_kinds not in self._pages:  # one shape per number of kinds asked for (at most 3)
            q = select(_M.c.seq, _M.c.kind, _M.c.step, cast(_M.c.data, Text)).where(
                _M.c.job_id == bindparam("job"), _M.c.seq > bindparam("after")
            )
            if n_kinds:
                q = q.where(or_(*(_M.c.kind == bindparam(f"kind_{i}") for i in range(n_kinds))))
            self._pages[n_kinds] = Statement(self.db, q.order_by(_M.c.seq).limit(bindparam("limit")))
        return self._pages[n_kinds]


class EventRows:
    """A job's events after a seq as (seq, type, data as its stored JSON text), oldest first: what
    the SSE streams send (api/sse.py), without an ORM session or a JSON decoding per event."""

    def __init__(self, db: Database):
        q = select(_E.c.seq, _E.c.type, cast(_E.c.data, Text)).where(
            _E.c.job_id == bindparam("job"), _E.c.seq > bindparam("after")
        )
        self._after = Statement(db, q.order_by(_E.c.seq).limit(bindparam("limit")))

    def after(self, job_id: str, after: int, limit: int) -> list[tuple[int, str, str]]:
        return self._after.rows({"job": job_id, "after": after, "limit": limit})  # DBAPI rows: tuples
