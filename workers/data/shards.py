"""Datasets of several files (shards), as Spark, Ray Data or pandas write a table larger than
memory: a `data.uri` ending in "/" names a folder (`store://datasets/NAME/`, the tenant's
uploads NAME/part-0.parquet, NAME/part-1.parquet, ...; or `s3://bucket/prefix/` inside the
operator's allowed prefixes). Its shards are the files under it of the job's format, read in
sorted key order, as if they were one file: parquet rows and npz arrays concatenated, jsonl/text
documents one file's after the other's (each file's lines as that file alone gives them, so a
file need not end in a line break). The deterministic split and the seeded shuffles are the one
file's; only the reading changes (workers/data/formats.py in memory, workers/data/streaming.py's
plans streamed).

Which files: every file under the folder (recursively, as Ray Data's readers do) whose name ends
in one of the format's endings (service.spec.DATA_FORMATS), skipping any path segment that
starts with "_" or "." (Spark's `_SUCCESS`, `_temporary/`, `.part-0.crc`). An uploaded shard is
stored as `NAME/SHARD/data.EXT` (service/datasets.py), which the same rule finds; it is named
`NAME/SHARD` in messages.
"""

from __future__ import annotations

from dataclasses import dataclass

from service.errors import ConfigError
from service.spec import DATA_FORMATS

# Formats a folder may hold. Image archives are one archive each: their class folders and
# sample order are the archive's own, with no meaning across archives.
SHARDABLE = ("parquet", "jsonl", "text", "npz")


@dataclass(frozen=True)
class Shard:
    uri: str  # what messages call it: the folder's uri + its name under the folder
    path: str  # its path in the filesystem that reads it (pyarrow.fs)
    size: int


def is_folder(uri: str | None) -> bool:
    return uri is not None and uri.endswith("/")


def skipped(rel: str) -> bool:
    """Whether the file at `rel` (its path under a folder of shards) is no shard, whatever its
    ending: a path part that starts with "_" or "." (Spark's `_SUCCESS`, `_temporary/`,
    `.part-0.crc`), or an empty or ".." part. The one rule for every reader of a folder and for
    `slimtrain dataset push DIR`. Pure."""
    return any(p.startswith(("_", ".")) or p in ("", "..") for p in rel.split("/"))


def select(
    uri: str, fmt: str, entries: list[tuple[str, int]], store_layout: bool
) -> list[tuple[str, str, int]]:
    """(name shown, relative key, size) of the shards among `entries` (key relative to the folder,
    size), in sorted key order. Pure. `store_layout`: the keys are uploads' `SHARD/data.EXT`, shown as
    SHARD. ConfigError naming data.uri when the folder holds none."""
    if fmt not in SHARDABLE:
        raise ConfigError(
            f"data.uri: {uri} is a folder; a folder of {fmt} files is not a dataset "
            f"(shards may be {', '.join(SHARDABLE)}; an image dataset is one zip or tar archive)"
        )
    endings = DATA_FORMATS[fmt]
    out = []
    for rel, size in sorted(entries):
        if skipped(rel):
            continue
        parts = rel.split("/")
        if not parts[-1].lower().endswith(endings):
            continue
        shown = "/".join(parts[:-1]) if store_layout and len(parts) > 1 else rel
        out.append((shown, rel, size))
    if not out:
        raise ConfigError(f"data.uri: {uri} holds no {fmt} files (names ending in {', '.join(endings)})")
    return out


def list_shards(
    uri: str, location: str, store, fmt: str, field: str = "data.uri"
) -> tuple[list[Shard], object]:
    """The shards of the folder `location` (what the service resolved for `uri`: store://KEY/ or
    an allowed s3://bucket/prefix/) and the pyarrow filesystem that reads them."""
    import pyarrow.fs as pafs

    scheme, _, rest = location.partition("://")
    if scheme == "store":
        if store is None:
            raise ConfigError(f"{field}: store:// needs an artifact store")
        objs = store.list(rest)
        entries = [(o.key[len(rest) :], int(o.size)) for o in objs if o.key.startswith(rest)]
        chosen = select(uri, fmt, entries, store_layout=True)
        if hasattr(store, "path"):  # LocalArtifactStore: files under its root
            fs = pafs.LocalFileSystem()
            paths = [str(store.path(rest + rel)) for _, rel, _ in chosen]
        else:  # S3 store: bucket/key, with the store's endpoint and credentials
            base, fs = store.ray_storage(rest.rstrip("/"))
            paths = [f"{base}/{rel}" for _, rel, _ in chosen]
    elif scheme == "s3":
        from workers.data import s3_location

        base, fs = s3_location(location, field, folder=True)
        try:
            infos = fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
        except OSError as e:  # access denied, no such bucket, endpoint unreachable
            raise ConfigError(f"{field}: {uri} is not readable ({e})") from None
        entries = [
            (i.path[len(base) + 1 :], int(i.size))
            for i in infos
            if i.type == pafs.FileType.File and i.path.startswith(base + "/")
        ]
        chosen = select(uri, fmt, entries, store_layout=False)
        paths = [f"{base}/{rel}" for _, rel, _ in chosen]
    else:
        raise ConfigError(f"{field}: only store:// and s3:// folders hold shards (got {uri})")
    shards = [Shard(uri + shown, p, size) for (shown, _, size), p in zip(chosen, paths, strict=True)]
    return shards, fs


def read_bytes(shard: Shard, fs) -> bytes:
    try:
        with fs.open_input_file(shard.path) as f:
            return f.readall()
    except OSError as e:
        raise ConfigError(f"data.uri: {shard.uri} is not readable ({e})") from None


def check_same_columns(schemas: list[tuple[str, object]], columns: list[str], folder: str) -> list[str]:
    """The job's `columns` that the first shard has; ConfigError naming data.uri, the column and
    the shard when another shard lacks one of them or holds it with another type. Columns the
    job does not read may differ (pandas writes an all-null column as type null). Pure."""
    (first_uri, first), rest = schemas[0], schemas[1:]
    have = [c for c in columns if c in first.names]
    for uri, schema in rest:
        for c in have:
            if c not in schema.names:
                raise ConfigError(
                    f"data.uri: {uri} has no column {c!r}, which {first_uri} has: the shards of "
                    f"{folder} must share one schema"
                )
            a, b = first.field(c).type, schema.field(c).type
            if a != b:
                raise ConfigError(
                    f"data.uri: column {c!r} is {b} in {uri} but {a} in {first_uri}: the shards of "
                    f"{folder} must share one schema"
                )
    return have
