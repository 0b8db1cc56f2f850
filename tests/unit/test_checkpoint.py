"""Checkpoints verify by manifest, fall back past corrupt ones, and never unpickle code."""

import json
import os
import pickle

import pytest
import torch

from service.artifacts import JobArtifacts, LocalArtifactStore, manifest_files
from service.errors import CheckpointError
from workers.checkpoint import dir_name, load_folder, load_latest, write_checkpoint


def _write(store, job, step):
    arts = JobArtifacts(store, job)
    folder = store.root / job / "checkpoints" / dir_name(step)
    write_checkpoint(
        folder,
        step,
        {"step": step, "w": torch.full((3,), float(step))},
        [{"torch": torch.get_rng_state()}],
        {"world_size": 1},
    )
    return arts, folder


def test_latest_verified_checkpoint_wins_and_corrupt_ones_are_skipped(tmp_path):
    store = LocalArtifactStore(tmp_path)
    for s in (100, 200, 300):
        _write(store, "j", s)
    assert load_latest(store, "j").step == 300
    # flip a byte in the newest: skipped, the previous one is used
    p = tmp_path / "j" / "checkpoints" / dir_name(300) / "state.pt"
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0xFF
    p.write_bytes(bytes(data))
    assert load_latest(store, "j").step == 200
    # a half-written one (no manifest yet) is skipped too
    os.remove(tmp_path / "j" / "checkpoints" / dir_name(200) / "manifest.json")
    got = load_latest(store, "j")
    assert got.step == 100 and torch.equal(got.state["w"], torch.full((3,), 100.0))


def test_no_checkpoint_is_none(tmp_path):
    assert load_latest(LocalArtifactStore(tmp_path), "nothing") is None


class Evil:
    def __reduce__(self):
        return (open, (os.environ["SENTINEL"], "w"))


def test_malicious_pickle_never_executes(tmp_path, monkeypatch):
    sentinel = tmp_path / "pwned"
    monkeypatch.setenv("SENTINEL", str(sentinel))
    store = LocalArtifactStore(tmp_path / "store")
    _, folder = _write(store, "j", 100)
    # plant a pickle that would create the sentinel file when unpickled, and fix up the manifest
    # so that only the loader's own refusal stands in the way
    with open(folder / "state.pt", "wb") as f:
        pickle.dump({"step": 100, "evil": Evil()}, f)
    import hashlib
    import json

    m = json.loads((folder / "manifest.json").read_text())
    b = (folder / "state.pt").read_bytes()
    m["files"]["state.pt"] = {"size": len(b), "sha256": hashlib.sha256(b).hexdigest()}
    (folder / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(CheckpointError, match="cannot load"):
        load_folder(folder)
    assert load_latest(store, "j") is None
    assert not sentinel.exists()


def test_checkpoint_manifest_has_the_job_manifest_shape(tmp_path):
    store = LocalArtifactStore(tmp_path)
    _, folder = _write(store, "j", 100)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["version"] == 1 and manifest["step"] == 100
    assert set(manifest_files(manifest)) == {"state.pt", "rng.pt", "meta.json"}


def test_checkpoints_written_before_version_1_still_load(tmp_path):
    """Their manifest was {"step", "files"} without a version: resumable as before."""
    store = LocalArtifactStore(tmp_path)
    _, folder = _write(store, "j", 100)
    manifest = json.loads((folder / "manifest.json").read_text())
    del manifest["version"]
    (folder / "manifest.json").write_text(json.dumps(manifest))
    assert load_folder(folder).step == 100
