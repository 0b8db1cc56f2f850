"""`slimtrain dataset push DIR SET`'s choice of shards (api/dataset_sets.plan_folder: the readers'
skip rule, one flat folder, one format, strict names) and `dataset ls`'s grouping of a set's
shards into one line. Pure: files with names only; the upload itself is
tests/integration/test_datasets_upload.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from api.dataset_sets import FolderRefused, group_sets, plan_folder, set_name


def _folder(root: Path, *names: str) -> Path:
    for n in names:
        p = root / n
        if n.endswith("/"):
            p.mkdir(parents=True)
        else:
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(b"x" * len(n))
    return root


def test_a_spark_folder_gives_its_parts_in_sorted_order_and_skips_what_the_readers_skip(tmp_path):
    d = _folder(
        tmp_path,
        "part-00001.snappy.parquet",
        "part-00000.snappy.parquet",
        "_SUCCESS",
        ".part-00000.snappy.parquet.crc",
        "_temporary/0/part-00002.parquet",
    )
    got = plan_folder(d)
    assert [s.name for s in got] == ["part-00000.snappy.parquet", "part-00001.snappy.parquet"]
    assert {s.format for s in got} == {"parquet"}
    assert got[0].size == len("part-00000.snappy.parquet") and got[0].path == d / got[0].name


def test_format_option_names_files_without_an_ending_and_a_tokenizer_rides_along(tmp_path):
    d = _folder(tmp_path / "a", "part-00000", "part-00001")
    with pytest.raises(FolderRefused, match=r"cannot tell the format of part-00000, part-00001.*--format"):
        plan_folder(d)
    assert [s.format for s in plan_folder(d, "text")] == ["text", "text"]
    d = _folder(tmp_path / "b", "a.jsonl", "b.jsonl", "tok.json")
    assert [(s.name, s.format) for s in plan_folder(d)] == [
        ("a.jsonl", "jsonl"),
        ("b.jsonl", "jsonl"),
        ("tok.json", "tokenizer"),
    ]


@pytest.mark.parametrize(
    ("names", "fmt", "says"),
    [
        ((), None, "holds no shard files"),
        (("_SUCCESS", ".x.crc"), None, "holds no shard files"),
        (("tok.json",), None, "only a tokenizer.json"),
        (("a.parquet", "year=2024/"), None, r"holds year=2024/, which is no file: a set is one flat folder"),
        (("a.parquet", "b c.parquet"), None, "b c.parquet is not a strict name"),
        (("a.zip", "b.zip"), None, "image_zip files: a set's shards are parquet, jsonl, text, npz"),
        (("a.parquet",), "image_zip", "--format image_zip: the shards of a set are one of"),
    ],
)
def test_what_cannot_be_one_set_is_refused_before_a_byte_is_sent(tmp_path, names, fmt, says):
    with pytest.raises(FolderRefused, match=says):
        plan_folder(_folder(tmp_path, *names), fmt)


def test_mixed_formats_name_one_file_of_each(tmp_path):
    with pytest.raises(FolderRefused) as e:
        plan_folder(_folder(tmp_path, "a.parquet", "b.jsonl", "c.parquet"))
    assert "a.parquet is parquet, b.jsonl is jsonl" in str(e.value)


@pytest.mark.parametrize(("given", "want"), [("clicks", "clicks"), ("clicks/", "clicks")])
def test_set_name_takes_a_trailing_slash(given, want):
    assert set_name(given) == want


@pytest.mark.parametrize("bad", ["a/b", "a//", "../x", ".hidden", "", "/", "x y"])
def test_set_name_is_one_strict_name(bad):
    with pytest.raises(FolderRefused, match="invalid dataset set name"):
        set_name(bad)


def _entry(name, fmt="parquet", size=10, samples=4, created="2026-12-01T00:00:00Z", classes=None):
    return {
        "name": name,
        "format": fmt,
        "size": size,
        "samples": samples,
        "created": created,
        "num_classes": classes,
    }


def test_ls_shows_a_set_as_one_line_with_its_shards_and_total_size():
    items = [
        _entry("a.parquet"),
        _entry("clicks/p0.parquet", size=100, samples=40, classes=3),
        _entry("clicks/p1.parquet", size=150, samples=60, created="2026-12-02T00:00:00Z", classes=4),
        _entry("clicks/tok.json", fmt="tokenizer", size=7, samples=0),
        _entry("z.npz", fmt="npz"),
    ]
    got = group_sets(items)
    assert [d["name"] for d in got] == ["a.parquet", "clicks/", "clicks/tok.json", "z.npz"]
    assert got[1] == {
        "name": "clicks/",
        "shards": 2,
        "size": 250,
        "samples": 100,
        "format": "parquet",
        "num_classes": 4,
        "created": "2026-12-02T00:00:00Z",
    }
    mixed = group_sets([_entry("s/a.parquet"), _entry("s/b.npz", fmt="npz")])
    assert mixed[0]["format"] == "npz+parquet"  # shown as it is: a job refuses such a set
    assert mixed[0]["num_classes"] is None  # a shard whose classes the job's options decide
