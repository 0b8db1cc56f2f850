"""A tenant's uploaded files in the artifact store, whatever they hold (model weights in
service/uploads.py, datasets in service/datasets.py): the names, the streamed upload with its
size limit and sha256, listing and deleting, and the URI rules a job's spec is held to at
submission (`store://` inside the caller's tenant, `s3://` inside what the operator allows).

Layout: `_tenants/<tenant>/<kind>/<name>/<file>` + `meta.json` (size, sha256, created and what
the kind's check found). Job ids start with a letter or digit, so no job's prefix is `_tenants`;
tenants are `[a-z0-9_-]` (service.auth) and names one strict segment (service.spec.MODEL_NAME_RE),
so no name reaches outside its tenant's folder.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlparse

from service.artifacts import ArtifactStore
from service.errors import ArtifactNotFound, SlimtrainError, SpecError
from service.spec import MODEL_NAME_RE

TENANTS = "_tenants"
META = "meta.json"
# Checks a received file (path, size), raising what refuses it; gives the file name to store it
# under and what it found, for the entry.
Inspect = Callable[[Path, int], tuple[str, dict]]


class UploadRefused(SlimtrainError):
    """An upload refused for what it is: `errors` names the part of the request at fault."""

    code = "upload_refused"
    field = "(body)"

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.errors = [{"field": field or self.field, "message": message}]


class InvalidName(UploadRefused):
    code = "invalid_name"
    field = "name"


class UploadTooLarge(SlimtrainError):
    code = "upload_too_large"


class UploadNotFound(SlimtrainError):
    code = "not_found"


def check_upload_name(name: str, what: str, error: type[InvalidName] = InvalidName) -> str:
    if not isinstance(name, str) or not MODEL_NAME_RE.fullmatch(name):
        raise error(
            f"invalid {what} name {name!r}: letters, digits, '.', '_' and '-', up to 100, "
            "starting with a letter or digit"
        )
    return name


def field_error(field: str, message: str) -> SpecError:
    """A refused job spec, naming the field (422 like any spec error)."""
    return SpecError(f"{field}: {message}", [{"field": field, "message": message}])


def now_utc() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


class Upload:
    """One upload in progress: `write` each chunk as it arrives (to a temporary file, hashed and
    counted, the kind's too-large error past the limit), then `finish` checks the file and
    stores it. `close` always (it removes the temporary file). Nothing reaches the artifact
    store before the check passes, so a refused upload leaves nothing there."""

    def __init__(self, files: TenantFiles, tenant: str, name: str, inspect: Inspect):
        self.files, self.prefix, self.name, self.inspect = files, files.prefix(tenant, name), name, inspect
        self.sha, self.size = hashlib.sha256(), 0
        tmp_dir = files.tmp_dir
        if tmp_dir is not None:
            tmp_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".upload-", dir=tmp_dir)
        self.tmp = Path(tmp)
        self.file = os.fdopen(fd, "wb")

    def write(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self.size > self.files.max_bytes:
            raise self.files.too_large(
                f"the upload is larger than the limit of {self.files.max_bytes} bytes ({self.files.setting})"
            )
        self.sha.update(chunk)
        self.file.write(chunk)

    def finish(self) -> dict:
        self.file.close()
        filename, found = self.inspect(self.tmp, self.size)
        entry = {"name": self.name, "size": self.size, "sha256": self.sha.hexdigest(), **found}
        entry["created"] = now_utc()
        store = self.files.artifacts
        # The file first, then the entry: a listed upload always has its file.
        store.put_file(self.prefix + filename, self.tmp)
        store.put_json(self.prefix + META, entry)
        for obj in store.list(self.prefix):  # a replaced upload of another format
            if obj.key not in (self.prefix + filename, self.prefix + META):
                store.delete_prefix(obj.key)
        return entry

    def close(self) -> None:
        self.file.close()
        self.tmp.unlink(missing_ok=True)


class TenantFiles:
    """One kind of a tenant's uploads (`models`, `datasets`) in the artifact store. Each kind
    gives `start(tenant, name, ...)`: an `Upload` with the check its bytes must pass."""

    kind = "files"
    what = "file"  # for messages: "no dataset 'x'"
    setting = "SLIMTRAIN_MAX_..._BYTES"
    invalid_name: type[InvalidName] = InvalidName
    too_large: type[UploadTooLarge] = UploadTooLarge
    not_found: type[UploadNotFound] = UploadNotFound

    def __init__(self, artifacts: ArtifactStore, max_bytes: int, tmp_dir: Path | None = None):
        # tmp_dir: where uploads wait for their check (the data dir: /tmp may be small).
        self.artifacts, self.max_bytes, self.tmp_dir = artifacts, max_bytes, tmp_dir

    @classmethod
    def prefix(cls, tenant: str, name: str) -> str:
        return f"{TENANTS}/{tenant}/{cls.kind}/{check_upload_name(name, cls.what, cls.invalid_name)}/"

    def check_size(self, declared: int) -> None:
        """Refuse an upload whose Content-Length is above the limit before reading it."""
        if declared > self.max_bytes:
            raise self.too_large(
                f"the upload is {declared} bytes; the limit is {self.max_bytes} ({self.setting})"
            )

    def list(self, tenant: str) -> list[dict]:
        out = []
        for obj in self.artifacts.list(f"{TENANTS}/{tenant}/{self.kind}/"):
            if obj.key.endswith("/" + META):
                try:
                    out.append(self.artifacts.get_json(obj.key))
                except (ArtifactNotFound, ValueError):
                    continue  # deleted meanwhile, or half-written by another store
        return sorted(out, key=lambda e: e["name"])

    def get(self, tenant: str, name: str) -> dict:
        try:
            return self.artifacts.get_json(self.prefix(tenant, name) + META)
        except ArtifactNotFound:
            raise self.not_found(f"no {self.what} {name!r}") from None

    def delete(self, tenant: str, name: str) -> None:
        self.get(tenant, name)
        self.artifacts.delete_prefix(self.prefix(tenant, name))


# --- s3:// in a job's spec -----------------------------------------------------------------------


def inside(uri: str, prefix_uri: str) -> bool:
    """Whether `uri` (s3://bucket/key) lies in `prefix_uri` (s3://bucket[/prefix]), by whole
    path segments: s3://b/data does not contain s3://b/data-other/x."""
    u, s = urlparse(uri), urlparse(prefix_uri)
    if u.netloc != s.netloc:
        return False
    prefix = s.path.strip("/")
    return not prefix or u.path.lstrip("/").startswith(prefix + "/") or u.path.strip("/") == prefix


def check_s3(uri: str, field: str, artifacts: ArtifactStore, allowed: list[str] | None) -> str:
    """`uri` if a job may read it. The artifact store holds every tenant's files, so reaching it
    through s3:// would skip the tenant check: refused always. `allowed` (the operator's
    SLIMTRAIN_S3_ALLOWED_PREFIXES; None where one user runs with their own credentials, as in
    `slimtrain run`) bounds what the service's credentials may be used to read for a client."""
    if artifacts.uri.startswith("s3://") and inside(uri, artifacts.uri):
        raise field_error(field, "points into slimtrain's artifact store; upload it and use store://")
    if allowed is None or any(inside(uri, p) for p in allowed):
        return uri
    if not allowed:
        raise field_error(
            field,
            "s3:// URIs are not enabled on this server; the operator allows buckets or prefixes with "
            "SLIMTRAIN_S3_ALLOWED_PREFIXES (e.g. s3://bucket/prefix), or upload the file and use store://",
        )
    raise field_error(
        field,
        f"{uri} is outside the S3 prefixes this server allows ({', '.join(allowed)}; "
        "SLIMTRAIN_S3_ALLOWED_PREFIXES)",
    )
