"""Tenant-scoped datasets: uploads (`PUT /v1/datasets/{name}`), checked on arrival with the
workers' own readers (workers/data/formats.py), and the resolution of a job's `data.uri` /
`data.tokenizer` to the store keys its workers read.

Layout: `_tenants/<tenant>/datasets/<name>/data.<ext>` (or `tokenizer.json`) + `meta.json`
(size, sha256, created, format, samples, num_classes, columns); service/tenant_files.py has
what datasets share with models. A name's ending gives its format (`?format=` overrides it);
the stored file's name is fixed by the format, so readers never guess from the user's name.

The check reads the file as the workers will: parquet batch by batch (the format meant for
data larger than memory: decoding every page finds corruption, and only the label column's
distinct values are kept); npz the same way, its members' .npy headers parsed as the streamed
reader parses them and the arrays decoded a bounded chunk at a time (`_inspect_npz`: an npz may
be larger than memory too); text and archives whole, as the in-memory path loads them anyway
(archives through workers/data/archives.py's limits, images shrunk to 4x4 so the check's
memory is small whatever their size).
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import numpy as np

from service.artifacts import ArtifactStore
from service.errors import ArtifactNotFound, ConfigError
from service.spec import DATA_FORMATS, DataSpec, JobSpec, parse_spec
from service.tenant_files import (
    META,
    TENANTS,
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

TOKENIZER = "tokenizer"
# What an upload may be, and the endings that name each when `?format=` is not given.
UPLOAD_FORMATS: dict[str, tuple[str, ...]] = {**DATA_FORMATS, TOKENIZER: (".json",)}
# The stored file's name: its ending is its format's, for any reader that looks at endings.
FILENAMES = {fmt: "data" + endings[0] for fmt, endings in DATA_FORMATS.items()} | {
    TOKENIZER: "tokenizer.json"
}
PARQUET_BATCH_ROWS = 65_536
# The npz check decodes at most about this many bytes of an array at a time (plus the float32
# copy and mask the in-memory path's checks make of them).
NPZ_CHUNK_BYTES = 4 * 2**20
CHECK_IMAGE_SIDE = 4  # images are decoded for the check, then kept this small


class InvalidDatasetName(InvalidName):
    code = "invalid_dataset_name"


class DatasetNotFound(UploadNotFound):
    code = "dataset_not_found"


class DatasetTooLarge(UploadTooLarge):
    code = "dataset_too_large"


class InvalidDataset(UploadRefused):
    """The bytes are not a dataset of the format they claim (unreadable, no label column, no
    class folders, an unsafe archive, labels out of range): the message says what."""

    code = "invalid_dataset"


def upload_format(name: str, fmt: str | None) -> str:
    if fmt is not None:
        if fmt not in UPLOAD_FORMATS:
            raise InvalidDataset(f"format: {fmt!r}; allowed: {', '.join(UPLOAD_FORMATS)}", "format")
        return fmt
    low = name.lower()
    for f, endings in UPLOAD_FORMATS.items():
        if low.endswith(endings):
            return f
    endings = ", ".join(e for es in UPLOAD_FORMATS.values() for e in es)
    raise InvalidDataset(
        f"cannot tell the format from the name {name!r}: end it in one of {endings}, or give ?format=",
        "format",
    )


def dataset_key(tenant: str, name: str, fmt: str) -> str:
    return DatasetStore.prefix(tenant, name) + FILENAMES[fmt]


# --- the check on arrival --------------------------------------------------------------------


def inspect_dataset(
    name: str, fmt: str, label_column: str | None, text_column: str | None, path: Path, size: int
) -> tuple[str, dict]:
    """Read the received file as a job would; InvalidDataset saying what is wrong."""
    try:
        found = _inspect(name, fmt, label_column, text_column, path)
    except ConfigError as e:
        # The readers speak of the job's fields; here the body is at fault.
        raise InvalidDataset(e.message.removeprefix("data.uri: ")) from None
    return FILENAMES[fmt], {"format": fmt, "num_classes": None, "columns": None, **found}


def _inspect(name: str, fmt: str, label_column: str | None, text_column: str | None, path: Path) -> dict:
    from workers.data import archives, formats

    uri = f"store://datasets/{name}"
    if fmt == "parquet":
        return _inspect_parquet(path, label_column, uri)
    if fmt == TOKENIZER:
        from tokenizers import Tokenizer

        try:
            tok = Tokenizer.from_str(path.read_text("utf-8"))
        except Exception as e:  # the library raises plain Exception for a malformed file
            raise ConfigError(f"not a tokenizer.json ({e})") from None
        return {"samples": 0, "num_classes": tok.get_vocab_size()}
    if fmt == "npz":
        return _inspect_npz(path, uri)
    raw = path.read_bytes()
    if fmt in ("jsonl", "text"):
        spec = DataSpec(uri=uri, format=fmt, text_column=text_column if fmt == "jsonl" else None)
        docs = list(formats._documents(raw, spec))  # UTF-8, and JSON with its text field per line
        n = len(docs) if fmt == "jsonl" else sum(1 for line in docs[0].split("\n") if line.strip())
        if not n:
            raise ConfigError(f"{uri} holds no text")
        return {"samples": n}
    members = archives.iter_zip(raw) if fmt == "image_zip" else archives.iter_tar(raw)
    out = formats.from_images(members, DataSpec(uri=uri, format=fmt, image_size=CHECK_IMAGE_SIDE))
    _enough(len(out.x), uri)
    return {"samples": len(out.x), "num_classes": out.num_classes}


def _enough(n: int, uri: str) -> None:
    from workers.data.formats import MIN_SAMPLES

    if n < MIN_SAMPLES:
        raise ConfigError(f"{uri} holds {n} samples; a job needs at least {MIN_SAMPLES}")


def _inspect_npz(path: Path, uri: str) -> dict:
    """What formats.npz_raw finds in the whole arrays (the same samples and classes, the same
    refusals), without holding them: X's and y's .npy headers parsed (formats.npy_header, as
    the streamed reader does), then y and X read through zipfile a chunk at a time (stored or
    deflated alike, each member's CRC checked at its end, as np.load checks it) and checked by
    the in-memory path's functions: labels (check_labels over the distinct labels) or token
    ids (token_vocab over the smallest and largest) first, then every chunk of X decoded by
    formats.npz_rows (numeric, finite, token ids not negative)."""
    import zipfile
    import zlib

    from workers.data import formats as F

    spec = DataSpec(uri=uri, format="npz")
    try:
        with zipfile.ZipFile(path) as zf:
            (sx, fx, dx), (sy, fy, dy) = (_npy_header(zf, name, uri) for name in ("X", "y"))
            if sx[0] != sy[0]:
                raise ConfigError(f"data.uri: X and y of {uri} need the same length (got {sx[0]}, {sy[0]})")
            kind = F.npz_kind(dx, sx[1:], sy[1:], spec)
            if kind == "tokens":
                lo, hi, seen = 0, -1, False
                for name, shape, fortran, dtype in (("X", sx, fx, dx), ("y", sy, fy, dy)):
                    for part in _npy_chunks(zf, name, shape, fortran, dtype, uri):
                        if part.size:
                            lo, hi, seen = min(lo, int(part.min())), max(hi, int(part.max())), True
                tokens = np.array([lo, hi]) if seen else np.zeros(0, np.int64)
                k = F.token_vocab(tokens, None, "data.uri: X/y tokens")
            else:
                labels = np.zeros(0, dy)
                for part in _npy_chunks(zf, "y", sy, fy, dy, uri):
                    labels = np.union1d(labels, part)
                k = F.check_labels(labels, None, "data.uri: y")
                no_y = np.zeros(0, np.int64)  # y is checked; npz_rows decodes X and y apart
                for part in _npy_chunks(zf, "X", sx, fx, dx, uri):
                    F.npz_rows(part, no_y, kind, spec)
    # A truncated or corrupted upload surfaces as any of these (np.load's own list; and an
    # entry compressed with a method zipfile lacks).
    except (ValueError, OSError, EOFError, NotImplementedError, zipfile.BadZipFile, zlib.error) as e:
        raise ConfigError(f"data.uri: {uri} is not an .npz with arrays X and y ({e})") from None
    _enough(sx[0], uri)
    return {"samples": sx[0], "num_classes": k}


def _npy_header(zf, name: str, uri: str) -> tuple[tuple[int, ...], bool, np.dtype]:
    from workers.data.formats import npy_header, npz_member

    with zf.open(npz_member(zf, name, uri)) as f:
        return npy_header(f, name, uri)


def _npy_chunks(zf, name: str, shape: tuple[int, ...], fortran: bool, dtype: np.dtype, uri: str):
    """Array `name` of the open npz, NPZ_CHUNK_BYTES or one row at a time, in the order it is
    stored: runs of rows [r, *shape[1:]]; a Fortran-ordered array (stored column by column)
    as runs of its elements, 1-D, which the checks (per element, none looks across a row)
    take alike."""
    from workers.data.formats import npy_header, npz_member

    per = shape[1:] if not (fortran and len(shape) > 1) else ()
    unit = dtype.itemsize * int(np.prod(per, dtype=np.int64))  # bytes of one row (one element)
    left = dtype.itemsize * int(np.prod(shape, dtype=np.int64))
    if unit == 0:
        return
    step = max(1, NPZ_CHUNK_BYTES // unit) * unit
    with zf.open(npz_member(zf, name, uri)) as f:
        npy_header(f, name, uri)  # to the first data byte
        while left:
            size = min(step, left)
            data = f.read(size)
            if len(data) != size:
                raise ConfigError(f"data.uri: {uri}: array {name} is truncated")
            left -= size
            yield np.frombuffer(data, dtype).reshape(-1, *per)


def _inspect_parquet(path: Path, label_column: str | None, uri: str) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from workers.data.formats import _numeric, check_labels

    try:
        pf = pq.ParquetFile(path)
        columns = pf.schema_arrow.names
        label = label_column or ("label" if "label" in columns else None)
        if label is not None and label not in columns:
            raise ConfigError(
                f"label_column: no column {label!r} in the parquet file (columns: {', '.join(columns[:20])})"
            )
        if label is None and not any(_token_list(pf.schema_arrow.field(c).type) for c in columns):
            raise ConfigError(
                "no label column: name it with ?label_column= (default 'label'; columns: "
                f"{', '.join(columns[:20])}), or give a column of token-id lists for language modelling"
            )
        rows, classes = 0, []
        # Every page is decoded (that is what finds a corrupt file), one batch at a time.
        for batch in pf.iter_batches(batch_size=PARQUET_BATCH_ROWS):
            rows += batch.num_rows
            if label is not None:
                col = batch.column(label)
                if col.null_count:
                    raise ConfigError(f"label_column: column {label!r} has null values")
                classes.append(np.unique(_numeric(col, label, "label_column")))
    except (pa.ArrowException, OSError) as e:
        raise ConfigError(f"{uri} is not a readable parquet file ({e})") from None
    _enough(rows, uri)
    found = {"samples": rows, "columns": columns}
    if label is not None:
        found["num_classes"] = check_labels(
            np.unique(np.concatenate(classes)), None, f"label column {label!r}"
        )
    return found


def _token_list(t) -> bool:
    import pyarrow as pa

    return (pa.types.is_list(t) or pa.types.is_large_list(t)) and pa.types.is_integer(t.value_type)


class DatasetStore(TenantFiles):
    """A tenant's uploaded datasets in the artifact store. A name is one segment (a dataset of
    one file), or SET/SHARD: one shard of the set SET, which a job reads whole as
    `store://datasets/SET/` (workers/data/shards.py). SET is then a folder, never also a
    dataset of its own."""

    kind, what, setting = "datasets", "dataset", "SLIMTRAIN_MAX_DATASET_BYTES"
    invalid_name, too_large, not_found = InvalidDatasetName, DatasetTooLarge, DatasetNotFound

    @classmethod
    def prefix(cls, tenant: str, name: str) -> str:
        # Each segment a strict name (no '.', '..', empty or absolute segment): no name reaches
        # outside its tenant's datasets.
        parts = name.split("/") if isinstance(name, str) else [name]
        if len(parts) > 2:
            raise cls.invalid_name(f"invalid dataset name {name!r}: a name is NAME, or SET/SHARD for a shard")
        for part in parts:
            check_upload_name(part, cls.what, cls.invalid_name)
        return f"{TENANTS}/{tenant}/{cls.kind}/{name}/"

    def shards(self, tenant: str, name: str) -> list[str]:
        """The names of the shards of set `name` (SET/SHARD), sorted."""
        base = self.prefix(tenant, name)
        return sorted(
            o.key[len(base) : -len("/" + META)]
            for o in self.artifacts.list(base)
            if o.key.endswith("/" + META) and o.key[len(base) :].count("/") == 1
        )

    def start(
        self,
        tenant: str,
        name: str,
        fmt: str | None = None,
        label_column: str | None = None,
        text_column: str | None = None,
    ) -> Upload:
        self.prefix(tenant, name)  # the name, then the format: both before any byte is read
        set_name, _, shard = name.partition("/")
        if shard and self.artifacts.exists(self.prefix(tenant, set_name) + META):
            raise InvalidDatasetName(
                f"dataset {set_name!r} is one file; a set of shards needs a name of its own (delete it first)"
            )
        if not shard and self.shards(tenant, name):
            raise InvalidDatasetName(
                f"{name!r} is a set of shards ({name}/...); upload a shard as {name}/SHARD, "
                "or delete the set first"
            )
        fmt = upload_format(name, fmt)
        return Upload(self, tenant, name, partial(inspect_dataset, name, fmt, label_column, text_column))

    def delete(self, tenant: str, name: str) -> None:
        """Delete a dataset, a shard (SET/SHARD), or a whole set (SET)."""
        whole_set = "/" not in name and not self.artifacts.exists(self.prefix(tenant, name) + META)
        if whole_set and self.shards(tenant, name):
            self.artifacts.delete_prefix(self.prefix(tenant, name))
            return
        super().delete(tenant, name)


# --- data.uri / data.tokenizer: resolution at submission ----------------------------------------


def resolve_data(
    spec: JobSpec, tenant: str, artifacts: ArtifactStore, allowed_s3: list[str] | None = None
) -> JobSpec:
    """Fill in `data.resolved_uri` / `data.resolved_tokenizer` for `tenant`: a store:// name
    becomes the key of the tenant's own upload (another tenant's is exactly as absent as a
    missing one), an s3:// URI must lie in `allowed_s3` (service.tenant_files.check_s3)."""
    data = spec.data
    if data.uri is None:
        return spec
    out = spec.model_dump(mode="json")
    for field, uri, fmt in (
        ("data.uri", data.uri, data.format),
        ("data.tokenizer", data.tokenizer, TOKENIZER),
    ):
        if uri is None:
            continue
        target = "resolved_uri" if field == "data.uri" else "resolved_tokenizer"
        if uri.startswith("s3://"):
            out["data"][target] = check_s3(uri, field, artifacts, allowed_s3)
            continue
        name = uri.removeprefix("store://datasets/")
        if field == "data.uri" and name.endswith("/"):
            out["data"]["format"], out["data"][target] = _resolve_set(artifacts, tenant, name[:-1], fmt)
            continue
        try:
            stored = artifacts.get_json(DatasetStore.prefix(tenant, name) + META)["format"]
        except (ArtifactNotFound, ValueError, KeyError, TypeError, InvalidName):
            raise field_error(field, f"no dataset {name!r} (push it with `slimtrain dataset push`)") from None
        if field == "data.tokenizer" and stored != TOKENIZER:
            raise field_error(field, f"dataset {name!r} is {stored}, not a tokenizer.json")
        if field == "data.uri":
            if stored == TOKENIZER:
                raise field_error(field, f"dataset {name!r} is a tokenizer.json, not data")
            if fmt is not None and fmt != stored:
                raise field_error("data.format", f"{fmt}, but dataset {name!r} was uploaded as {stored}")
            # Given here, never guessed from the name by the workers.
            out["data"]["format"] = stored
        out["data"][target] = dataset_key(tenant, name, stored)
    return parse_spec(out)


def _resolve_set(artifacts: ArtifactStore, tenant: str, name: str, fmt: str | None) -> tuple[str, str]:
    """(format, store key prefix) of the tenant's set of shards `name` (uploads NAME/SHARD),
    every shard of one format; as absent as a missing one when another tenant has it."""
    from workers.data.shards import SHARDABLE

    store = DatasetStore(artifacts, 0)
    try:
        base = store.prefix(tenant, name)
    except InvalidName:
        raise field_error("data.uri", f"no set of datasets {name!r}") from None
    if artifacts.exists(base + META):
        raise field_error("data.uri", f"dataset {name!r} is one file: name it store://datasets/{name}")
    shards = store.shards(tenant, name)
    if not shards:
        raise field_error(
            "data.uri",
            f"no dataset shards under {name + '/'!r} "
            f"(push each as {name}/SHARD with `slimtrain dataset push`)",
        )
    formats: dict[str, str] = {}
    for shard in shards:
        try:
            formats[shard] = artifacts.get_json(f"{base}{shard}/{META}")["format"]
        except (ArtifactNotFound, ValueError, KeyError, TypeError):
            raise field_error("data.uri", f"shard {name}/{shard} was deleted meanwhile") from None
    # A tokenizer.json may live beside the shards (data.tokenizer: store://datasets/SET/tok.json);
    # the workers read only files of the data's format.
    shards = [s for s in shards if formats[s] != TOKENIZER]
    if not shards:
        raise field_error("data.uri", f"no dataset shards under {name + '/'!r}, only a tokenizer.json")
    first = shards[0]
    for shard in shards:
        if formats[shard] != formats[first]:
            raise field_error(
                "data.uri",
                f"shard {name}/{shard} is {formats[shard]} but {name}/{first} is {formats[first]}: "
                "the shards of a set share one format",
            )
    stored = formats[first]
    if stored not in SHARDABLE:
        raise field_error(
            "data.uri", f"a set of {stored} shards is not a dataset (sets hold {', '.join(SHARDABLE)})"
        )
    if fmt is not None and fmt != stored:
        raise field_error("data.format", f"{fmt}, but the shards of {name!r} were uploaded as {stored}")
    return stored, base


def resolve_sources(
    spec: JobSpec, tenant: str, artifacts: ArtifactStore, jobs=None, allowed_s3: list[str] | None = None
) -> JobSpec:
    """Everything a job reads, resolved for the caller's tenant at submission: `model.init`
    (service.uploads.resolve_init) and the data."""
    from service.uploads import resolve_init

    spec = resolve_init(spec, tenant, artifacts, jobs, allowed_s3)
    return resolve_data(spec, tenant, artifacts, allowed_s3)
