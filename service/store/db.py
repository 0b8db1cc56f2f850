"""The database engine: SQLite (WAL, busy timeout) by default, PostgreSQL through
`postgresql+psycopg://`, and schema upgrades through Alembic at start-up."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import psycopg
from alembic import command
from alembic.config import Config as AlembicConfig
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from psycopg_pool import PoolTimeout
from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker

log = logging.getLogger(__name__)

MIGRATIONS = Path(__file__).resolve().parent.parent / "migrations"
_PG_MIGRATION_LOCK = 0x51_1A_7A_11  # pg_advisory_lock key: one schema upgrade at a time
_WRITE = "slimtrain_write"


def unavailable(exc: BaseException) -> bool:
    """Whether `exc` says the database cannot serve now and may later, rather than that the
    request or the code is wrong: PostgreSQL's operational errors (a server down, restarting or
    shutting connections: refused, AdminShutdown, a connection lost), no connection free within
    the loop reads' wait (service/store/async_reads.py), a SQLite database locked past its busy
    timeout. sqlite3 raises OperationalError for bad SQL too, so only "locked" counts there."""
    if isinstance(exc, PoolTimeout):
        return True
    orig = exc.orig if isinstance(exc, DBAPIError) else exc
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return True
    if isinstance(orig, psycopg.OperationalError):
        return True
    return isinstance(orig, sqlite3.OperationalError) and "locked" in str(orig)


def make_engine(url: str) -> Engine:
    u = make_url(url)
    if u.get_backend_name() == "sqlite":
        if u.database and u.database != ":memory:":
            Path(u.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})
        _sqlite_pragmas(engine)
        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20)


def _sqlite_pragmas(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _connect(dbapi_conn, _record):
        # pysqlite's own BEGIN is deferred and lazy; we emit BEGIN ourselves (below).
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA busy_timeout=30000")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()

    @event.listens_for(engine, "begin")
    def _begin(conn):
        # Write transactions take the write lock up front: two deferred transactions that both
        # read and then write would deadlock, and SQLite fails one at once, ignoring busy_timeout.
        conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get(_WRITE) else "BEGIN")


def _pg_read_engine(url: str) -> Engine:
    """PostgreSQL's engine for the API's read path (service/store/job_rows.py), whose reads are
    one SELECT each: in autocommit, so no BEGIN and ROLLBACK go to the server around it, and
    without the pool's pre-ping, a SELECT 1 before every read; `Statement.rows` redoes a read
    that finds its connection closed instead. The API's CPU per GET job went from 1.37 to
    0.99 ms on one process (bench/README.md, "API at one and two processes"). A single statement in
    autocommit reads one committed state, as it did inside the transaction. The API's own reads
    of jobs and metrics now run on the event loop (service/store/async_reads.py); this engine
    serves the SSE streams' event reads (api/sse.py: one read for all the streams of a job) and
    reads outside the API. At most 2 connections: with the write engine's 30 and the async
    pool's 8, an API process stays within 40 of PostgreSQL's connections (README.md, "Several API
    replicas")."""
    return create_engine(url, isolation_level="AUTOCOMMIT", pool_size=1, max_overflow=1)


def _inline_engine(url: str) -> Engine:
    """SQLite reads made on the API's event loop (api.deps.read_db): read-only connections whose
    busy timeout is 0, so a read that would wait for a lock fails at once instead of stalling
    every request the loop serves (the caller redoes it on the request threads, which wait)."""
    engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 0})

    @event.listens_for(engine, "connect")
    def _connect(dbapi_conn, _record):
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA busy_timeout=0")
        cur.execute("PRAGMA query_only=ON")  # this engine never writes
        cur.close()

    return engine


class Database:
    def __init__(self, url: str):
        self.url = url
        self.engine = make_engine(url)
        self.is_sqlite = self.engine.dialect.name == "sqlite"
        # A file database's reads may run on the event loop (WAL: readers do not wait for writers);
        # an in-memory one is per connection, and PostgreSQL's reads cross a socket: neither.
        database = self.engine.url.database
        file_backed = self.is_sqlite and database not in (None, "", ":memory:")
        self.inline: Engine | None = _inline_engine(url) if file_backed else None
        # The read path's engine (job_rows.Statement): SQLite's own; PostgreSQL's in autocommit.
        self.reads: Engine = self.engine if self.is_sqlite else _pg_read_engine(url)
        self._read = sessionmaker(self.engine, expire_on_commit=False)
        self._write = sessionmaker(self.engine.execution_options(**{_WRITE: True}), expire_on_commit=False)

    @contextlib.contextmanager
    def read(self) -> Iterator[Session]:
        with self._read() as s:
            yield s

    @contextlib.contextmanager
    def write(self) -> Iterator[Session]:
        """One transaction: committed when the block ends, rolled back when it raises."""
        with self._write.begin() as s:
            yield s

    def ping(self) -> None:
        with self.engine.connect() as conn:
            conn.execute(text("SELECT 1"))

    def dispose(self) -> None:
        for engine in {self.engine, self.reads, self.inline} - {None}:
            engine.dispose()

    # --- schema --------------------------------------------------------------------------------

    def _alembic(self) -> AlembicConfig:
        cfg = AlembicConfig()
        cfg.set_main_option("script_location", str(MIGRATIONS))
        return cfg

    def head_revision(self) -> str | None:
        return ScriptDirectory.from_config(self._alembic()).get_current_head()

    def current_revision(self) -> str | None:
        with self.engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()

    def upgrade(self) -> None:
        """Bring the schema to the newest revision; safe when several processes start at once."""
        cfg = self._alembic()
        with self._migration_lock(), self.engine.begin() as conn:
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")

    @contextlib.contextmanager
    def _migration_lock(self) -> Iterator[None]:
        if self.is_sqlite:
            db = make_url(self.url).database
            if not db or db == ":memory:":
                yield
                return
            lock_path = Path(db).expanduser().with_suffix(".migrate.lock")
            with open(lock_path, "a") as f:
                fcntl.flock(f, fcntl.LOCK_EX)
                try:
                    yield
                finally:
                    fcntl.flock(f, fcntl.LOCK_UN)
            return
        with self.engine.connect() as conn:
            conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": _PG_MIGRATION_LOCK})
            conn.commit()
            try:
                yield
            finally:
                conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": _PG_MIGRATION_LOCK})
                conn.commit()
