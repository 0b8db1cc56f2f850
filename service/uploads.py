"""Tenant-scoped model weights: uploads (`PUT /v1/models/{name}`) and the resolution of a job's
`model.init` to the one store key its workers read.

Layout: `_tenants/<tenant>/models/<name>/model.safetensors` (+ `meta.json`: size, sha256,
tensors, created); service/tenant_files.py has what models share with datasets.

Resolution happens here, at submission, with the caller's tenant in hand: the stored spec then
carries `model.init.resolved` and workers never see tenant logic. A client cannot set
`resolved` (service.spec refuses it in a submitted spec).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from service.artifacts import MANIFEST, JobArtifacts, manifest_files
from service.errors import ArtifactKeyError, ArtifactNotFound
from service.spec import JobSpec
from service.tenant_files import (
    InvalidName,
    TenantFiles,
    Upload,
    UploadNotFound,
    UploadRefused,
    UploadTooLarge,
    check_s3,
    check_upload_name,
    field_error,
)

WEIGHTS = "model.safetensors"
# safetensors' own reader refuses headers above 100 MB; a header is JSON naming each tensor.
MAX_HEADER_BYTES = 100 * 1024 * 1024
DTYPES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}


class InvalidModelName(InvalidName):
    code = "invalid_model_name"


class ModelNotFound(UploadNotFound):
    code = "model_not_found"


class ModelTooLarge(UploadTooLarge):
    code = "model_too_large"


class NotSafetensors(UploadRefused):
    """The bytes are not a safetensors file (a pickle under a .safetensors name, a truncated
    file): refused, never parsed by anything that could run code."""

    code = "not_safetensors"


def check_model_name(name: str) -> str:
    return check_upload_name(name, "model", InvalidModelName)


def model_prefix(tenant: str, name: str) -> str:
    return ModelStore.prefix(tenant, name)


def model_key(tenant: str, name: str) -> str:
    return model_prefix(tenant, name) + WEIGHTS


def safetensors_header(head: bytes, size: int) -> dict:
    """The parsed header of a safetensors file of `size` bytes whose first bytes are `head`
    (8 + the header's length at least). Raises NotSafetensors saying what is wrong. Pure
    parsing of a length and JSON: nothing in the file is ever executed."""
    if size < 8 or len(head) < 8:
        raise NotSafetensors(f"not a safetensors file: {size} bytes, shorter than the 8-byte header length")
    (n,) = struct.unpack("<Q", head[:8])
    if n > MAX_HEADER_BYTES or 8 + n > size:
        raise NotSafetensors(
            f"not a safetensors file: its first 8 bytes give a header of {n} bytes in a file of {size}"
            " (a pickle or another format?)"
        )
    if len(head) < 8 + n:
        raise NotSafetensors("not a safetensors file: header truncated")
    try:
        header = json.loads(head[8 : 8 + n])
    except (ValueError, UnicodeDecodeError):
        raise NotSafetensors("not a safetensors file: its header is not JSON") from None
    if not isinstance(header, dict):
        raise NotSafetensors("not a safetensors file: its header is not a JSON object")
    data_bytes = size - 8 - n
    end = 0
    for key, t in header.items():
        if key == "__metadata__":
            continue
        if not isinstance(t, dict) or set(t) != {"dtype", "shape", "data_offsets"}:
            raise NotSafetensors(f"tensor {key!r}: entry needs exactly dtype, shape and data_offsets")
        if t["dtype"] not in DTYPES:
            raise NotSafetensors(f"tensor {key!r}: unknown dtype {t['dtype']!r}")
        shape, offs = t["shape"], t["data_offsets"]
        if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise NotSafetensors(f"tensor {key!r}: shape must be a list of non-negative integers")
        ok = isinstance(offs, list) and len(offs) == 2 and all(isinstance(o, int) for o in offs)
        if not ok or not 0 <= offs[0] <= offs[1] <= data_bytes:
            raise NotSafetensors(f"tensor {key!r}: data_offsets {offs!r} outside the {data_bytes} data bytes")
        count = 1
        for d in shape:
            count *= d
        if offs[1] - offs[0] != count * DTYPES[t["dtype"]]:
            raise NotSafetensors(f"tensor {key!r}: {offs[1] - offs[0]} bytes for shape {shape} {t['dtype']}")
        end = max(end, offs[1])
    if end != data_bytes:
        raise NotSafetensors(f"not a safetensors file: tensors cover {end} of its {data_bytes} data bytes")
    return header


def inspect_weights(path: Path, size: int) -> tuple[str, dict]:
    """The check of an uploaded model (service.tenant_files.Upload.finish): a safetensors file."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) == 8:
            (n,) = struct.unpack("<Q", head)
            head += f.read(min(n, MAX_HEADER_BYTES))
    header = safetensors_header(head, size)
    return WEIGHTS, {"tensors": sum(1 for k in header if k != "__metadata__")}


class ModelStore(TenantFiles):
    """A tenant's uploaded weights in the artifact store."""

    kind, what, setting = "models", "model", "SLIMTRAIN_MAX_MODEL_BYTES"
    invalid_name, too_large, not_found = InvalidModelName, ModelTooLarge, ModelNotFound

    def start(self, tenant: str, name: str) -> Upload:
        return Upload(self, tenant, name, inspect_weights)


# --- model.init: resolution at submission --------------------------------------------------------


def resolve_init(
    spec: JobSpec, tenant: str, artifacts, jobs=None, allowed_s3: list[str] | None = None
) -> JobSpec:
    """Fill in `model.init.resolved` for `tenant`, checking what can be checked now. `jobs`
    (a store.repo.Store) looks up `init.job` for this tenant: another tenant's job is refused
    exactly like a missing one. Without `jobs` (`slimtrain run`, one user) the job's folder in
    the artifact store is enough. `allowed_s3`: service.tenant_files.check_s3."""
    init = spec.model.init
    if init is None:
        return spec
    if init.job is not None:
        field = "model.init.job"
        missing = field_error(
            field, f"no succeeded job {init.job!r} with {WEIGHTS} (jobs of your tenant only)"
        )
        if jobs is not None:
            from service.jobs import JobNotFound

            try:
                job = jobs.get_job(init.job, tenant)
            except JobNotFound:
                raise missing from None
            if job.state != "succeeded":
                raise field_error(field, f"job {init.job!r} is {job.state}; only a succeeded job's weights")
        try:
            listed = manifest_files(JobArtifacts(artifacts, init.job).get_json(MANIFEST))
        except (ArtifactNotFound, ArtifactKeyError, ValueError, KeyError, TypeError):
            raise missing from None
        if WEIGHTS not in listed:
            raise missing
        resolved = f"{init.job}/{WEIGHTS}"
    elif init.uri.startswith("store://"):
        name = init.uri.removeprefix("store://models/")
        resolved = model_key(tenant, name)
        if not artifacts.exists(resolved):
            raise field_error("model.init.uri", f"no model {name!r} (push it with `slimtrain model push`)")
    else:
        resolved = check_s3(init.uri, "model.init.uri", artifacts, allowed_s3)
    data = spec.model_dump(mode="json")
    data["model"]["init"]["resolved"] = resolved
    return JobSpec.model_validate(data)
