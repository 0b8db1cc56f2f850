"""Where a PostgreSQL GET /v1/jobs/{id} spends the API's CPU, in one process on uvloop, without a
load generator (not part of the test suite): `python -m bench.api.pg_read_cost [--reads 3000]`.

GET job cost the API process about twice the CPU on PostgreSQL that it did on SQLite, until reads
waiting together shared a query (service/store/read_batches.py; bench README, "API at one and
two processes"). This splits a read: the whole request through the app;
the read alone (`AsyncReads.run` of `JobService.job_row`, what the route awaits); the same SELECT
on a connection held outside the pool; `SELECT 1` on it (the round trip's floor with psycopg);
and, where asyncpg is installed (it is not a dependency), the SELECT and `SELECT 1` through it.
Each figure is process CPU per call (user + system, all threads), best of 5 rounds, at 1 and 16
calls in flight; PostgreSQL's own CPU is not in it. Writes bench/results/api/pg_read_cost.{md,json}
(BENCH_OUT/api with BENCH_OUT set)."""

from __future__ import annotations

import argparse
import json
import re
import tempfile
from pathlib import Path

import uvloop

from bench.api.profile_get import SPEC, TOKEN, acpu_us, call
from bench.common import conditions, machine, markdown_table, results_dir, save_json

CONCURRENCY = (1, 16)


async def measure(url: str, n: int) -> list[list]:
    from api.app import create_app
    from service.ray_jobs import RayJobs
    from service.settings import Settings
    from service.store.async_reads import conninfo

    settings = Settings(
        data_dir=Path(tempfile.mkdtemp(prefix="slimtrain-pgcost-")),
        api_tokens=f"{TOKEN}:bench",
        database_url=url,
    )
    settings.run_scheduler = False
    app = create_app(settings, ray=RayJobs("http://127.0.0.1:9"))
    rows: list[list] = []
    async with app.router.lifespan_context(app):
        status, body = await call(app, "/v1/jobs", method="POST", body=json.dumps(SPEC).encode())
        assert status == 201, body
        job = json.loads(body)["id"]
        svc, reads = app.state.service, app.state.async_reads
        stmt, params = next(svc.job_row("bench", job))
        args = stmt.args(params)
        held = await reads.pool.getconn()

        async def held_select():
            return await (await held.execute(stmt.sql, args)).fetchall()

        async def held_one():
            return await (await held.execute("SELECT 1")).fetchall()

        cases = [
            ("request: GET /healthz", lambda: call(app, "/healthz")),
            ("request: GET /v1/jobs/{id}", lambda: call(app, f"/v1/jobs/{job}")),
            ("read: AsyncReads.run(job_row), the pool", lambda: reads.run(svc.job_row("bench", job))),
            ("read: the same SELECT, psycopg, one held connection", held_select),
            ("read: SELECT 1, psycopg, one held connection", held_one),
        ]
        apg = None
        try:
            import asyncpg

            apg = await asyncpg.connect(conninfo(url))
            names: list[str] = []
            sql = re.sub(r"%\((\w+)\)s", lambda m: names.append(m.group(1)) or f"${len(names)}", stmt.sql)
            values = [args[k] for k in names]
            cases += [
                ("read: the same SELECT, asyncpg, one held connection", lambda: apg.fetch(sql, *values)),
                ("read: SELECT 1, asyncpg, one held connection", lambda: apg.fetch("SELECT 1")),
            ]
        except ImportError:
            pass
        for label, fn in cases:
            held_conn = "held connection" in label
            # one connection serves one query at a time: the held cases run at 1 only
            rows.append(
                [
                    label,
                    *[
                        None if held_conn and c > 1 else await acpu_us(fn, n, concurrency=c)
                        for c in CONCURRENCY
                    ],
                ]
            )
        await reads.pool.putconn(held)
        if apg is not None:
            await apg.close()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reads", type=int, default=3000, help="calls per figure and round")
    a = ap.parse_args()
    from tests.plugins.postgres import start_postgres

    pg = start_postgres()
    try:
        rows = uvloop.run(measure(pg.new_database(), a.reads))
    finally:
        pg.stop()
    m = machine()
    headers = ["what", *[f"CPU us per call, {c} in flight" for c in CONCURRENCY]]
    text = (
        f"{conditions(m)}\nOne API process on uvloop, PostgreSQL on the same machine, no load generator; "
        f"{a.reads} calls per figure, best of 5.\n\n{markdown_table(headers, rows)}\n"
    )
    out = results_dir("api")
    (out / "pg_read_cost.md").write_text(text)
    save_json(out / "pg_read_cost.json", {"machine": m, "calls": a.reads, "rows": rows})
    print(text)


if __name__ == "__main__":
    main()
