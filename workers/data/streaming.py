"""Datasets larger than memory: a parquet file, an uncompressed npz, a jsonl/text corpus or an
image zip/tar archive streamed through Ray Data to the training workers, instead of loaded whole,
`ray.put` once and copied into every worker (workers/data/__init__.py). Each format has a `Plan`
that says how a read task decodes one group of samples (a row group, a run of npz rows or of
images, a line-aligned byte range).

Driver side (`open_streamed`): one pass over the file, a row group at a time, validates it and
computes what the in-memory path derives from the whole array (DataInfo: shapes, classes, the
training split's mean and std); `StreamedData.ray_datasets` then defines the "train" and "val"
Ray Datasets that the driver hands to the TorchTrainer (`datasets=`). Worker side (`Feed`): each
rank that reads (`reads`: all of them, or a pipeline's first and last stage) iterates its
`get_dataset_shard("train")` block by block (`rebatch`), and scores its share of "val".

The same rows, the same tensors: samples are decoded by the in-memory path's own parquet
functions (workers/data/formats.py), and the train/validation split is the in-memory path's
(`sharding.split_indices` over row positions), so a file gives the same training and validation
samples, the same dtypes and shapes, whichever path reads it. Ray Data's `read_parquet` does not
say which row of the file a row is, and the split needs that: the reader here is one Ray Data
task per parquet row group (`ray.data.range` over the row groups, `map_batches` reading each),
which knows every row's position. What changes is the order (see docs/reliability.md): a streamed
epoch visits the row groups in a seeded order and mixes rows in a seeded local shuffle buffer;
it is not the in-memory path's global permutation.

A folder of shards (workers/data/shards.py) streams as the one file they were cut from: a
plan's groups are every shard's row groups (line groups), a group never spanning two files
(`Plan.paths`, `Plan.group_shard`), and row positions count on across the files.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import torch

from service.errors import ConfigError
from service.spec import DataSpec, streaming_unsupported
from workers.data import formats as F
from workers.data import sharding as sh
from workers.data.info import DataInfo

log = logging.getLogger(__name__)

# One Ray Data read task reads consecutive row groups until it has this many rows or bytes
# (whichever comes first), and shuffles them: the rows a batch is mixed from, and the size of
# the blocks a worker holds. Fewer, larger tasks than one per row group: each task and block
# costs the executor and the iterators fixed work, on the CPUs the training workers need.
TASK_ROWS = 4096
TASK_BYTES = 16 * 2**20
# CPU a streamed job leaves free for Ray Data's read tasks. With every CPU taken by training
# workers Ray Data never starts a read ("backpressured ... 0 CPU") and the job hangs forever.
DATA_CPUS = 1.0
# One Ray Data read task (a row group); two fit in the CPU left free.
READ_TASK_CPUS = 0.5
# jsonl / text: the driver's checking pass cuts the file into line-aligned groups of about this
# many bytes (a group is what one read task tokenises at least; a task takes several).
TEXT_GROUP_BYTES = 256 * 1024
# Rows per forward pass when a rank scores its share of the validation split.
EVAL_CHUNK_ROWS = 512


# --- which path ---------------------------------------------------------------------------


def wants_streaming(spec: DataSpec, strategy: str, size: int | None, threshold: int) -> bool:
    """The `data.streaming` decision. Pure: `size` is the file's bytes (None when not looked up).
    `on` for a dataset that cannot stream is the user's error, named; `auto` falls back."""
    if spec.streaming == "off":
        return False
    why = streaming_unsupported(spec, strategy)
    if spec.streaming == "on":
        if why:
            raise ConfigError(f"data.streaming: on is not possible: {why}; use auto or off")
        return True
    return why is None and size is not None and size > threshold


def worker_cpus(workers: int, cluster_cpus: float, streamed: bool) -> float:
    """CPUs each training worker reserves. Streamed jobs leave DATA_CPUS free for Ray Data on a
    small cluster (2 workers on 2 CPUs get 0.5 each); ConfigError when even that cannot fit."""
    if not streamed:
        return 1.0
    spare = cluster_cpus - DATA_CPUS
    if spare <= 0 or spare / workers < 0.1:
        raise ConfigError(
            f"parallel.workers: a streamed dataset needs {DATA_CPUS:g} CPU left for Ray Data besides "
            f"{workers} training workers; the Ray cluster has {cluster_cpus:g} CPUs "
            "(use fewer workers, or data.streaming: off)"
        )
    return min(1.0, round(spare / workers, 2))


@dataclass(frozen=True)
class Reads:
    """What one rank reads of a streamed dataset (`reads` decides it)."""

    split: bool  # Ray Train splits "train" across the workers; else each reader gets it whole
    train: bool  # this rank reads: training batches of batch_size // count rows, and "val" ...
    share: tuple[int, int]  # ... whose rows % count == index it scores: (index, count)


def reads(strategy: str, rank: int, world: int) -> Reads:
    """Who reads what of a streamed dataset: the one place that decides it (the driver asks
    whether to split "train", each worker what it reads). Pure.

    ddp, fsdp: Ray Data splits the training stream, each rank reading its own share of every
    global batch, and every rank scores its share of the validation rows. pipeline: stage 0
    needs a batch's inputs and the last stage its targets, so both read the whole stream, each
    its own Ray Data execution of the same seeded items in order (`StreamedData.streams`), and
    so get the same global batches; the stages between read nothing (their inputs are the
    previous stage's activations) and run as many validation forwards as the others."""
    if strategy == "pipeline":
        ends = rank in (0, world - 1)
        return Reads(split=False, train=ends, share=(0, 1))
    return Reads(split=True, train=True, share=(rank, world))


def ingest_options():
    """Ray Data's execution options for the job's datasets (the TorchTrainer's DataConfig):
    blocks in order, so one worker's epoch is the same batches on every run; no progress bars."""
    from ray.data import DataContext, ExecutionOptions

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.enable_operator_progress_bars = False
    return ExecutionOptions(preserve_order=True)


# --- reading ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """Everything a Ray Data read task needs: picklable and small (the validation rows travel
    as a bit set, n/8 bytes). A "group" is the unit a read task reads whole: a parquet row
    group, or a run of images of a zip archive. Subclasses say how a group's samples decode."""

    uri: str
    path: str
    filesystem: object  # pyarrow.fs.FileSystem
    spec: dict  # the DataSpec (columns, layout), as JSON
    row_starts: tuple[int, ...]  # first sample of each group
    n: int
    val_bits: bytes
    group_bytes: tuple[int, ...] = ()  # each group's decoded bytes (an estimate for parquet)
    # A folder of shards (workers/data/shards.py): every file's path and uri, and the file of
    # each group (a group never spans two files). Empty for one file: `path`, `uri`.
    paths: tuple[str, ...] = ()
    shard_uris: tuple[str, ...] = ()
    group_shard: tuple[int, ...] = ()

    @property
    def data_spec(self) -> DataSpec:
        return DataSpec.model_validate(self.spec)

    def shard(self, i: int) -> int:
        """The file group i lies in (an index into `paths`; 0 for one file)."""
        return self.group_shard[i] if self.group_shard else 0

    def file(self, k: int) -> tuple[str, str]:
        """(path, uri) of file k."""
        return (self.paths[k], self.shard_uris[k]) if self.paths else (self.path, self.uri)

    def group(self, i: int) -> tuple[int, int]:
        """Group i's samples: first, and one past the last."""
        end = self.row_starts[i + 1] if i + 1 < len(self.row_starts) else self.n
        return self.row_starts[i], end

    def is_val(self, start: int, count: int) -> np.ndarray:
        """Whether each of the rows start..start+count-1 is in the validation split."""
        lo, hi = start // 8, (start + count + 7) // 8
        bits = np.unpackbits(np.frombuffer(self.val_bits, np.uint8)[lo:hi])
        off = start - lo * 8
        return bits[off : off + count].astype(bool)

    def rows(self, i: int, part: str) -> dict[str, np.ndarray]:
        """Group i's samples of one split ("train" or "val"): x, y and each row's position."""
        x, y = self.samples(i)  # each format's plan (a subclass) decodes its own groups
        start = self.row_starts[i]
        val = self.is_val(start, len(y))
        keep = val if part == "val" else ~val
        row = np.arange(start, start + len(y), dtype=np.int64)
        return {"x": x[keep], "y": y[keep].astype(np.int64), "row": row[keep]}


@dataclass(frozen=True)
class ParquetPlan(Plan):
    """A parquet file, or a folder of them: a group is a row group (of file `shard(i)`, its
    `local_groups[i]`-th)."""

    local_groups: tuple[int, ...] = ()  # a folder: each group's row-group index in its file

    def columns(self) -> list[str]:
        return F.parquet_columns(self.data_spec)

    def read_group(self, i: int):
        import pyarrow as pa
        import pyarrow.parquet as pq

        path, uri = self.file(self.shard(i))
        j = self.local_groups[i] if self.local_groups else i
        try:
            with self.filesystem.open_input_file(path) as f:
                return pq.ParquetFile(f).read_row_group(j, columns=self.columns())
        except (pa.ArrowException, OSError, ValueError) as e:
            raise ConfigError(f"data.uri: {uri}: row group {j} is not readable parquet ({e})") from None

    def samples(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        x, y, _ = decode(self.read_group(i), self.data_spec)
        return x, y


@dataclass(frozen=True)
class ZipPlan(Plan):
    """An image zip (one folder per class): a group is a run of images in sample order (by file
    name, as workers/data/formats.from_images orders them), decoded by the in-memory path's
    own functions. Read tasks open the archive where it lies (zip is random access; a tar is
    not, and loads in memory)."""

    members: tuple[str, ...] = ()  # entries in sample order
    labels: bytes = b""  # int64 label of each sample, in sample order
    shape: tuple[int, int] = (0, 0)  # (H, W) of every image
    channels: int = 1

    def samples(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Group i's images, decoded with the in-memory path's functions (any archive kind:
        `_entries` reads the bytes)."""
        start, end = self.group(i)
        size = self.data_spec.image_size
        pxs = []
        try:
            for name, data in self._entries(start, end):
                got = F.decode_image(name, data, size)
                if got is None:  # the plan lists samples only: the archive changed
                    raise ConfigError(f"data.uri: {self.uri}: entry {name!r} is no longer an image")
                pxs.append(got[1])
                F.check_image_shape(name, got[1], self.shape)
        except self._unreadable() as e:
            raise ConfigError(
                f"data.uri: {self.uri}: images {start}..{end - 1} are not readable ({e})"
            ) from None
        y = np.frombuffer(self.labels, np.int64)[start:end]
        return F.image_array(pxs, self.shape, self.channels), y

    def _unreadable(self) -> tuple[type[BaseException], ...]:
        """What reading this kind of archive raises when its bytes are damaged."""
        import zipfile
        import zlib

        return (zipfile.BadZipFile, zlib.error, KeyError, OSError, EOFError)

    def _entries(self, start: int, end: int) -> Iterator[tuple[str, bytes]]:
        """(name, bytes) of samples start..end-1, read where the archive lies."""
        import zipfile

        from workers.data import archives

        with self.filesystem.open_input_file(self.path) as f, zipfile.ZipFile(f) as zf:
            for name in self.members[start:end]:
                with zf.open(name) as m:
                    yield name, archives._read_capped(m, archives.LIMITS.max_entry_bytes, name, "data.uri")


class NotStreamable(ConfigError):
    """A dataset that the spec allows to stream but whose file cannot (a compressed tar): with
    `data.streaming: auto` it loads in memory instead; with `on` it is the job's error."""


@dataclass(frozen=True)
class TarPlan(ZipPlan):
    """An uncompressed image tar: a tar has no directory, so the driver's one pass records where
    each member's bytes lie (`offsets`: its header block, in sample order); a read task seeks to
    a member's header, checks that it still describes the member the pass validated (a regular
    file of that size and name: the pass refused links, devices and names outside the archive),
    and reads its bytes. Nothing is extracted or written."""

    offsets: tuple[int, ...] = ()  # each member's own (last) header block, in sample order
    sizes: tuple[int, ...] = ()

    def _unreadable(self) -> tuple[type[BaseException], ...]:
        import tarfile

        return (tarfile.TarError, OSError, EOFError)

    def _entries(self, start: int, end: int) -> Iterator[tuple[str, bytes]]:
        import tarfile

        from workers.data import archives

        with self.filesystem.open_input_file(self.path) as f:
            for j in range(start, end):
                name, off, n = self.members[j], self.offsets[j], self.sizes[j]
                f.seek(off)
                head = tarfile.TarInfo.frombuf(f.read(tarfile.BLOCKSIZE), "utf-8", "surrogateescape")
                # A long name lives in a header before this one; this one holds its start.
                short = archives._check_name(head.name, "data.uri")
                if not head.isfile() or head.size != n or not name.startswith(short):
                    raise ConfigError(f"data.uri: {self.uri}: entry {name!r} changed since it was checked")
                data = f.read(n)
                if len(data) != n:
                    raise ConfigError(f"data.uri: {self.uri}: entry {name!r} is truncated")
                yield name, data


@dataclass(frozen=True)
class NpyArray:
    """Where an uncompressed `.npy` member of an npz lies in its file: the byte its data starts
    at, its dtype and per-sample shape. A C-order array's row i starts `i * row_bytes` after
    that, so a group of rows is one ranged read (a local seek, an S3 range request)."""

    name: str  # "X" or "y"
    offset: int
    dtype: np.dtype
    shape: tuple[int, ...]  # the whole array's

    @property
    def row_bytes(self) -> int:
        return self.dtype.itemsize * int(np.prod(self.shape[1:], dtype=np.int64))

    def read(self, f, start: int, end: int, uri: str) -> np.ndarray:
        """Rows start..end-1, read from the open file `f`."""
        f.seek(self.offset + start * self.row_bytes)
        size = (end - start) * self.row_bytes
        data = f.read(size)
        if len(data) != size:
            raise ConfigError(
                f"data.uri: {uri}: array {self.name} is truncated (the data changed since it was checked)"
            )
        return np.frombuffer(data, self.dtype).reshape(end - start, *self.shape[1:])


@dataclass(frozen=True)
class NpzPlan(Plan):
    """An uncompressed npz (np.savez), or a folder of them: a group is a run of rows of one
    file, read by offset from its stored `X.npy` and `y.npy` (`arrays`: each file's X and y)
    and decoded by the in-memory path's own function (formats.npz_rows: NHWC to NCHW, integer
    tokens kept as int64)."""

    arrays: tuple[tuple[NpyArray, NpyArray], ...] = ()
    file_starts: tuple[int, ...] = ()  # first sample of each file
    kind: str = "features"  # formats.npz_kind of the arrays

    def raw(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Group i's rows of X and y as stored (dtype and shape of the file)."""
        k = self.shard(i)
        path, uri = self.file(k)
        start, end = self.group(i)
        a, b = start - self.file_starts[k], end - self.file_starts[k]
        ax, ay = self.arrays[k]
        try:
            with self.filesystem.open_input_file(path) as f:
                return ax.read(f, a, b, uri), ay.read(f, a, b, uri)
        except OSError as e:
            raise ConfigError(f"data.uri: {uri}: rows {a}..{b - 1} are not readable ({e})") from None

    def samples(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        x, y, _ = F.npz_rows(*self.raw(i), self.kind, self.data_spec)
        return x, y


_TOKENIZERS: dict[int, object] = {}


@dataclass(frozen=True)
class TextPlan(Plan):
    """A jsonl or text file for language modelling: a group is a line-aligned byte range of the
    file (`ranges`), whose documents hold tokens `token_starts[i]..` of the whole file's token
    stream (the driver's pass tokenised every group once to count them). A sample is the
    in-memory path's block j: tokens [j*T, (j+1)*T) and the next T as targets; group i holds the
    blocks that start inside it, and its read task tokenises the group and as many lines after
    it as the last block's tail needs (at most T tokens more). Documents never span a line, so a
    group tokenises to exactly its share of the whole file's tokens."""

    ranges: tuple[tuple[int, int], ...] = ()
    token_starts: tuple[int, ...] = ()
    first_lines: tuple[int, ...] = ()  # line number of each group's first line (messages)
    seq_len: int = F.DEFAULT_SEQ_LEN
    tokenizer_json: str | None = None

    def tokenizer(self):
        if self.tokenizer_json is None:
            return None
        key = hash(self.tokenizer_json)
        if key not in _TOKENIZERS:  # once per process, not per task
            _TOKENIZERS.clear()
            _TOKENIZERS[key] = F.load_tokenizer(self.tokenizer_json, self.data_spec)
        return _TOKENIZERS[key]

    def samples(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        t = self.seq_len
        r0, r1 = self.group(i)
        if r1 == r0:
            empty = np.zeros((0, t), np.int64)
            return empty, empty
        spec, tok = self.data_spec, self.tokenizer()
        k = self.shard(i)
        path, uri = self.file(k)
        b0, b1 = self.ranges[i]
        need = r1 * t + 1 - self.token_starts[i]  # tokens from the group's first to the last target
        try:
            with self.filesystem.open_input_file(path) as f:
                f.seek(b0)
                raw = f.read(b1 - b0)
        except OSError as e:
            raise ConfigError(f"data.uri: {uri}: bytes {b0}..{b1} are not readable ({e})") from None
        docs = F.line_documents(F.utf8(raw, uri, b0), self._spec_of(spec, uri), self.first_lines[i])
        parts = [F.tokenize(docs, tok)]
        have = len(parts[0])
        if have < need:  # the last block's tail: the lines after the group (maybe the next files')
            for docs in self._documents_after(k, b1, spec):
                parts.append(F.tokenize(docs, tok))
                have += len(parts[-1])
                if have >= need:
                    break
            else:
                raise ConfigError(f"data.uri: {uri} ended early (the data changed since it was checked)")
        tokens = np.concatenate(parts)[r0 * t - self.token_starts[i] : need]
        idx = np.arange(r1 - r0)[:, None] * t + np.arange(t)[None, :]
        return tokens[idx], tokens[idx + 1]

    def _spec_of(self, spec: DataSpec, uri: str) -> DataSpec:
        """The spec whose messages (a line that is not JSON) name file `uri` of a folder."""
        return spec.model_copy(update={"uri": uri}) if self.paths else spec

    def _documents_after(self, k: int, pos: int, spec: DataSpec) -> Iterator[list[str]]:
        """The documents after byte `pos` of file k, then those of the files after it, a few
        KiB of whole lines at a time: a file's documents are its own (it need not end in a line
        break), as the in-memory path reads a folder."""
        for kk in range(k, max(1, len(self.paths))):
            path, uri = self.file(kk)
            carry, at = b"", pos if kk == k else 0
            try:
                with self.filesystem.open_input_file(path) as f:
                    f.seek(at)
                    while True:
                        chunk = f.read(max(4096, 16 * self.seq_len))
                        data = carry + chunk
                        if not data:
                            break
                        cut = data.rfind(b"\n") + 1 if chunk else len(data)
                        if cut == 0:
                            carry = data
                            continue
                        yield F.line_documents(F.utf8(data[:cut], uri, at), self._spec_of(spec, uri))
                        carry, at = data[cut:], at + cut
                        if not chunk:
                            break
            except OSError as e:
                raise ConfigError(f"data.uri: {uri}: bytes from {at} are not readable ({e})") from None


def read_tasks(row_starts: tuple[int, ...], n: int, group_bytes: tuple[int, ...]) -> list[tuple[int, ...]]:
    """Consecutive row groups per read task: each task up to TASK_ROWS rows or TASK_BYTES
    (a row group larger than that is a task of its own). Pure."""
    tasks: list[tuple[int, ...]] = []
    cur: list[int] = []
    rows = size = 0
    ends = (*row_starts[1:], n)
    for i, (start, end) in enumerate(zip(row_starts, ends, strict=True)):
        cur.append(i)
        rows += end - start
        size += group_bytes[i] if i < len(group_bytes) else 0
        if rows >= TASK_ROWS or size >= TASK_BYTES:
            tasks.append(tuple(cur))
            cur, rows, size = [], 0, 0
    if cur:
        tasks.append(tuple(cur))
    return tasks


def epoch_plan(seed: int, epoch: int, train_rows: list[int], drop: int) -> list[tuple[int, int]]:
    """(task, rows kept) in the order an epoch reads its tasks: a permutation seeded by
    (seed, epoch), and the last `drop` rows of the epoch (after each task's own shuffle) left
    out, so that an epoch holds whole global batches, as the in-memory path drops its
    permutation's ragged tail. Pure."""
    order = np.random.default_rng([seed, epoch]).permutation(len(train_rows))
    keep = [train_rows[t] for t in order]
    for j in range(len(keep) - 1, -1, -1):
        d = min(drop, keep[j])
        keep[j] -= d
        drop -= d
    return [(int(t), k) for t, k in zip(order, keep, strict=True)]


def task_seed(seed: int, epoch: int, task: int) -> list[int]:
    """The seed of a read task's row shuffle in one epoch (numpy's SeedSequence entropy)."""
    return [seed, epoch, task]


def decode(table, spec: DataSpec) -> tuple[np.ndarray, np.ndarray, tuple[int, int, int] | None]:
    """(x, y, image shape) of a parquet table, as workers/data/formats.from_parquet decodes the
    whole file (with its helpers, so the two paths cannot drift); labels are checked by the
    caller over the whole file."""
    if spec.token_column is not None:  # sequence classification: int token lists, one label
        x = F._list_column(
            F._column(table, spec.token_column, "data.token_column"), spec.token_column, "data.token_column"
        )
        if x.ndim != 2 or not np.issubdtype(x.dtype, np.integer):
            raise ConfigError(
                f"data.token_column: column {spec.token_column!r} must hold flat lists of integer token ids"
            )
        if x.size and x.min() < 0:
            raise ConfigError(f"{spec.uri}: token ids must be non-negative (found {int(x.min())})")
        y = F._numeric(
            F._column(table, spec.label_column, "data.label_column"), spec.label_column, "data.label_column"
        )
        return x.astype(np.int64), y, None
    y = F._numeric(
        F._column(table, spec.label_column, "data.label_column"), spec.label_column, "data.label_column"
    )
    cols = spec.feature_columns
    if len(cols) == 1 and not F._is_scalar(table, cols[0]):
        x = F._list_column(F._column(table, cols[0], "data.feature_columns"), cols[0], "data.feature_columns")
    else:
        x = np.stack(
            [
                F._numeric(F._column(table, c, "data.feature_columns"), c, "data.feature_columns")
                for c in cols
            ],
            axis=1,
        ).reshape(len(y), len(cols))
    x, image_shape = F._features(x, spec.layout, "data.feature_columns")
    return x, y, image_shape


@dataclass
class StreamedData:
    """What the driver and the workers hold of a streamed dataset: its description, never its
    rows. `streamed` tells the training loop to read batches from its Ray Data shard."""

    info: DataInfo
    plan: Plan
    streamed: bool = True

    def streams(
        self, seed: int, batch_size: int, steps_per_epoch: int, total_steps: int, start_step: int = 0
    ) -> dict[str, tuple[list[dict], Callable[[dict], dict]]]:
        """What `ray_datasets` makes Ray Datasets of, without Ray: for "train" and "val", the
        items (one per read task, in stream order) and the function a read task runs on one
        (a batch of one item, numpy columns) to give its rows (x, y, row; "train": from_epoch).
        Pure: the same arguments give the same rows on every process, which is what lets two
        pipeline stages read the same batches (`reads`).

        "train" is every epoch the job still trains, from the epoch of `start_step` (the newest
        checkpoint's step: a resume skips within one epoch, not all before it) to the last.
        Each epoch reads the read tasks in its own seeded order; each task shuffles its rows
        (seeded by seed, epoch, task) and leaves out its share of the epoch's ragged tail
        (`epoch_plan`), so that an epoch is exactly `steps_per_epoch` global batches. Every row
        carries "from_epoch", the epoch the stream starts at, so that a worker's Feed knows
        which step its first batch is."""
        plan = self.plan
        tasks = read_tasks(plan.row_starts, plan.n, plan.group_bytes)
        ends = (*plan.row_starts[1:], plan.n)
        train_rows = [
            sum(int((~plan.is_val(plan.row_starts[g], ends[g] - plan.row_starts[g])).sum()) for g in t)
            for t in tasks
        ]
        drop = self.info.n_train - steps_per_epoch * batch_size
        first = start_step // steps_per_epoch
        last = -(-total_steps // steps_per_epoch)  # epochs the job trains, the last maybe partly
        items = [
            {"epoch": e, "task": t, "keep": k}
            for e in range(first, max(last, first + 1))
            for t, k in epoch_plan(seed, e, train_rows, drop)
        ]

        def read_train(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            e, t, k = (int(batch[c][0]) for c in ("epoch", "task", "keep"))
            parts = [plan.rows(g, "train") for g in tasks[t]]
            out = {c: np.concatenate([p[c] for p in parts]) for c in ("x", "y", "row")}
            take = np.random.default_rng(task_seed(seed, e, t)).permutation(len(out["y"]))[:k]
            out = {c: v[take] for c, v in out.items()}
            out["from_epoch"] = np.full(k, first, dtype=np.int64)
            return out

        def read_val(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            parts = [plan.rows(g, "val") for g in tasks[int(batch["task"][0])]]
            return {c: np.concatenate([p[c] for p in parts]) for c in ("x", "y", "row")}

        return {"train": (items, read_train), "val": ([{"task": t} for t in range(len(tasks))], read_val)}

    def ray_datasets(
        self, seed: int, batch_size: int, steps_per_epoch: int, total_steps: int, start_step: int = 0
    ) -> dict:
        """The TorchTrainer's `datasets`: "train" (split across the workers, or whole to each
        reading pipeline stage: `reads`) and "val" (every reading worker reads it whole and
        scores its share), each the `streams` in one Ray Data execution per reader (an
        execution per epoch costs each epoch a start, the executor and the first read tasks,
        during which the workers wait): a Ray Data task per item, in order."""
        import ray.data

        ingest_options()  # progress bars off in the context the datasets copy

        def dataset(rows: list[dict], read):
            ds = ray.data.from_items(rows, override_num_blocks=len(rows))
            return ds.map_batches(read, batch_size=1, batch_format="numpy", num_cpus=READ_TASK_CPUS)

        streams = self.streams(seed, batch_size, steps_per_epoch, total_steps, start_step)
        return {name: dataset(items, read) for name, (items, read) in streams.items()}

    def local_shards(
        self, seed: int, batch_size: int, steps_per_epoch: int, total_steps: int, start_step: int = 0
    ) -> dict:
        """The iterators one Ray Train worker of a 1-worker job gets, without Ray Train (tests and
        benches drive the loop through LocalSession(shards=...))."""
        out = {}
        options = ingest_options()
        datasets = self.ray_datasets(seed, batch_size, steps_per_epoch, total_steps, start_step)
        for name, ds in datasets.items():
            ds.context.execution_options = options
            out[name] = ds.iterator()
        return out

    def for_export(self, calibration_rows: int):
        """An in-memory Dataset for export and the final report, which score the exported model
        on the whole validation split: the validation rows and the first `calibration_rows`
        training rows, read here on the driver (the workers never hold them)."""
        from workers.data import Dataset

        train: list[dict] = []
        val: list[dict] = []
        have = 0
        for i in range(len(self.plan.row_starts)):
            val.append(self.plan.rows(i, "val"))
            if have < calibration_rows:
                part = self.plan.rows(i, "train")
                train.append(part)
                have += len(part["y"])

        def cat(parts: list[dict], k: str) -> torch.Tensor:
            return torch.from_numpy(np.concatenate([p[k] for p in parts]))

        # The validation rows in split order (sharding.split_indices), as the in-memory path.
        val_rows = cat(val, "row")
        _, val_idx = sh.split_indices(self.plan.n, self.plan.data_spec.val_fraction)
        rank_of = torch.empty(self.plan.n, dtype=torch.int64)
        rank_of[val_idx] = torch.arange(len(val_idx))
        order = torch.argsort(rank_of[val_rows])
        return Dataset(
            cat(train, "x")[:calibration_rows],
            cat(train, "y")[:calibration_rows],
            cat(val, "x")[order],
            cat(val, "y")[order],
            self.info,
        )


def open_streamed(spec: DataSpec, path, filesystem, tokenizer_json: bytes | None = None) -> StreamedData:
    """Plan and check a dataset for streaming: one pass, a row group (an image, a run of lines)
    at a time, raising ConfigError for what the in-memory path refuses. `path`: the file's, or
    a folder's shards (workers/data/shards.Shard, in read order; parquet, jsonl, text, npz).
    `tokenizer_json`: the bytes of a jsonl/text dataset's `data.tokenizer`."""
    fmt = spec.resolved_format
    if not isinstance(path, str) and fmt not in ("parquet", "jsonl", "text", "npz"):
        raise NotStreamable(f"data.streaming: on is not possible: a folder of {fmt} files does not stream")
    if fmt in ("image_zip", "image_tar"):
        return open_archive(spec, path, filesystem)
    if fmt in ("jsonl", "text"):
        return open_text(spec, path, filesystem, tokenizer_json)
    if fmt == "npz":
        return open_npz(spec, path, filesystem)
    return open_parquet(spec, path, filesystem)


# The first bytes of the compressed forms tarfile reads (gzip, bzip2, xz).
_COMPRESSED = {b"\x1f\x8b": "gzip", b"BZh": "bzip2", b"\xfd7zXZ\x00": "xz"}


def _tar_members(spec: DataSpec, path: str, filesystem):
    """(name, bytes, header offset, size) of each file of an uncompressed tar, read front to back
    as a stream (buffered: the same on a local file and on S3) with the in-memory path's checks."""
    from workers.data import archives

    try:
        with filesystem.open_input_file(path) as f:
            size, magic = f.size(), f.read(6)
    except OSError as e:
        raise ConfigError(f"data.uri: {spec.uri} is not readable ({e})") from None
    for sig, what in _COMPRESSED.items():
        if magic.startswith(sig):
            raise NotStreamable(
                f"data.streaming: on is not possible: {spec.uri} is a {what}-compressed tar, which "
                "cannot be read from the middle; upload it uncompressed (.tar) to stream it, or use "
                "auto or off"
            )
    with filesystem.open_input_stream(path, compression=None) as stream:
        for name, data, m in archives.iter_tar_members(stream, "data.uri", size=size):
            yield name, data, m.offset_data - 512, m.size


def open_archive(spec: DataSpec, path: str, filesystem) -> StreamedData:
    """One pass over the archive, an entry at a time (workers/data/archives: names, links, sizes
    and bombs checked as on the in-memory path), decoding each image to learn the classes, the
    shape, the channels and, per image, the sums the training split's mean and std need; the
    images are then read again by the read tasks (a zip through its directory, a tar at the
    member offsets this pass records)."""
    from workers.data import archives

    tar = spec.resolved_format == "image_tar"
    names: list[str] = []
    folders: list[str] = []
    stats: list[tuple[float, float, int, int]] = []  # sum, sum of squares, values, channels
    where: list[tuple[int, int]] = []  # tar: (header offset, size) of each image
    shape = None

    def entries():
        if tar:
            yield from _tar_members(spec, path, filesystem)
            return
        try:
            f = filesystem.open_input_file(path)
        except OSError as e:
            raise ConfigError(f"data.uri: {spec.uri} is not readable ({e})") from None
        with f:
            for name, data in archives.iter_zip(f, "data.uri"):
                yield name, data, 0, 0

    for name, data, offset, size in entries():
        got = F.decode_image(name, data, spec.image_size)
        if got is None:
            continue
        folder, px = got
        shape = F.check_image_shape(name, px, shape)
        p64 = px.astype(np.float64)
        names.append(name)
        folders.append(folder)
        where.append((offset, size))
        stats.append((float(p64.sum()), float(np.square(p64).sum()), px.size, px.shape[2]))
    index = F.class_index(set(folders))
    n = len(names)
    if n < F.MIN_SAMPLES:
        raise ConfigError(f"data.uri: {spec.uri} gives {n} samples; at least {F.MIN_SAMPLES} are needed")
    order = sorted(range(n), key=lambda i: F.sample_key(names[i]))
    channels = max(st[3] for st in stats)
    _, val_idx = sh.split_indices(n, spec.val_fraction)
    mask = np.zeros(n, dtype=bool)
    mask[val_idx.numpy()] = True
    total = total_sq = 0.0
    count = 0
    for pos, i in enumerate(order):
        if not mask[pos]:
            s, q, c, ch = stats[i]
            rep = channels // ch  # gray replicated into R, G and B
            total, total_sq, count = total + s * rep, total_sq + q * rep, count + c * rep
    mean = total / count
    std = max(float(np.sqrt(max(total_sq - count * mean * mean, 0.0) / max(count - 1, 1))), 1e-6)
    image_bytes = channels * shape[0] * shape[1] * 4
    per = max(1, min(TASK_ROWS, TASK_BYTES // image_bytes))
    starts = tuple(range(0, n, per))
    extra = {}
    if tar:
        extra = {"offsets": tuple(where[i][0] for i in order), "sizes": tuple(where[i][1] for i in order)}
    plan = (TarPlan if tar else ZipPlan)(
        spec.uri,
        path,
        filesystem,
        spec.model_dump(mode="json"),
        starts,
        n,
        np.packbits(mask).tobytes(),
        tuple(min(per, n - s) * image_bytes for s in starts),
        members=tuple(names[i] for i in order),
        labels=np.array([index[folders[i]] for i in order], dtype=np.int64).tobytes(),
        shape=shape,
        channels=channels,
        **extra,
    )
    classes = [c.rpartition("/")[2] for c in sorted(index)]
    info = DataInfo(
        kind="image",
        input_shape=(channels * shape[0] * shape[1],),
        input_dtype="float32",
        num_classes=len(index),
        image_shape=(channels, *shape),
        mean=float(mean),
        std=std,
        n_train=n - len(val_idx),
        n_val=len(val_idx),
        source=f"{spec.uri}: {n} images, classes {', '.join(classes[:10])}{'...' * (len(classes) > 10)}",
        vocab_size=None,
    )
    return StreamedData(info, plan)


def _files(spec: DataSpec, path) -> list[tuple[str, str]]:
    """(path, uri) of each file a plan reads: `path` is one file's path, or a folder's shards
    (workers/data/shards.Shard) in read order."""
    if isinstance(path, str):
        return [(path, spec.uri)]
    return [(sh_.path, sh_.uri) for sh_ in path]


def _shard_fields(files: list[tuple[str, str]], group_shard: list[int]) -> dict:
    """A plan's fields for a folder of several files; none for one file."""
    if len(files) == 1:
        return {}
    return {
        "paths": tuple(p for p, _ in files),
        "shard_uris": tuple(u for _, u in files),
        "group_shard": tuple(group_shard),
    }


def open_text(spec: DataSpec, path, filesystem, tokenizer_json: bytes | None) -> StreamedData:
    """One pass over a jsonl or text file, TEXT_GROUP_BYTES of whole lines at a time (memory:
    one group), checking it as the in-memory path does (UTF-8, JSON lines with their text field)
    and tokenising each group to count its tokens: the in-memory path's blocks and split follow
    from the total, and each group's first token says which blocks its read task cuts."""
    tok = None if tokenizer_json is None else F.load_tokenizer(tokenizer_json, spec)
    files = _files(spec, path)
    ranges: list[tuple[int, int]] = []
    token_starts: list[int] = []
    first_lines: list[int] = []
    group_shard: list[int] = []
    total = 0
    for k, (fpath, uri) in enumerate(files):
        fspec = spec.model_copy(update={"uri": uri}) if len(files) > 1 else spec
        pos, line, carry = 0, 1, b""
        try:
            f = filesystem.open_input_stream(fpath, compression=None)
        except OSError as e:
            raise ConfigError(f"data.uri: {uri} is not readable ({e})") from None
        with f:
            while True:
                chunk = f.read(TEXT_GROUP_BYTES)
                data = carry + chunk
                # A group ends after a line break (the file's end for the last); a line longer
                # than a group makes its group longer. A group never spans two files.
                cut = data.rfind(b"\n") + 1 if chunk else len(data)
                if cut == 0:
                    if not chunk:
                        break
                    carry = data
                    continue
                part, carry = data[:cut], data[cut:]
                n_tokens = len(F.tokenize(F.line_documents(F.utf8(part, uri, pos), fspec, line), tok))
                ranges.append((pos, pos + cut))
                token_starts.append(total)
                first_lines.append(line)
                group_shard.append(k)
                total, pos, line = total + n_tokens, pos + cut, line + part.count(b"\n")
                if not chunk:
                    break
    t = spec.seq_len or F.DEFAULT_SEQ_LEN
    n = (total - 1) // t
    if n < F.MIN_SAMPLES:
        raise ConfigError(
            f"data.seq_len: {total} tokens make {max(n, 0)} samples of {t}; "
            f"at least {F.MIN_SAMPLES} are needed"
        )
    _, val_idx = sh.split_indices(n, spec.val_fraction)
    mask = np.zeros(n, dtype=bool)
    mask[val_idx.numpy()] = True
    # Group i holds the blocks that start in it: j*T in [token_starts[i], token_starts[i+1]).
    starts = tuple(min(-(-ts // t), n) for ts in token_starts)
    ends = (*starts[1:], n)
    plan = TextPlan(
        spec.uri,
        files[0][0],
        filesystem,
        spec.model_dump(mode="json"),
        starts,
        n,
        np.packbits(mask).tobytes(),
        tuple((e - s) * t * 16 for s, e in zip(starts, ends, strict=True)),  # x and y, int64
        ranges=tuple(ranges),
        token_starts=tuple(token_starts),
        first_lines=tuple(first_lines),
        seq_len=t,
        tokenizer_json=None if tokenizer_json is None else tokenizer_json.decode("utf-8"),
        **_shard_fields(files, group_shard),
    )
    vocab, source = F.text_vocab(spec, tok)
    info = DataInfo(
        kind="tokens",
        input_shape=(t,),
        input_dtype="int64",
        num_classes=vocab,
        n_train=n - len(val_idx),
        n_val=len(val_idx),
        source=source,
    )
    return StreamedData(info, plan)


def _npy_member(zf, f, name: str, uri: str) -> NpyArray:
    """Where array `name` of an open npz lies (its .npy header parsed by formats.npy_header),
    refusing what cannot be read by offset (NotStreamable) and what the in-memory path refuses."""
    import struct
    import zipfile

    info = F.npz_member(zf, name, uri)
    if info.compress_type != zipfile.ZIP_STORED:
        raise NotStreamable(
            f"data.streaming: on is not possible: {uri} is a compressed npz (np.savez_compressed), "
            "which cannot be read from the middle; save it with np.savez to stream it, or use auto or off"
        )
    f.seek(info.header_offset)
    head = f.read(30)  # the member's local header: its name and extra field come before the data
    if len(head) != 30 or head[:4] != b"PK\x03\x04":
        raise ConfigError(f"data.uri: {uri} is not an .npz with arrays X and y (bad zip entry {name})")
    name_len, extra_len = struct.unpack("<HH", head[26:30])
    start = info.header_offset + 30 + name_len + extra_len
    f.seek(start)
    shape, fortran, dtype = F.npy_header(f, name, uri)
    if fortran and len(shape) > 1:
        raise NotStreamable(
            f"data.streaming: on is not possible: array {name} of {uri} is stored column-major "
            "(Fortran order), whose rows cannot be read in ranges; save it C-ordered, or use auto or off"
        )
    arr = NpyArray(name, f.tell(), dtype, shape)
    if arr.offset - start + shape[0] * arr.row_bytes != info.file_size:
        raise ConfigError(f"data.uri: {uri}: array {name} is truncated")
    return arr


def open_npz(spec: DataSpec, path, filesystem) -> StreamedData:
    """Plan and check an uncompressed npz (or a folder's npz shards, as one: X and y alike in
    each) for streaming: the members' .npy headers say where each array's rows lie; then one pass,
    a group of rows at a time, checks them as the in-memory path does (labels, token ids, finite
    values) and computes the training split's mean and std."""
    import zipfile

    files = _files(spec, path)
    arrays: list[tuple[NpyArray, NpyArray]] = []
    for fpath, uri in files:
        try:
            with filesystem.open_input_file(fpath) as f, zipfile.ZipFile(f) as zf:
                ax, ay = _npy_member(zf, f, "X", uri), _npy_member(zf, f, "y", uri)
        except (zipfile.BadZipFile, OSError, EOFError) as e:
            raise ConfigError(f"data.uri: {uri} is not an .npz with arrays X and y ({e})") from None
        if ax.shape[0] != ay.shape[0]:
            raise ConfigError(
                f"data.uri: X and y of {uri} need the same length (got {ax.shape[0]}, {ay.shape[0]})"
            )
        arrays.append((ax, ay))
    if len(files) > 1:
        schemas = [
            (uri, {"X": (ax.dtype, ax.shape[1:]), "y": (ay.dtype, ay.shape[1:])})
            for (_, uri), (ax, ay) in zip(files, arrays, strict=True)
        ]
        F.check_same_arrays(schemas, spec.uri)
    ax, ay = arrays[0]
    kind = F.npz_kind(ax.dtype, ax.shape[1:], ay.shape[1:], spec)
    counts = [a[0].shape[0] for a in arrays]
    n = sum(counts)
    if n < F.MIN_SAMPLES:
        raise ConfigError(f"data.uri: {spec.uri} gives {n} samples; at least {F.MIN_SAMPLES} are needed")
    # A group: as many rows of one file as a read task takes (TASK_ROWS or TASK_BYTES decoded).
    decoded = (4 if kind == "features" else 8) * int(np.prod(ax.shape[1:])) + 8 * int(np.prod(ay.shape[1:]))
    per = max(1, min(TASK_ROWS, TASK_BYTES // max(decoded, 1)))
    file_starts = [int(s) for s in np.cumsum([0, *counts])[:-1]]
    starts, group_shard = [], []
    for k, (first, count) in enumerate(zip(file_starts, counts, strict=True)):
        for s in range(first, first + count, per):
            starts.append(s)
            group_shard.append(k)
    _, val_idx = sh.split_indices(n, spec.val_fraction)
    mask = np.zeros(n, dtype=bool)
    mask[val_idx.numpy()] = True
    ends = [*starts[1:], n]
    plan = NpzPlan(
        spec.uri,
        files[0][0],
        filesystem,
        spec.model_dump(mode="json"),
        tuple(starts),
        n,
        np.packbits(mask).tobytes(),
        tuple((e - s) * decoded for s, e in zip(starts, ends, strict=True)),
        arrays=tuple(arrays),
        file_starts=tuple(file_starts),
        kind=kind,
        **_shard_fields(files, group_shard),
    )
    return StreamedData(scan_npz(plan, len(val_idx)), plan)


def scan_npz(plan: NpzPlan, n_val: int) -> DataInfo:
    """The DataInfo workers/data/_split derives from the whole arrays (formats.npz_raw), from
    one pass: labels (or token ids) over every row, mean and std over the training rows."""
    spec = plan.data_spec
    labels = None
    lo, hi = 0, -1  # token ids: the smallest (when negative) and the largest
    total = total_sq = 0.0
    count = 0
    image_shape = x_shape = None
    for i, start in enumerate(plan.row_starts):
        x_raw, y_raw = plan.raw(i)
        if plan.kind == "tokens":
            lo = min(lo, int(x_raw.min()), int(y_raw.min()))
            hi = max(hi, int(x_raw.max()), int(y_raw.max()))
        else:
            u = np.unique(y_raw)
            labels = u if labels is None else np.union1d(labels, u)
        x, y, image_shape = F.npz_rows(x_raw, y_raw, plan.kind, spec)
        x_shape = x.shape[1:]
        if plan.kind == "sequence":
            hi = max(hi, int(x.max()))
        elif plan.kind == "features":
            train = x[~plan.is_val(start, len(y))].astype(np.float64)
            total += float(train.sum())
            total_sq += float(np.square(train).sum())
            count += train.size
    common = {
        "input_shape": tuple(int(d) for d in x_shape),
        "n_train": plan.n - n_val,
        "n_val": n_val,
        "source": plan.uri,
    }
    if plan.kind == "tokens":
        vocab = F.token_vocab(np.array([lo, hi]), spec.num_classes, "data.uri: X/y tokens")
        return DataInfo(kind="tokens", input_dtype="int64", num_classes=vocab, **common)
    k = F.check_labels(labels, spec.num_classes, "data.uri: y")
    if plan.kind == "sequence":
        return DataInfo(kind="sequence", input_dtype="int64", num_classes=k, vocab_size=hi + 1, **common)
    mean = total / count
    # Unbiased, as torch.std on the in-memory path; clamped the same way.
    std = max(float(np.sqrt(max(total_sq - count * mean * mean, 0.0) / max(count - 1, 1))), 1e-6)
    return DataInfo(
        kind="image" if image_shape else "vector",
        input_dtype="float32",
        num_classes=k,
        image_shape=image_shape,
        mean=float(mean),
        std=std,
        **common,
    )


def open_parquet(spec: DataSpec, path, filesystem) -> StreamedData:
    """Plan and check a parquet file (or a folder's shards, as one file: the columns the job reads
    alike in each) for streaming: one pass, a row group at a time (memory: one row group),
    raising ConfigError for what the in-memory path refuses."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from workers.data.shards import check_same_columns

    files = _files(spec, path)
    metas, schemas = [], []
    for fpath, uri in files:
        try:
            with filesystem.open_input_file(fpath) as f:
                pf = pq.ParquetFile(f)
                metas.append(pf.metadata)
                schemas.append((uri, pf.schema_arrow))
        except (pa.ArrowException, OSError, ValueError) as e:
            raise ConfigError(f"data.uri: {uri} is not a readable parquet file ({e})") from None
    if len(files) > 1:
        check_same_columns(schemas, F.parquet_columns(spec), spec.uri)
    counts, sizes, local, group_shard = [], [], [], []
    for k, meta in enumerate(metas):
        for i in range(meta.num_row_groups):
            counts.append(meta.row_group(i).num_rows)
            sizes.append(int(meta.row_group(i).total_byte_size))
            local.append(i)
            group_shard.append(k)
    n = sum(counts)
    if n < F.MIN_SAMPLES:
        raise ConfigError(f"data.uri: {spec.uri} gives {n} samples; at least {F.MIN_SAMPLES} are needed")
    starts = tuple(int(s) for s in np.cumsum([0, *counts])[:-1])
    _, val_idx = sh.split_indices(n, spec.val_fraction)
    mask = np.zeros(n, dtype=bool)
    mask[val_idx.numpy()] = True
    extra = _shard_fields(files, group_shard)
    if extra:
        extra["local_groups"] = tuple(local)
    plan = ParquetPlan(
        spec.uri,
        files[0][0],
        filesystem,
        spec.model_dump(mode="json"),
        starts,
        n,
        np.packbits(mask).tobytes(),
        tuple(sizes),
        **extra,
    )
    return StreamedData(scan(plan, len(val_idx)), plan)


def scan(plan: ParquetPlan, n_val: int) -> DataInfo:
    """The DataInfo workers/data/_split derives from the whole array, from one pass."""
    spec = plan.data_spec
    labels = None
    total, total_sq, count = 0.0, 0.0, 0
    x_shape = image_shape = None
    x_dtype = None
    vocab = 0
    for i, start in enumerate(plan.row_starts):
        x, y, img = decode(plan.read_group(i), spec)
        u = np.unique(y)
        labels = u if labels is None else np.union1d(labels, u)
        if x_shape is None:
            x_shape, image_shape, x_dtype = x.shape[1:], img, x.dtype
        elif x.shape[1:] != x_shape:
            raise ConfigError(
                f"data.feature_columns: row group {i} has samples of shape {list(x.shape[1:])}, "
                f"the first {list(x_shape)}; all rows must have one shape"
            )
        if x_dtype == np.int64:
            vocab = max(vocab, int(x.max()) + 1 if x.size else 0)
        else:
            train = x[~plan.is_val(start, len(y))].astype(np.float64)
            total += float(train.sum())
            total_sq += float(np.square(train).sum())
            count += train.size
    field = "data.label_column" if spec.token_column else f"data.label_column ({spec.label_column!r})"
    k = F.check_labels(labels, spec.num_classes, field)
    if x_dtype == np.int64:
        kind, mean, std, vocab_size = "sequence", 0.0, 1.0, vocab
    else:
        kind = "image" if image_shape else "vector"
        mean = total / count
        # Unbiased, as torch.std on the in-memory path; clamped the same way.
        var = max(total_sq - count * mean * mean, 0.0) / max(count - 1, 1)
        std = max(float(np.sqrt(var)), 1e-6)
        vocab_size = None
    return DataInfo(
        kind=kind,
        input_shape=tuple(int(d) for d in x_shape),
        input_dtype=str(np.dtype(x_dtype)),
        num_classes=k,
        image_shape=image_shape,
        mean=float(mean),
        std=std,
        n_train=plan.n - n_val,
        n_val=n_val,
        source=plan.uri,
        vocab_size=vocab_size,
    )


# --- worker side --------------------------------------------------------------------------


def rebatch(blocks: Iterator[Mapping[str, np.ndarray]], size: int) -> Iterator[dict[str, np.ndarray]]:
    """Batches of exactly `size` rows, in stream order, from blocks of any sizes (columns of
    equal length); the rows left over at the end, fewer than `size`, are dropped (drop_last).
    A batch inside one block is a view of it; one that spans blocks, a copy. Pure."""
    carry: dict[str, np.ndarray] | None = None
    for block in blocks:
        n = len(next(iter(block.values()))) if block else 0
        if n == 0:
            continue
        start = 0
        if carry is not None:
            have = len(next(iter(carry.values())))
            start = min(size - have, n)
            carry = {k: np.concatenate([carry[k], v[:start]]) for k, v in block.items()}
            if have + start < size:
                continue
            yield carry
            carry = None
        while start + size <= n:
            yield {k: v[start : start + size] for k, v in block.items()}
            start += size
        if start < n:
            carry = {k: v[start:] for k, v in block.items()}


class Feed:
    """One rank's batches from its Ray Data shards ("train": its split of the training stream,
    or the whole stream for a pipeline stage that reads, `StreamedData.ray_datasets`; "val": all
    validation rows, of which it scores row % world == rank: `reads` decides both).

    `train_batch(step)` returns the batch of that step: the stream is opened once, its first
    batch says which epoch it starts at (from_epoch), and a step is the stream's batch
    `step - from_epoch * steps_per_epoch`; after a resume in the middle of an epoch the batches
    before the checkpoint's step are read and dropped (see docs/reliability.md for what that
    repeats exactly)."""

    def __init__(
        self,
        shards: Mapping[str, object],
        per_rank_batch: int,
        steps_per_epoch: int,
        seed: int,
        rank: int,
        world: int,
    ):
        self.shards, self.batch, self.spe, self.seed = shards, per_rank_batch, steps_per_epoch, seed
        self.rank, self.world = rank, world
        self._it: Iterator | None = None
        self._head: dict | None = None  # the stream's first batch, read to learn from_epoch
        self._first_step = 0  # the step of the stream's first batch
        self._next = 0  # index in the stream of the batch the open iterator yields next

    def _open(self) -> None:
        # Whole blocks (a read task's rows, or a split's slice of them), cut into batches here:
        # iter_torch_batches costs every batch its slicing, formatting and a hand-off between Ray
        # Data's threads, which with the workers on every CPU cost their Python threads ~45 ms
        # more CPU per 1000 samples than in memory (bench/results/data/profile-before-rebatch.md,
        # against profile-rebatch.md); a block's batches are views, copied once into the tensor
        # the step reads.
        blocks = self.shards["train"].iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=2)
        self._it = rebatch(blocks, self.batch)
        self._head = next(self._it, None)
        if self._head is None:
            raise RuntimeError(f"rank {self.rank}: the streamed training split gave no batch")
        self._first_step = int(self._head["from_epoch"][0]) * self.spe
        self._next = 0

    def train_batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self._it is None:
            self._open()
        k = step - self._first_step
        if k < 0:
            raise RuntimeError(
                f"rank {self.rank}: step {step} comes before the stream's first step {self._first_step} "
                "(it starts at the newest listed checkpoint's epoch, which did not load)"
            )
        if k < self._next:
            raise RuntimeError(f"rank {self.rank}: step {step} was already read from the stream")
        while True:
            if self._head is not None:
                b, self._head = self._head, None
            else:
                b = next(self._it, None)
            if b is None:
                raise RuntimeError(
                    f"rank {self.rank}: the streamed data ended after {self._next} batches "
                    f"(step {self._first_step + self._next}); step {step} was asked for"
                )
            self._next += 1
            if self._next - 1 == k:  # a copy: blocks are read-only views of Ray's object store
                return torch.from_numpy(np.array(b["x"])), torch.from_numpy(np.array(b["y"]))

    def val_chunks(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's share of the validation rows (each row is scored by exactly one rank), one
        chunk per batch of "val", maybe empty: every rank reads the same batches of "val", so
        every rank runs as many forwards, which FSDP needs (each forward gathers the weights)."""
        for b in self.shards["val"].iter_torch_batches(batch_size=EVAL_CHUNK_ROWS):
            mine = b["row"] % self.world == self.rank
            yield b["x"][mine], b["y"][mine]


class IdleFeed:
    """A rank that reads nothing (a pipeline stage between the first and the last): no batches,
    and as many empty validation chunks as a reading rank's `Feed.val_chunks` yields for
    `n_val` rows (Ray Data's batches of EVAL_CHUNK_ROWS rows, the last maybe fewer), since each
    chunk is a forward whose activations this stage must pass on."""

    def __init__(self, n_val: int):
        self.n_chunks = -(-n_val // EVAL_CHUNK_ROWS)

    def train_batch(self, step: int) -> tuple[None, None]:
        return None, None

    def val_chunks(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for _ in range(self.n_chunks):
            yield torch.empty(0), torch.empty(0, dtype=torch.int64)


def feed_for(
    strategy: str,
    rank: int,
    world: int,
    shards: Callable[[], Mapping[str, object]],
    batch_size: int,
    steps_per_epoch: int,
    seed: int,
    n_val: int,
) -> Feed | IdleFeed:
    """This rank's feed of a streamed dataset, as `reads` says; `shards` gives its Ray Data
    iterators (Ray Train's dataset shards), asked for only by a rank that reads."""
    r = reads(strategy, rank, world)
    if not r.train:
        return IdleFeed(n_val)
    index, count = r.share
    return Feed(shards(), batch_size // count, steps_per_epoch, seed, index, count)


def resume_step(arts) -> int:
    """The newest listed checkpoint's step (0 without one): where a resumed run's stream
    starts (its epoch). Listed, not verified: workers.checkpoint.load_latest decides."""
    from workers.checkpoint import list_checkpoints

    return max((step for step, _ in list_checkpoints(arts)), default=0)


def memory_now() -> dict[str, int]:
    """This process's resident memory in bytes by kind (Linux /proc/self/status): rss (all),
    anon (private pages: what the process allocated itself, a deserialized dataset included) and
    shmem (shared pages it touched: Ray object-store blocks it read zero-copy)."""
    keys = {"VmRSS": "rss", "RssAnon": "anon", "RssShmem": "shmem"}
    out = dict.fromkeys(keys.values(), 0)
    try:
        with open("/proc/self/status") as f:
            for line in f:
                name, _, value = line.partition(":")
                if name in keys:
                    out[keys[name]] = int(value.split()[0]) * 1024
    except OSError:
        pass
    return out


class MemorySampler:
    """Peaks of `memory_now()` sampled every `every` seconds on a daemon thread (the kernel keeps
    a peak of the whole RSS only, VmHWM, which mixes private and shared pages)."""

    def __init__(self, every: float = 0.05):
        import threading

        self.every, self.peak = every, memory_now()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="memory-sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self._take()

    def _take(self) -> None:
        now = memory_now()
        self.peak = {k: max(v, now[k]) for k, v in self.peak.items()}

    def start(self) -> MemorySampler:
        self._thread.start()
        return self

    def stop(self) -> dict[str, int]:
        self._stop.set()
        self._thread.join()
        self._take()
        return self.peak


def peak_rss() -> int:
    """This process's peak resident set size so far, in bytes (Linux: ru_maxrss is in KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
