"""The S3 artifact store: AWS S3, MinIO or any S3-compatible endpoint (`s3://bucket/prefix`).

Credentials come from the standard AWS chain (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY /
AWS_SESSION_TOKEN, shared files, instance roles); the endpoint from SLIMTRAIN_S3_ENDPOINT_URL.
A store pickles with its endpoint and, when they are static, its credentials: the driver hands
it to Ray workers that have no AWS variables of their own, as Ray Train's pyarrow filesystem
does for checkpoint uploads. Expiring credentials (instance roles, web identity) are never
frozen into the pickle: each process resolves its own.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO
from urllib.parse import urlparse

from service.artifacts import ArtifactStore, ObjectInfo, check_name
from service.errors import ArtifactKeyError, ArtifactNotFound, ConfigError

log = logging.getLogger(__name__)

URI_SETTING = "SLIMTRAIN_ARTIFACT_URI"
ENDPOINT_SETTING = "SLIMTRAIN_S3_ENDPOINT_URL"
DEFAULT_REGION = "us-east-1"
# S3 refuses presigned URLs valid for longer than 7 days.
MAX_PRESIGN_SECONDS = 7 * 24 * 3600
# Above this, uploads go multipart and are read from disk in parts rather than held in memory.
MULTIPART_THRESHOLD = 16 * 1024 * 1024
S3_KEY_MAX_BYTES = 1024


@dataclass(frozen=True)
class S3Credentials:
    access_key: str
    secret_key: str = field(repr=False)
    session_token: str | None = field(default=None, repr=False)


def parse_s3_uri(uri: str, setting: str = URI_SETTING) -> tuple[str, str]:
    """(bucket, key or prefix without surrounding slashes) of `s3://bucket/key`."""
    parsed = urlparse(uri)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise ConfigError(f"{setting}: {uri!r} is not an s3://bucket/prefix URI")
    if parsed.query or parsed.fragment or parsed.params:
        raise ConfigError(f"{setting}: {uri!r} may not have a query or fragment")
    return parsed.netloc, parsed.path.strip("/")


def check_endpoint(endpoint_url: str | None) -> str | None:
    if not endpoint_url:
        return None
    parsed = urlparse(endpoint_url)
    if parsed.scheme not in ("http", "https") or not parsed.netloc or parsed.path.strip("/"):
        raise ConfigError(f"{ENDPOINT_SETTING}: {endpoint_url!r} must be http(s)://host[:port] with no path")
    return endpoint_url.rstrip("/")


def static_credentials(session) -> S3Credentials | None:
    """The session's credentials when they are static (environment, shared file, explicit);
    None for refreshable ones, which must not be frozen into a pickle that outlives them."""
    from botocore.credentials import RefreshableCredentials

    creds = session.get_credentials()
    if creds is None or isinstance(creds, RefreshableCredentials):
        return None
    frozen = creds.get_frozen_credentials()
    return S3Credentials(frozen.access_key, frozen.secret_key, frozen.token)


def make_client(endpoint_url: str | None, region: str, credentials: S3Credentials | None):
    import boto3
    from botocore.config import Config

    config = Config(
        region_name=region,
        retries={"max_attempts": 5, "mode": "standard"},
        # MinIO and most S3-compatible servers serve only path-style requests.
        s3={"addressing_style": "path" if endpoint_url else "auto"},
    )
    kwargs = {}
    if credentials is not None:
        kwargs = {
            "aws_access_key_id": credentials.access_key,
            "aws_secret_access_key": credentials.secret_key,
            "aws_session_token": credentials.session_token,
        }
    return boto3.session.Session().client("s3", endpoint_url=endpoint_url, config=config, **kwargs)


def _error_code(err) -> str:
    return str(getattr(err, "response", {}).get("Error", {}).get("Code", ""))


def translate(err: Exception, bucket: str, key: str, endpoint_url: str | None) -> Exception:
    """A boto error as one of ours, naming the setting to fix; unknown errors pass through."""
    from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

    where = f"s3://{bucket}/{key}"
    if isinstance(err, EndpointConnectionError):
        return ConfigError(f"{ENDPOINT_SETTING}: cannot reach {endpoint_url or 'AWS S3'} ({err})")
    if isinstance(err, NoCredentialsError):
        return ConfigError(
            f"{where}: no S3 credentials; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
            "(or another standard AWS credential source)"
        )
    if isinstance(err, ClientError):
        code = _error_code(err)
        if code in ("NoSuchKey", "404", "NotFound"):
            return ArtifactNotFound(f"no artifact {where}")
        if code == "NoSuchBucket":
            return ConfigError(f"{URI_SETTING}: bucket {bucket!r} does not exist")
        if code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            return ConfigError(
                f"{where}: access denied ({code}); check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY "
                "and the bucket's policy"
            )
    return err


class S3ArtifactStore(ArtifactStore):
    """Keys live under `prefix/` in the bucket. Every key passes `check_name` before it reaches
    S3, so no caller can address an object outside the store's prefix."""

    def __init__(
        self,
        uri: str,
        endpoint_url: str | None = None,
        *,
        region: str | None = None,
        credentials: S3Credentials | None = None,
    ):
        import boto3

        self.bucket, self.prefix = parse_s3_uri(uri)
        if self.prefix:
            check_name(self.prefix)
        self.uri = f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"
        self.endpoint_url = check_endpoint(endpoint_url)
        session = boto3.session.Session()
        self.region = region or session.region_name or DEFAULT_REGION
        self.credentials = credentials if credentials is not None else static_credentials(session)
        self._client = None

    def __repr__(self) -> str:  # Ray prints configs holding a store: never show credentials
        return f"S3ArtifactStore({self.uri!r}, endpoint_url={self.endpoint_url!r})"

    def __getstate__(self) -> dict:
        # A boto3 client is neither picklable nor fork-safe: each process makes its own.
        return {**self.__dict__, "_client": None}

    @property
    def client(self):
        if self._client is None:
            self._client = make_client(self.endpoint_url, self.region, self.credentials)
        return self._client

    def full_key(self, key: str) -> str:
        """The object key of a store key; refuses anything `check_name` refuses."""
        key = key.strip("/")
        full = f"{self.prefix}/{key}" if self.prefix and key else (self.prefix or key)
        # S3 limits the whole object key, so a name within our own limit can still be too long
        # once the store's and the job's prefixes are in front of it: say which limit bites.
        if len(full.encode()) > S3_KEY_MAX_BYTES:
            raise ArtifactKeyError(
                f"artifact name too long: its S3 key would be {len(full.encode())} bytes with the "
                f"store and job prefixes; S3 allows {S3_KEY_MAX_BYTES}"
            )
        if key:
            check_name(key)
        return full

    def _call(self, key: str, fn, **kwargs):
        try:
            return fn(Bucket=self.bucket, **kwargs)
        except Exception as e:
            raise translate(e, self.bucket, key, self.endpoint_url) from None

    def put_bytes(self, key: str, data: bytes) -> None:
        self._call(key, self.client.put_object, Key=self.full_key(key), Body=data)

    def put_file(self, key: str, path: str | Path) -> None:
        self._transfer(
            key, lambda full, config: self.client.upload_file(str(path), self.bucket, full, Config=config)
        )

    def put_fileobj(self, key: str, f: BinaryIO) -> None:
        self._transfer(
            key, lambda full, config: self.client.upload_fileobj(f, self.bucket, full, Config=config)
        )

    def _transfer(self, key: str, upload) -> None:
        """A managed upload: multipart above the threshold, the source read part by part."""
        from boto3.s3.transfer import TransferConfig

        config = TransferConfig(
            multipart_threshold=MULTIPART_THRESHOLD, multipart_chunksize=MULTIPART_THRESHOLD
        )
        full = self.full_key(key)
        try:
            upload(full, config)
        except Exception as e:
            # boto3 wraps the ClientError of a failed upload; translate the original.
            cause = e.__context__ if isinstance(e.__context__, Exception) else e
            raise translate(cause, self.bucket, full, self.endpoint_url) from None

    def open_read(self, key: str) -> BinaryIO:
        """The object's body as a stream: nothing is read until the caller reads."""
        return self._call(key, self.client.get_object, Key=self.full_key(key))["Body"]

    def exists(self, key: str) -> bool:
        try:
            self._call(key, self.client.head_object, Key=self.full_key(key))
            return True
        except ArtifactNotFound:
            return False

    def _iter_objects(self, object_prefix: str):
        paginator = self.client.get_paginator("list_objects_v2")
        try:
            for page in paginator.paginate(Bucket=self.bucket, Prefix=object_prefix):
                yield from page.get("Contents", [])
        except Exception as e:
            raise translate(e, self.bucket, object_prefix, self.endpoint_url) from None

    def list(self, prefix: str) -> list[ObjectInfo]:
        folder = self.full_key(prefix)
        folder = f"{folder}/" if folder else ""
        cut = len(self.prefix) + 1 if self.prefix else 0
        out = [
            ObjectInfo(obj["Key"][cut:], obj["Size"])
            for obj in self._iter_objects(folder)
            # Zero-byte "dir/" markers made by pyarrow's create_dir are not artifacts.
            if not obj["Key"].endswith("/")
        ]
        return sorted(out, key=lambda o: o.key)

    def delete_prefix(self, prefix: str) -> None:
        """Delete the object named `prefix` and everything in the folder `prefix/`."""
        if not prefix.strip("/"):
            raise ArtifactKeyError("refusing to delete the store root")
        full = self.full_key(prefix)
        keys = [full] + [obj["Key"] for obj in self._iter_objects(full + "/")]
        for i in range(0, len(keys), 1000):  # DeleteObjects takes at most 1000 keys
            batch = [{"Key": k} for k in keys[i : i + 1000]]
            resp = self._call(prefix, self.client.delete_objects, Delete={"Objects": batch, "Quiet": True})
            errors = [e for e in resp.get("Errors", []) if e.get("Code") != "NoSuchKey"]
            if errors:
                raise ConfigError(f"s3://{self.bucket}/{full}: could not delete {errors[0]}")

    def ray_storage(self, prefix: str) -> tuple[str, object | None]:
        """`bucket/prefix/<prefix>` and a pyarrow S3FileSystem, so that Ray Train uploads
        checkpoints straight into the bucket from every worker."""
        import pyarrow.fs

        kwargs: dict = {"region": self.region}
        if self.endpoint_url:
            parsed = urlparse(self.endpoint_url)
            kwargs.update(endpoint_override=parsed.netloc, scheme=parsed.scheme)
        if self.credentials is not None:
            kwargs.update(
                access_key=self.credentials.access_key,
                secret_key=self.credentials.secret_key,
                session_token=self.credentials.session_token,
            )
        return f"{self.bucket}/{self.full_key(prefix)}", pyarrow.fs.S3FileSystem(**kwargs)

    def presigned_url(self, key: str, expires: int = 900, filename: str | None = None) -> str:
        """A time-limited GET URL for the object, for downloads that bypass the API. It is
        signed for the store's endpoint: clients must be able to reach that endpoint."""
        if not 1 <= expires <= MAX_PRESIGN_SECONDS:
            raise ValueError(f"expires: {expires} must be 1..{MAX_PRESIGN_SECONDS} seconds")
        params = {"Bucket": self.bucket, "Key": self.full_key(key)}
        if filename:
            params["ResponseContentDisposition"] = f'attachment; filename="{check_name(filename)}"'
        return self.client.generate_presigned_url("get_object", Params=params, ExpiresIn=expires)


def read_s3_uri(uri: str, endpoint_url: str | None = None) -> bytes:
    """The whole object named by `uri` (the reader behind `data.uri: s3://bucket/key.npz`).
    The endpoint defaults to SLIMTRAIN_S3_ENDPOINT_URL; credentials from the AWS chain."""
    import boto3

    bucket, key = parse_s3_uri(uri, setting="data.uri")
    if not key:
        raise ConfigError(f"data.uri: {uri!r} names a bucket, not an object")
    if endpoint_url is None:
        from service.settings import Settings

        endpoint_url = Settings().s3_endpoint_url
    endpoint_url = check_endpoint(endpoint_url)
    session = boto3.session.Session()
    client = make_client(endpoint_url, session.region_name or DEFAULT_REGION, static_credentials(session))
    try:
        with client.get_object(Bucket=bucket, Key=key)["Body"] as body:
            return body.read()
    except Exception as e:
        if _error_code(e) in ("NoSuchKey", "NoSuchBucket", "404", "NotFound"):
            raise ConfigError(f"data.uri: {uri} does not exist") from None
        raise translate(e, bucket, key, endpoint_url) from None
