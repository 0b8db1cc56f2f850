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


# --- HuggingFace transformers (workers/models/hf.py) ----------------------------------------------
#
# The config dict is checked here, without importing transformers (the API stays light): keys
# outside these lists are refused by name, so a typo (`n_layr`) is a 422, not a silently
# ignored attribute. tests/unit/test_hf_models.py checks that every key is a real attribute of
# transformers' config class.
_HF_COMMON = {"model_type", "vocab_size", "initializer_range", "bos_token_id", "eos_token_id", "pad_token_id"}
HF_CONFIG_KEYS: dict[str, set[str]] = {
    "gpt2": _HF_COMMON
    | {
        "n_positions",
        "n_embd",
        "n_layer",
        "n_head",
        "n_inner",
        "activation_function",
        "resid_pdrop",
        "embd_pdrop",
        "attn_pdrop",
        "layer_norm_epsilon",
        "tie_word_embeddings",
        "scale_attn_weights",
        "scale_attn_by_inverse_layer_idx",
        "reorder_and_upcast_attn",
    },  # fmt: skip
    "llama": _HF_COMMON
    | {
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "hidden_act",
        "max_position_embeddings",
        "rms_norm_eps",
        "tie_word_embeddings",
        "attention_bias",
        "attention_dropout",
        "mlp_bias",
    },  # fmt: skip
    "bert": _HF_COMMON
    | {
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "intermediate_size",
        "hidden_act",
        "hidden_dropout_prob",
        "attention_probs_dropout_prob",
        "max_position_embeddings",
        "type_vocab_size",
        "layer_norm_eps",
        "classifier_dropout",
    },  # fmt: skip
}
# (width key, heads key) per model_type: heads must divide the width.
_HF_HEADS = {
    "gpt2": ("n_embd", "n_head"),
    "llama": ("hidden_size", "num_attention_heads"),
    "bert": ("hidden_size", "num_attention_heads"),
}
HF_MAX_SIZE = 1 << 16  # any integer size in a config (widths, layers, vocab, positions)


def _check_hf_config(config: dict, allowed_types: tuple[str, ...]) -> dict:
    mt = config.get("model_type")
    if mt not in allowed_types:
        raise ValueError(
            f"model_type: {mt!r} is not supported here; allowed: {', '.join(allowed_types)}"
            if "model_type" in config
            else f"model_type: required; allowed: {', '.join(allowed_types)}"
        )
    keys = HF_CONFIG_KEYS[mt]
    for k, v in config.items():
        if k not in keys:
            raise ValueError(f"{k}: unknown key for model_type {mt}; allowed: {', '.join(sorted(keys))}")
        if isinstance(v, bool) or k in ("model_type", "activation_function", "hidden_act"):
            continue
        if isinstance(v, int) and not (0 <= v <= HF_MAX_SIZE) and not k.endswith("token_id"):
            raise ValueError(f"{k}: {v} is out of range 0..{HF_MAX_SIZE}")
        if not isinstance(v, (int, float, str)) and v is not None:
            raise ValueError(f"{k}: must be a number, a string or null (got {type(v).__name__})")
    width, heads = _HF_HEADS[mt]
    if width in config and heads in config:
        w, h = config[width], config[heads]
        if isinstance(w, int) and isinstance(h, int) and (h < 1 or w % h):
            raise ValueError(f"{width}: {w} is not divisible by {heads} ({h})")
    return config


class HFCausalLMArgs(Args):
    config: dict[str, Any] = Field(
        description="A HuggingFace config dict: model_type gpt2 or llama and that config's fields "
        "(e.g. n_layer, n_head, n_embd). vocab_size defaults to the data's vocabulary; built from "
        "the config alone (random init, or model.init), nothing is downloaded."
    )

    @field_validator("config")
    @classmethod
    def _config(cls, v: dict) -> dict:
        return _check_hf_config(v, ("gpt2", "llama"))


class HFSeqClsArgs(Args):
    config: dict[str, Any] = Field(
        description="A HuggingFace config dict: model_type bert and its fields (hidden_size, "
        "num_hidden_layers, ...). vocab_size defaults to the data's token vocabulary, the labels "
        "to the data's classes."
    )

    @field_validator("config")
    @classmethod
    def _config(cls, v: dict) -> dict:
        return _check_hf_config(v, ("bert",))


BUILTIN_MODELS: dict[str, type[Args]] = {
    "mlp": MLPArgs,
    "lenet5": LeNet5Args,
    "convnet": ConvNetArgs,
    "gpt": GPTArgs,
    "resnet": ResNetArgs,
    "hf_causal_lm": HFCausalLMArgs,
    "hf_seq_cls": HFSeqClsArgs,
}

# Which data kinds each built-in model accepts ("image" datasets are also "vector" ones).
MODEL_INPUT_KIND: dict[str, set[str]] = {
    "mlp": {"vector", "image"},
    "lenet5": {"image"},
    "convnet": {"image"},
    "gpt": {"tokens"},
    "resnet": {"image"},
    "hf_causal_lm": {"tokens"},
    "hf_seq_cls": {"sequence"},
}

# Built-in models that cannot run as a pipeline, and why: refused at submission, where the
# worker's stage split (workers/models/stages.py) would only find it at start-up.
NO_PIPELINE: dict[str, str] = {
    "resnet": "BatchNorm statistics would be per micro-batch",
    # A HuggingFace model's forward is one call into transformers (masks, positions and caches
    # built inside it), not a chain of modules that stages could be cut from.
    "hf_causal_lm": "a HuggingFace model has no stage split",
    "hf_seq_cls": "a HuggingFace model has no stage split",
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
    vocab_size: int | None = Field(
        default=None,
        ge=2,
        le=65_536,
        description="Token sequences instead of features (for hf_seq_cls): each feature binned into "
        "this many token ids, one label per sequence.",
    )


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
