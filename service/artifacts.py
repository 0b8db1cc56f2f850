"""The artifact store: where checkpoints, exported models and reports live.

One interface, a local-folder implementation (the default) and an S3 one (`s3://bucket/prefix`).
Every key a job touches goes through `job_key`, which refuses anything that could leave the job's
prefix (`..`, absolute paths, backslashes, NUL, empty segments, odd characters), so no artifact
name can escape its job whatever the caller passes.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO
from urllib.parse import urlparse

from service.errors import ArtifactCorrupt, ArtifactKeyError, ArtifactNotFound, ConfigError

JOB_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_SEGMENT = r"[A-Za-z0-9_][A-Za-z0-9._=-]{0,254}"
_SEGMENT_RE = re.compile(f"^{_SEGMENT}$")
# What `check_name` accepts, as one pattern (for the OpenAPI document) and a length.
NAME_PATTERN = f"^{_SEGMENT}(/{_SEGMENT})*$"
NAME_MAX_CHARS = 1024
MANIFEST = "manifest.json"
# One shape for every manifest, a job's and a checkpoint's: {"version": 1, "files": {name:
# {"size", "sha256"}}, ...} plus what identifies it ("job_id" of a job, "step" of a checkpoint).
MANIFEST_VERSION = 1
# Not the job's result but the entrypoint's note to the reconciler on how an attempt ended,
# rewritten by each attempt after the manifest: never listed, never downloaded by the CLI.
NOT_IN_MANIFEST = frozenset({"outcome.json"})
CHUNK = 1024 * 1024


def check_job_id(job_id: str) -> str:
    if not isinstance(job_id, str) or not JOB_ID_RE.fullmatch(job_id) or ".." in job_id:
        raise ArtifactKeyError(f"invalid job id {job_id!r}")
    return job_id


def check_name(name: str) -> str:
    """A relative artifact name inside a job: segments of [A-Za-z0-9._=-], not starting with '.'."""
    if not isinstance(name, str) or not name or len(name) > NAME_MAX_CHARS:
        raise ArtifactKeyError(f"artifact name must be 1-{NAME_MAX_CHARS} characters")
    parts = name.split("/")
    for part in parts:
        if not _SEGMENT_RE.fullmatch(part) or part in (".", ".."):
            raise ArtifactKeyError(
                f"invalid artifact name {name!r}: segments are letters, digits, '.', '_', '=', '-' "
                "and may not start with '.'"
            )
    return name


def job_key(job_id: str, name: str) -> str:
    return f"{check_job_id(job_id)}/{check_name(name)}"


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def manifest_doc(files: dict[str, dict], **ident) -> dict:
    """A manifest: `files` maps each name to {"size", "sha256"}; `ident` says whose it is."""
    return {"version": MANIFEST_VERSION, **ident, "files": dict(sorted(files.items()))}


def manifest_files(manifest) -> dict[str, dict]:
    """{name: {"size", "sha256"}} of a manifest. Also reads the job manifests written before
    version 1 (`{"job_id", "artifacts": [{"name", "size", "sha256"}]}`), so jobs finished before
    the change still verify; checkpoint manifests already had `files`. Raises ValueError for
    anything else (a newer version included: refusing beats trusting what we cannot read)."""
    if not isinstance(manifest, dict):
        raise ValueError("a manifest is a JSON object")
    version = manifest.get("version")
    if version is not None and version != MANIFEST_VERSION:
        raise ValueError(f"manifest version {version!r}; this slimtrain reads version {MANIFEST_VERSION}")
    if "files" in manifest:
        files = manifest["files"]
    elif isinstance(manifest.get("artifacts"), list):  # the job manifest before version 1
        files = {e["name"]: {"size": e["size"], "sha256": e["sha256"]} for e in manifest["artifacts"]}
    else:
        raise ValueError("a manifest lists its files under 'files'")
    if not isinstance(files, dict) or not all(
        isinstance(e, dict) and isinstance(e.get("sha256"), str) and isinstance(e.get("size"), int)
        for e in files.values()
    ):
        raise ValueError("each file of a manifest has an integer 'size' and a 'sha256'")
    for name in files:
        # Readers join these names to a folder (the CLI's download): none may leave it.
        try:
            check_name(name)
        except ArtifactKeyError as e:
            raise ValueError(e.message) from None
    return files


def verify_files(folder: Path, files: dict[str, dict]) -> list[str]:
    """Names of `files` (a manifest's) that are missing in `folder` or differ in size or sha256."""
    bad = []
    for name, entry in files.items():
        p = folder / name
        if not p.is_file() or p.stat().st_size != entry["size"] or sha256_file(p) != entry["sha256"]:
            bad.append(name)
    return bad


class ArtifactStore(ABC):
    """Keys are '/'-separated, relative to the store's root; callers build them with `job_key`."""

    uri: str

    @abstractmethod
    def put_bytes(self, key: str, data: bytes) -> None: ...

    @abstractmethod
    def open_read(self, key: str) -> BinaryIO:
        """A readable binary stream; raises ArtifactNotFound."""

    @abstractmethod
    def list(self, prefix: str) -> list[ObjectInfo]:
        """Objects under `prefix` (a folder: 'job/checkpoints/'), sorted by key."""

    @abstractmethod
    def delete_prefix(self, prefix: str) -> None: ...

    @abstractmethod
    def ray_storage(self, prefix: str) -> tuple[str, object | None]:
        """(storage_path, pyarrow filesystem or None) for Ray Train's RunConfig."""

    # Generic helpers built on the primitives above.

    def get_bytes(self, key: str) -> bytes:
        with self.open_read(key) as f:
            return f.read()

    def exists(self, key: str) -> bool:
        try:
            self.open_read(key).close()
            return True
        except ArtifactNotFound:
            return False

    def put_json(self, key: str, obj) -> None:
        self.put_bytes(key, json.dumps(obj, indent=2, sort_keys=True).encode())

    def get_json(self, key: str):
        return json.loads(self.get_bytes(key))

    def put_fileobj(self, key: str, f: BinaryIO) -> None:
        """Store what `f` holds from its position to its end, read in chunks: an upload of any
        size never sits whole in memory. The default suits stores with nothing better."""
        self.put_bytes(key, f.read())

    def put_file(self, key: str, path: str | Path) -> None:
        with open(path, "rb") as f:
            self.put_fileobj(key, f)

    def sha256(self, key: str) -> str:
        h = hashlib.sha256()
        with self.open_read(key) as f:
            for chunk in iter(lambda: f.read(CHUNK), b""):
                h.update(chunk)
        return h.hexdigest()

    def download_prefix(self, prefix: str, dest: Path) -> list[Path]:
        """Copy every object under `prefix` into `dest`, keeping relative paths."""
        out = []
        for obj in self.list(prefix):
            rel = obj.key[len(prefix) :]
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            with self.open_read(obj.key) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst, CHUNK)
            out.append(target)
        return out


class LocalArtifactStore(ArtifactStore):
    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.uri = self.root.as_uri()

    def path(self, key: str) -> Path:
        p = (self.root / key).resolve()
        # Defense in depth behind check_name: also refuses keys that resolve through a symlink
        # out of their top-level folder (a job's prefix), into another job or out of the store.
        top = self.root / key.split("/", 1)[0] if key else self.root
        if p != top and top not in p.parents:
            raise ArtifactKeyError(f"key {key!r} escapes its prefix")
        return p

    def put_bytes(self, key: str, data: bytes) -> None:
        self._write(key, lambda out: out.write(data))

    def put_fileobj(self, key: str, f: BinaryIO) -> None:
        self._write(key, lambda out: shutil.copyfileobj(f, out, CHUNK))

    def _write(self, key: str, fill) -> None:
        p = self.path(key)
        p.parent.mkdir(parents=True, exist_ok=True)
        # Write-then-rename: a reader never sees a half-written object.
        fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as out:
                fill(out)
            os.replace(tmp, p)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def open_read(self, key: str) -> BinaryIO:
        p = self.path(key)
        if not p.is_file():
            raise ArtifactNotFound(f"no artifact {key!r}")
        return open(p, "rb")

    def list(self, prefix: str) -> list[ObjectInfo]:
        base = self.path(prefix.rstrip("/")) if prefix.strip("/") else self.root
        if not base.is_dir():
            return []
        out = []
        for dirpath, _dirs, files in os.walk(base):
            for fn in files:
                if fn.startswith(".tmp-"):
                    continue
                fp = Path(dirpath) / fn
                out.append(ObjectInfo(fp.relative_to(self.root).as_posix(), fp.stat().st_size))
        return sorted(out, key=lambda o: o.key)

    def delete_prefix(self, prefix: str) -> None:
        p = self.path(prefix.rstrip("/"))
        if p == self.root:
            raise ArtifactKeyError("refusing to delete the store root")
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()

    def ray_storage(self, prefix: str) -> tuple[str, object | None]:
        p = self.path(prefix.rstrip("/"))
        p.mkdir(parents=True, exist_ok=True)
        return str(p), None


def open_store(uri: str, s3_endpoint_url: str | None = None) -> ArtifactStore:
    parsed = urlparse(uri)
    if parsed.scheme in ("", "file"):
        return LocalArtifactStore(parsed.path if parsed.scheme else uri)
    if parsed.scheme == "s3":
        from service.s3_store import S3ArtifactStore

        return S3ArtifactStore(uri, endpoint_url=s3_endpoint_url)
    raise ConfigError(f"SLIMTRAIN_ARTIFACT_URI: {uri!r} must be a folder, file:///path or s3://bucket/prefix")


class JobArtifacts:
    """The artifacts of one job: names relative to the job's prefix, checked on every access."""

    def __init__(self, store: ArtifactStore, job_id: str):
        self.store = store
        self.job_id = check_job_id(job_id)

    def key(self, name: str) -> str:
        return job_key(self.job_id, name)

    def put_bytes(self, name: str, data: bytes) -> None:
        self.store.put_bytes(self.key(name), data)

    def put_json(self, name: str, obj) -> None:
        self.store.put_json(self.key(name), obj)

    def get_bytes(self, name: str) -> bytes:
        return self.store.get_bytes(self.key(name))

    def get_json(self, name: str):
        return self.store.get_json(self.key(name))

    def open_read(self, name: str) -> BinaryIO:
        return self.store.open_read(self.key(name))

    def get_verified_json(self, name: str):
        """A JSON artifact checked against the job's manifest when the manifest lists it (a job
        still running has no manifest yet); corrupt or unparsable bytes raise ArtifactCorrupt."""
        data = self.get_bytes(name)
        try:
            listed = {n: e["sha256"] for n, e in manifest_files(self.get_json(MANIFEST)).items()}
        except ArtifactNotFound:
            listed = {}
        except (ValueError, KeyError, TypeError) as e:
            raise ArtifactCorrupt(f"job {self.job_id}: {MANIFEST} is corrupt ({e})") from None
        if name in listed and sha256_bytes(data) != listed[name]:
            raise ArtifactCorrupt(f"job {self.job_id}: {name} does not match its sha256 in {MANIFEST}")
        try:
            return json.loads(data)
        except ValueError as e:
            raise ArtifactCorrupt(f"job {self.job_id}: {name} is not valid JSON ({e})") from None

    def exists(self, name: str) -> bool:
        return self.store.exists(self.key(name))

    def list(self, sub: str = "") -> list[ObjectInfo]:
        prefix = f"{self.job_id}/" + (check_name(sub.strip("/")) + "/" if sub.strip("/") else "")
        return self.store.list(prefix)

    def name_of(self, key: str) -> str:
        return key[len(self.job_id) + 1 :]

    def write_manifest(self, exclude_prefixes: tuple[str, ...] = ("checkpoints/",)) -> dict:
        """List every artifact with size and sha256; written last, so a reader that finds the
        manifest knows the job's artifacts are complete."""
        files = {}
        for obj in self.list():
            name = self.name_of(obj.key)
            if name == MANIFEST or name in NOT_IN_MANIFEST or name.startswith(exclude_prefixes):
                continue
            files[name] = {"size": obj.size, "sha256": self.store.sha256(obj.key)}
        manifest = manifest_doc(files, job_id=self.job_id)
        self.put_json(MANIFEST, manifest)
        return manifest

    def verify_manifest(self) -> list[str]:
        """Names whose size or checksum disagree with the manifest (empty when all verify)."""
        bad = []
        for name, e in manifest_files(self.get_json(MANIFEST)).items():
            try:
                ok = self.store.sha256(self.key(name)) == e["sha256"]
            except ArtifactNotFound:
                ok = False
            if not ok:
                bad.append(name)
        return bad


def iter_file_chunks(f: BinaryIO) -> Iterator[bytes]:
    with f:
        yield from iter(lambda: f.read(CHUNK), b"")
