"""An npz upload is checked a bounded chunk at a time (service/datasets._inspect_npz), with the
verdict the in-memory load gave (formats.from_npz over the whole arrays): the same samples and
classes for NCHW/NHWC images, Fortran-ordered arrays, integer tokens and token sequences,
compressed or not; the same message for a bad label or a NaN; a clear refusal for a truncated,
corrupted or non-npz file. Memory: tracemalloc's peak while checking a 48 MB npz stays a small
fraction of it, stored or deflated."""

from __future__ import annotations

import io
import tracemalloc

import numpy as np
import pytest

from service import datasets
from service.datasets import InvalidDataset, inspect_dataset
from service.errors import ConfigError
from service.spec import DataSpec
from workers.data import formats

URI = "store://datasets/d.npz"
RNG = np.random.default_rng(0)
LABELS = np.arange(40) % 4


def npz_bytes(compressed: bool = False, **arrays) -> bytes:
    buf = io.BytesIO()
    (np.savez_compressed if compressed else np.savez)(buf, **arrays)
    return buf.getvalue()


def verdict(tmp_path, data: bytes) -> dict | str:
    """The upload check's verdict: what meta.json records, or the refusal's message."""
    path = tmp_path / "upload"
    path.write_bytes(data)
    try:
        filename, found = inspect_dataset("d.npz", "npz", None, None, path, len(data))
    except InvalidDataset as e:
        return str(e)
    assert filename == "data.npz"
    return {k: found[k] for k in ("format", "samples", "num_classes", "columns")}


def verdicts(tmp_path, data: bytes) -> tuple[object, object]:
    """(the chunked check's verdict, the whole-array load's, alike)."""
    new = verdict(tmp_path, data)
    try:
        out = formats.from_npz(data, DataSpec(uri=URI, format="npz"))
        datasets._enough(len(out.x), URI)
        old = {"format": "npz", "samples": len(out.x), "num_classes": out.num_classes, "columns": None}
    except ConfigError as e:
        old = str(e).removeprefix("data.uri: ")
    return new, old


def _flip(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1 :]


GOOD = {
    "nchw": {"X": RNG.normal(size=(40, 1, 8, 8)).astype(np.float32), "y": LABELS},
    "nhwc": {"X": RNG.integers(0, 256, (40, 8, 8, 3), dtype=np.uint8), "y": LABELS},
    "vectors-fortran": {"X": np.asfortranarray(RNG.normal(size=(40, 7))), "y": LABELS.astype(np.int8)},
    "images-fortran": {"X": np.asfortranarray(RNG.normal(size=(40, 3, 4, 4))), "y": LABELS},
    "tokens": {"X": RNG.integers(0, 50, (20, 16)), "y": RNG.integers(0, 61, (20, 16))},
    "tokens-fortran": {
        "X": np.asfortranarray(RNG.integers(0, 50, (20, 16), dtype=np.int32)),
        "y": np.asfortranarray(RNG.integers(0, 50, (20, 16), dtype=np.int32)),
    },
    "sequence": {"X": RNG.integers(0, 1000, (30, 12), dtype=np.int32), "y": np.arange(30) % 3},
}
nan = RNG.normal(size=(40, 6)).astype(np.float32)
nan[37, 5] = np.nan
BAD = {
    "label-gap": {"X": np.ones((40, 4), np.float32), "y": np.array([0, 1, 3, 4] * 10)},
    "label-negative": {"X": np.ones((40, 4), np.float32), "y": LABELS - 1},
    "label-float": {"X": np.ones((40, 4), np.float32), "y": LABELS.astype(np.float32)},
    "nan": {"X": nan, "y": LABELS},
    "inf-after-cast": {"X": np.full((40, 2), 1e300), "y": LABELS},
    "token-negative": {"X": RNG.integers(-1, 5, (20, 16)), "y": RNG.integers(0, 5, (20, 16))},
    "sequence-negative": {"X": RNG.integers(-3, 9, (30, 12), dtype=np.int64), "y": np.arange(30) % 3},
    "too-few": {"X": np.ones((5, 4), np.float32), "y": np.arange(5)},
    "lengths": {"X": np.ones((40, 4), np.float32), "y": np.arange(39) % 3},
    "y-2d-labels": {"X": np.ones((40, 4), np.float32), "y": np.ones((40, 2), np.int64)},
}


@pytest.fixture(params=[64, datasets.NPZ_CHUNK_BYTES], ids=["64-byte-chunks", "default-chunks"])
def chunk(request, monkeypatch):
    monkeypatch.setattr(datasets, "NPZ_CHUNK_BYTES", request.param)
    return request.param


@pytest.mark.filterwarnings("ignore:overflow encountered in cast")  # inf-after-cast, on both paths
@pytest.mark.parametrize("compressed", [False, True], ids=["savez", "savez_compressed"])
@pytest.mark.parametrize("case", [*GOOD, *BAD])
def test_the_chunked_check_gives_the_whole_array_verdict(tmp_path, chunk, case, compressed):
    new, old = verdicts(tmp_path, npz_bytes(compressed, **{**GOOD, **BAD}[case]))
    assert new == old
    assert isinstance(new, dict) == (case in GOOD), new


def test_the_verdicts_say_what_they_found(tmp_path):
    """The comparison above is between two answers that are right, not two alike wrong."""
    found = {case: verdict(tmp_path, npz_bytes(**GOOD[case])) for case in ("nhwc", "tokens", "sequence")}
    assert [(f["samples"], f["num_classes"]) for f in found.values()] == [
        (40, 4),
        (20, 1 + max(int(GOOD["tokens"]["X"].max()), int(GOOD["tokens"]["y"].max()))),
        (30, 3),
    ]
    assert verdict(tmp_path, npz_bytes(**BAD["nan"])) == "X: features contain NaN or infinity"
    assert "class 2 never occurs" in verdict(tmp_path, npz_bytes(**BAD["label-gap"]))


good = npz_bytes(**GOOD["nchw"])
DAMAGED = {
    "empty": b"",
    "not-npz": b"X,y\n1,0\n" * 50,
    "npy-not-npz": (lambda b: (np.save(b, GOOD["nchw"]["X"]), b.getvalue())[1])(io.BytesIO()),
    "truncated": good[: len(good) // 2],
    "no-directory-end": good[:-10],
    "crc": _flip(good, 1000),
    "deflate": _flip(npz_bytes(True, **GOOD["nchw"]), 200),
    "pickle": npz_bytes(X=np.array([{"a": 1}] * 40, dtype=object), y=LABELS),
    "names": npz_bytes(features=GOOD["nchw"]["X"], labels=LABELS),
    "scalar": npz_bytes(X=np.float32(1), y=LABELS),
}


@pytest.mark.parametrize("case", DAMAGED)
def test_a_damaged_file_is_refused_naming_it(tmp_path, chunk, case):
    new = verdict(tmp_path, DAMAGED[case])
    assert isinstance(new, str) and new.startswith(URI), new
    assert "is not an .npz with arrays X and y" in new or "is a scalar" in new, new
    # a job reading it in memory refuses it too (before: a bare .npy or a scalar X raised TypeError)
    with pytest.raises(ConfigError, match=r"^data.uri: store://datasets/d.npz(:| is not an .npz)"):
        formats.from_npz(DAMAGED[case], DataSpec(uri=URI, format="npz"))


@pytest.mark.parametrize("compressed", [False, True], ids=["savez", "savez_compressed"])
def test_memory_stays_bounded_whatever_the_file_size(tmp_path, monkeypatch, compressed):
    """48 MB of float32 features (all zeros when deflated: a 50 KB upload that inflates to
    48 MB) checked in 1 MiB chunks: the peak of what Python and numpy allocate stays under
    8 MiB, where the whole-array load held the 48 MB and its float32 copy."""
    n, width = 12_288, 1024
    x = np.zeros((n, width), np.float32) if compressed else RNG.normal(size=(n, width)).astype(np.float32)
    path = tmp_path / "big.npz"
    with open(path, "wb") as f:
        (np.savez_compressed if compressed else np.savez)(f, X=x, y=np.arange(n) % 10)
    assert x.nbytes == 48 * 2**20
    del x
    monkeypatch.setattr(datasets, "NPZ_CHUNK_BYTES", 2**20)
    sizes = []
    rows = formats.npz_rows
    monkeypatch.setattr(formats, "npz_rows", lambda x, *a: (sizes.append(x.nbytes), rows(x, *a))[1])
    tracemalloc.start()
    try:
        _, found = inspect_dataset("big.npz", "npz", None, None, path, path.stat().st_size)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert (found["samples"], found["num_classes"]) == (n, 10)
    assert len(sizes) == 48 and max(sizes) == 2**20  # every row of X seen, a MiB at a time
    assert peak < 8 * 2**20, f"peak {peak / 2**20:.1f} MiB"
