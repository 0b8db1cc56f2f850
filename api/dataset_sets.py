"""Sets of dataset shards on the client side: `slimtrain dataset push DIR SET` (which files of a
local folder are shards, and the upload of all of them as SET/SHARD), and the listing that shows
a set as one line `SET/` (`slimtrain dataset ls`).

A folder's shards are chosen by the readers' own rule (workers.data.shards.skipped: a name that
starts with "_" or "." is no shard: Spark's `_SUCCESS`, `.part-0.crc`). Everything else in it must
be a shard, and all of one format: a file the push cannot name or place is refused before a byte
is sent, never left behind silently.

**All or nothing.** A set on the server is what a job reads whole (`store://datasets/SET/`), so
a set missing shards would train on part of the data without a word. The push therefore refuses
a SET that already has shards (pushing into it would mix two uploads), and when a shard fails
(the server refuses it, the connection breaks, Ctrl-C), it deletes again the shards this push
stored. Only when that deletion cannot be done (the server went away) do shards stay, and then
the report names exactly which are on the server and which are not."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from api.client import ApiError, Client, Unreachable
from service.tenant_files import InvalidName, check_upload_name


class FolderRefused(Exception):
    """The folder cannot be pushed as a set; the message says why (exit 2)."""


@dataclass(frozen=True)
class LocalShard:
    name: str  # SHARD in SET/SHARD: the file's name
    path: Path
    size: int
    format: str  # what it will be checked as (service.datasets.UPLOAD_FORMATS)


def set_name(name: str) -> str:
    """SET from `SET` or `SET/`; FolderRefused unless it is one strict name."""
    bare = name[:-1] if name.endswith("/") else name
    try:
        return check_upload_name(bare, "dataset set")
    except InvalidName as e:
        raise FolderRefused(str(e.message)) from None


def _few(names: list[str], n: int = 5) -> str:
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def plan_folder(folder: Path, fmt: str | None = None) -> list[LocalShard]:
    """The shards of `folder`, sorted by name, or FolderRefused: no shard at all, a folder inside
    it (a set is one flat folder: SET/SHARD), a name that is not a strict name, a file whose
    format cannot be told (without `fmt`), more than one data format, or a format that makes no
    set. `fmt` is given to every file. A `tokenizer.json` (`.json`) beside jsonl/text/... shards
    is pushed too: `data.tokenizer: store://datasets/SET/NAME.json` names it, and it is no
    shard of the data."""
    from service.datasets import TOKENIZER, InvalidDataset, upload_format
    from workers.data.shards import SHARDABLE, skipped

    if fmt is not None and fmt not in SHARDABLE:
        raise FolderRefused(f"--format {fmt}: the shards of a set are one of {', '.join(SHARDABLE)}")
    nested, bad_names, unknown, shards = [], [], [], []
    for path in sorted(folder.iterdir(), key=lambda p: p.name):
        if skipped(path.name):
            continue
        if path.is_dir():
            nested.append(path.name + "/")
            continue
        if not path.is_file():
            nested.append(path.name)  # a socket, a fifo, a dangling link: nothing to upload
            continue
        try:
            check_upload_name(path.name, "shard")
        except InvalidName:
            bad_names.append(path.name)
            continue
        try:
            found = fmt or upload_format(path.name, None)
        except InvalidDataset:
            unknown.append(path.name)
            continue
        shards.append(LocalShard(path.name, path, path.stat().st_size, found))
    if nested:
        raise FolderRefused(
            f"{folder} holds {_few(nested)}, which is no file: a set is one flat folder of shards "
            "(SET/SHARD); push each folder as a set of its own, or name what is no shard with a "
            "leading '_' or '.'"
        )
    if bad_names:
        raise FolderRefused(
            f"{folder}: {_few(bad_names)} is not a strict name (letters, digits, '.', '_' and '-', up "
            "to 100, starting with a letter or digit): each shard is uploaded as SET/<its file name>"
        )
    if unknown:
        raise FolderRefused(
            f"{folder}: cannot tell the format of {_few(unknown)} from its ending: give --format "
            f"({', '.join(SHARDABLE)}), or name what is no shard with a leading '_' or '.'"
        )
    data = [s for s in shards if s.format != TOKENIZER]
    if not data:
        what = "only a tokenizer.json" if shards else "no shard files"
        raise FolderRefused(
            f"{folder} holds {what} (names starting with '_' or '.' are skipped, as the readers skip them)"
        )
    by_format: dict[str, str] = {}
    for s in data:
        by_format.setdefault(s.format, s.name)
    if len(by_format) > 1:
        mixed = ", ".join(f"{name} is {f}" for f, name in by_format.items())
        raise FolderRefused(f"{folder} mixes formats ({mixed}): the shards of a set share one format")
    (only,) = by_format
    if only not in SHARDABLE:
        raise FolderRefused(
            f"{folder} holds {only} files: a set's shards are {', '.join(SHARDABLE)}; an image "
            "dataset is one zip or tar archive: push each as a dataset of its own"
        )
    return shards


# --- the upload ----------------------------------------------------------------------------------


@dataclass
class PushFailed(Exception):
    """A shard failed midway; `cause` is what failed it (an ApiError, Unreachable, Ctrl-C). After
    the rollback: `on_server` the shards still there (empty when the rollback did its work),
    `removed` those deleted again, `not_sent` those never stored."""

    set_name: str
    failed: str
    cause: BaseException
    removed: list[str] = field(default_factory=list)
    on_server: list[str] = field(default_factory=list)
    not_sent: list[str] = field(default_factory=list)

    def report(self) -> list[str]:
        s = self.set_name
        lines = [f"push of {s}/ stopped at shard {self.failed}"]
        if self.on_server:
            lines.append(
                f"NOT rolled back: {s}/ on the server holds {len(self.on_server)} of the shards "
                f"({', '.join(self.on_server)}) and lacks {', '.join(self.not_sent)}: a job reading "
                f"store://datasets/{s}/ would read part of the data. Delete it with "
                f"`slimtrain dataset rm {s}`, then push again"
            )
        elif self.removed:
            n = len(self.removed)
            what = f"the {n} shards stored before ({_few(self.removed)}) were"
            if n == 1:
                what = f"the shard stored before ({self.removed[0]}) was"
            lines.append(f"rolled back: {what} deleted again; nothing of {s}/ is on the server")
        else:
            lines.append(f"nothing of {s}/ reached the server")
        return lines


def existing_shards(items: list[dict], name: str) -> list[str]:
    return [d["name"] for d in items if d["name"].startswith(name + "/")]


def push_set(
    api: Client,
    name: str,
    shards: list[LocalShard],
    params: dict,
    on_bytes: Callable[[int], None] | None = None,
    on_shard: Callable[[LocalShard], None] | None = None,
) -> list[dict]:
    """Upload `shards` as `name`/SHARD, in order; their entries. PushFailed when one fails,
    after deleting again what this push stored (the set did not exist before: see
    existing_shards)."""
    from service.datasets import TOKENIZER

    stored: list[str] = []
    entries = []
    for i, shard in enumerate(shards):
        if on_shard:
            on_shard(shard)
        # The format the server guesses from the name is the one planned, except under --format.
        p = {**params, "format": None if shard.format == TOKENIZER else params.get("format")}
        try:
            entries.append(api.push("datasets", shard.path, f"{name}/{shard.name}", on_bytes, p))
        except (ApiError, Unreachable, KeyboardInterrupt) as e:
            # A 4xx refusal stores nothing (the server checks before it stores); any other end
            # may have stored the shard before the answer was lost: delete it too.
            maybe = [] if isinstance(e, ApiError) and e.status < 500 else [shard.name]
            raise _rollback(api, name, shard.name, e, stored, maybe, [s.name for s in shards[i:]]) from None
        stored.append(shard.name)
    return entries


def _rollback(
    api: Client,
    name: str,
    failed: str,
    cause: BaseException,
    stored: list[str],
    maybe: list[str],
    unsent: list[str],
) -> PushFailed:
    out = PushFailed(name, failed, cause)
    left = []
    for shard in stored + maybe:
        try:
            api.delete_upload("datasets", f"{name}/{shard}")
        except ApiError as e:
            if e.status == 404:  # never stored (or already gone)
                continue
            left.append(shard)
        except (Unreachable, KeyboardInterrupt):
            left.append(shard)
        else:
            if shard in stored:
                out.removed.append(shard)
    if left:
        # What stays: the shards that were stored and could not be deleted (a `maybe` that could
        # not be deleted is reported too: whether it is there is unknown, so say it may be).
        out.on_server = [s if s in stored else f"{s} (perhaps)" for s in left]
        out.removed = [s for s in out.removed if s not in left]
        out.not_sent = [s for s in unsent if s not in left] or ["nothing"]
    return out


# --- the listing ---------------------------------------------------------------------------------


def group_sets(items: list[dict]) -> list[dict]:
    """The API's list of datasets with each set's data shards (SET/SHARD) as one entry
    `{"name": "SET/", "shards": n, "size": total, "samples": total, "format": ..., "num_classes":
    ..., "created": the latest}`, in name order. A tokenizer.json in a set (SET/tok.json) stays its own entry:
    it is no shard, and jobs name it by its full name. Pure."""
    from service.datasets import TOKENIZER

    sets: dict[str, list[dict]] = {}
    out = []
    for d in items:
        head, slash, _ = d["name"].partition("/")
        if slash and d.get("format") != TOKENIZER:
            sets.setdefault(head, []).append(d)
        else:
            out.append(d)
    for head, shards in sets.items():
        formats = sorted({s["format"] for s in shards})
        # Each shard's labels are 0..K-1 with every class present (the check on arrival), so the
        # set's classes are the most of any shard's; unknown where one shard's are.
        classes = [s.get("num_classes") for s in shards]
        out.append(
            {
                "name": head + "/",
                "shards": len(shards),
                "size": sum(s["size"] for s in shards),
                "samples": sum(s["samples"] for s in shards),
                "format": "+".join(formats),  # more than one: the set is refused at submission
                "num_classes": None if None in classes else max(classes),
                "created": max(s["created"] for s in shards),
            }
        )
    return sorted(out, key=lambda d: d["name"])
