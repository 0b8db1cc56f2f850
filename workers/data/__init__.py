"""The dataset registry: `digits` (scikit-learn, real), `synthetic` (deterministic by seed),
`text` (char-level corpus from the Python standard library's sources) and `uri` (a file from the
artifact store or S3 in one of the formats of workers/data/formats.py: npz, parquet, JSON Lines,
text, image folders in a zip or tar). Everything is held in memory as tensors: the datasets are
small, and index-based batching keeps every rank's view a pure function of the step."""

from __future__ import annotations

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
        from workers.data import formats

        raw = formats.load(spec, lambda uri, field: _read_uri(uri, store, field))
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


def _read_uri(uri: str, store, field: str = "data.uri") -> bytes:
    scheme, _, rest = uri.partition("://")
    if scheme == "store":
        if store is None:
            raise ConfigError(f"{field}: store:// needs an artifact store")
        from service.errors import ArtifactNotFound

        try:
            return store.get_bytes(rest)
        except ArtifactNotFound:
            raise ConfigError(f"{field}: {uri} not found in the artifact store") from None
    if scheme == "s3":
        from service.s3_store import read_s3_uri

        try:
            return read_s3_uri(uri)
        except ConfigError as e:  # its messages speak of data.uri
            raise ConfigError(field + ": " + e.message.removeprefix("data.uri: ")) from None
    raise ConfigError(f"{field}: unsupported scheme {scheme!r}")
