"""The local artifact store and key safety (no name escapes its job's prefix)."""

import hashlib

import pytest

from service.artifacts import (
    JobArtifacts,
    LocalArtifactStore,
    check_name,
    job_key,
    manifest_files,
    sha256_bytes,
    verify_files,
)
from service.errors import ArtifactCorrupt, ArtifactKeyError, ArtifactNotFound

BAD_NAMES = [
    "",
    "..",
    "../x",
    "a/../../b",
    "/etc/passwd",
    "a//b",
    "a/",
    ".hidden",
    "a/.b",
    "a\\b",
    "..\\x",
    "a\x00b",
    "%2e%2e/x",
    "a b",
    "~/x",
    "a/./b",
    "C:\\x",
    "x" * 2000,
    "é",
]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_names_refused(name):
    with pytest.raises(ArtifactKeyError):
        check_name(name)


@pytest.mark.parametrize("job", ["", "..", "../j", "j/k", ".j", "j\x00"])
def test_bad_job_ids_refused(job):
    with pytest.raises(ArtifactKeyError):
        job_key(job, "report.json")


def test_good_names():
    for n in ["report.json", "checkpoints/step-00000100/state.pt", "model.int8.onnx", "a_b-c=d"]:
        assert check_name(n) == n


def test_local_store_roundtrip_list_manifest(tmp_path):
    store = LocalArtifactStore(tmp_path)
    arts = JobArtifacts(store, "job-1")
    arts.put_bytes("a.bin", b"hello")
    arts.put_json("report.json", {"x": 1})
    arts.put_bytes("checkpoints/step-00000001/state.pt", b"zzz")
    assert arts.get_bytes("a.bin") == b"hello" and arts.get_json("report.json") == {"x": 1}
    assert [arts.name_of(o.key) for o in arts.list()] == [
        "a.bin",
        "checkpoints/step-00000001/state.pt",
        "report.json",
    ]
    arts.put_json("outcome.json", {"attempt": 1, "state": "succeeded"})
    m = arts.write_manifest()
    # the job manifest has the checkpoints' shape; outcome.json (the reconciler's note) is not listed
    assert m["version"] == 1 and m["job_id"] == "job-1"
    assert list(m["files"]) == ["a.bin", "report.json"]
    assert m["files"]["a.bin"] == {"size": 5, "sha256": hashlib.sha256(b"hello").hexdigest()}
    assert arts.verify_manifest() == []
    (tmp_path / "job-1" / "a.bin").write_bytes(b"HELLO")
    assert arts.verify_manifest() == ["a.bin"]
    with pytest.raises(ArtifactNotFound):
        arts.get_bytes("missing.bin")


def test_symlink_escape_refused(tmp_path):
    store = LocalArtifactStore(tmp_path / "root")
    (tmp_path / "secret").write_text("s")
    (tmp_path / "root" / "job").mkdir()
    (tmp_path / "root" / "job" / "link").symlink_to(tmp_path / "secret")
    with pytest.raises(ArtifactKeyError):
        JobArtifacts(store, "job").get_bytes("link")


def test_symlink_into_another_job_refused(tmp_path):
    store = LocalArtifactStore(tmp_path)
    JobArtifacts(store, "job-b").put_bytes("secret.txt", b"b's")
    (tmp_path / "job-a").mkdir()
    (tmp_path / "job-a" / "link").symlink_to(tmp_path / "job-b" / "secret.txt")
    (tmp_path / "job-a" / "dir").symlink_to(tmp_path / "job-b")
    for name in ("link", "dir/secret.txt"):
        with pytest.raises(ArtifactKeyError, match="escapes its prefix"):
            JobArtifacts(store, "job-a").get_bytes(name)
    assert JobArtifacts(store, "job-b").get_bytes("secret.txt") == b"b's"


def test_writes_are_atomic_no_temp_files_listed(tmp_path):
    store = LocalArtifactStore(tmp_path)
    arts = JobArtifacts(store, "j")
    arts.put_bytes("x", b"1" * 100)
    (tmp_path / "j" / ".tmp-leftover").write_bytes(b"partial")
    assert [o.key for o in arts.list()] == ["j/x"]


def test_verified_json_checks_the_manifest_and_the_syntax(tmp_path):
    arts = JobArtifacts(LocalArtifactStore(tmp_path), "job-1")
    arts.put_json("report.json", {"accuracy": 0.9})
    assert arts.get_verified_json("report.json") == {"accuracy": 0.9}  # no manifest yet: running
    arts.write_manifest()
    assert arts.get_verified_json("report.json") == {"accuracy": 0.9}
    arts.put_json("report.json", {"accuracy": 0.99})  # valid JSON, but not what the job wrote
    with pytest.raises(ArtifactCorrupt, match="report.json does not match its sha256"):
        arts.get_verified_json("report.json")
    arts.put_bytes("notes.json", b'{"cut off')
    with pytest.raises(ArtifactCorrupt, match="notes.json is not valid JSON"):
        arts.get_verified_json("notes.json")
    arts.put_bytes("manifest.json", b"[]")
    with pytest.raises(ArtifactCorrupt, match="manifest.json is corrupt"):
        arts.get_verified_json("notes.json")


def test_manifests_written_before_version_1_still_verify(tmp_path):
    """Jobs finished before the one-shape change keep their `{"artifacts": [...]}` manifest."""
    arts = JobArtifacts(LocalArtifactStore(tmp_path), "old-job")
    arts.put_json("report.json", {"accuracy": 0.9})
    data = arts.get_bytes("report.json")
    old = {
        "job_id": "old-job",
        "artifacts": [{"name": "report.json", "size": len(data), "sha256": sha256_bytes(data)}],
    }
    arts.put_json("manifest.json", old)
    assert manifest_files(old) == {"report.json": {"size": len(data), "sha256": sha256_bytes(data)}}
    assert arts.verify_manifest() == []
    assert arts.get_verified_json("report.json") == {"accuracy": 0.9}
    arts.put_json("report.json", {"accuracy": 0.99})
    assert arts.verify_manifest() == ["report.json"]


@pytest.mark.parametrize(
    "manifest, why",
    [
        ([], "JSON object"),
        ({"version": 2, "files": {}}, "version 2"),
        ({"job_id": "j"}, "under 'files'"),
        ({"files": {"a": {"size": "1", "sha256": "x"}}}, "integer 'size'"),
        ({"files": {"../escape": {"size": 1, "sha256": "x"}}}, "invalid artifact name"),
    ],
)
def test_unreadable_manifests_are_refused(manifest, why):
    with pytest.raises(ValueError, match=why):
        manifest_files(manifest)


def test_verify_files_catches_size_content_and_absence(tmp_path):
    (tmp_path / "a").write_bytes(b"abc")
    (tmp_path / "b").write_bytes(b"xyz")
    files = {
        "a": {"size": 3, "sha256": sha256_bytes(b"abc")},
        "b": {"size": 3, "sha256": sha256_bytes(b"XYZ")},
        "c": {"size": 1, "sha256": sha256_bytes(b"c")},
    }
    assert verify_files(tmp_path, files) == ["b", "c"]
