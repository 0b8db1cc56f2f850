"""FastAPI dependencies: the service and the caller's tenant (bearer token -> tenant)."""

from __future__ import annotations

from typing import Annotated

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
