"""PostgreSQL's reads of the API's read path (service/store/job_rows.py) on the event loop,
through psycopg's async connections and its pool (psycopg_pool).

Why: a PostgreSQL read crosses a socket, so on a request thread it cost the hand-off to the
thread and back, the GIL that thread and the event loop then share, and SQLAlchemy's pool
checkout, for a SELECT that the server answers in tens of microseconds; GET /v1/jobs/{id} ran at
0.29x of /healthz's req/s on one process, against 0.59x on SQLite, whose reads already run on
the loop. Here the loop sends the query and serves other requests until the answer comes: 1.24x
the GET job req/s at 16 requests in flight on one process, 0.95x at 8 on each of two
(bench/README.md, "API at one and two processes"). SQLAlchemy's own asyncio layer would do the same
through greenlets, a switch per call; the statements are already compiled (job_rows.Statement),
so only a connection is needed, and psycopg_pool is psycopg's own pool.

Reads of a job by id that wait at the same time go out as one query (service/store/read_batches.py):
under load the round trip, not the row, was most of a GET's CPU.

The connections are in autocommit, like the thread path's (db._pg_read_engine): one SELECT
reads one committed state, with no BEGIN and ROLLBACK around it."""

from __future__ import annotations

import psycopg
from psycopg_pool import AsyncConnectionPool
from sqlalchemy.engine import make_url

from service.store.job_rows import Read, Statement, T
from service.store.read_batches import ReadBatches

# At most this many reads in flight; a read that finds them all lent waits in the pool's queue,
# which costs CPU of its own (a waiter, a timer). With the write engine's 30 and the thread
# path's 2 (the SSE streams' event reads), an API process stays within 40 of PostgreSQL's
# connections (README.md, "Several API replicas").
MAX_CONNECTIONS = 8
# How long a read waits for a connection: under load, its turn (reads hold one for a round trip,
# so the queue moves in milliseconds); when the server is down, the pool's reconnection. Past it
# the request fails (503, api/errors.py) instead of hanging. The thread path fails at once when
# nothing listens.
WAIT_S = 3.0


def conninfo(url: str) -> str:
    """libpq's URI for a SQLAlchemy `postgresql+psycopg://` URL (its query, e.g. sslmode, kept)."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


class AsyncReads:
    """A pool of autocommit connections that runs `job_rows` reads. Open and close it on the event
    loop that uses it (the app's lifespan)."""

    def __init__(self, url: str, max_connections: int = MAX_CONNECTIONS, wait_s: float = WAIT_S):
        self.pool = AsyncConnectionPool(
            conninfo(url),
            kwargs={"autocommit": True},
            min_size=1,
            max_size=max_connections,
            timeout=wait_s,
            open=False,
            name="slimtrain-reads",
        )
        self._batches: dict[Statement, ReadBatches] = {}  # per batchable statement (a few per process)

    async def open(self) -> None:
        await self.pool.open(wait=False)  # a server that is down fails the reads, not the start

    async def close(self) -> None:
        await self.pool.close()

    async def run(self, read: Read[T]) -> T:
        """`job_rows.run` on this pool."""
        try:
            stmt, params = next(read)
            while True:
                stmt, params = read.send(await self.rows(stmt, params))
        except StopIteration as done:
            return done.value

    async def rows(self, stmt: Statement, params: dict) -> list[tuple]:
        """The rows of `stmt`; through one query shared with the reads of it waiting at the same
        time where the statement allows (service/store/read_batches.py)."""
        if stmt.batch is None:
            return await self.query(stmt, params)
        batches = self._batches.get(stmt)
        if batches is None:
            batches = self._batches[stmt] = ReadBatches(self.query, stmt)
        return await batches.rows(params[stmt.batch.key])

    async def query(self, stmt: Statement, params: dict) -> list[tuple]:
        args = stmt.args(params)
        # No check before use (a round trip per read): a read that finds its connection closed
        # (a server restart, an idle timeout) runs again on the next, as job_rows.Statement.rows
        # does; the pool drops a broken connection when it comes back and connects a new one in
        # the background. A server that is down fails the read after WAIT_S; once it is back,
        # the next reads connect anew (tests/integration/test_job_reads.py restarts one).
        # getconn/putconn, not `pool.connection()`: that also enters the connection's own context,
        # whose exit commits (nothing, in autocommit) on every read.
        tries = self.pool.max_size + 2
        for attempt in range(1, tries + 1):
            conn = await self.pool.getconn()
            try:
                cur = await conn.execute(stmt.sql, args)
                return await cur.fetchall()
            except psycopg.OperationalError:
                if attempt == tries or not conn.broken:
                    raise
            finally:
                await self.pool.putconn(conn)
        raise AssertionError("unreachable: the last try returns or raises")
