"""Where a `GET /v1/jobs/{id}` spends its CPU, in one process, without a load generator (not
part of the test suite): `python -m bench.api.profile_get [--profile]`.

The app (SQLite in a temp dir, background loops off) is called as an ASGI app directly, one
request at a time, and timed in CPU seconds of the process (all threads), so the machine's other
load moves the figures less than wall time. Besides whole requests (healthz, GET job, a page of
50 jobs), each part is timed alone, the read path of today beside the one it replaced where both
still exist: the ORM's `Store.get_job` against `JobRows.get`, a fresh render of the body against
a reused one, anyio's thread hand-off against asyncio's executor. `--profile` adds cProfile's top
functions of the GET (its own overhead inflates every figure about 4x; read it for shares).
Writes bench/results/api/profile.{md,json} (or BENCH_OUT/api)."""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import functools
import io
import json
import os
import pstats
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import anyio
import anyio.to_thread

from bench.common import conditions, machine, markdown_table, results_dir, save_json

TOKEN = "bench-token-0123456789abcdef"
SPEC = {"name": "bench", "model": {"name": "mlp"}, "data": {"name": "digits"}, "parallel": {"workers": 2}}
PAGE = 50


async def call(
    app, path: str, query: bytes = b"", method: str = "GET", body: bytes = b""
) -> tuple[int, bytes]:
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": query,
        "root_path": "",
        "headers": [(b"host", b"bench"), (b"authorization", f"Bearer {TOKEN}".encode())],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
    }
    sent: list[dict] = []

    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message):
        sent.append(message)

    await app(scope, receive, send)
    return sent[0]["status"], b"".join(m.get("body", b"") for m in sent[1:])


def cpu_us(fn, n: int, repeats: int = 5) -> float:
    """Best of `repeats` of the mean CPU time of `fn()` in microseconds."""
    for _ in range(min(n, 200)):
        fn()
    best = float("inf")
    for _ in range(repeats):
        c0 = time.process_time()
        for _ in range(n):
            fn()
        best = min(best, (time.process_time() - c0) / n * 1e6)
    return best


async def acpu_us(fn, n: int, repeats: int = 5, concurrency: int = 1) -> float:
    async def batch(k):
        for _ in range(k):
            await fn()

    await batch(min(n, 200))
    best = float("inf")
    for _ in range(repeats):
        c0 = time.process_time()
        await asyncio.gather(*(batch(n // concurrency) for _ in range(concurrency)))
        best = min(best, (time.process_time() - c0) / n * 1e6)
    return best


async def measure(n: int, profile: bool) -> tuple[list[list], str | None]:
    from pydantic import TypeAdapter

    from api.app import create_app
    from api.routes.schemas import JobOut
    from service.ray_jobs import RayJobs
    from service.settings import Settings
    from service.store.job_rows import run

    settings = Settings(
        data_dir=Path(tempfile.mkdtemp(prefix="slimtrain-prof-")), api_tokens=f"{TOKEN}:bench"
    )
    settings.run_scheduler = False
    app = create_app(settings, ray=RayJobs("http://127.0.0.1:9"))
    rows: list[list] = []
    top = None
    async with app.router.lifespan_context(app):
        ids = []
        for i in range(PAGE):
            status, body = await call(
                app, "/v1/jobs", method="POST", body=json.dumps({**SPEC, "name": f"b{i}"}).encode()
            )
            assert status == 201, body
            ids.append(json.loads(body)["id"])
        job = f"/v1/jobs/{ids[0]}"
        for label, path, query in [
            ("request: GET /healthz", "/healthz", b""),
            ("request: GET /v1/jobs/{id}", job, b""),
            (f"request: GET /v1/jobs (page of {PAGE})", "/v1/jobs", f"limit={PAGE}".encode()),
        ]:
            status, _ = await call(app, path, query)
            assert status == 200
            rows.append([label, await acpu_us(lambda p=path, q=query: call(app, p, q), n)])

        svc, bodies = app.state.service, app.state.job_bodies
        row = run(svc.job_row("bench", ids[0]))
        ta = TypeAdapter(JobOut)
        rows += [
            [
                "part: Store.get_job (ORM session, replaced)",
                cpu_us(lambda: svc.store.get_job(ids[0], "bench"), n),
            ],
            [
                "part: JobRows.get (one SELECT on a pooled DBAPI connection)",
                cpu_us(lambda: run(svc.job_row("bench", ids[0])), n),
            ],
            [
                "part: render the body afresh (JobOut.of + validate + JSON, as FastAPI did)",
                cpu_us(lambda: ta.dump_json(ta.validate_python(JobOut.of(row.job())), by_alias=True), n),
            ],
            ["part: the same body reused (row compared whole)", cpu_us(lambda: bodies.body(row), n)],
            [
                "part: auth (token digest against every token)",
                cpu_us(lambda: app.state.auth.tenant_for(TOKEN), n),
            ],
        ]
        limiter = anyio.CapacityLimiter(os.cpu_count() or 2)
        pool = ThreadPoolExecutor(os.cpu_count() or 2)
        loop = asyncio.get_running_loop()

        def nothing():
            return None

        for conc in (1, 16):
            rows.append(
                [
                    f"part: thread hand-off, anyio (replaced), {conc} concurrent",
                    await acpu_us(
                        lambda: anyio.to_thread.run_sync(functools.partial(nothing), limiter=limiter),
                        n,
                        concurrency=conc,
                    ),
                ]
            )
            rows.append(
                [
                    f"part: thread hand-off, asyncio executor, {conc} concurrent",
                    await acpu_us(lambda: loop.run_in_executor(pool, nothing), n, concurrency=conc),
                ]
            )
        pool.shutdown()
        if profile:
            pr = cProfile.Profile()
            pr.enable()
            for _ in range(n):
                await call(app, job)
            pr.disable()
            buf = io.StringIO()
            pstats.Stats(pr, stream=buf).sort_stats("tottime").print_stats(25)
            top = buf.getvalue()
    return rows, top


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--requests", type=int, default=2000, help="calls per figure (each the best of 5)")
    p.add_argument("--profile", action="store_true")
    a = p.parse_args()
    rows, top = asyncio.run(measure(a.requests, a.profile))
    out = results_dir("api")
    m = machine()
    table = markdown_table(["what", "CPU us per call"], [[w, round(v, 1)] for w, v in rows])
    how = f"In one process, no load generator; {a.requests} calls per figure, best of 5."
    text = f"{conditions(m)}\n{how}\n\n{table}\n"
    if top:
        text += f"\ncProfile of GET /v1/jobs/{{id}}, top by own time:\n\n```\n{top}\n```\n"
    (out / "profile.md").write_text(text)
    save_json(out / "profile.json", {"machine": m, "calls": a.requests, "cpu_us": dict(rows)})
    print(text)


if __name__ == "__main__":
    main()
