"""Operational routes: liveness and readiness (unauthenticated), Prometheus metrics (behind the
metrics token, api/routes/prometheus.py)."""

from __future__ import annotations

import logging

from fastapi import APIRouter, Depends, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from api.errors import documented
from api.routes.prometheus import require_metrics_token
from api.routes.schemas import Health

router = APIRouter(tags=["operations"])
log = logging.getLogger(__name__)


@router.get(
    "/healthz",
    response_model=Health,
    response_model_exclude_none=True,
    summary="Liveness: the process serves requests",
    operation_id="healthz",
)
async def healthz() -> Health:
    return Health(status="ok")


@router.get(
    "/readyz",
    response_model=Health,
    summary="Readiness: the database answers at the current schema and, in the leader, the "
    "background loops run; `leader` says whether this process leads",
    operation_id="readyz",
    responses={503: {"model": Health, "description": "Not ready; `checks` says why."}},
)
async def readyz(request: Request):
    service = request.app.state.service
    checks: dict[str, str] = {}

    def check_db() -> None:
        db = service.store.db
        db.ping()
        current, head = db.current_revision(), db.head_revision()
        if current != head:
            raise RuntimeError(f"schema at {current}, code expects {head}")

    try:
        await run_in_threadpool(check_db)
        checks["database"] = "ok"
    except Exception as e:  # any failure means: not ready; the body says which
        checks["database"] = f"{type(e).__name__}: {e}"
    leadership = request.app.state.leadership
    leads = leadership is not None and leadership.leading
    if leads or leadership is None:
        for name, loop in service.loops.items():
            checks[name] = "ok" if loop.alive else "not running"
    else:  # a follower serves HTTP; it needs its campaign for the lease, not the loops
        checks["leader election"] = (
            "ok" if leadership.alive and leadership.last_error is None else leadership.last_error or "stopped"
        )
    ok = all(v == "ok" for v in checks.values())
    body = Health(status="ok" if ok else "not ready", checks=checks, leader=leads)
    return JSONResponse(body.model_dump(), status_code=200 if ok else 503)


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    operation_id="prometheus_metrics",
    response_class=Response,
    responses={
        200: {"content": {CONTENT_TYPE_LATEST: {}}},
        **documented(401, s401="Missing or wrong metrics token (SLIMTRAIN_METRICS_TOKEN), or none set."),
    },
    dependencies=[Depends(require_metrics_token)],
)
async def metrics(request: Request) -> Response:
    data = await run_in_threadpool(generate_latest, request.app.state.registry)
    return Response(data, media_type=CONTENT_TYPE_LATEST)
