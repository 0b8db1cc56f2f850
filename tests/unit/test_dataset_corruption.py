"""A dataset object that is not a readable .npz is a configuration error (the job fails once,
naming data.uri), whatever the damage: no retry can repair the object."""

import io

import numpy as np
import pytest

from service.artifacts import LocalArtifactStore
from service.datasets import dataset_key
from service.errors import ConfigError
from service.spec import DataSpec
from workers.data import load_dataset

KEY = dataset_key("t", "d.npz", "npz")  # what the service resolves tenant t's d.npz to


def _npz(compressed: bool = False, **arrays) -> bytes:
    buf = io.BytesIO()
    (np.savez_compressed if compressed else np.savez)(buf, **arrays)
    return buf.getvalue()


GOOD = {"X": np.arange(64 * 40, dtype=np.float32).reshape(40, 64), "y": np.arange(40) % 10}


def _flip(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1 :]


@pytest.mark.parametrize(
    "damage",
    [
        lambda: b"",
        lambda: b"not a zip file at all",
        lambda: _npz(**GOOD)[: len(_npz(**GOOD)) // 2],  # an upload cut short
        lambda: _npz(**GOOD)[:-10],  # only the end of the central directory missing
        lambda: _flip(_npz(**GOOD), 1000),  # a flipped byte inside X: CRC mismatch
        lambda: _flip(_npz(compressed=True, **GOOD), 200),  # inside a deflate stream
        lambda: _npz(X=np.array([{"a": 1}] * 40, dtype=object), y=GOOD["y"]),  # a pickle inside
        lambda: _npz(features=GOOD["X"], labels=GOOD["y"]),  # other array names
    ],
    ids=["empty", "garbage", "truncated", "no-directory-end", "crc", "deflate", "pickle", "names"],
)
def test_a_damaged_dataset_is_a_configuration_error(tmp_path, damage):
    store = LocalArtifactStore(tmp_path)
    store.put_bytes(KEY, damage())
    with pytest.raises(
        ConfigError, match=r"^data.uri: store://datasets/d.npz is not an .npz with arrays X and y"
    ):
        load_dataset(DataSpec(uri="store://datasets/d.npz", resolved_uri=KEY), store)


def test_the_undamaged_dataset_loads(tmp_path):
    store = LocalArtifactStore(tmp_path)
    store.put_bytes(KEY, _npz(**GOOD))
    assert load_dataset(DataSpec(uri="store://datasets/d.npz", resolved_uri=KEY), store).info.n_train == 32
