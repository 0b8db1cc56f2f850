"""Reading a user's zip or tar archive safely, in memory.

Nothing is ever extracted to disk: each member is read into memory, one at a time, through a
capped read, so no entry name can place a file anywhere (zip-slip) and a decompression bomb
stops at the first byte over its cap rather than at the disk's end. Entry names that would
escape their folder (`..`, absolute paths, drive letters, backslashes) and tar members that are
not plain files or folders (symlinks, hard links, devices, fifos) are still refused, naming the
entry: an archive holding them is not a dataset of image folders, and refusing keeps the rule
simple for the day the data is extracted by something else.

The limits below bound one archive on the in-memory path: the job's whole dataset is held as
tensors anyway, so an archive over them would not fit a worker either.
"""

from __future__ import annotations

import io
import re
import tarfile
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

from service.errors import ConfigError


@dataclass(frozen=True)
class Limits:
    max_entries: int = 200_000  # members, folders included
    max_entry_bytes: int = 64 << 20  # one member, uncompressed
    max_total_bytes: int = 2 << 30  # all members, uncompressed
    # Uncompressed / compressed size, per zip member and over a whole tar. PNG/JPEG members
    # compress ~1x; a bomb is ~1000x. Members under `ratio_floor_bytes` are exempt (a tiny
    # uniform file can compress 50x legitimately).
    max_ratio: float = 100.0
    ratio_floor_bytes: int = 1 << 20


LIMITS = Limits()
_DRIVE = re.compile(r"^[A-Za-z]:")


def _check_name(name: str, field: str) -> str:
    """The member's path inside the archive, normalised; ConfigError if it could escape."""
    if "\\" in name or name.startswith("/") or _DRIVE.match(name):
        raise ConfigError(f"{field}: archive entry {name!r} has an absolute or non-POSIX path; refused")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise ConfigError(f"{field}: archive entry {name!r} escapes its folder ('..'); refused")
    return "/".join(parts)


def _read_capped(f, cap: int, name: str, field: str) -> bytes:
    data = f.read(cap + 1)  # one byte more than allowed tells an over-size member apart
    if len(data) > cap:
        raise ConfigError(f"{field}: archive entry {name!r} is over {cap} bytes uncompressed; refused")
    return data


class _Budget:
    def __init__(self, limits: Limits, field: str):
        self.limits, self.field, self.entries, self.total = limits, field, 0, 0

    def entry(self, name: str) -> None:
        self.entries += 1
        if self.entries > self.limits.max_entries:
            raise ConfigError(
                f"{self.field}: archive has more than {self.limits.max_entries} entries; refused"
            )

    def add(self, name: str, size: int) -> None:
        if size > self.limits.max_entry_bytes:
            raise ConfigError(
                f"{self.field}: archive entry {name!r} is {size} bytes uncompressed, over the "
                f"{self.limits.max_entry_bytes}-byte limit; refused"
            )
        self.total += size
        if self.total > self.limits.max_total_bytes:
            raise ConfigError(
                f"{self.field}: archive is over {self.limits.max_total_bytes} bytes uncompressed "
                f"(at entry {name!r}); refused"
            )

    def ratio(self, name: str, size: int, compressed: int, whole: bool = False) -> None:
        if size >= self.limits.ratio_floor_bytes and size > self.limits.max_ratio * max(compressed, 1):
            what = f"archive expands, up to entry {name!r}," if whole else f"archive entry {name!r} expands"
            raise ConfigError(
                f"{self.field}: {what} {size / max(compressed, 1):.0f}x "
                f"(limit {self.limits.max_ratio:.0f}x): a decompression bomb; refused"
            )


def iter_zip(raw, field: str = "data.uri", limits: Limits | None = None) -> Iterator[tuple[str, bytes]]:
    """(path, bytes) of each file in a zip (its bytes, or a seekable binary file: the streamed
    path reads the archive where it lies), in archive order; folders are skipped."""
    limits = limits or LIMITS  # read at call time, so a test or an operator can tighten it
    budget = _Budget(limits, field)
    try:
        zf = zipfile.ZipFile(io.BytesIO(raw) if isinstance(raw, bytes | bytearray | memoryview) else raw)
        infos = zf.infolist()
    except (zipfile.BadZipFile, zlib.error, ValueError, OSError, EOFError) as e:
        raise ConfigError(f"{field}: not a readable zip archive ({e})") from None
    if len(infos) > limits.max_entries:
        raise ConfigError(
            f"{field}: archive has {len(infos)} entries, over the {limits.max_entries} limit; refused"
        )
    # The declared sizes are checked first (cheap), the actual ones while reading (headers lie).
    declared = 0
    for info in infos:
        name = _check_name(info.filename, field)
        budget.ratio(name, info.file_size, info.compress_size)
        declared += info.file_size
    if declared > limits.max_total_bytes:
        raise ConfigError(
            f"{field}: archive declares {declared} bytes uncompressed, over {limits.max_total_bytes}; refused"
        )
    with zf:
        for info in infos:
            name = _check_name(info.filename, field)
            budget.entry(name)
            if info.is_dir():
                continue
            # Unix mode bits in external_attr: a zip can carry a symlink (0o120000).
            kind = (info.external_attr >> 16) & 0o170000
            if kind not in (0, 0o100000):
                raise ConfigError(f"{field}: archive entry {name!r} is a link or special file; refused")
            try:
                with zf.open(info) as f:
                    data = _read_capped(f, limits.max_entry_bytes, name, field)
            except (zipfile.BadZipFile, zlib.error, ValueError, OSError, EOFError, NotImplementedError) as e:
                raise ConfigError(f"{field}: archive entry {name!r} cannot be read ({e})") from None
            budget.add(name, len(data))
            budget.ratio(name, len(data), info.compress_size)
            yield name, data


def iter_tar(
    raw: bytes, field: str = "data.uri", limits: Limits | None = None
) -> Iterator[tuple[str, bytes]]:
    """(path, bytes) of each file in a tar (plain, gzip, bz2 or xz), in archive order."""
    for name, data, _ in iter_tar_members(raw, field, limits):
        yield name, data


def iter_tar_members(
    raw, field: str = "data.uri", limits: Limits | None = None, size: int | None = None
) -> Iterator[tuple[str, bytes, tarfile.TarInfo]]:
    """(path, bytes, member) of each file in a tar, in archive order. `raw`: the archive's bytes
    (any compression), or a binary file read front to back as a stream (an uncompressed tar, no
    seeks: the streamed path's driver reads it where it lies) of `size` bytes. A member's
    `offset_data` is where its bytes lie in the file."""
    limits = limits or LIMITS
    budget = _Budget(limits, field)
    whole = isinstance(raw, bytes | bytearray | memoryview)
    size = len(raw) if whole else size
    try:
        source, mode = (io.BytesIO(raw), "r:*") if whole else (raw, "r|")
        tf = tarfile.open(fileobj=source, mode=mode)  # noqa: SIM115 (closed by `with tf` below)
    except (tarfile.TarError, zlib.error, OSError, EOFError, ValueError) as e:
        raise ConfigError(f"{field}: not a readable tar archive ({e})") from None
    with tf:
        while True:
            try:
                member = tf.next()  # one header at a time: a bomb is stopped before the rest
            except (tarfile.TarError, zlib.error, OSError, EOFError, ValueError) as e:
                raise ConfigError(f"{field}: tar archive is corrupt ({e})") from None
            if member is None:
                break
            name = _check_name(member.name, field)
            budget.entry(name)
            if member.isdir():
                continue
            if not member.isfile():
                what = (
                    "a symlink" if member.issym() else "a hard link" if member.islnk() else "a device or fifo"
                )
                raise ConfigError(f"{field}: archive entry {name!r} is {what}; refused")
            budget.add(name, member.size)
            # The whole archive's expansion so far against its compressed size.
            budget.ratio(name, budget.total, size or 0, whole=True)
            try:
                f = tf.extractfile(member)
                data = _read_capped(f, limits.max_entry_bytes, name, field)
            except (tarfile.TarError, zlib.error, OSError, EOFError, ValueError) as e:
                raise ConfigError(f"{field}: archive entry {name!r} cannot be read ({e})") from None
            if len(data) != member.size:
                raise ConfigError(f"{field}: archive entry {name!r} is truncated; refused")
            yield name, data, member
