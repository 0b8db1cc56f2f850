"""The OpenAPI document: FastAPI's, made to say exactly what the API does.

- The POST /v1/jobs body is the JobSpec schema, as JSON or YAML (the route reads the raw body
  itself: for the size limit, the idempotency hash and field-named errors).
- Valid OpenAPI 3.1.0, the version FastAPI declares (tests/unit/test_openapi.py validates it with
  openapi-spec-validator): no keyword of a later version.
- Every error is the ErrorBody JSON of api/errors.py. FastAPI adds a 422 `HTTPValidationError`
  to every route with parameters; that body is never sent (our handler answers ErrorBody), and
  routes whose parameters cannot fail validation never answer 422 at all, so those entries go:
  each route declares the errors it can answer.
- Links from a submitted job to the routes about it, which clients (and stateful testing) follow.
- The example specs (examples/*.yaml) as examples of that body, and the example sweeps
  (examples/sweeps/*.yaml) as examples of the POST /v1/sweeps body: a tool that sends a
  documented example (Schemathesis' examples phase does) sends a request the API accepts, not
  one pieced together from each field's own example.
"""

from __future__ import annotations

import yaml
from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from api.routes.dashboard import EXAMPLES_DIR, read_examples
from api.routes.schemas import ErrorBody
from service.spec import JobSpec
from service.sweeps.plan import SweepRequest

REF_TEMPLATE = "#/components/schemas/{model}"
_FASTAPI_422 = {"$ref": "#/components/schemas/HTTPValidationError"}

# Where a submitted job's routes are, from the 201 answer of POST /v1/jobs: those that answer
# as soon as the job exists (its report and spec.json come later).
_JOB = {"job_id": "$response.body#/id"}
JOB_LINKS = {
    "GetJob": {"operationId": "get_job", "parameters": _JOB},
    "CancelJob": {"operationId": "cancel_job", "parameters": _JOB},
    "JobAttempts": {"operationId": "job_attempts", "parameters": _JOB},
    "JobMetrics": {"operationId": "job_metrics", "parameters": _JOB},
    "JobEvents": {"operationId": "job_events", "parameters": _JOB},
    "JobLogs": {"operationId": "job_logs", "parameters": _JOB},
    "ListArtifacts": {"operationId": "list_artifacts", "parameters": _JOB},
}

# Where a submitted sweep's routes are, from the 201 answer of POST /v1/sweeps (its Location
# names the same sweep).
_SWEEP = {"sweep_id": "$response.body#/id"}
SWEEP_LINKS = {
    "GetSweep": {"operationId": "get_sweep", "parameters": _SWEEP},
    "CancelSweep": {"operationId": "cancel_sweep", "parameters": _SWEEP},
}

# One server-sent event of GET /v1/jobs/{job_id}/events. OpenAPI 3.2 has `itemSchema` for it;
# this document is 3.1, where that keyword is invalid and a text/event-stream `schema` describes
# each event (as 3.1 tools, Schemathesis among them, read it and check every event against it).
_EVENT = {
    "type": "object",
    "required": ["id", "event", "data"],
    "properties": {
        "id": {
            "type": "string",
            "pattern": "^[0-9]+$",
            "description": "The per-job sequence number.",
        },
        "event": {"type": "string", "enum": ["state", "metric"]},
        "data": {
            "type": "string",
            "description": "`state`: the job's new state and why; `metric`: the driver's record.",
            "contentMediaType": "application/json",
            "contentSchema": {"type": "object"},
        },
    },
}
EVENT_STREAM = {"media_type": "text/event-stream", "content": {"schema": _EVENT}}


def _add_model(schemas: dict, model: type[BaseModel]) -> None:
    schema = model.model_json_schema(ref_template=REF_TEMPLATE)
    schemas.update(schema.pop("$defs", {}))
    schemas[model.__name__] = schema


def _drop_fastapi_422(doc: dict) -> None:
    for path in doc.get("paths", {}).values():
        for operation in path.values():
            responses = operation.get("responses", {})
            schema = responses.get("422", {}).get("content", {}).get("application/json", {}).get("schema")
            if schema == _FASTAPI_422:
                del responses["422"]
    schemas = doc.get("components", {}).get("schemas", {})
    schemas.pop("HTTPValidationError", None)
    schemas.pop("ValidationError", None)


def _add_spec_examples(doc: dict) -> None:
    """The examples/ specs, under each media type the body may have (JSON or YAML: the value is
    the spec either way; a tool writes it in the media type's syntax)."""
    examples = {e.name: {"summary": e.title, "value": yaml.safe_load(e.text)} for e in read_examples()}
    if examples:
        for media in doc["paths"]["/v1/jobs"]["post"]["requestBody"]["content"].values():
            media["examples"] = examples


def _add_sweep_examples(doc: dict) -> None:
    """The examples/sweeps/ requests as examples of the POST /v1/sweeps body."""
    found = read_examples(EXAMPLES_DIR / "sweeps")
    examples = {e.name: {"summary": e.title, "value": yaml.safe_load(e.text)} for e in found}
    if examples:
        for media in doc["paths"]["/v1/sweeps"]["post"]["requestBody"]["content"].values():
            media["examples"] = examples


def _objective_short_form(schema: dict) -> None:
    """An objective may also be written `<metric> max` / `<metric> min` (Objective reads that form,
    and the example sweeps use it): the document says so, or it would call them invalid."""
    items = schema["properties"]["objective"]["items"]
    schema["properties"]["objective"]["items"] = {
        "anyOf": [
            items,
            {
                "type": "string",
                "pattern": r"^\s*\S+\s+(max|min)\s*$",
                "description": "`<metric> max` or `<metric> min`, e.g. `accuracy max`.",
            },
        ]
    }


def document(app: FastAPI) -> dict:
    if app.openapi_schema:
        return app.openapi_schema
    doc = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
    _drop_fastapi_422(doc)
    _add_spec_examples(doc)
    _add_sweep_examples(doc)
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    _add_model(schemas, JobSpec)
    _add_model(schemas, ErrorBody)
    _add_model(schemas, SweepRequest)  # the body of POST /v1/sweeps
    _objective_short_form(schemas["SweepRequest"])
    app.openapi_schema = doc
    return doc
