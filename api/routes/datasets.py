"""`/v1/datasets`: the caller's uploaded datasets, which jobs read with `data.uri:
store://datasets/<name>` (and `data.tokenizer: store://datasets/<name>.json`). Thin: the service
layer (service/datasets.py) streams, checks with the workers' readers and stores; names live in
the caller's tenant only."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, Field

from api.deps import CurrentTenant, ServiceDep
from api.errors import documented
from api.routes.models import octet_stream_body, receive_upload
from service.datasets import UPLOAD_FORMATS
from service.spec import MODEL_NAME_PATTERN

router = APIRouter(prefix="/v1", tags=["datasets"])

_SEGMENT = MODEL_NAME_PATTERN.strip("^$")
# NAME, or SET/SHARD: one shard of a set that jobs read whole as store://datasets/SET/ (a path
# parameter, so that the one '/' reaches the route; each segment strict, so no name leaves the
# tenant's datasets).
DatasetName = Annotated[
    str,
    Path(
        pattern=f"^{_SEGMENT}(/{_SEGMENT})?$",
        description="Letters, digits, '.', '_' and '-', up to 100, starting with a letter or digit; "
        "SET/SHARD for a shard of a set (read whole as store://datasets/SET/).",
    ),
]

_ENDINGS = "; ".join(f"{f}: {', '.join(e)}" for f, e in UPLOAD_FORMATS.items())


class DatasetOut(BaseModel):
    name: str = Field(description="The dataset's name in this tenant (`store://datasets/<name>`).")
    size: int = Field(description="Bytes of the file.")
    sha256: str = Field(description="sha256 of the file, as received.")
    format: str = Field(description="What it was checked as: " + ", ".join(UPLOAD_FORMATS) + ".")
    created: str = Field(description="When it was uploaded (UTC, ISO 8601).")
    samples: int = Field(
        description="Rows (parquet, npz), images (zip, tar), documents (jsonl: lines; text: "
        "non-empty lines); 0 for a tokenizer.json."
    )
    num_classes: int | None = Field(
        description="Classes of the labels (or the vocabulary of token data and of a tokenizer); "
        "null where the job's options decide (text, unlabelled parquet)."
    )
    columns: list[str] | None = Field(description="parquet: the file's columns; null for other formats.")


class DatasetList(BaseModel):
    items: list[DatasetOut] = Field(description="The tenant's datasets, by name.")


_BODY = octet_stream_body(
    "The raw bytes of one dataset file (streamed; the limit is SLIMTRAIN_MAX_DATASET_BYTES), "
    "checked on arrival as the workers will read it."
)


@router.put(
    "/datasets/{name:path}",
    status_code=201,
    response_model=DatasetOut,
    summary="Upload a dataset",
    operation_id="put_dataset",
    openapi_extra=_BODY,
    responses=documented(
        400,
        401,
        413,
        422,
        s422="Not a dataset of its format (unreadable, no label column or class folders, an unsafe "
        "archive, labels out of range: the message says which), an unknown format, or an invalid name.",
    ),
)
async def put_dataset(
    request: Request,
    service: ServiceDep,
    tenant: CurrentTenant,
    name: DatasetName,
    format: Annotated[
        str | None, Query(description=f"The format, overriding the name's ending ({_ENDINGS}).")
    ] = None,
    label_column: Annotated[
        str | None,
        Query(max_length=200, description="parquet: the column of class labels to check (default: label)."),
    ] = None,
    text_column: Annotated[
        str | None,
        Query(max_length=200, description="jsonl: the field holding each document (default: text)."),
    ] = None,
) -> DatasetOut:
    datasets = service.datasets
    entry = await receive_upload(
        request, datasets, lambda: datasets.start(tenant, name, format, label_column, text_column)
    )
    return DatasetOut(**entry)


@router.get(
    "/datasets",
    response_model=DatasetList,
    summary="List the tenant's datasets",
    operation_id="list_datasets",
    responses=documented(401),
)
async def list_datasets(service: ServiceDep, tenant: CurrentTenant) -> DatasetList:
    items = await run_in_threadpool(service.datasets.list, tenant)
    return DatasetList(items=[DatasetOut(**e) for e in items])


@router.delete(
    "/datasets/{name:path}",
    status_code=204,
    summary="Delete a dataset",
    operation_id="delete_dataset",
    response_class=Response,
    responses=documented(401, 404, 422, s404="No such dataset for this tenant."),
)
async def delete_dataset(service: ServiceDep, tenant: CurrentTenant, name: DatasetName) -> Response:
    await run_in_threadpool(service.datasets.delete, tenant, name)
    return Response(status_code=204)
