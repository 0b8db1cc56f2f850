"""The local artifact store and key safety (no name escapes its job's prefix)."""

import pytest

from service.artifacts import JobArtifacts, LocalArtifactStore, check_name, job_key
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
    m = arts.write_manifest()
    assert [e["name"] for e in m["artifacts"]] == ["a.bin", "report.json"]
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
