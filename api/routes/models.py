"""`/v1/models`: the caller's uploaded weights (safetensors), which jobs start from with
`model.init.uri: store://models/<name>`. Thin: the service layer (service/uploads.py) streams,
checks and stores; names live in the caller's tenant only."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated

from fastapi import APIRouter, Path, Request, Response
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, Field

from api.deps import CurrentTenant, ServiceDep
from api.errors import BadRequest, documented
from service.spec import MODEL_NAME_PATTERN
from service.tenant_files import TenantFiles, Upload

router = APIRouter(prefix="/v1", tags=["models"])

# The name of a tenant's upload (a model, a dataset): one strict path segment.
UploadName = Annotated[
    str,
    Path(
        pattern=MODEL_NAME_PATTERN,
        description="Letters, digits, '.', '_' and '-', up to 100, starting with a letter or digit.",
    ),
]


class ModelOut(BaseModel):
    name: str = Field(description="The model's name in this tenant (`store://models/<name>`).")
    size: int = Field(description="Bytes of the safetensors file.")
    sha256: str = Field(description="sha256 of the file, as received.")
    tensors: int = Field(description="Tensors in the file's header.")
    created: str = Field(description="When it was uploaded (UTC, ISO 8601).")


class ModelList(BaseModel):
    items: list[ModelOut] = Field(description="The tenant's models, by name.")


def octet_stream_body(description: str) -> dict:
    """The OpenAPI request body of an upload: raw bytes, streamed."""
    return {
        "requestBody": {
            "required": True,
            "description": description,
            "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
        }
    }


_BODY = octet_stream_body(
    "The raw bytes of one safetensors file (streamed; the limit is SLIMTRAIN_MAX_MODEL_BYTES). "
    "Anything else (a pickle, a .bin) is refused."
)


@router.put(
    "/models/{name}",
    status_code=201,
    response_model=ModelOut,
    summary="Upload model weights (safetensors)",
    operation_id="put_model",
    openapi_extra=_BODY,
    responses=documented(
        400,
        401,
        413,
        422,
        s422="Not a safetensors file (the message says what is wrong), or an invalid name.",
    ),
)
async def put_model(
    request: Request, service: ServiceDep, tenant: CurrentTenant, name: UploadName
) -> ModelOut:
    return ModelOut(
        **await receive_upload(request, service.models, lambda: service.models.start(tenant, name))
    )


async def receive_upload(request: Request, files: TenantFiles, start: Callable[[], Upload]) -> dict:
    """Stream a PUT body into an upload of `files` (models, datasets): the limit is checked on
    Content-Length before a byte is read, and again as bytes arrive (a chunked body); the
    check and the store happen once the body is whole, off the event loop."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            files.check_size(int(declared))
        except ValueError:
            raise BadRequest("Content-Length: not a number") from None
    upload = await run_in_threadpool(start)
    try:
        async for chunk in request.stream():
            upload.write(chunk)  # a local file write; the limit is checked as bytes arrive
        return await run_in_threadpool(upload.finish)
    finally:
        upload.close()


@router.get(
    "/models",
    response_model=ModelList,
    summary="List the tenant's models",
    operation_id="list_models",
    responses=documented(401),
)
async def list_models(service: ServiceDep, tenant: CurrentTenant) -> ModelList:
    items = await run_in_threadpool(service.models.list, tenant)
    return ModelList(items=[ModelOut(**e) for e in items])


@router.delete(
    "/models/{name}",
    status_code=204,
    summary="Delete a model",
    operation_id="delete_model",
    response_class=Response,
    responses=documented(401, 404, 422, s404="No such model for this tenant."),
)
async def delete_model(service: ServiceDep, tenant: CurrentTenant, name: UploadName) -> Response:
    await run_in_threadpool(service.models.delete, tenant, name)
    return Response(status_code=204)
