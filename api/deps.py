"""FastAPI dependencies: the service and the caller's tenant (bearer token -> tenant)."""

from __future__ import annotations

import asyncio
import contextvars
import functools
import sqlite3
from collections.abc import Callable
from typing import Annotated, TypeVar

from fastapi import Depends, Request
from fastapi.security import HTTPBearer

from service.job_service import JobService
from service.store.async_reads import AsyncReads
from service.store.job_rows import Read, run


# async: both are pure CPU work; a plain `def` dependency costs a threadpool hop per request.
async def get_service(request: Request) -> JobService:
    return request.app.state.service


class TenantBearer(HTTPBearer):
    """The caller's tenant, from its bearer token: the security scheme itself rather than a
    dependency on one, because FastAPI solves every level of a dependency tree on every request
    (one level less here: ~20 us of the ~600 us a `GET /v1/jobs/{id}` cost, bench/api). Documented
    as before, scheme `HTTPBearer`."""

    async def __call__(self, request: Request) -> str:  # type: ignore[override]
        creds = await super().__call__(request)
        return request.app.state.auth.tenant_for(creds.credentials if creds else None)


current_tenant = TenantBearer(
    auto_error=False, scheme_name="HTTPBearer", description="An API token from SLIMTRAIN_API_TOKENS."
)

ServiceDep = Annotated[JobService, Depends(get_service)]
CurrentTenant = Annotated[str, Depends(current_tenant)]

T = TypeVar("T")


async def run_db(request: Request, fn: Callable[..., T], *args) -> T:
    """Run a request's database work on the app's own small thread pool (app.state.db_pool):
    sized to the cores, it keeps dozens of threads from fighting over the GIL (measured in
    bench/api: 956 -> ~1,600 req/s on 2 cores), and slow work on the default pool (artifact
    streams, Ray calls) cannot starve it. asyncio's executor hand-off, not anyio's: half the CPU
    per call (~55 against ~105 us at 16 concurrent requests, bench/api/profile_get.py)."""
    call = functools.partial(contextvars.copy_context().run, fn, *args)
    return await asyncio.get_running_loop().run_in_executor(request.app.state.db_pool, call)


async def read_db(request: Request, fn: Callable[..., Read[T]], *args, on_loop: bool = True) -> T:
    """Run the read `fn(*args)` makes (service/store/job_rows.py) where the database is best read.

    PostgreSQL: on the event loop, through the async pool (service/store/async_reads.py), which
    waits on its socket without holding a thread or the GIL.

    A SQLite file, when `on_loop`: here on the event loop too. Why: one SQLite SELECT costs
    ~15 us of CPU, less than the hand-off to a thread and back plus the GIL that thread and the
    loop then share: GET /v1/jobs/{id} went from 1,536 to 2,693 req/s at 16 connections on
    2 CPUs, 0.32x to 0.57x of /healthz (bench/README.md, API). WAL readers do not wait for
    writers; a read that would wait anyway (another process checkpointing or recovering the
    file) fails at once on the inline engine's zero busy timeout and is redone by `run_db`,
    which waits. Otherwise (in-memory SQLite, or a read the caller keeps off the loop): `run_db`."""
    reads: AsyncReads | None = request.app.state.async_reads
    if reads is not None:
        return await reads.run(fn(*args))
    if on_loop and request.app.state.inline_reads:
        try:
            return run(fn(*args), inline=True)
        except sqlite3.OperationalError:
            pass  # locked: wait off the loop
    return await run_db(request, _run, fn, *args)


def _run(fn: Callable[..., Read[T]], *args) -> T:
    return run(fn(*args))
