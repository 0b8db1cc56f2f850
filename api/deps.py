"""FastAPI dependencies: the service and the caller's tenant (bearer token -> tenant)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Annotated, TypeVar

import anyio.to_thread
from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service.job_service import JobService

_bearer = HTTPBearer(auto_error=False, description="An API token from SLIMTRAIN_API_TOKENS.")


# async: both are pure CPU work; a plain `def` dependency costs a threadpool hop per request.
async def get_service(request: Request) -> JobService:
    return request.app.state.service


async def current_tenant(
    request: Request, creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> str:
    return request.app.state.auth.tenant_for(creds.credentials if creds else None)


ServiceDep = Annotated[JobService, Depends(get_service)]
CurrentTenant = Annotated[str, Depends(current_tenant)]

T = TypeVar("T")


async def run_db(request: Request, fn: Callable[..., T], *args) -> T:
    """Run a request's database work on the app's own small thread pool: sized to the cores, it
    keeps dozens of threads from fighting over the GIL (measured in bench/api: 956 -> ~1,600
    req/s on 2 cores), and slow work on the default pool (artifact streams, Ray calls) cannot
    starve it."""
    return await anyio.to_thread.run_sync(functools.partial(fn, *args), limiter=request.app.state.db_limiter)
