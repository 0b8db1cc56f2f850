"""A Ray stand-in shared by several API processes (tests/integration/test_api_replicas.py).

`FakeRay` (tests/plugins/fake_ray.py) is a dictionary inside one process; API replicas are
separate processes, so this one keeps the Ray Jobs API's state in a SQLite file they all open:
a submission id is a primary key, so a second submission under one id is refused as Ray refuses
it, and every call to `submit` is logged (which process, when) for the test to count.
`SharedRay.drive()`, run by the test process, plays the drivers: PENDING -> RUNNING, metric
parts written to the artifact folder as a real driver writes them, then `report.json` and
SUCCEEDED. `create_app` is the API factory the replicas run (`uvicorn --factory`), with the
stand-in in Ray's place; `ReplicaProcess` starts one."""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import time
from pathlib import Path

from service.artifacts import JobArtifacts, LocalArtifactStore
from service.limits import Resources
from service.ray_jobs import (
    FAILED,
    PENDING,
    RUNNING,
    STOPPED,
    SUCCEEDED,
    NodeInfo,
    RayJobInfo,
    capacity_of,
)
from service.records import part_name
from tests.plugins.server import ApiProcess

ENV = "SLIMTRAIN_TEST_SHARED_RAY"  # the stand-in's SQLite file
CPU_ENV = "SLIMTRAIN_TEST_SHARED_RAY_CPU"


class SharedRay:
    def __init__(self, path: str | Path, cpu: float = 4.0):
        self.path, self.cpu = str(path), cpu
        with self._db() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(
                "CREATE TABLE IF NOT EXISTS jobs (submission_id TEXT PRIMARY KEY, job_id TEXT, "
                "attempt INTEGER, status TEXT, message TEXT, parts INTEGER DEFAULT 0, at REAL)"
            )
            db.execute("CREATE TABLE IF NOT EXISTS calls (submission_id TEXT, pid INTEGER, at REAL)")

    @contextlib.contextmanager
    def _db(self):
        db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        try:
            yield db
        finally:
            db.close()

    # --- what service.ray_jobs.RayJobs offers ---------------------------------------------------

    @property
    def dashboard_url(self) -> str:
        return "http://shared-fake-ray:8265"

    def submit(self, submission_id, entrypoint, env_vars, metadata) -> bool:
        with self._db() as db:
            db.execute("INSERT INTO calls VALUES (?, ?, ?)", (submission_id, os.getpid(), time.time()))
            try:
                db.execute(
                    "INSERT INTO jobs (submission_id, job_id, attempt, status, at) VALUES (?, ?, ?, ?, ?)",
                    (submission_id, metadata["slimtrain_job"], metadata["attempt"], PENDING, time.time()),
                )
            except sqlite3.IntegrityError:
                return False  # Ray holds it already
        return True

    def info(self, submission_id):
        with self._db() as db:
            row = db.execute(
                "SELECT status, message FROM jobs WHERE submission_id = ?", (submission_id,)
            ).fetchone()
        return None if row is None else RayJobInfo(row[0], row[1])

    def stop(self, submission_id) -> bool:
        with self._db() as db:
            cur = db.execute(
                "UPDATE jobs SET status = ?, message = ? WHERE submission_id = ? AND status IN (?, ?)",
                (STOPPED, "Job was intentionally stopped.", submission_id, PENDING, RUNNING),
            )
        return cur.rowcount == 1

    def logs(self, submission_id):
        return "driver: (stand-in)\n" if self.info(submission_id) else None

    async def tail_logs(self, submission_id):
        yield "driver: (stand-in)\n"

    def nodes(self):
        return [NodeInfo("shared-fake-node", True, {"CPU": self.cpu, "GPU": 0.0})]

    def capacity(self) -> Resources:
        return capacity_of(self.nodes())

    # --- the test's side ------------------------------------------------------------------------

    def held(self) -> dict[str, list[tuple[str, int]]]:
        """Per slimtrain job, the (submission id, attempt) of each Ray job the stand-in holds."""
        out: dict[str, list[tuple[str, int]]] = {}
        with self._db() as db:
            for sid, job, attempt in db.execute("SELECT submission_id, job_id, attempt FROM jobs"):
                out.setdefault(job, []).append((sid, attempt))
        return {j: sorted(v) for j, v in out.items()}

    def calls(self) -> list[tuple[str, int, float]]:
        with self._db() as db:
            return list(db.execute("SELECT submission_id, pid, at FROM calls ORDER BY at"))

    def drive(self, artifacts_root: Path, parts: int = 4, per_part: int = 2) -> int:
        """One step of every driver: a PENDING one starts; a RUNNING one writes its next metric
        part; after `parts` parts it writes report.json and succeeds. Returns live drivers."""
        store = LocalArtifactStore(artifacts_root)
        live = 0
        with self._db() as db:
            rows = db.execute(
                "SELECT submission_id, job_id, attempt, status, parts FROM jobs WHERE status IN (?, ?)",
                (PENDING, RUNNING),
            ).fetchall()
        for sid, job, attempt, status, done in rows:
            live += 1
            if status == PENDING:
                self._set(sid, RUNNING, 0)
                continue
            arts = JobArtifacts(store, job)
            if done < parts:
                first = done * per_part
                lines = [
                    {
                        "kind": "train",
                        "step": first + i + 1,
                        "loss": 1.0 / (first + i + 1),
                        "attempt": attempt,
                    }
                    for i in range(per_part)
                ]
                arts.put_bytes(part_name(first), "".join(json.dumps(r) + "\n" for r in lines).encode())
                self._set(sid, RUNNING, done + 1)
            else:
                arts.put_json("report.json", {"accuracy": 0.5, "steps": parts * per_part})
                arts.write_manifest()
                self._set(sid, SUCCEEDED, done, "Job finished successfully.")
        return live

    def _set(self, sid: str, status: str, parts: int, message: str | None = None) -> None:
        with self._db() as db:
            db.execute(
                "UPDATE jobs SET status = ?, parts = ?, message = ? "
                "WHERE submission_id = ? AND status NOT IN (?, ?, ?)",
                (status, parts, message, sid, STOPPED, FAILED, SUCCEEDED),
            )


def create_app():
    """The API factory of a replica: settings from the environment, the shared stand-in as Ray."""
    from api.app import create_app as create

    return create(ray=SharedRay(os.environ[ENV], float(os.environ.get(CPU_ENV, "4"))))


class ReplicaProcess(ApiProcess):
    """An API process (uvicorn, as `ApiProcess`) whose Ray is the shared stand-in."""

    factory = "tests.plugins.shared_ray:create_app"
