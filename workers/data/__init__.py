"""The dataset registry: `digits` (scikit-learn, real), `synthetic` (deterministic by seed),
`text` (char-level corpus from the Python standard library's sources) and `uri` (a file from the
artifact store or S3 in one of the formats of workers/data/formats.py: npz, parquet, JSON Lines,
text, image folders in a zip or tar; or a folder of parquet, jsonl/text or npz shards,
workers/data/shards.py). Held in memory as tensors, where index-based batching keeps
every rank's view a pure function of the step; a parquet, npz, jsonl/text or image zip/tar file
larger than memory streams through Ray Data instead (`load_for_job`, workers/data/streaming.py)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

import numpy as np

from service.errors import ConfigError
from service.spec import DataSpec, streaming_unsupported
from workers.data import sources
from workers.data.info import DataInfo
from workers.data.shards import Shard, is_folder, list_shards, read_bytes

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


@dataclass
class Dataset:
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    info: DataInfo


def load_dataset(spec: DataSpec, store=None) -> Dataset:
    """Load and split a dataset. `store` (an ArtifactStore) is needed for store:// URIs."""
    if spec.uri is not None:
        from workers.data import formats

        def read(uri, field):
            return _read_uri(uri, store, field)

        shards = None
        if is_folder(spec.uri):
            files, fs = locate_shards(spec, store)
            shards = [(f.uri, partial(read_bytes, f, fs)) for f in files]
        raw = formats.load(spec, read, shards)
    elif spec.name == "digits":
        raw = sources.digits()
    elif spec.name == "synthetic":
        raw = sources.synthetic(**spec.args)
    elif spec.name == "text":
        raw = sources.text(**spec.args)
    else:  # spec validation makes this unreachable
        raise ConfigError(f"data.name: unknown dataset {spec.name!r}")
    return _split(raw, spec.val_fraction)


def load_for_job(spec: DataSpec, strategy: str, store=None, stream_above_bytes: int | None = None):
    """The job's data: a `Dataset` in memory, or a `streaming.StreamedData` that workers read
    through Ray Data, as `data.streaming` decides (auto: files above `stream_above_bytes`,
    default SLIMTRAIN_STREAM_ABOVE_BYTES)."""
    from workers.data import streaming

    size = path = fs = None
    if spec.streaming != "off" and streaming_unsupported(spec, strategy) is None:
        # What the service resolved (the tenant's key), as the in-memory path reads it.
        if is_folder(spec.uri):
            path, fs = locate_shards(spec, store)  # a folder's files: their total size decides
            size = sum(f.size for f in path)
        else:
            path, fs, size = locate_uri(spec.location("data.uri"), store)
    if stream_above_bytes is None:
        from service.settings import Settings

        stream_above_bytes = Settings().stream_above_bytes
    if streaming.wants_streaming(spec, strategy, size, stream_above_bytes):
        tok = None
        if spec.tokenizer and spec.resolved_format in ("jsonl", "text"):
            tok = _read_uri(spec.location("data.tokenizer"), store, "data.tokenizer")
        try:
            return streaming.open_streamed(spec, path, fs, tok)
        except streaming.NotStreamable as e:
            if spec.streaming == "on":
                raise
            log.info("data.uri %s cannot stream (%s): loading it in memory", spec.uri, e.message)
    return load_dataset(spec, store)


def _split(raw: sources.Raw, val_fraction: float) -> Dataset:
    # torch only here: the API validates uploads with this package's readers and has no torch
    import torch

    from workers.data.sharding import split_indices

    x, y = raw.x, raw.y
    n = len(x)
    tr, va = split_indices(n, val_fraction)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    tokens = x.dtype == np.int64
    if tokens:
        # int tokens [N, T]: next-token targets [N, T], or one class label per sequence [N]
        kind = raw.kind or "tokens"
        num_classes = raw.num_classes or int(max(x.max(), y.max())) + 1
        mean, std = 0.0, 1.0
    else:
        kind = "image" if raw.image_shape else "vector"
        num_classes = raw.num_classes or int(y.max()) + 1
        train_x = xt[tr]
        # One scalar mean/std of the training split: per-feature statistics blow up on constant
        # features (the digits' border pixels are always 0).
        mean, std = float(train_x.mean()), float(train_x.std().clamp_min(1e-6))
    info = DataInfo(
        kind=kind,
        input_shape=tuple(x.shape[1:]),
        input_dtype=str(x.dtype),
        num_classes=num_classes,
        image_shape=raw.image_shape,
        mean=mean,
        std=std,
        n_train=len(tr),
        n_val=len(va),
        source=raw.source,
        vocab_size=raw.vocab_size,
    )
    return Dataset(xt[tr], yt[tr], xt[va], yt[va], info)


def _store_key(uri: str, store, field: str) -> str | None:
    """The artifact-store key a store:// URI names (None for another scheme)."""
    scheme, _, rest = uri.partition("://")
    if scheme != "store":
        return None
    if store is None:
        raise ConfigError(f"{field}: store:// needs an artifact store")
    return rest


def locate_shards(spec: DataSpec, store) -> tuple[list[Shard], object]:
    """The files of a folder `data.uri` (workers/data/shards.py), in read order, and the pyarrow
    filesystem that reads them."""
    return list_shards(spec.uri, spec.location("data.uri"), store, spec.resolved_format)


def locate_uri(uri: str, store, field: str = "data.uri") -> tuple[str, object, int]:
    """(path, pyarrow filesystem, size in bytes) of the file a store:// or s3:// URI names, for readers
    that stream it (workers/data/streaming.py) rather than take its bytes (`_read_uri`)."""
    import pyarrow.fs as pafs

    key = _store_key(uri, store, field)
    if key is None:
        if uri.partition("://")[0] != "s3":
            raise ConfigError(f"{field}: only store:// and s3:// datasets can be streamed (got {uri})")
        path, fs = s3_location(uri, field)
    elif hasattr(store, "path"):  # LocalArtifactStore: a file under its root
        path, fs = str(store.path(key)), pafs.LocalFileSystem()
    else:  # S3: bucket/key and a pyarrow S3FileSystem with the store's endpoint and credentials
        path, fs = store.ray_storage(key)
    where = "in the artifact store" if key is not None else "(or not readable with the service's credentials)"
    try:
        info = fs.get_file_info(path)
    except OSError as e:  # S3: access denied, no such bucket, endpoint unreachable
        raise ConfigError(f"{field}: {uri} is not readable ({e})") from None
    if info.type != pafs.FileType.File:
        raise ConfigError(f"{field}: {uri} not found {where}")
    return path, fs, int(info.size)


def s3_location(
    uri: str, field: str = "data.uri", endpoint_url: str | None = None, folder: bool = False
) -> tuple[str, object]:
    """(bucket/key, pyarrow S3FileSystem) of an s3:// URI, with the endpoint and the static
    credentials the in-memory reader (service.s3_store.read_s3_uri) uses: the filesystem travels
    pickled into Ray Data's read tasks, so they need no AWS variables of their own. The
    operator's allow-list (SLIMTRAIN_S3_ALLOWED_PREFIXES) was checked at submission. `folder`:
    the URI names a prefix (bucket/prefix, no trailing slash; a whole bucket is allowed)."""
    from urllib.parse import urlparse

    import boto3
    import pyarrow.fs as pafs

    from service.s3_store import DEFAULT_REGION, check_endpoint, parse_s3_uri, static_credentials

    bucket, key = parse_s3_uri(uri, setting=field)
    if not key and not folder:
        raise ConfigError(f"{field}: {uri!r} names a bucket, not an object")
    if endpoint_url is None:
        from service.settings import Settings

        endpoint_url = Settings().s3_endpoint_url
    endpoint_url = check_endpoint(endpoint_url)
    session = boto3.session.Session()
    kwargs: dict = {"region": session.region_name or DEFAULT_REGION}
    if endpoint_url:
        parsed = urlparse(endpoint_url)
        kwargs.update(endpoint_override=parsed.netloc, scheme=parsed.scheme)
    creds = static_credentials(session)
    if creds is not None:
        kwargs.update(
            access_key=creds.access_key, secret_key=creds.secret_key, session_token=creds.session_token
        )
    return f"{bucket}/{key}".rstrip("/"), pafs.S3FileSystem(**kwargs)


def _read_uri(uri: str, store, field: str = "data.uri") -> bytes:
    rest = _store_key(uri, store, field)
    if rest is not None:
        from service.errors import ArtifactNotFound

        try:
            return store.get_bytes(rest)
        except ArtifactNotFound:
            raise ConfigError(f"{field}: {uri} not found in the artifact store") from None
    scheme = uri.partition("://")[0]
    if scheme == "s3":
        from service.s3_store import read_s3_uri

        try:
            return read_s3_uri(uri)
        except ConfigError as e:  # its messages speak of data.uri
            raise ConfigError(field + ": " + e.message.removeprefix("data.uri: ")) from None
    raise ConfigError(f"{field}: unsupported scheme {scheme!r}")
