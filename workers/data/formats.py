"""Readers of the dataset formats a `data.uri` may hold, into the same raw arrays the built-in
sets give (workers/data/sources.Raw), so splitting, normalisation and models see no difference.

- npz: arrays X and y. Float (or small-integer) X with [N] labels is classification; 4-D X is an
  image batch, NCHW unless `layout: nhwc`. int X with [N, T] y of its shape is language
  modelling; int X [N, T] with [N] labels is sequence classification (kept int64, kind
  "sequence").
- parquet: `feature_columns` (numeric columns, or one column of fixed-length, maybe nested,
  lists) + `label_column`; or `token_column` (lists of token ids), with `label_column` for
  sequence classification, without it cut into `seq_len` blocks for language modelling.
- jsonl / text: every line a document (jsonl: its `text_column`), tokenised on its own with a
  HuggingFace tokenizer.json (`tokenizers`) or as UTF-8 bytes, each followed by a newline,
  concatenated and cut into `seq_len` blocks: X is tokens[i*T : (i+1)*T], y the same shifted by
  one, as the built-in `text` set.
- image_zip / image_tar: one folder per class, class index = position of the folder name in
  sorted order; samples in file-name order. Read with Pillow as 8-bit gray (modes 1, L, LA, I,
  I;16, F) or RGB (any other; alpha dropped); one channel if every image is gray, else three
  (gray replicated), whatever the archive order. Resized to `image_size` when given (else all
  must share one size) and kept as float32 pixel values 0-255 (the model normalises its input by
  the training split's mean and std).

Labels must lie in 0..num_classes-1; with no `num_classes` given every class in 0..max must
occur, so a stray label (-1, 255 for "ignore") is refused rather than becoming a class.
"""

from __future__ import annotations

import io
import json
import zipfile
import zlib
from collections.abc import Callable, Iterator

import numpy as np

from service.errors import ConfigError
from service.spec import DataSpec
from workers.data import archives
from workers.data.sources import Raw, image_shape_of

DEFAULT_SEQ_LEN = 64
MIN_SAMPLES = 10
# Pillow's own bomb guard is a warning up to 2x its limit; this path refuses outright.
MAX_IMAGE_PIXELS = 4096 * 4096
_GRAY_MODES = {"1", "L", "LA", "I", "I;16", "F"}

Reader = Callable[[str, str], bytes]  # (uri, spec field) -> bytes


def load(spec: DataSpec, read: Reader, shards: list[tuple[str, Callable[[], bytes]]] | None = None) -> Raw:
    """The dataset as raw arrays. `shards`: a folder's files (workers/data/shards.py), each
    (its uri, a reader of its bytes) in read order, instead of the one file `read` gives."""
    if shards is not None:
        out = _from_shards(spec, read, shards)
    else:
        # What the service resolved (the tenant's store key, an allowed s3:// URI); messages
        # keep speaking of spec.uri, the name the user wrote.
        out = _from_file(spec, read, read(spec.location("data.uri"), "data.uri"))
    if len(out.x) < MIN_SAMPLES:
        raise ConfigError(
            f"data.uri: {spec.uri} gives {len(out.x)} samples; at least {MIN_SAMPLES} are needed"
        )
    return out


def _from_shards(spec: DataSpec, read: Reader, shards: list[tuple[str, Callable[[], bytes]]]) -> Raw:
    """A folder's files as one: parquet tables and npz arrays concatenated (the columns the job
    reads checked alike in every shard), jsonl/text documents file after file."""
    fmt = spec.resolved_format
    if fmt == "parquet":
        from workers.data.shards import check_same_columns

        tables = [(uri, _read_parquet(get(), uri)) for uri, get in shards]
        have = check_same_columns([(u, t.schema) for u, t in tables], parquet_columns(spec), spec.uri)
        if len(have) < len(parquet_columns(spec)):
            return parquet_raw(tables[0][1], spec)  # names the missing column, as for one file
        import pyarrow as pa

        return parquet_raw(pa.concat_tables([t.select(have) for _, t in tables]), spec)
    if fmt == "npz":
        arrays = [(uri, *_npz_arrays(get(), uri)) for uri, get in shards]
        check_same_arrays([(uri, npz_schema(x, y)) for uri, x, y in arrays], spec.uri)
        return npz_raw(np.concatenate([a[1] for a in arrays]), np.concatenate([a[2] for a in arrays]), spec)
    if fmt in ("jsonl", "text"):
        docs: list[str] = []
        for uri, get in shards:
            docs.extend(line_documents(utf8(get(), uri), spec.model_copy(update={"uri": uri})))
        tok_json = read(spec.location("data.tokenizer"), "data.tokenizer") if spec.tokenizer else None
        return text_raw(docs, spec, tok_json)
    raise ConfigError(f"data.uri: {spec.uri} is a folder; {fmt} datasets are one file")


def _from_file(spec: DataSpec, read: Reader, raw: bytes) -> Raw:
    fmt = spec.resolved_format
    if fmt == "npz":
        out = from_npz(raw, spec)
    elif fmt == "parquet":
        out = from_parquet(raw, spec)
    elif fmt in ("jsonl", "text"):
        tok = read(spec.location("data.tokenizer"), "data.tokenizer") if spec.tokenizer else None
        out = from_text(raw, spec, tok)
    elif fmt == "image_zip":
        out = from_images(archives.iter_zip(raw), spec)
    elif fmt == "image_tar":
        out = from_images(archives.iter_tar(raw), spec)
    else:  # spec validation makes this unreachable
        raise ConfigError(f"data.format: unknown format {fmt!r}")
    return out


# --- labels and arrays --------------------------------------------------------------------


def check_labels(y: np.ndarray, num_classes: int | None, field: str) -> int:
    """The number of classes; ConfigError naming `field` when a label is out of range."""
    if not np.issubdtype(y.dtype, np.integer):
        raise ConfigError(f"{field}: labels must be integers 0..K-1 (got {y.dtype})")
    if y.size == 0:
        raise ConfigError(f"{field}: no labels")
    lo, hi = int(y.min()), int(y.max())
    if num_classes is not None:
        if lo < 0 or hi >= num_classes:
            bad = lo if lo < 0 else hi
            raise ConfigError(
                f"{field}: label {bad} outside the class range 0..{num_classes - 1} "
                f"(data.num_classes={num_classes})"
            )
        return num_classes
    if lo < 0:
        raise ConfigError(f"{field}: label {lo} is negative; labels are class indices 0..K-1")
    missing = np.setdiff1d(np.arange(hi + 1), np.unique(y))
    if len(missing):
        raise ConfigError(
            f"{field}: labels run 0..{hi} but class {int(missing[0])} never occurs ({len(missing)} missing); "
            "labels must be contiguous class indices, or set data.num_classes"
        )
    return hi + 1


def token_vocab(tokens: np.ndarray, num_classes: int | None, field: str) -> int:
    """The vocabulary size of a token stream: `num_classes`, else the largest id + 1. Unlike
    class labels, ids need not all occur."""
    if tokens.size == 0:
        raise ConfigError(f"{field}: no tokens")
    lo, hi = int(tokens.min()), int(tokens.max())
    if lo < 0:
        raise ConfigError(f"{field}: token id {lo} is negative")
    if num_classes is not None and hi >= num_classes:
        raise ConfigError(
            f"{field}: token id {hi} outside the vocabulary 0..{num_classes - 1} "
            f"(data.num_classes={num_classes})"
        )
    return num_classes or hi + 1


def _features(
    x: np.ndarray, layout: str | None, field: str
) -> tuple[np.ndarray, tuple[int, int, int] | None]:
    """Float32 features [N, F] and the (C, H, W) image shape they hold, if any."""
    if not (np.issubdtype(x.dtype, np.number) or x.dtype == np.bool_):
        raise ConfigError(f"{field}: features must be numeric (got {x.dtype})")
    if x.ndim == 4:
        if layout == "nhwc":
            x = x.transpose(0, 3, 1, 2)
    elif layout is not None:
        raise ConfigError(f"data.layout: applies to 4-D image arrays [N, C, H, W]; {field} is {x.ndim}-D")
    x = np.ascontiguousarray(x, dtype=np.float32)
    if not np.isfinite(x).all():
        raise ConfigError(f"{field}: features contain NaN or infinity")
    return x.reshape(len(x), -1), image_shape_of(x.shape[1:])


def _blocks(tokens: np.ndarray, seq_len: int, vocab: int, source: str) -> Raw:
    """Language-modelling samples: X = T tokens, y = the next T (as workers/data/sources.text)."""
    n = (len(tokens) - 1) // seq_len
    if n < MIN_SAMPLES:
        raise ConfigError(
            f"data.seq_len: {len(tokens)} tokens make {n} samples of {seq_len}; "
            f"at least {MIN_SAMPLES} are needed"
        )
    idx = np.arange(n)[:, None] * seq_len + np.arange(seq_len)[None, :]
    return Raw(tokens[idx], tokens[idx + 1], None, source, vocab)


# --- npz ----------------------------------------------------------------------------------


def _npz_arrays(raw: bytes, uri: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        # allow_pickle=False: an .npz from a user must never execute code when loaded.
        z = np.load(io.BytesIO(raw), allow_pickle=False)
        if not isinstance(z, np.lib.npyio.NpzFile):  # a bare .npy loads as one array
            raise ValueError("one .npy array, not an .npz archive")
        with z:
            x, y = z["X"], z["y"]
    # A truncated or corrupted upload surfaces as any of these; none is fixed by a retry.
    except (KeyError, ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error) as e:
        raise ConfigError(f"data.uri: {uri} is not an .npz with arrays X and y ({e})") from None
    for name, a in (("X", x), ("y", y)):
        if a.ndim == 0:  # as npy_header says it
            raise ConfigError(f"data.uri: {uri}: array {name} is a scalar; X and y need one row per sample")
    if len(x) != len(y):
        raise ConfigError(f"data.uri: X and y of {uri} need the same length (got {len(x)}, {len(y)})")
    return x, y


def from_npz(raw: bytes, spec: DataSpec) -> Raw:
    return npz_raw(*_npz_arrays(raw, spec.uri), spec)


def npz_member(zf: zipfile.ZipFile, name: str, uri: str) -> zipfile.ZipInfo:
    """The zip entry of array `name` ("X" or "y") of an open npz."""
    try:
        return zf.getinfo(name + ".npy")
    except KeyError:
        raise ConfigError(f"data.uri: {uri} is not an .npz with arrays X and y (no {name})") from None


def npy_header(f, name: str, uri: str) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, Fortran order, dtype) of the .npy whose magic `f` is at (numpy.lib.format), `f`
    left at its first data byte; refusing what np.load(allow_pickle=False) refuses, and a
    scalar. The streamed reader (workers/data/streaming.py) and the upload check
    (service/datasets.py) parse npz members with it, neither loading an array."""
    from numpy.lib import format as npy

    try:
        version = npy.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = npy.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, fortran, dtype = npy.read_array_header_2_0(f)
        else:
            raise ValueError(f".npy format version {version} is not read here")
    except ValueError as e:
        raise ConfigError(f"data.uri: {uri} is not an .npz with arrays X and y ({name}: {e})") from None
    if dtype.hasobject:  # np.load(allow_pickle=False) refuses these in memory
        raise ConfigError(f"data.uri: {uri} is not an .npz with arrays X and y ({name} holds Python objects)")
    if not shape:
        raise ConfigError(f"data.uri: {uri}: array {name} is a scalar; X and y need one row per sample")
    return tuple(int(d) for d in shape), bool(fortran), dtype


def npz_schema(x, y) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
    """Each array's dtype and per-sample shape: what the shards of a folder must share."""
    return {"X": (x.dtype, tuple(x.shape[1:])), "y": (y.dtype, tuple(y.shape[1:]))}


def check_same_arrays(schemas: list[tuple[str, dict]], folder: str) -> None:
    """ConfigError naming data.uri, the array and the shard when a shard's X or y differs in
    dtype or per-sample shape from the first shard's (`npz_schema` of each). Pure."""
    (first, s0), rest = schemas[0], schemas[1:]
    for uri, s in rest:
        for name in ("X", "y"):
            (da, sa), (db, sb) = s0[name], s[name]
            if da != db or sa != sb:
                raise ConfigError(
                    f"data.uri: array {name} is {db} {list(sb)} per sample in {uri} "
                    f"but {da} {list(sa)} in {first}: the shards of {folder} must share one schema"
                )


def npz_kind(x_dtype: np.dtype, x_shape: tuple[int, ...], y_shape: tuple[int, ...], spec: DataSpec) -> str:
    """What npz arrays X and y of these dtypes and per-sample shapes hold: "tokens" (language
    modelling: int X [N, T], y [N, T]), "sequence" (int32/int64 X [N, T] with one label per row:
    token ids, never cast to float) or "features" (anything else numeric, with [N] labels).
    Pure: the in-memory path and the streamed one (a group of rows at a time) decide alike."""
    if len(y_shape) == 1:  # token sequences: X and y are int [N, T]
        if not np.issubdtype(x_dtype, np.integer) or x_shape != y_shape:
            raise ConfigError("data.uri: token data needs integer X of the same shape as y")
        return "tokens"
    if len(y_shape) != 0:
        raise ConfigError("data.uri: y must be [N] labels or [N, T] tokens")
    if (
        len(x_shape) == 1
        and np.issubdtype(x_dtype, np.integer)
        and x_dtype.itemsize >= 4
        and spec.layout is None
    ):
        return "sequence"
    return "features"


def npz_rows(
    x: np.ndarray, y: np.ndarray, kind: str, spec: DataSpec
) -> tuple[np.ndarray, np.ndarray, tuple[int, int, int] | None]:
    """(x, y, image shape) of some rows of npz arrays of `kind` (`npz_kind`): what the model
    gets (int64 tokens; float32 features [N, F], NHWC images transposed to NCHW first). Row by
    row, so any group of rows decodes as it would within the whole array; the checks over all
    rows (labels, vocabulary) are the caller's."""
    if kind == "tokens":
        return x.astype(np.int64), y.astype(np.int64), None
    y = y.astype(np.int64)
    if kind == "sequence":
        _check_ids(x, spec.uri)
        return x.astype(np.int64), y, None
    x, image_shape = _features(x, spec.layout, "data.uri: X")
    return x, y, image_shape


def npz_raw(x: np.ndarray, y: np.ndarray, spec: DataSpec) -> Raw:
    uri = spec.uri
    if len(x) != len(y):
        raise ConfigError(f"data.uri: X and y need the same length (got {len(x)}, {len(y)})")
    kind = npz_kind(x.dtype, x.shape[1:], y.shape[1:], spec)
    if kind == "tokens":
        vocab = token_vocab(np.concatenate([x.ravel(), y.ravel()]), spec.num_classes, "data.uri: X/y tokens")
        xs, ys, _ = npz_rows(x, y, kind, spec)
        return Raw(xs, ys, None, uri, vocab)
    k = check_labels(y, spec.num_classes, "data.uri: y")
    xs, ys, image_shape = npz_rows(x, y, kind, spec)
    if kind == "sequence":
        return Raw(xs, ys, None, uri, k, kind="sequence", vocab_size=int(xs.max()) + 1)
    return Raw(xs, ys, image_shape, uri, k)


def _check_ids(x: np.ndarray, source: str) -> None:
    if x.size and x.min() < 0:
        raise ConfigError(f"{source}: token ids must be non-negative (found {int(x.min())})")


def _sequence(x: np.ndarray, y: np.ndarray, k: int, source: str) -> Raw:
    _check_ids(x, source)
    return Raw(x.astype(np.int64), y, None, source, k, kind="sequence", vocab_size=int(x.max()) + 1)


# --- parquet ------------------------------------------------------------------------------


def _read_parquet(raw: bytes, uri: str):
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.read_table(io.BytesIO(raw))
    except (pa.ArrowException, OSError, ValueError) as e:
        raise ConfigError(f"data.uri: {uri} is not a readable parquet file ({e})") from None


def _column(table, name: str, field: str):
    if name not in table.column_names:
        cols = ", ".join(table.column_names[:20])
        raise ConfigError(f"{field}: no column {name!r} in the parquet file (columns: {cols})")
    col = table.column(name).combine_chunks()
    if col.null_count:
        raise ConfigError(f"{field}: column {name!r} has {col.null_count} null values")
    return col


def _list_column(col, name: str, field: str) -> np.ndarray:
    """A column of equal-length (maybe nested) lists as one array [N, d1, d2, ...]."""
    import pyarrow as pa
    import pyarrow.compute as pc

    n, dims = len(col), []
    while (
        pa.types.is_list(col.type)
        or pa.types.is_large_list(col.type)
        or pa.types.is_fixed_size_list(col.type)
    ):
        lengths = pc.list_value_length(col).to_numpy(zero_copy_only=False)
        if len(lengths) and (lengths != lengths[0]).any():
            row = int(np.argmax(lengths != lengths[0]))
            raise ConfigError(
                f"{field}: column {name!r} holds lists of different lengths "
                f"({lengths[0]} and {lengths[row]}, "
                f"at depth {len(dims) + 1}); all rows must have one shape"
            )
        dims.append(int(lengths[0]) if len(lengths) else 0)
        col = pc.list_flatten(col)
        if col.null_count:
            raise ConfigError(f"{field}: column {name!r} has null values inside its lists")
    return _numeric(col, name, field).reshape(n, *dims)


def _numeric(col, name: str, field: str) -> np.ndarray:
    import pyarrow as pa

    t = col.type
    if not (pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t)):
        raise ConfigError(f"{field}: column {name!r} is {t}, not numeric")
    # a copy: Arrow's zero-copy views are read-only, and torch wants writable arrays
    return np.array(col.to_numpy(zero_copy_only=False))


def parquet_columns(spec: DataSpec) -> list[str]:
    """The columns a job reads of a parquet dataset."""
    cols = [*(spec.feature_columns or []), spec.token_column, spec.label_column]
    return [c for c in cols if c is not None]


def from_parquet(raw: bytes, spec: DataSpec) -> Raw:
    return parquet_raw(_read_parquet(raw, spec.uri), spec)


def parquet_raw(table, spec: DataSpec) -> Raw:
    import pyarrow as pa

    uri = spec.uri
    if spec.token_column is not None:
        col = _column(table, spec.token_column, "data.token_column")
        if spec.label_column is None:  # language modelling over the concatenated token lists
            import pyarrow.compute as pc

            if not pa.types.is_list(col.type) and not pa.types.is_large_list(col.type):
                raise ConfigError(
                    f"data.token_column: column {spec.token_column!r} is {col.type}, not a list of token ids"
                )
            tokens = _numeric(pc.list_flatten(col), spec.token_column, "data.token_column")
            if not np.issubdtype(tokens.dtype, np.integer):
                raise ConfigError(f"data.token_column: token ids must be integers (got {tokens.dtype})")
            tokens = tokens.astype(np.int64)
            vocab = token_vocab(tokens, spec.num_classes, "data.token_column")
            return _blocks(tokens, spec.seq_len or DEFAULT_SEQ_LEN, vocab, f"{uri} ({spec.token_column})")
        x = _list_column(col, spec.token_column, "data.token_column")
        if x.ndim != 2 or not np.issubdtype(x.dtype, np.integer):
            raise ConfigError(
                f"data.token_column: column {spec.token_column!r} must hold flat lists of integer token ids"
            )
        y = _numeric(
            _column(table, spec.label_column, "data.label_column"), spec.label_column, "data.label_column"
        )
        k = check_labels(y, spec.num_classes, "data.label_column")
        return _sequence(x, y.astype(np.int64), k, uri)
    y = _numeric(
        _column(table, spec.label_column, "data.label_column"), spec.label_column, "data.label_column"
    )
    k = check_labels(y, spec.num_classes, f"data.label_column ({spec.label_column!r})")
    cols = spec.feature_columns
    if len(cols) == 1 and not _is_scalar(table, cols[0]):
        x = _list_column(_column(table, cols[0], "data.feature_columns"), cols[0], "data.feature_columns")
    else:
        x = np.stack(
            [_numeric(_column(table, c, "data.feature_columns"), c, "data.feature_columns") for c in cols],
            axis=1,
        )
    x, image_shape = _features(x, spec.layout, "data.feature_columns")
    return Raw(x, y.astype(np.int64), image_shape, uri, k)


def _is_scalar(table, name: str) -> bool:
    import pyarrow as pa

    if name not in table.column_names:
        return True  # _column names the missing column
    t = table.schema.field(name).type
    return not (pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t))


# --- text ---------------------------------------------------------------------------------


def _documents(raw: bytes, spec: DataSpec) -> Iterator[str]:
    """What the upload check counts (service/datasets.py): a text file's whole text, a jsonl
    file's documents."""
    text = utf8(raw, spec.uri)
    if spec.resolved_format == "text":
        yield text
        return
    yield from line_documents(text, spec)


def utf8(raw: bytes, uri: str | None, offset: int = 0) -> str:
    """`raw` as text; ConfigError naming the file's byte (`offset`: where `raw` starts in it)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"data.uri: {uri} is not UTF-8 text (byte {offset + e.start})") from None


def line_documents(text: str, spec: DataSpec, first_line: int = 1) -> list[str]:
    """The documents of whole lines of a jsonl or text file (`text` starts at a line's start and
    ends after a "\n" or at the file's end), each ending in "\n". jsonl: each non-blank line's
    `text_column`; text: each line. A document never spans a line break, so any line-aligned
    piece of a file tokenises to its share of the whole file's tokens: the streamed path's read
    tasks tokenise pieces (workers/data/streaming.TextPlan)."""
    lines = text.split("\n")  # not splitlines(): JSON strings may hold a raw U+2028
    if lines[-1] == "":
        lines.pop()  # the piece ends in "\n"
    if spec.resolved_format == "text":
        return [line + "\n" for line in lines]
    key = spec.text_column or "text"
    docs = []
    for i, line in enumerate(lines, first_line):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"data.uri: line {i} of {spec.uri} is not JSON ({e.msg})") from None
        if not isinstance(obj, dict) or not isinstance(obj.get(key), str):
            raise ConfigError(f"data.text_column: line {i} has no string field {key!r}")
        doc = obj[key]
        docs.append(doc if doc.endswith("\n") else doc + "\n")
    return docs


def load_tokenizer(tokenizer_json: bytes | str, spec: DataSpec):
    from tokenizers import Tokenizer

    try:
        text = tokenizer_json.decode("utf-8") if isinstance(tokenizer_json, bytes) else tokenizer_json
        return Tokenizer.from_str(text)
    except Exception as e:  # the library raises plain Exception for a malformed file
        raise ConfigError(f"data.tokenizer: {spec.tokenizer} is not a tokenizer.json ({e})") from None


def tokenize(docs: list[str], tokenizer) -> np.ndarray:
    """int64 token ids of the documents, concatenated: each document tokenised on its own (no
    special tokens), or its UTF-8 bytes without a tokenizer."""
    if tokenizer is None:
        return np.frombuffer("".join(docs).encode("utf-8"), dtype=np.uint8).astype(np.int64)
    ids = [np.asarray(e.ids, dtype=np.int64) for e in tokenizer.encode_batch(docs, add_special_tokens=False)]
    return np.concatenate(ids) if ids else np.zeros(0, np.int64)


def text_vocab(spec: DataSpec, tokenizer) -> tuple[int, str]:
    """(vocabulary size, source description) of a jsonl/text dataset."""
    if tokenizer is None:
        return 256, f"{spec.uri}, bytes as tokens"
    return tokenizer.get_vocab_size(), f"{spec.uri}, tokenizer {spec.tokenizer}"


def from_text(raw: bytes, spec: DataSpec, tokenizer_json: bytes | None) -> Raw:
    """Every line a document (jsonl: its text field), tokenised on its own; the documents'
    tokens concatenated and cut into `seq_len` blocks."""
    return text_raw(line_documents(utf8(raw, spec.uri), spec), spec, tokenizer_json)


def text_raw(docs: list[str], spec: DataSpec, tokenizer_json: bytes | None) -> Raw:
    tok = None if tokenizer_json is None else load_tokenizer(tokenizer_json, spec)
    tokens = tokenize(docs, tok)
    vocab, source = text_vocab(spec, tok)
    return _blocks(tokens, spec.seq_len or DEFAULT_SEQ_LEN, vocab, source)


# --- image folders ------------------------------------------------------------------------


def decode_image(name: str, data: bytes, size: int | None) -> tuple[str, np.ndarray] | None:
    """(class folder, pixels [H, W, C] float32 0-255) of one archive entry, None for archive
    noise (hidden files, macOS resource forks). The streamed path decodes with it too."""
    from PIL import Image, UnidentifiedImageError

    parts = name.split("/")
    if any(p.startswith(".") or p == "__MACOSX" for p in parts):
        return None  # hidden files and macOS resource forks are archive noise, not samples
    if len(parts) < 2:
        raise ConfigError(f"data.uri: archive entry {name!r} is not inside a class folder")
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.width * img.height > MAX_IMAGE_PIXELS:
                raise ConfigError(
                    f"data.uri: archive entry {name!r} is {img.width}x{img.height}, "
                    f"over {MAX_IMAGE_PIXELS} pixels"
                )
            # gray stays one channel; if any image is colour, all become RGB (`image_array`)
            img = img.convert("L" if img.mode in _GRAY_MODES else "RGB")
            if size is not None and img.size != (size, size):
                img = img.resize((size, size), Image.Resampling.BILINEAR)
            px = np.asarray(img, dtype=np.float32)
            px = px[:, :, None] if px.ndim == 2 else px
    except ConfigError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise ConfigError(f"data.uri: archive entry {name!r} is not a readable image ({e})") from None
    return "/".join(parts[:-1]), px


def check_image_shape(name: str, px: np.ndarray, shape: tuple[int, int] | None) -> tuple[int, int]:
    if shape is not None and px.shape[:2] != shape:
        raise ConfigError(
            f"data.uri: archive entry {name!r} is {px.shape[1]}x{px.shape[0]}, the first image "
            f"{shape[1]}x{shape[0]}; set data.image_size to resize them all"
        )
    return px.shape[:2]


def class_index(folders: set[str]) -> dict[str, int]:
    """Class folder -> label: the folder's position in sorted order; the folders must be
    siblings, at least two."""
    if not folders:
        raise ConfigError("data.uri: no images found; the archive needs one folder per class")
    ordered = sorted(folders)
    depth = {c.count("/") for c in ordered}
    parents = {c.rpartition("/")[0] for c in ordered}
    if len(depth) != 1 or len(parents) != 1:
        raise ConfigError(
            f"data.uri: class folders must be siblings (found {', '.join(ordered[:5])}); "
            "put one folder per class at the archive's top (or under one common folder)"
        )
    if len(ordered) < 2:
        raise ConfigError(f"data.uri: one class folder ({ordered[0]!r}); classification needs at least 2")
    return {c: i for i, c in enumerate(ordered)}


def sample_key(name: str) -> tuple[str, str]:
    """Archive order is whatever the packer wrote; sorting by file name (then folder) makes the
    sample order, hence the train/validation split, a function of the contents alone, and
    keeps a numbered export (00000.png, 00001.png, ... across class folders) in its order."""
    return name.rpartition("/")[2], name


def image_array(pxs: list[np.ndarray], shape: tuple[int, int], channels: int) -> np.ndarray:
    """Images [H, W, c] as one float32 array [N, channels*H*W] (NCHW flattened); gray
    replicated into R, G and B is what Pillow's own L -> RGB conversion gives."""
    x = np.stack([np.broadcast_to(px, (*shape, channels)) for px in pxs]).transpose(0, 3, 1, 2)
    return np.ascontiguousarray(x).reshape(len(pxs), -1)


def from_images(members: Iterator[tuple[str, bytes]], spec: DataSpec) -> Raw:
    items: list[tuple[str, str, np.ndarray]] = []  # (class folder, entry, pixels [H, W, C])
    shape = None  # (H, W) of the first image
    for name, data in members:
        got = decode_image(name, data, spec.image_size)
        if got is None:
            continue
        folder, px = got
        shape = check_image_shape(name, px, shape)
        items.append((folder, name, px))
    index = class_index({c for c, _, _ in items})
    folders = sorted(index)
    items.sort(key=lambda it: sample_key(it[1]))
    channels = max(px.shape[2] for _, _, px in items)
    x = image_array([px for _, _, px in items], shape, channels)
    y = np.array([index[c] for c, _, _ in items], dtype=np.int64)
    names = [c.rpartition("/")[2] for c in folders]
    source = (
        f"{spec.uri}: {len(items)} images, classes {', '.join(names[:10])}{'...' if len(names) > 10 else ''}"
    )
    return Raw(x, y, (channels, *shape), source, len(folders))
