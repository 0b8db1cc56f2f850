"""Tenant-scoped model weights: uploads (`PUT /v1/models/{name}`) and the resolution of a job's
`model.init` to the one store key its workers read.

Layout: `_tenants/<tenant>/models/<name>/model.safetensors` (+ `meta.json`: size, sha256,
created). Job ids start with a letter or digit, so no job's prefix is `_tenants`; tenants are
`[a-z0-9_-]` (service.auth) and names one strict segment (service.spec.MODEL_NAME_RE), so no
name reaches outside its tenant's folder.

Resolution happens here, at submission, with the caller's tenant in hand: the stored spec then
carries `model.init.resolved` and workers never see tenant logic. A client cannot set
`resolved` (service.spec refuses it in a submitted spec).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlparse

from service.artifacts import MANIFEST, ArtifactStore, JobArtifacts, manifest_files
from service.errors import ArtifactKeyError, ArtifactNotFound, SlimtrainError, SpecError
from service.spec import MODEL_NAME_RE, JobSpec

TENANTS = "_tenants"
WEIGHTS = "model.safetensors"
META = "meta.json"
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


class _Refusal(SlimtrainError):
    """An upload refused for what it is: `errors` names the part of the request at fault."""

    field = "(body)"

    def __init__(self, message: str):
        super().__init__(message)
        self.errors = [{"field": self.field, "message": message}]


class InvalidModelName(_Refusal):
    code = "invalid_model_name"
    field = "name"


class ModelNotFound(SlimtrainError):
    code = "model_not_found"


class ModelTooLarge(SlimtrainError):
    code = "model_too_large"


class NotSafetensors(_Refusal):
    """The bytes are not a safetensors file (a pickle under a .safetensors name, a truncated
    file): refused, never parsed by anything that could run code."""

    code = "not_safetensors"


def check_model_name(name: str) -> str:
    if not isinstance(name, str) or not MODEL_NAME_RE.fullmatch(name):
        raise InvalidModelName(
            f"invalid model name {name!r}: letters, digits, '.', '_' and '-', up to 100, "
            "starting with a letter or digit"
        )
    return name


def model_prefix(tenant: str, name: str) -> str:
    return f"{TENANTS}/{tenant}/models/{check_model_name(name)}/"


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


class Upload:
    """One upload in progress: `write` each chunk as it arrives (to a temporary file, hashed and
    counted, ModelTooLarge past the limit), then `finish` checks the bytes are safetensors and
    stores them. `close` always (it removes the temporary file)."""

    def __init__(
        self, artifacts: ArtifactStore, prefix: str, name: str, max_bytes: int, tmp_dir: Path | None = None
    ):
        self.artifacts, self.prefix, self.name, self.max_bytes = artifacts, prefix, name, max_bytes
        self.sha, self.size = hashlib.sha256(), 0
        if tmp_dir is not None:
            tmp_dir.mkdir(parents=True, exist_ok=True)
        fd, self.tmp = tempfile.mkstemp(prefix=".upload-", suffix=".safetensors", dir=tmp_dir)
        self.file = os.fdopen(fd, "wb")

    def write(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self.size > self.max_bytes:
            raise ModelTooLarge(
                f"the upload is larger than the limit of {self.max_bytes} bytes (SLIMTRAIN_MAX_MODEL_BYTES)"
            )
        self.sha.update(chunk)
        self.file.write(chunk)

    def finish(self) -> dict:
        self.file.close()
        with open(self.tmp, "rb") as f:
            head = f.read(8)
            if len(head) == 8:
                (n,) = struct.unpack("<Q", head)
                head += f.read(min(n, MAX_HEADER_BYTES))
        header = safetensors_header(head, self.size)
        entry = {
            "name": self.name,
            "size": self.size,
            "sha256": self.sha.hexdigest(),
            "tensors": sum(1 for k in header if k != "__metadata__"),
            "created": datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
        }
        # Weights first, then the entry: a listed model always has its file.
        self.artifacts.put_file(self.prefix + WEIGHTS, self.tmp)
        self.artifacts.put_json(self.prefix + META, entry)
        return entry

    def close(self) -> None:
        self.file.close()
        Path(self.tmp).unlink(missing_ok=True)


class ModelStore:
    """A tenant's uploaded weights in the artifact store."""

    def __init__(self, artifacts: ArtifactStore, max_bytes: int, tmp_dir: Path | None = None):
        # tmp_dir: where uploads wait for their check (the data dir: /tmp may be small).
        self.artifacts, self.max_bytes, self.tmp_dir = artifacts, max_bytes, tmp_dir

    def check_size(self, declared: int) -> None:
        """Refuse an upload whose Content-Length is above the limit before reading it."""
        if declared > self.max_bytes:
            raise ModelTooLarge(
                f"the upload is {declared} bytes; the limit is {self.max_bytes} (SLIMTRAIN_MAX_MODEL_BYTES)"
            )

    def start(self, tenant: str, name: str) -> Upload:
        return Upload(self.artifacts, model_prefix(tenant, name), name, self.max_bytes, self.tmp_dir)

    def put(self, tenant: str, name: str, chunks: Iterable[bytes]) -> dict:
        """Store `chunks` as the tenant's model `name` (an upload in one call)."""
        upload = self.start(tenant, name)
        try:
            for chunk in chunks:
                upload.write(chunk)
            return upload.finish()
        finally:
            upload.close()

    def list(self, tenant: str) -> list[dict]:
        out = []
        for obj in self.artifacts.list(f"{TENANTS}/{tenant}/models/"):
            if obj.key.endswith("/" + META):
                try:
                    out.append(self.artifacts.get_json(obj.key))
                except (ArtifactNotFound, ValueError):
                    continue  # deleted meanwhile, or half-written by another store
        return sorted(out, key=lambda e: e["name"])

    def get(self, tenant: str, name: str) -> dict:
        try:
            return self.artifacts.get_json(model_prefix(tenant, name) + META)
        except ArtifactNotFound:
            raise ModelNotFound(f"no model {name!r}") from None

    def delete(self, tenant: str, name: str) -> None:
        self.get(tenant, name)
        self.artifacts.delete_prefix(model_prefix(tenant, name))


# --- model.init: resolution at submission --------------------------------------------------------


def _init_error(field: str, message: str) -> SpecError:
    return SpecError(f"{field}: {message}", [{"field": field, "message": message}])


def resolve_init(spec: JobSpec, tenant: str, artifacts: ArtifactStore, jobs=None) -> JobSpec:
    """Fill in `model.init.resolved` for `tenant`, checking what can be checked now. `jobs`
    (a store.repo.Store) looks up `init.job` for this tenant: another tenant's job is refused
    exactly like a missing one. Without `jobs` (`slimtrain run`, one user) the job's folder in
    the artifact store is enough."""
    init = spec.model.init
    if init is None:
        return spec
    if init.job is not None:
        field = "model.init.job"
        missing = _init_error(
            field, f"no succeeded job {init.job!r} with {WEIGHTS} (jobs of your tenant only)"
        )
        if jobs is not None:
            from service.jobs import JobNotFound

            try:
                job = jobs.get_job(init.job, tenant)
            except JobNotFound:
                raise missing from None
            if job.state != "succeeded":
                raise _init_error(field, f"job {init.job!r} is {job.state}; only a succeeded job's weights")
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
            raise _init_error("model.init.uri", f"no model {name!r} (push it with `slimtrain model push`)")
    else:
        # The artifact store holds every tenant's weights: reaching it through s3:// would skip
        # the tenant check above.
        if artifacts.uri.startswith("s3://") and _inside(init.uri, artifacts.uri):
            raise _init_error(
                "model.init.uri",
                "points into slimtrain's artifact store; use init.job or store://models/<name>",
            )
        resolved = init.uri
    data = spec.model_dump(mode="json")
    data["model"]["init"]["resolved"] = resolved
    return JobSpec.model_validate(data)


def _inside(uri: str, store_uri: str) -> bool:
    u, s = urlparse(uri), urlparse(store_uri)
    if u.netloc != s.netloc:
        return False
    prefix = s.path.strip("/")
    return not prefix or u.path.lstrip("/").startswith(prefix + "/") or u.path.strip("/") == prefix
