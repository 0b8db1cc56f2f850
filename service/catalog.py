"""Names and argument schemas of the registry's models and datasets.

This is the torch-free half of the registries: the API validates `model.args` and `data.args`
against these schemas at submit time, and `workers.models` / `workers.data` build from the
validated arguments. Operators add models through the entry-point group `slimtrain.models`:
the entry point names an object with an `Args` pydantic model and a `build(args, info)` function.
"""

from __future__ import annotations

from functools import cache
from importlib.metadata import entry_points
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

MODEL_ENTRY_POINT_GROUP = "slimtrain.models"


Width = Annotated[int, Field(ge=1, le=65_536)]


class Args(BaseModel):
    model_config = ConfigDict(extra="forbid")


# --- models -------------------------------------------------------------------------------------


class MLPArgs(Args):
    hidden: list[Width] = Field(
        default=[300, 100],
        min_length=1,
        max_length=8,
        description="Hidden layer widths (LeNet-300-100 by default).",
    )
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)


class LeNet5Args(Args):
    activation: str = Field(default="relu", pattern="^(relu|tanh)$", description="relu | tanh")


class ConvNetArgs(Args):
    channels: list[Width] = Field(
        default=[32, 64],
        min_length=1,
        max_length=4,
        description="Channels of each VGG stage (two 3x3 convs then a 2x2 max-pool).",
    )
    hidden: int = Field(default=128, ge=1, le=4096, description="Width of the classifier layer.")
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)


class GPTArgs(Args):
    n_layer: int = Field(default=2, ge=1, le=48)
    n_head: int = Field(default=4, ge=1, le=64)
    n_embd: int = Field(default=128, ge=8, le=8192, description="Must be divisible by n_head.")
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)


class ResNetArgs(Args):
    depth: int = Field(
        default=20,
        ge=8,
        le=110,
        description="6n+2 (n BasicBlocks per stage): 8, 14, 20, 26, 32, 44, 56, 110.",
    )
    width: int = Field(default=16, ge=1, le=512, description="Channels of the first stage (x2, x4 after).")

    @field_validator("depth")
    @classmethod
    def _six_n_plus_two(cls, v: int) -> int:
        if (v - 2) % 6:
            raise ValueError(f"{v} is not 6n+2; allowed: 8, 14, 20, 26, 32, 44, 56, 110 (any 6n+2 up to 110)")
        return v


BUILTIN_MODELS: dict[str, type[Args]] = {
    "mlp": MLPArgs,
    "lenet5": LeNet5Args,
    "convnet": ConvNetArgs,
    "gpt": GPTArgs,
    "resnet": ResNetArgs,
}

# Which data kinds each built-in model accepts ("image" datasets are also "vector" ones).
MODEL_INPUT_KIND: dict[str, set[str]] = {
    "mlp": {"vector", "image"},
    "lenet5": {"image"},
    "convnet": {"image"},
    "gpt": {"tokens"},
    "resnet": {"image"},
}

# Built-in models that cannot run as a pipeline, and why: refused at submission, where the
# worker's stage split (workers/models/stages.py) would only find it at start-up.
NO_PIPELINE: dict[str, str] = {
    "resnet": "BatchNorm statistics would be per micro-batch",
}


@cache
def model_plugins() -> dict[str, Any]:
    """Operator-installed models from the `slimtrain.models` entry-point group."""
    found: dict[str, Any] = {}
    for ep in entry_points(group=MODEL_ENTRY_POINT_GROUP):
        if ep.name not in BUILTIN_MODELS:
            found[ep.name] = ep
    return found


def model_names() -> list[str]:
    return [*BUILTIN_MODELS, *sorted(model_plugins())]


def model_args_schema(name: str) -> type[BaseModel]:
    if name in BUILTIN_MODELS:
        return BUILTIN_MODELS[name]
    plugin = model_plugins()[name].load()
    return getattr(plugin, "Args", Args)


# --- datasets -----------------------------------------------------------------------------------


class DigitsArgs(Args):
    pass


class SyntheticArgs(Args):
    n_samples: int = Field(default=10_000, ge=100, le=5_000_000)
    n_features: int = Field(
        default=64,
        ge=2,
        le=65_536,
        description="A perfect square makes the data an image (1 x s x s) for conv models.",
    )
    n_classes: int = Field(default=10, ge=2, le=1000)
    n_informative: int | None = Field(default=None, ge=1, description="Default: n_features // 2.")
    class_sep: float = Field(default=1.0, gt=0.0)
    seed: int = Field(default=0, ge=0, description="Generator seed; the data is a pure function of it.")


class TextArgs(Args):
    block_size: int = Field(default=64, ge=8, le=2048, description="Context length in characters.")
    max_chars: int = Field(
        default=400_000,
        ge=10_000,
        le=50_000_000,
        description="Characters of the Python standard library's sources to use.",
    )


BUILTIN_DATASETS: dict[str, type[Args]] = {
    "digits": DigitsArgs,
    "synthetic": SyntheticArgs,
    "text": TextArgs,
}

DATASET_KIND: dict[str, str] = {"digits": "image", "synthetic": "vector", "text": "tokens"}


def dataset_names() -> list[str]:
    return list(BUILTIN_DATASETS)
