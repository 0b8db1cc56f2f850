"""Checkpoint files and their verification.

A checkpoint is a folder: `state.pt` (model, optimizer, scaler, masks, schedule step, quantizer
state), `rng.pt` (every rank's RNG states), `meta.json`, and `manifest.json` (size and sha256 of
each file) written last. A checkpoint whose manifest is missing or disagrees with its files is
never resumed from: the loader falls back to the newest one that verifies. Files are loaded with
`torch.load(weights_only=True)`: a planted pickle cannot run code.
"""

from __future__ import annotations

import json
import logging
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from service.artifacts import (
    MANIFEST,
    ArtifactStore,
    JobArtifacts,
    manifest_doc,
    manifest_files,
    sha256_file,
    verify_files,
)
from service.errors import CheckpointError

log = logging.getLogger(__name__)

FORMAT = 1
STATE, RNG, META = "state.pt", "rng.pt", "meta.json"
CHECKPOINTS = "checkpoints"
DIR_RE = re.compile(r"^step-(\d{8})$")


def dir_name(step: int) -> str:
    return f"step-{step:08d}"


def write_checkpoint(folder: Path, step: int, state: dict, rng: list[dict], meta: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(state, folder / STATE)
    torch.save({"ranks": rng}, folder / RNG)
    (folder / META).write_text(json.dumps({"format": FORMAT, "step": step, **meta}, sort_keys=True))
    files = {
        p.name: {"size": p.stat().st_size, "sha256": sha256_file(p)}
        for p in sorted(folder.iterdir())
        if p.name != MANIFEST
    }
    # Last: its presence says every file above was completely written. The shape is the job
    # manifest's (service.artifacts.manifest_doc), so one reader checks both.
    (folder / MANIFEST).write_text(json.dumps(manifest_doc(files, step=step), sort_keys=True))


def verify_folder(folder: Path) -> dict:
    """Return the manifest when every listed file matches it; raise CheckpointError otherwise."""
    mpath = folder / MANIFEST
    try:
        manifest = json.loads(mpath.read_text())
        files = manifest_files(manifest)
        int(manifest["step"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"checkpoint {folder.name}: no readable manifest ({e})") from None
    for name in (STATE, RNG, META):
        if name not in files:
            raise CheckpointError(f"checkpoint {folder.name}: manifest lacks {name}")
    bad = verify_files(folder, files)
    if bad:
        raise CheckpointError(f"checkpoint {folder.name}: {bad[0]} is missing or corrupt")
    return manifest


@dataclass
class Loaded:
    step: int
    state: dict
    rng: list[dict]
    meta: dict
    name: str


def load_folder(folder: Path) -> Loaded:
    manifest = verify_folder(folder)
    try:
        state = torch.load(folder / STATE, map_location="cpu", weights_only=True)
        rng = torch.load(folder / RNG, map_location="cpu", weights_only=True)["ranks"]
        meta = json.loads((folder / META).read_text())
    except Exception as e:  # an unpickling error of any kind means: not a checkpoint of ours
        raise CheckpointError(f"checkpoint {folder.name}: cannot load ({type(e).__name__}: {e})") from None
    return Loaded(int(manifest["step"]), state, rng, meta, folder.name)


def list_checkpoints(arts: JobArtifacts) -> list[tuple[int, str]]:
    """(step, folder name) of every checkpoint folder in the job's store, newest first."""
    found = set()
    for obj in arts.list(CHECKPOINTS):
        parts = arts.name_of(obj.key).split("/")
        if len(parts) >= 3 and DIR_RE.match(parts[1]):
            found.add((int(DIR_RE.match(parts[1]).group(1)), parts[1]))
    return sorted(found, reverse=True)


def load_latest(store: ArtifactStore, job_id: str, scratch: Path | None = None) -> Loaded | None:
    """The newest checkpoint of the job that verifies, or None when there is none.

    Corrupt or incomplete ones (a crash mid-upload, a flipped byte) are skipped with a warning."""
    arts = JobArtifacts(store, job_id)
    for step, name in list_checkpoints(arts):
        with tempfile.TemporaryDirectory(dir=scratch) as tmp:
            local = Path(tmp) / name
            prefix = arts.key(f"{CHECKPOINTS}/{name}") + "/"
            store.download_prefix(prefix, local)
            try:
                loaded = load_folder(local)
            except CheckpointError as e:
                log.warning("skipping checkpoint at step %d: %s", step, e)
                continue
            return loaded
    return None
