"""A real PostgreSQL server for the tests: a throwaway cluster initdb'd in a temp dir, started on a
free loopback port for the session and removed at its end. PostgreSQL refuses to run as root, so
when the tests run as root the cluster belongs to the `postgres` system user (as Debian's
`postgresql` package creates it; `make test` installs it: tests/system-deps.sh). Each user of
`postgres_url` gets its own fresh database."""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.raycluster import free_port


def pg_bin() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=lambda p: int(p.split("/")[4]))
    if found:
        return Path(found[-1]).parent
    exe = shutil.which("pg_ctl")
    if exe:
        return Path(exe).parent
    raise RuntimeError("PostgreSQL is not installed: apt-get install postgresql (make test-deps)")


@dataclass
class PostgresServer:
    port: int
    datadir: Path
    bin: Path
    user: str | None  # the system user the server runs as (None: the current one)

    def _run(self, *args: str, **kw) -> subprocess.CompletedProcess:
        cmd = [*args]
        if self.user is not None:
            cmd = ["runuser", "-u", self.user, "--", *cmd]
        return subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=120, **kw)

    def psql(self, sql: str) -> str:
        return self._run(
            str(self.bin / "psql"),
            "-h",
            "127.0.0.1",
            "-p",
            str(self.port),
            "-U",
            "postgres",
            "-d",
            "postgres",
            "-v",
            "ON_ERROR_STOP=1",
            "-Atc",
            sql,
        ).stdout

    def new_database(self) -> str:
        name = "t_" + uuid.uuid4().hex[:12]
        self.psql(f"CREATE DATABASE {name}")
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{name}"

    def start(self) -> None:
        """Start the server on its data directory and port; returns once it answers."""
        sockdir = self.datadir.parent / "sock"
        opts = (
            f"-p {self.port} -k {sockdir} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200"
        )
        log = str(self.datadir.parent / "log")
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.datadir), "-o", opts, "-l", log, "-w", "start")
        deadline = time.monotonic() + 30
        while True:
            try:
                self.psql("SELECT 1")
                return
            except subprocess.CalledProcessError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def halt(self) -> None:
        """Stop the server at once, as a crash would (its data stays: `start` brings it back)."""
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.datadir), "-m", "immediate", "stop")

    def stop(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError, subprocess.TimeoutExpired):
            self.halt()
        shutil.rmtree(self.datadir.parent, ignore_errors=True)


def start_postgres() -> PostgresServer:
    bin_dir = pg_bin()
    user = "postgres" if os.geteuid() == 0 else None
    root = Path(tempfile.mkdtemp(prefix="slimtrain-pg-"))
    datadir, sockdir = root / "data", root / "sock"
    sockdir.mkdir()
    if user is not None:
        pw = pwd.getpwnam(user)
        for p in (root, sockdir):
            os.chown(p, pw.pw_uid, pw.pw_gid)
    server = PostgresServer(free_port(), datadir, bin_dir, user)
    server._run(
        str(bin_dir / "initdb"),
        "-D",
        str(datadir),
        "-U",
        "postgres",
        "--auth=trust",
        "-E",
        "UTF8",
        "--no-sync",
        "--locale=C",
    )
    try:
        server.start()
    except BaseException:
        server.stop()
        raise
    return server


@pytest.fixture(scope="session")
def postgres_server():
    server = start_postgres()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def postgres_url(postgres_server) -> str:
    return postgres_server.new_database()


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request, tmp_path) -> str:
    """A fresh, empty database: once as a SQLite file, once on the session's PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'slimtrain.db'}"
    return request.getfixturevalue("postgres_server").new_database()


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def module_database_url(request, tmp_path_factory) -> str:
    """As `database_url`, shared by one module's tests (for costly fixtures such as a server)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path_factory.mktemp('db') / 'slimtrain.db'}"
    return request.getfixturevalue("postgres_server").new_database()
