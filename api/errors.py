"""Typed errors -> HTTP. The only place that knows status codes; every error body is
`{"error": {"code", "message"[, "fields"]}}`, never a traceback."""

from __future__ import annotations

import logging

import psycopg
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from psycopg_pool import PoolTimeout
from sqlalchemy.exc import DBAPIError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from service.auth import AuthError
from service.errors import ArtifactCorrupt, ArtifactKeyError, ArtifactNotFound, SlimtrainError, SpecError
from service.jobs import IdempotencyConflict, InvalidTransition, JobNotFound, LimitExceeded
from service.ray_jobs import ClusterUnavailable
from service.store.db import unavailable
from service.store.repo import BadCursor
from service.sweeps.service import SweepNotFound
from service.tenant_files import UploadNotFound, UploadRefused, UploadTooLarge

log = logging.getLogger(__name__)


class BodyTooLarge(SlimtrainError):
    code = "body_too_large"


class BadRequest(SlimtrainError):
    """A malformed request parameter (a cursor, a header) other than the spec itself."""

    code = "bad_request"


class UnsupportedMediaType(SlimtrainError):
    """A body in a format the route does not read (its Content-Type)."""

    code = "unsupported_media_type"


STATUS: dict[type[SlimtrainError], int] = {
    SpecError: 422,
    LimitExceeded: 422,
    ArtifactKeyError: 400,
    BadRequest: 400,
    BadCursor: 400,
    AuthError: 401,
    JobNotFound: 404,
    SweepNotFound: 404,
    ArtifactNotFound: 404,
    # A tenant's uploads, models and datasets alike (service/tenant_files.py).
    UploadNotFound: 404,
    UploadTooLarge: 413,
    UploadRefused: 422,
    InvalidTransition: 409,
    IdempotencyConflict: 409,
    BodyTooLarge: 413,
    UnsupportedMediaType: 415,
    # The object store handed back bytes the job did not write: an upstream fault, not the
    # client's, and never served as if it were the artifact.
    ArtifactCorrupt: 502,
    ClusterUnavailable: 503,
}

_HTTP_CODES = {
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    413: "body_too_large",
    415: "unsupported_media_type",
}


# What each status means on this API, for the OpenAPI document; a route may say more.
_MEANING = {
    400: "A malformed parameter (a cursor, a header, an artifact name); the message names it.",
    401: "Missing or invalid bearer token.",
    404: "No such job for this tenant.",
    409: "The request conflicts with the job's state.",
    413: "The body is above the server's limit.",
    415: "The body's Content-Type is not one this route reads; the message names those it does.",
    422: "Invalid parameters: `fields` names each one and what is allowed.",
    502: "The stored artifact fails its manifest checksum or cannot be parsed; it is not served.",
    503: "The Ray cluster or the database cannot be reached; try again later.",
}
_MEANING_DB = "The database cannot be reached; try again later."
DATABASE_RETRY_AFTER_S = 2  # a restart or failover of PostgreSQL takes seconds
ERROR_SCHEMA = {"$ref": "#/components/schemas/ErrorBody"}


def documented(*statuses: int, **meanings: str) -> dict[int, dict]:
    """OpenAPI responses for the error statuses a route can answer, each with the JSON error
    body (whatever media type the route's success has) and, for 401, its challenge header.
    `meanings` overrides a description: `documented(404, s404="No such job or artifact.")`."""
    out: dict[int, dict] = {}
    for status in statuses:
        response = {
            "description": meanings.get(f"s{status}", _MEANING[status]),
            "content": {"application/json": {"schema": ERROR_SCHEMA}},
        }
        if status == 401:
            response["headers"] = {
                "WWW-Authenticate": {
                    "description": "The scheme to authenticate with.",
                    "required": True,
                    "schema": {"type": "string", "enum": ["Bearer"]},
                }
            }
        out[status] = response
    return out


def status_of(err: SlimtrainError) -> int:
    for cls in type(err).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return 500


def error_body(code: str, message: str, **extra) -> dict:
    return {"error": {"code": code, "message": message, **extra}}


def error_response(
    status: int, code: str, message: str, headers: dict | None = None, **extra
) -> JSONResponse:
    return JSONResponse(error_body(code, message, **extra), status_code=status, headers=headers)


async def _slimtrain_error(_request: Request, exc: SlimtrainError) -> JSONResponse:
    status = status_of(exc)
    extra = {}
    if getattr(exc, "errors", None):
        extra["fields"] = exc.errors
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    if status == 409 and isinstance(exc, InvalidTransition) and exc.state:
        extra["state"] = str(exc.state)
    if status >= 500:
        log.warning("%s: %s", exc.code, exc.message)
    return error_response(status, exc.code, exc.message, headers=headers, **extra)


async def _validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
    fields = [
        {"field": ".".join(str(x) for x in e.get("loc", ())), "message": e.get("msg", "invalid")}
        for e in exc.errors()
    ]
    message = "; ".join(f"{f['field']}: {f['message']}" for f in fields)
    return error_response(422, "invalid_request", message, fields=fields)


def _allowed_methods(request: Request) -> str:
    """Every method the path answers to. Starlette names only those of the first route that
    matches the path, but one path may have several routes (GET and POST /v1/jobs)."""
    methods: set[str] = set()
    for route in request.app.router.routes:
        match, _ = route.matches(request.scope)
        if match is not Match.NONE:
            methods |= getattr(route, "methods", None) or set()
    return ", ".join(sorted(methods))


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    code = _HTTP_CODES.get(exc.status_code, "http_error")
    headers = dict(getattr(exc, "headers", None) or {})
    if exc.status_code == 405:
        headers["Allow"] = _allowed_methods(request)
    return error_response(exc.status_code, code, str(exc.detail), headers=headers or None)


async def _unexpected(_request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error", exc_info=exc)
    return error_response(500, "internal_error", "internal error; the server log has the details")


async def _database_error(request: Request, exc: Exception) -> JSONResponse:
    """A database that cannot serve now (service.store.db.unavailable: down, restarting, locked)
    is a 503 the client may retry, as an unreachable Ray cluster is; any other database error is
    a fault of ours (500, logged with its traceback)."""
    if not unavailable(exc):
        return await _unexpected(request, exc)
    log.warning("database unavailable: %s: %s", type(exc).__name__, exc)
    return error_response(
        503, "database_unavailable", _MEANING_DB, headers={"Retry-After": str(DATABASE_RETRY_AFTER_S)}
    )


def install(app: FastAPI) -> None:
    app.add_exception_handler(SlimtrainError, _slimtrain_error)
    # Their own handlers, not `_unexpected`'s: Starlette re-raises what reaches that one, and
    # the server logs a traceback for an outage that the warning above already names.
    for db_error in (DBAPIError, psycopg.Error, PoolTimeout):
        app.add_exception_handler(db_error, _database_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
