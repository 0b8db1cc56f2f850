"""The dataset registry: `digits` (scikit-learn, real), `synthetic` (deterministic by seed),
`text` (char-level corpus from the Python standard library's sources) and `uri` (an .npz with X
and y from the artifact store or S3). Everything is held in memory as tensors: the datasets are
small, and index-based batching keeps every rank's view a pure function of the step."""

from __future__ import annotations

import io
import zipfile
import zlib
from dataclasses import dataclass

import numpy as np
import torch

from service.errors import ConfigError
from service.spec import DataSpec
from workers.data import sources
from workers.data.info import DataInfo
from workers.data.sharding import split_indices


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
        raw = _from_npz(_read_uri(spec.uri, store), spec.uri)
    elif spec.name == "digits":
        raw = sources.digits()
    elif spec.name == "synthetic":
        raw = sources.synthetic(**spec.args)
    elif spec.name == "text":
        raw = sources.text(**spec.args)
    else:  # spec validation makes this unreachable
        raise ConfigError(f"data.name: unknown dataset {spec.name!r}")
    return _split(raw, spec.val_fraction)


def _split(raw: sources.Raw, val_fraction: float) -> Dataset:
    x, y = raw.x, raw.y
    n = len(x)
    tr, va = split_indices(n, val_fraction)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    tokens = x.dtype == np.int64
    if tokens:
        kind = "tokens"
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
    )
    return Dataset(xt[tr], yt[tr], xt[va], yt[va], info)


def _read_uri(uri: str, store) -> bytes:
    scheme, _, rest = uri.partition("://")
    if scheme == "store":
        if store is None:
            raise ConfigError("data.uri: store:// needs an artifact store")
        from service.errors import ArtifactNotFound

        try:
            return store.get_bytes(rest)
        except ArtifactNotFound:
            raise ConfigError(f"data.uri: {uri} not found in the artifact store") from None
    if scheme == "s3":
        from service.s3_store import read_s3_uri

        return read_s3_uri(uri)
    raise ConfigError(f"data.uri: unsupported scheme {scheme!r}")


def _from_npz(raw: bytes, uri: str):
    try:
        # allow_pickle=False: an .npz from a user must never execute code when loaded.
        with np.load(io.BytesIO(raw), allow_pickle=False) as z:
            x, y = z["X"], z["y"]
    # A truncated or corrupted upload surfaces as any of these; none is fixed by a retry.
    except (KeyError, ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error) as e:
        raise ConfigError(f"data.uri: {uri} is not an .npz with arrays X and y ({e})") from None
    if len(x) != len(y) or len(x) < 10:
        raise ConfigError(f"data.uri: X and y need the same length >= 10 (got {len(x)}, {len(y)})")
    if not np.issubdtype(y.dtype, np.integer) or y.min() < 0:
        raise ConfigError("data.uri: y must hold non-negative integer labels")
    y = y.astype(np.int64)
    if y.ndim == 2:  # token sequences: X and y are int [N, T]
        if not np.issubdtype(x.dtype, np.integer) or x.shape != y.shape:
            raise ConfigError("data.uri: token data needs integer X of the same shape as y")
        return sources.Raw(x.astype(np.int64), y, None, uri)
    if y.ndim != 1:
        raise ConfigError("data.uri: y must be [N] labels or [N, T] tokens")
    image_shape = sources.image_shape_of(x.shape[1:])
    return sources.Raw(x.reshape(len(x), -1).astype(np.float32), y, image_shape, uri)
