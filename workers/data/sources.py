"""Raw arrays of the built-in datasets."""

from __future__ import annotations

import hashlib
import math
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass
class Raw:
    x: np.ndarray
    y: np.ndarray
    image_shape: tuple[int, int, int] | None
    source: str
    num_classes: int | None = None  # None: derived from the labels
    kind: str | None = None  # None: from the arrays; "sequence": int tokens [N, T], labels [N]
    vocab_size: int | None = None  # token vocabulary of a "sequence" set


def image_shape_of(shape: tuple[int, ...]) -> tuple[int, int, int] | None:
    if len(shape) == 3:
        return (shape[0], shape[1], shape[2])
    if len(shape) == 2:
        return (1, shape[0], shape[1])
    if len(shape) == 1:
        side = math.isqrt(shape[0])
        if side * side == shape[0] and side >= 4:
            return (1, side, side)
    return None


def digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    return Raw(
        d.data.astype(np.float32),
        d.target.astype(np.int64),
        (1, 8, 8),
        "sklearn digits (1797 8x8, pixel values 0-16)",
        10,
    )


def synthetic(
    n_samples: int,
    n_features: int,
    n_classes: int,
    n_informative: int | None,
    class_sep: float,
    seed: int,
    vocab_size: int | None = None,
):
    from sklearn.datasets import make_classification

    informative = n_informative or max(2, n_features // 2)
    informative = min(informative, n_features)
    x, y = make_classification(
        n_samples=n_samples,
        n_features=n_features,
        n_informative=informative,
        n_redundant=0,
        n_classes=n_classes,
        n_clusters_per_class=1,
        class_sep=class_sep,
        random_state=seed,
    )
    if vocab_size is not None:
        # Token sequences for sequence classifiers (hf_seq_cls): each feature, clipped to +-3 std,
        # binned into vocab_size equal-width ids; one class label per sequence.
        edges = np.linspace(-3.0, 3.0, vocab_size + 1)[1:-1]
        tokens = np.digitize(x / x.std(), edges).astype(np.int64)
        source = f"synthetic {n_samples}x{n_features} tokens (vocab {vocab_size}), {n_classes} classes"
        source += f", seed {seed}"
        y = y.astype(np.int64)
        return Raw(tokens, y, None, source, n_classes, kind="sequence", vocab_size=vocab_size)
    return Raw(
        x.astype(np.float32),
        y.astype(np.int64),
        image_shape_of((n_features,)),
        f"synthetic {n_samples}x{n_features}, {n_classes} classes, seed {seed}",
        n_classes,
    )


def stdlib_corpus(max_chars: int) -> tuple[bytes, str]:
    """The first `max_chars` bytes of the standard library's top-level modules, in name order:
    real text that ships with every Python, and the same on every machine of one version."""
    root = Path(sysconfig.get_paths()["stdlib"])
    chunks, total = [], 0
    for path in sorted(root.glob("*.py")):
        data = path.read_bytes()
        chunks.append(data)
        total += len(data)
        if total >= max_chars:
            break
    corpus = b"".join(chunks)[:max_chars]
    return corpus, hashlib.sha256(corpus).hexdigest()[:16]


def text(block_size: int, max_chars: int):
    corpus, digest = stdlib_corpus(max_chars)
    tokens = np.frombuffer(corpus, dtype=np.uint8).astype(np.int64)
    n = (len(tokens) - 1) // block_size
    starts = np.arange(n) * block_size
    idx = starts[:, None] + np.arange(block_size)[None, :]
    # The vocabulary is all 256 byte values, whatever this corpus happens to contain.
    return Raw(
        tokens[idx],
        tokens[idx + 1],
        None,
        f"python stdlib sources, {len(corpus)} bytes, sha256 {digest}, bytes as tokens",
        256,
    )
