"""What a model needs to know about its data, and what an exported model's user needs to know
about its input. Plain values only: it travels in checkpoints, packed artifacts and reports."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class DataInfo:
    kind: str  # image | vector | tokens | sequence (int tokens [T], one class label)
    input_shape: tuple[int, ...]  # raw per-sample shape the exported model takes: (64,), (T,)
    input_dtype: str  # float32 | int64
    num_classes: int  # classes, or vocabulary size for tokens
    image_shape: tuple[int, int, int] | None = None  # (C, H, W) when the features are an image
    mean: float = 0.0  # normalisation of the raw features (inside the model)
    std: float = 1.0
    n_train: int = 0
    n_val: int = 0
    source: str = ""
    vocab_size: int | None = None  # token vocabulary of a "sequence" set (num_classes: its classes)

    @property
    def n_features(self) -> int:
        n = 1
        for d in self.input_shape:
            n *= d
        return n

    def describe(self) -> str:
        img = f", image {self.image_shape}" if self.image_shape else ""
        return f"{self.kind} {list(self.input_shape)} {self.input_dtype}{img}"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> DataInfo:
        d = dict(d)
        d["input_shape"] = tuple(d["input_shape"])
        if d.get("image_shape") is not None:
            d["image_shape"] = tuple(d["image_shape"])
        return cls(**d)
