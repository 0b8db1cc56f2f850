"""The job spec: the single source of truth for what a job is (DESIGN.md, "Contracts").

Strict pydantic v2 models: unknown fields are rejected, every field but `name`, `model` and `data`
has a documented default, and cross-field rules report the field they are about. Steps are
optimizer steps of the global batch, so a schedule means the same thing at any worker count.
"""

from __future__ import annotations

import difflib
import io
import json
import math
import re
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from service import catalog
from service.errors import ConfigError, SpecError

SPEC_VERSION = 1


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


# A name in the caller's model namespace (`store://models/NAME`, `PUT /v1/models/NAME`): one
# path segment, so no name can reach outside its tenant's folder in the artifact store.
MODEL_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$"
MODEL_NAME_RE = re.compile(MODEL_NAME_PATTERN)
_JOB_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"


class InitSpec(Strict):
    """Where a job's initial weights come from (safetensors, loaded strictly before training)."""

    job: str | None = Field(
        default=None,
        pattern=_JOB_ID_PATTERN,
        description="Id of a succeeded job of the same tenant: its final `model.safetensors`. "
        "Exclusive with `uri`.",
    )
    uri: str | None = Field(
        default=None,
        description="`store://models/<name>` (uploaded with `PUT /v1/models/<name>`, in the "
        "caller's namespace), `s3://bucket/key.safetensors`, or `s3://bucket/folder/` holding "
        "sharded safetensors with HuggingFace's `model.safetensors.index.json`.",
    )
    resolved: str | None = Field(
        default=None,
        description="Set by the service at submission, never by a client: the artifact-store key "
        "(or s3:// URI) the workers read the weights from.",
    )

    @field_validator("uri")
    @classmethod
    def _uri(cls, v: str | None) -> str | None:
        if v is None:
            return v
        scheme, sep, rest = v.partition("://")
        if scheme == "store" and sep:
            name = rest.removeprefix("models/")
            if not rest.startswith("models/") or not MODEL_NAME_RE.fullmatch(name):
                raise ValueError(
                    "store:// weights are store://models/<name>, the name letters, digits, '.', "
                    "'_' and '-' (up to 100, not starting with '.', '_' or '-')"
                )
            return v
        if scheme == "s3" and sep:
            bucket, _, key = rest.partition("/")
            if not bucket or not key or ".." in key.split("/") or re.search(r"\s", v):
                raise ValueError("must be s3://bucket/key.safetensors or s3://bucket/folder/")
            if not (key.endswith(".safetensors") or key.endswith("/") or key.endswith(".index.json")):
                raise ValueError(
                    "an s3:// key must end in .safetensors, or be a folder (ending in '/') holding "
                    "model.safetensors.index.json"
                )
            return v
        raise ValueError("must be store://models/<name>, s3://bucket/key.safetensors or s3://bucket/folder/")

    @model_validator(mode="after")
    def _rules(self, info: ValidationInfo) -> InitSpec:
        if (self.job is None) == (self.uri is None):
            raise ValueError("give exactly one of `job` or `uri`")
        # A client that could name the key would read any tenant's weights: only the service,
        # after checking the caller's access, fills this in.
        if self.resolved is not None and (info.context or {}).get("submitted"):
            raise ValueError("resolved: set by the service; not allowed in a submitted spec")
        return self


class ModelSpec(Strict):
    name: str = Field(
        description="Registry model: "
        + ", ".join(catalog.BUILTIN_MODELS)
        + ", or one installed through the `slimtrain.models` entry points."
    )
    args: dict[str, Any] = Field(default_factory=dict, description="Arguments of that model.")
    init: InitSpec | None = Field(
        default=None,
        description="Start from trained weights (safetensors) instead of a random initialisation.",
    )

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        names = catalog.model_names()
        if v not in names:
            raise ValueError(f"unknown model {v!r}; allowed: {', '.join(names)}")
        return v

    @model_validator(mode="after")
    def _args(self) -> ModelSpec:
        self.args = _validated_args(catalog.model_args_schema(self.name), self.args)
        return self


# Data formats a `data.uri` may hold, and the file endings that name each when `data.format` is
# not given (workers/data/formats.py reads them).
DATA_FORMATS: dict[str, tuple[str, ...]] = {
    "npz": (".npz",),
    "parquet": (".parquet", ".pq"),
    "jsonl": (".jsonl",),
    "text": (".txt",),
    "image_zip": (".zip",),
    "image_tar": (".tar", ".tar.gz", ".tgz"),
}
# Which format-specific options each format takes; any other is refused, naming the field.
_FORMAT_OPTIONS: dict[str, set[str]] = {
    "npz": {"layout", "num_classes"},
    "parquet": {"label_column", "feature_columns", "token_column", "layout", "num_classes", "seq_len"},
    "jsonl": {"text_column", "tokenizer", "seq_len"},
    "text": {"tokenizer", "seq_len"},
    "image_zip": {"image_size"},
    "image_tar": {"image_size"},
}
_COLUMN = Annotated[str, Field(min_length=1, max_length=200)]


def guess_data_format(uri: str) -> str | None:
    low = uri.lower()
    for fmt, endings in DATA_FORMATS.items():
        if low.endswith(endings):
            return fmt
    return None


def _data_uri_error(v: str, what: str) -> str | None:
    m = re.fullmatch(r"(s3|store)://([^\s]+)", v)
    if not m:
        return (
            f"must be s3://bucket/key.npz or store://datasets/<name>.npz ({what}; formats: see data.format)"
        )
    if m.group(1) == "store":
        # One name in the caller's own datasets (`PUT /v1/datasets/<name>`), resolved to its
        # store key at submission: a client never names a key of the artifact store. A set of
        # shards is `<name>/` (uploads <name>/<shard>), one shard `<name>/<shard>`.
        parts = m.group(2).removeprefix("datasets/").split("/")
        ok = len(parts) == 1 or (len(parts) == 2 and (parts[1] == "" or MODEL_NAME_RE.fullmatch(parts[1])))
        if not m.group(2).startswith("datasets/") or not ok or not MODEL_NAME_RE.fullmatch(parts[0]):
            return (
                "store:// data is store://datasets/<name>, a dataset you uploaded (PUT /v1/datasets/<name>, "
                "`slimtrain dataset push`), or store://datasets/<name>/ for the shards you uploaded as "
                "<name>/<shard>; a name is letters, digits, '.', '_' and '-', up to 100, "
                "starting with a letter or digit"
            )
    if ".." in m.group(2).split("/"):
        return "must not contain '..' segments"
    return None


class DataSpec(Strict):
    name: str | None = Field(
        default=None,
        description="Registry dataset: " + ", ".join(catalog.BUILTIN_DATASETS) + ". Exclusive with `uri`.",
    )
    uri: str | None = Field(
        default=None,
        description="A dataset file: `s3://bucket/key.EXT` or `store://datasets/<name>.EXT` (a key in "
        "the artifact store), or a folder of shards read as one file: `store://datasets/<set>/` "
        "(uploads <set>/<shard>) or `s3://bucket/prefix/` (give `format`); see docs/data.md. The "
        "format comes from `format` or the ending: "
        + "; ".join(f"{f}: {', '.join(e)}" for f, e in DATA_FORMATS.items())
        + ".",
    )
    format: Literal["npz", "parquet", "jsonl", "text", "image_zip", "image_tar"] | None = Field(
        default=None,
        description="Format of `uri`; default: from its ending. npz: arrays X and y. parquet: "
        "`feature_columns` (or one list column) + `label_column`, or a `token_column` of token "
        "ids. jsonl: one JSON object per line, its `text_column` a document. text: plain UTF-8. "
        "image_zip / image_tar: one folder per class (class index = sorted folder names).",
    )
    label_column: _COLUMN | None = Field(default=None, description="parquet: integer class labels 0..K-1.")
    feature_columns: list[_COLUMN] | None = Field(
        default=None,
        min_length=1,
        max_length=100_000,
        description="parquet: numeric feature columns, or one list column (nested lists give an "
        "image: [C][H][W], or [H][W][C] with layout nhwc).",
    )
    token_column: _COLUMN | None = Field(
        default=None,
        description="parquet: a column of integer token-id lists. With `label_column`: sequence "
        "classification (equal lengths); without: language modelling in `seq_len` blocks.",
    )
    text_column: _COLUMN | None = Field(
        default=None, description="jsonl: the field holding each document; default text."
    )
    tokenizer: str | None = Field(
        default=None,
        description="jsonl / text: a HuggingFace `tokenizer.json` (same URI rules as `uri`); "
        "default: bytes as tokens (vocabulary 256).",
    )
    seq_len: int | None = Field(
        default=None,
        ge=2,
        le=65_536,
        description="jsonl / text / parquet tokens: tokens per sample; default 64.",
    )
    layout: Literal["nchw", "nhwc"] | None = Field(
        default=None,
        description="npz / parquet image arrays: channel position of 4-D X; default nchw "
        "(nhwc is transposed to the models' NCHW).",
    )
    image_size: int | None = Field(
        default=None,
        ge=4,
        le=1024,
        description="image_zip / image_tar: resize every image to this square side; default: "
        "keep the size (then all images must share it).",
    )
    num_classes: int | None = Field(
        default=None,
        ge=2,
        le=10_000_000,
        description="npz / parquet: number of classes (vocabulary size for tokens); labels must "
        "lie in 0..num_classes-1. Default: max label + 1, every class present.",
    )
    args: dict[str, Any] = Field(default_factory=dict, description="Arguments of that dataset.")
    val_fraction: float = Field(
        default=0.2, gt=0.0, le=0.5, description="Share of the data held out for validation."
    )
    resolved_uri: str | None = Field(
        default=None,
        description="Set by the service at submission, never by a client: what the workers read "
        "for `uri` (the artifact-store key of the caller's dataset, or the s3:// URI).",
    )
    resolved_tokenizer: str | None = Field(
        default=None,
        description="Set by the service at submission, never by a client: what the workers read "
        "for `tokenizer`.",
    )
    streaming: Literal["auto", "on", "off"] = Field(
        default="auto",
        description="Stream `uri` through Ray Data instead of loading it into every worker: on, "
        "off, or auto (stream a parquet, npz, jsonl/text or image zip/tar file larger than "
        "SLIMTRAIN_STREAM_ABOVE_BYTES; built-in sets always load in memory). See docs/data.md.",
    )

    @field_validator("name")
    @classmethod
    def _known(cls, v: str | None) -> str | None:
        if v is not None and v not in catalog.BUILTIN_DATASETS:
            raise ValueError(f"unknown dataset {v!r}; allowed: {', '.join(catalog.dataset_names())}")
        return v

    @field_validator("uri")
    @classmethod
    def _uri(cls, v: str | None) -> str | None:
        if v is None:
            return v
        err = _data_uri_error(v, "a dataset file")
        if err:
            raise ValueError(err)
        return v

    @field_validator("tokenizer")
    @classmethod
    def _tokenizer(cls, v: str | None) -> str | None:
        if v is None:
            return v
        err = _data_uri_error(v, "a tokenizer.json")
        if err or not v.endswith(".json"):
            raise ValueError(err or "must name a tokenizer.json (ending in .json)")
        return v

    @model_validator(mode="after")
    def _not_resolved(self, info: ValidationInfo) -> DataSpec:
        # A client that could name the key would read any tenant's data: only the service,
        # after checking the caller's access, fills these in (service.datasets.resolve_data).
        if (info.context or {}).get("submitted"):
            for f in ("resolved_uri", "resolved_tokenizer"):
                if getattr(self, f) is not None:
                    raise ValueError(f"{f}: set by the service; not allowed in a submitted spec")
        return self

    @model_validator(mode="after")
    def _one_source(self) -> DataSpec:
        if (self.name is None) == (self.uri is None):
            raise ValueError("give exactly one of `name` or `uri`")
        options = {f for fmt in _FORMAT_OPTIONS.values() for f in fmt}
        given = sorted(f for f in options if getattr(self, f) is not None)
        if self.name is not None:
            schema = catalog.BUILTIN_DATASETS[self.name]
            self.args = _validated_args(schema, self.args)
            extra = (["format"] if self.format is not None else []) + given
            if extra:
                raise ValueError(f"{extra[0]}: only with `uri` (a built-in dataset takes `args`)")
            return self
        if self.args:
            raise ValueError("args: not allowed with `uri`")
        fmt = self.format or guess_data_format(self.uri)
        if fmt is None and self.uri.startswith("store://"):
            # An uploaded dataset's name need not end in its format: the upload recorded it,
            # and resolution at submission fills `format` in and checks the options then.
            return self
        if fmt is None and self.uri.endswith("/"):
            raise ValueError(
                "format: a folder of shards (a uri ending in '/') needs format ("
                + ", ".join(DATA_FORMATS)
                + ")"
            )
        if fmt is None:
            raise ValueError(
                "format: cannot tell the format from the uri's ending; give format ("
                + ", ".join(DATA_FORMATS)
                + ") or end the uri in one of "
                + ", ".join(e for es in DATA_FORMATS.values() for e in es)
            )
        for f in given:
            if f not in _FORMAT_OPTIONS[fmt]:
                raise ValueError(
                    f"{f}: not an option of format {fmt} (it takes {', '.join(sorted(_FORMAT_OPTIONS[fmt]))})"
                )
        if fmt == "parquet":
            if self.feature_columns is None and self.token_column is None:
                raise ValueError("parquet data needs feature_columns (with label_column) or token_column")
            if self.feature_columns is not None and self.token_column is not None:
                raise ValueError("token_column: exclusive with feature_columns")
            if self.feature_columns is not None and self.label_column is None:
                raise ValueError("label_column: required with feature_columns")
            if self.seq_len is not None and (self.token_column is None or self.label_column is not None):
                raise ValueError("seq_len: only for language modelling (token_column without label_column)")
            names = [*(self.feature_columns or []), self.token_column]
            if self.label_column is not None and self.label_column in names:
                raise ValueError(f"label_column: {self.label_column!r} is also a feature/token column")
        return self

    def location(self, field: str = "data.uri") -> str | None:
        """What the workers read for `field` (data.uri or data.tokenizer): the key the service
        resolved, as store://KEY, or the s3:// URI. A store:// name is the caller's and only the
        service knows whose: unresolved, it is refused rather than read from a shared prefix."""
        uri, resolved = (
            (self.uri, self.resolved_uri)
            if field == "data.uri"
            else (self.tokenizer, self.resolved_tokenizer)
        )
        if uri is None:
            return None
        if resolved is not None:
            return resolved if resolved.startswith("s3://") else "store://" + resolved
        if uri.startswith("store://"):
            raise ConfigError(
                f"{field}: {uri} was not resolved to a tenant's dataset; submit the job through the "
                "service or `slimtrain run`"
            )
        return uri

    @property
    def resolved_format(self) -> str | None:
        """The format of `uri` (given or from its ending); None for a built-in dataset."""
        if self.uri is None:
            return None
        return self.format or guess_data_format(self.uri)

    @property
    def kind(self) -> str | None:
        """image | vector | tokens; None when only the data itself can tell (uri)."""
        if self.name is None:
            fmt = self.resolved_format
            if fmt in ("image_zip", "image_tar"):
                return "image"
            if fmt in ("jsonl", "text") or (fmt == "parquet" and self.label_column is None):
                return "tokens"
            return None
        if self.name == "synthetic":
            if self.args.get("vocab_size") is not None:
                return "sequence"
            side = math.isqrt(self.args["n_features"])
            return "image" if side * side == self.args["n_features"] else "vector"
        return catalog.DATASET_KIND[self.name]


class TrainSpec(Strict):
    epochs: int = Field(default=10, ge=1, le=100_000, description="Passes over the training split.")
    max_steps: int | None = Field(
        default=None, ge=1, description="Stop after this many optimizer steps (before the epochs end)."
    )
    batch_size: int = Field(
        default=64,
        ge=1,
        le=1_000_000,
        description="Global batch size, split evenly across data-parallel workers.",
    )
    optimizer: Literal["sgd", "adamw"] = Field(default="sgd")
    lr: float = Field(default=0.05, gt=0.0, le=10.0, description="Peak learning rate.")
    momentum: float = Field(default=0.9, ge=0.0, lt=1.0, description="SGD momentum (adamw: beta1).")
    weight_decay: float = Field(default=5e-4, ge=0.0, le=1.0)
    lr_schedule: Literal["constant", "cosine", "step"] = Field(default="cosine")
    warmup_steps: int = Field(default=0, ge=0, description="Linear warm-up from 0 to `lr`.")
    lr_step_size: int | None = Field(
        default=None, ge=1, description="`step` schedule: steps between decays (default: a third of the run)."
    )
    lr_gamma: float = Field(default=0.1, gt=0.0, le=1.0, description="`step` schedule: decay factor.")
    grad_clip_norm: float | None = Field(default=None, gt=0.0, description="Clip the gradient norm.")
    seed: int = Field(default=0, ge=0, le=2**31 - 1)
    log_every_steps: int = Field(default=10, ge=1, description="Metrics cadence in steps.")
    eval_every_steps: int | None = Field(
        default=None, ge=1, description="Evaluate every N steps (default: at each epoch's end)."
    )


class ParallelSpec(Strict):
    strategy: Literal["ddp", "fsdp", "pipeline"] = Field(default="ddp")
    workers: int = Field(default=1, ge=1, le=1024, description="Ray Train workers (one process each).")
    gpus_per_worker: float = Field(
        default=0, ge=0, le=8, description="0 trains on CPU (gloo); > 0 needs GPUs in the cluster (NCCL)."
    )
    pipeline_microbatches: int = Field(default=4, ge=1, le=1024)
    pipeline_schedule: Literal["gpipe", "1f1b"] = Field(default="1f1b")

    @model_validator(mode="after")
    def _rules(self) -> ParallelSpec:
        g = self.gpus_per_worker
        if g > 1 and g != int(g):
            raise ValueError(f"gpus_per_worker: {g:g}; above 1 only whole GPUs (2, 3, ...): Ray's rule")
        if 0 < g < 1 and self.workers > 1:
            # Seen on an H200 (bench/README.md, "Jobs through Ray on the GPU"): Ray packed both
            # halves onto one GPU and NCCL refused ("Duplicate GPU detected"), on every retry.
            raise ValueError(
                f"gpus_per_worker: {g:g} with {self.workers} workers; a fraction of a GPU lets Ray put "
                "two workers on one GPU, where NCCL cannot run two ranks of a job: give each worker "
                "1 or more GPUs, or run one worker"
            )
        if self.strategy == "pipeline" and self.workers < 2:
            raise ValueError("workers: strategy `pipeline` needs at least 2 workers (one per stage)")
        one_f_one_b = self.strategy == "pipeline" and self.pipeline_schedule == "1f1b"
        if one_f_one_b and self.pipeline_microbatches < self.workers:
            raise ValueError(
                f"pipeline_microbatches: schedule `1f1b` needs at least one microbatch per stage "
                f"({self.workers} workers); use more microbatches or schedule `gpipe`"
            )
        return self


NM_STRUCTURE_RE = re.compile(r"(\d+):(\d+)")
WANDA_CALIBRATION_BATCHES = 8
# Built-in models whose prunable layers are all Linear (or transformers' Conv1D, a Linear stored
# (in, out)): wanda's score needs one activation norm per input feature of a weight.
WANDA_MODELS = ("gpt", "hf_causal_lm", "hf_seq_cls", "mlp")


class PruningSpec(Strict):
    schedule: Literal["cubic", "linear", "oneshot", "threshold"] = Field(
        default="cubic",
        description="cubic (Zhu & Gupta), linear, oneshot (all at start_step), or threshold "
        "(prune |w| < theta * std(layer), theta ramped up cubically).",
    )
    initial_sparsity: float = Field(default=0.0, ge=0.0, lt=1.0)
    final_sparsity: float = Field(default=0.5, ge=0.0, lt=1.0)
    threshold: float | None = Field(
        default=None, gt=0.0, le=10.0, description="`threshold` schedule: theta in units of the layer's std."
    )
    start_step: int = Field(default=0, ge=0)
    end_step: int = Field(default=1000, ge=0)
    frequency: int = Field(default=100, ge=1, description="Steps between mask updates.")
    scope: Literal["global", "layer"] = Field(default="global")
    structure: str = Field(
        default="unstructured",
        description="unstructured (single weights), channel (whole output channels), or 'N:M' "
        "semi-structured (e.g. '2:4': at most N non-zeros in every M consecutive weights along "
        "the input axis; final_sparsity is then 1 - N/M).",
        json_schema_extra={"examples": ["unstructured", "channel", "2:4"]},
    )
    channel_multiple: int = Field(
        default=1,
        ge=1,
        le=512,
        description="structure channel: every pruned layer keeps a multiple of this many channels, "
        "rounded up from what final_sparsity asks (so the sparsity reached can be a little lower), "
        "for runtimes that compute channels in blocks. Attention heads are kept whole, not "
        "rounded. Measured on a convnet in onnxruntime on 2 CPUs, 8 bought no speed "
        "(bench/README.md, 'Channel pruning').",
    )
    exclude: list[str] = Field(
        default_factory=list, description="Layer names (or fnmatch patterns) never pruned."
    )
    layer_sparsity: dict[str, Annotated[float, Field(ge=0.0, lt=1.0)]] = Field(
        default_factory=dict,
        description="scope layer: a final sparsity of their own for the layers a name (or fnmatch "
        "pattern) matches, the first matching entry winning; the others go to final_sparsity. Each "
        "follows the same schedule scaled to its own final value (its target at every step is the "
        "schedule's times value / final_sparsity). Every entry must match a pruned layer.",
        json_schema_extra={"examples": [{"features.conv1*": 0.5, "features.conv2*": 0.25}]},
    )
    criterion: Literal["magnitude", "wanda"] = Field(
        default="magnitude",
        description="What a weight is worth. magnitude: |w|. wanda (Sun et al. 2023): |w| times "
        "the L2 norm of its input feature over `calibration_batches` training batches, compared "
        "within each output row (unstructured or N:M; Linear layers: language models and mlp).",
    )
    calibration_batches: int | None = Field(
        default=None,
        ge=1,
        le=4096,
        description="`wanda`: training batches whose layer inputs are measured before each mask "
        f"update (default {WANDA_CALIBRATION_BATCHES}).",
    )

    @field_validator("structure")
    @classmethod
    def _structure(cls, v: str) -> str:
        if v in ("unstructured", "channel"):
            return v
        m = NM_STRUCTURE_RE.fullmatch(v)
        if m is None or not 0 < int(m.group(1)) < int(m.group(2)):
            raise ValueError(
                f"Input should be 'unstructured' or 'channel', or 'N:M' with whole numbers "
                f"0 < N < M (e.g. '2:4'); got {v!r}"
            )
        return f"{int(m.group(1))}:{int(m.group(2))}"

    def nm(self) -> tuple[int, int] | None:
        """(N, M) of an N:M structure, else None."""
        m = NM_STRUCTURE_RE.fullmatch(self.structure)
        return (int(m.group(1)), int(m.group(2))) if m else None

    @model_validator(mode="after")
    def _rules(self) -> PruningSpec:
        nm = self.nm()
        if nm is not None:
            # N:M fixes the sparsity: derived when omitted, an error when it disagrees.
            implied = 1.0 - nm[0] / nm[1]
            if "final_sparsity" in self.model_fields_set and abs(self.final_sparsity - implied) > 1e-9:
                raise ValueError(
                    f"final_sparsity: structure '{self.structure}' prunes exactly 1 - {nm[0]}/{nm[1]} = "
                    f"{implied:g} of the weights; omit final_sparsity or set it to {implied:g}"
                )
            self.final_sparsity = implied
        if self.schedule == "threshold":
            if self.threshold is None:
                raise ValueError("threshold: required when schedule is `threshold`")
            if self.structure != "unstructured":
                raise ValueError("structure: the `threshold` schedule prunes unstructured weights only")
        elif self.threshold is not None:
            raise ValueError("threshold: only used by schedule `threshold`")
        if self.schedule in ("cubic", "linear", "threshold") and self.end_step <= self.start_step:
            raise ValueError(f"end_step: must be greater than start_step ({self.start_step})")
        if self.initial_sparsity > self.final_sparsity:
            raise ValueError(f"initial_sparsity: must not exceed final_sparsity ({self.final_sparsity})")
        self._layer_sparsity_rules()
        if self.channel_multiple != 1 and self.structure != "channel":
            raise ValueError(
                f"channel_multiple: only used by structure `channel` (structure is '{self.structure}'); "
                "omit it or set it to 1"
            )
        self._wanda_rules()
        return self

    def _layer_sparsity_rules(self) -> None:
        if not self.layer_sparsity:
            return
        if self.scope != "layer":
            raise ValueError(
                "layer_sparsity: per-layer targets need scope `layer` (under `global` one threshold "
                "ranks every layer's weights together); set scope: layer"
            )
        if self.nm() is not None or self.schedule == "threshold" or self.criterion == "wanda":
            raise ValueError(
                "layer_sparsity: allowed with criterion magnitude, structure unstructured or channel "
                "and a cubic, linear or oneshot schedule"
            )
        if self.final_sparsity <= 0.0:
            raise ValueError(
                "layer_sparsity: each layer's target is the schedule's scaled by value / final_sparsity, "
                "so final_sparsity must be above 0"
            )

    def _wanda_rules(self) -> None:
        if self.criterion != "wanda":
            if self.calibration_batches is not None:
                raise ValueError("calibration_batches: only used by criterion `wanda`")
            return
        if self.structure == "channel":
            raise ValueError(
                "structure: criterion `wanda` prunes single weights within each output row; "
                "allowed: unstructured or 'N:M' (e.g. '2:4'), not channel"
            )
        if self.schedule == "threshold":
            raise ValueError(
                "schedule: criterion `wanda` needs a sparsity target; allowed: cubic, linear, oneshot"
            )
        if "scope" in self.model_fields_set and self.scope != "layer":
            raise ValueError(
                "scope: criterion `wanda` compares weights within each output row of a layer; "
                "omit scope or set it to layer"
            )
        self.scope = "layer"
        if self.calibration_batches is None:
            self.calibration_batches = WANDA_CALIBRATION_BATCHES


class ClippingSpec(Strict):
    max_abs: float = Field(gt=0.0, description="Weights are clamped to [-max_abs, max_abs] after each step.")


class QuantizationSpec(Strict):
    mode: Literal["none", "ptq", "qat", "fixed"] = Field(
        default="none",
        description="none; ptq: int8 after training, activations calibrated on training batches; "
        "qat: fake-quantized training from start_step; fixed: weights on the fixed-point grid "
        "round(w*scale)/scale from start_step.",
    )
    bits: Literal[8, 4] = Field(
        default=8,
        description="8: int8 weights and uint8 activations (onnxruntime's int8 CPU kernels). "
        "4: weight-only int4 (onnxruntime has int4 weights but no int4 activation kernels).",
    )
    start_step: int = Field(
        default=0, ge=0, description="`qat` and `fixed`: the step fake quantization begins."
    )
    freeze_step: int | None = Field(
        default=None,
        ge=1,
        description="`qat`: the step activation observers freeze (default: 80% of the way from "
        "start_step to the last step, and not before pruning ends).",
    )
    scale: float | None = Field(
        default=None, gt=0.0, description="`fixed` (required): w_q = round(w*scale)/scale."
    )
    codebook_bits: int | None = Field(
        default=None,
        ge=1,
        le=7,
        description="Weight sharing after quantization: each layer's nonzero codes snap to "
        "2**codebook_bits shared values (k-means), Deep Compression's second stage.",
    )
    kernels: Literal["portable", "vnni"] = Field(
        default="portable",
        description="bits 8: the onnxruntime CPU kernels model.int8.onnx is built for. portable: "
        "weight codes stored as uint8 + 128 (U8U8 kernels), exact on every CPU. vnni: stored as "
        "int8 (U8S8 kernels), exact only on x86 CPUs with AVX-VNNI, AVX-512 VNNI or AMX, where a "
        "slim convnet's int8 graph ran 1.8x faster than with portable storage (bench/README.md, "
        "Channel pruning); on x86 CPUs without VNNI those kernels "
        "saturate 16-bit sums and the model computes something else.",
    )

    @model_validator(mode="after")
    def _rules(self) -> QuantizationSpec:
        m = self.mode
        if m == "none":
            for name, default in (
                ("bits", 8),
                ("start_step", 0),
                ("freeze_step", None),
                ("codebook_bits", None),
                ("kernels", "portable"),
            ):
                if getattr(self, name) != default:
                    raise ValueError(f"{name}: only used when mode is ptq, qat or fixed (mode is none)")
        if m == "fixed" and self.scale is None:
            raise ValueError("scale: required when mode is `fixed` (w_q = round(w*scale)/scale)")
        if m != "fixed" and self.scale is not None:
            raise ValueError(f"scale: only used by mode `fixed` (mode is {m})")
        if m == "ptq" and self.start_step:
            raise ValueError(
                "start_step: mode `ptq` quantizes after training; start_step is for qat and fixed"
            )
        if self.freeze_step is not None:
            if m != "qat":
                raise ValueError(f"freeze_step: only used by mode `qat` (mode is {m})")
            if self.bits == 4:
                raise ValueError("freeze_step: bits 4 is weight-only; there are no activation observers")
            if self.freeze_step <= self.start_step:
                raise ValueError(f"freeze_step: must be greater than start_step ({self.start_step})")
        if self.kernels != "portable" and self.bits != 8:
            raise ValueError(f"kernels: only for bits 8 (bits {self.bits} is weight-only, float compute)")
        if self.codebook_bits is not None and self.codebook_bits >= self.bits:
            raise ValueError(f"codebook_bits: must be less than bits ({self.bits})")
        return self


class WeightSharingSpec(Strict):
    bits: int = Field(
        default=4,
        ge=1,
        le=8,
        description="Each Linear/Conv layer's surviving weights share at most 2**bits values "
        "(k-means, then fine-tuned: Deep Compression's weight sharing).",
    )
    start_step: int = Field(
        default=0,
        ge=0,
        description="The step the weights are clustered (at or after pruning's last update); "
        "the shared values train from there to the end.",
    )


class CompressionSpec(Strict):
    pruning: PruningSpec | None = None
    clipping: ClippingSpec | None = None
    quantization: QuantizationSpec = Field(default_factory=QuantizationSpec)
    weight_sharing: WeightSharingSpec | None = None
    baseline_job: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$",
        description="Id of a dense job of the same model and data: its report's accuracy becomes "
        "this job's `dense_accuracy`.",
    )

    @model_validator(mode="after")
    def _rules(self) -> CompressionSpec:
        q, pr = self.quantization, self.pruning
        if q.freeze_step is not None and pr is not None:
            last = pr.start_step if pr.schedule == "oneshot" else pr.end_step
            if q.freeze_step < last:
                raise ValueError(
                    f"quantization.freeze_step: must be >= the last pruning update ({last}): ranges "
                    "frozen earlier would not see the final sparse model"
                )
        ws = self.weight_sharing
        if ws is not None:
            if q.mode != "none":
                raise ValueError(
                    "weight_sharing: the shared values are the weights' quantization; set "
                    f"quantization.mode to none (is {q.mode}) or drop weight_sharing"
                )
            if pr is not None:
                last = pr.start_step if pr.schedule == "oneshot" else pr.end_step
                if ws.start_step < last:
                    raise ValueError(
                        f"weight_sharing.start_step: must be >= the last pruning update ({last}): "
                        "the clusters are of the surviving weights"
                    )
                if pr.structure == "channel":
                    raise ValueError(
                        "weight_sharing: not with pruning.structure `channel` (use unstructured)"
                    )
        return self


class CheckpointSpec(Strict):
    every_steps: int = Field(default=100, ge=1)
    keep: int = Field(default=3, ge=1, le=100)


Precision = Literal["fp32", "fp16", "bf16"]
JobName = Annotated[
    str,
    Field(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$",
        description="Letters, digits, '.', '_' and '-', up to 100.",
    ),
]


def streaming_unsupported(spec: DataSpec, strategy: str) -> str | None:
    """Why this dataset cannot stream through Ray Data (None when it can). Pure: checked at
    submission for `data.streaming: on` (once the upload's format is known) and by the workers.
    `strategy` (parallel.strategy): each of them streams today."""
    if spec.uri is None:
        return "built-in datasets load in memory"
    fmt = spec.resolved_format
    if fmt not in ("parquet", "npz", "image_zip", "image_tar", "jsonl", "text"):
        return f"only parquet, npz, jsonl/text and image zip/tar archives stream (this is {fmt})"
    if spec.token_column is not None and spec.label_column is None:
        return "token_column without label_column (language-modelling blocks) loads in memory"
    where = (spec.resolved_uri or spec.uri or "").lower()
    if fmt == "image_tar" and where.endswith((".gz", ".tgz", ".bz2", ".xz")):
        return "a compressed tar cannot be read from the middle; an uncompressed .tar streams"
    # Every parallel.strategy streams (pipeline: stage 0 and the last stage read the same whole
    # batches, workers.data.streaming.reads). A compressed npz is only found out by the driver.
    return None


class JobSpec(Strict):
    """A training job with its compression plan."""

    name: JobName
    model: ModelSpec
    data: DataSpec
    train: TrainSpec = Field(default_factory=TrainSpec)
    parallel: ParallelSpec = Field(default_factory=ParallelSpec)
    precision: Precision = Field(default="fp32")
    compression: CompressionSpec = Field(default_factory=CompressionSpec)
    checkpoint: CheckpointSpec = Field(default_factory=CheckpointSpec)
    retries: int = Field(default=2, ge=0, le=20, description="Restarts from the last checkpoint.")
    priority: int = Field(default=0, ge=-100, le=100, description="Higher runs first.")

    @model_validator(mode="after")
    def _rules(self) -> JobSpec:
        p, t = self.parallel, self.train
        if p.strategy == "pipeline":
            if t.batch_size % p.pipeline_microbatches:
                raise ValueError(
                    f"train.batch_size: {t.batch_size} is not divisible by "
                    f"parallel.pipeline_microbatches ({p.pipeline_microbatches})"
                )
        elif t.batch_size % p.workers:
            raise ValueError(
                f"train.batch_size: {t.batch_size} is not divisible by parallel.workers ({p.workers})"
            )
        if p.strategy == "pipeline" and self.model.name in catalog.NO_PIPELINE:
            raise ValueError(
                f"parallel.strategy: model {self.model.name!r} cannot run as a pipeline "
                f"({catalog.NO_PIPELINE[self.model.name]}); use ddp or fsdp"
            )
        if self.model.name in catalog.MODEL_INPUT_KIND and self.data.kind is not None:
            accepts = catalog.MODEL_INPUT_KIND[self.model.name]
            if self.data.kind not in accepts:
                raise ValueError(
                    f"model.name: {self.model.name!r} takes {' or '.join(sorted(accepts))} "
                    f"data; dataset gives {self.data.kind}"
                )
        self._wanda_rules()
        if self.compression.weight_sharing is not None and p.strategy != "ddp":
            raise ValueError(
                "compression.weight_sharing: clusters span whole layers, which only `ddp` holds on "
                f"every rank; set parallel.strategy to ddp (is {p.strategy})"
            )
        if self.model.name == "gpt":
            a = self.model.args
            if a["n_embd"] % a["n_head"]:
                raise ValueError(
                    f"model.args.n_embd: {a['n_embd']} is not divisible by n_head ({a['n_head']})"
                )
            if p.strategy == "pipeline" and p.workers > a["n_layer"] + 2:
                raise ValueError(
                    f"parallel.workers: gpt with n_layer={a['n_layer']} splits into at most "
                    f"{a['n_layer'] + 2} pipeline stages (embedding, {a['n_layer']} blocks, head)"
                )
        return self

    def _wanda_rules(self) -> None:
        pr = self.compression.pruning
        if pr is None or pr.criterion != "wanda":
            return
        name = self.model.name
        if name in catalog.MODEL_INPUT_KIND and name not in WANDA_MODELS:
            raise ValueError(
                f"compression.pruning.criterion: `wanda` scores the input features of Linear "
                f"layers; model {name!r} has convolutions; allowed models: {', '.join(WANDA_MODELS)} "
                "(or criterion magnitude)"
            )
        if self.data.streaming == "on":
            raise ValueError(
                "compression.pruning.criterion: `wanda` calibrates on training batches held in "
                "memory; set data.streaming to off or auto (or criterion magnitude)"
            )

    @property
    def uses_gpu(self) -> bool:
        return self.parallel.gpus_per_worker > 0


def _validated_args(schema: type[BaseModel], args: dict) -> dict:
    try:
        return schema.model_validate(args).model_dump()
    except ValidationError as e:
        first = e.errors()[0]
        loc = ".".join(str(x) for x in first["loc"])
        if first["type"] == "extra_forbidden":
            known = _model_at(schema, first["loc"][:-1])
            msg = _unknown("argument", str(first["loc"][-1]), known)
        else:
            msg = _clean(first["msg"])
        raise ValueError(f"args.{loc}: {msg}") from None


# --- loading and error reporting ---------------------------------------------------------------

_FIELD_PREFIX = re.compile(r"^([a-z_][a-z0-9_.]*): (.*)$", re.S)


def _clean(msg: str) -> str:
    return msg.removeprefix("Value error, ")


def _submodel(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model inside a field's annotation (`X`, `X | None`, `list[X]`, ...)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        return _submodel(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType, list, tuple, dict):
        for arg in typing.get_args(annotation):
            if (found := _submodel(arg)) is not None:
                return found
    return None


def _model_at(root: type[BaseModel] | None, loc: tuple | list) -> type[BaseModel] | None:
    """The model that validated the mapping at `loc` under `root` (None once the path leaves
    the models: a free-form dict such as `args`)."""
    model = root
    for part in loc:
        if model is None:
            return None
        if isinstance(part, int):  # a list index: same item model
            continue
        field = model.model_fields.get(str(part))
        model = _submodel(field.annotation) if field is not None else None
    return model


def _unknown(what: str, name: str, model: type[BaseModel] | None) -> str:
    """`unknown field `x`` with the nearest known name, or the allowed ones when none is near."""
    msg = f"unknown {what} `{name}`"
    if model is None:
        return msg
    known = list(model.model_fields)
    if not known:
        return f"{msg}; it takes no {what}s"
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    if close:
        return f"{msg}; did you mean `{close[0]}`?"
    return f"{msg}; allowed: {', '.join(known)}"


def format_errors(
    exc: ValidationError, root: str = "", model: type[BaseModel] | None = None
) -> list[dict[str, str]]:
    """Turn pydantic errors into [{field, message}], naming the field a cross-field rule is about.
    `model` (the one validated) lets an unknown field suggest the nearest known name."""
    out = []
    for err in exc.errors():
        loc = [str(x) for x in err["loc"]]
        msg = _clean(err["msg"])
        m = _FIELD_PREFIX.match(msg)
        if m:  # a cross-field rule names its field relative to the model it is on
            inner, msg = m.groups()
            loc.append(inner)
        field = ".".join(loc)
        if err["type"] == "extra_forbidden":
            msg = _unknown("field", loc[-1], _model_at(model, err["loc"][:-1]))
        if err["type"] == "missing":
            msg = "required field missing"
        out.append({"field": (root + field) or "(spec)", "message": msg})
    return out


def parse_spec(data: Any, submitted: bool = False) -> JobSpec:
    """Validate a decoded spec; raise SpecError naming each bad field. `submitted`: the spec comes
    from a client (fields only the service sets, such as model.init.resolved, are refused)."""
    if not isinstance(data, dict):
        raise SpecError("a job spec must be a mapping", [{"field": "(spec)", "message": "must be a mapping"}])
    try:
        return JobSpec.model_validate(data, context={"submitted": submitted})
    except ValidationError as e:
        errors = format_errors(e, model=JobSpec)
        raise SpecError("; ".join(f"{x['field']}: {x['message']}" for x in errors), errors) from None


def yaml_error(e: yaml.YAMLError) -> str:
    """One line: where and what. PyYAML's own text spans lines and names the stream
    (`<unicode string>` for text), which says nothing to whoever wrote the file."""
    mark = getattr(e, "problem_mark", None)
    problem = getattr(e, "problem", None)
    if mark is None or problem is None:
        return " ".join(str(e).split())
    out = f"line {mark.line + 1}, column {mark.column + 1}: {problem}"
    context, cmark = getattr(e, "context", None), getattr(e, "context_mark", None)
    if context and cmark is not None:  # e.g. the bracket that was never closed
        out += f" ({context} at line {cmark.line + 1}, column {cmark.column + 1})"
    elif context:
        out += f" ({context})"
    return out


class _NoAliasLoader(yaml.SafeLoader):
    """Refuses aliases (`*name`): a small body of nested aliases is one object in memory but
    gigabytes once the service re-encodes it (the "billion laughs")."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            mark = self.peek_event().start_mark
            raise yaml.composer.ComposerError(None, None, "aliases (*name) are not accepted here", mark)
        return super().compose_node(parent, index)


def decode_spec_text(text: str, source: str = "spec", field: str = "(spec)", aliases: bool = True) -> Any:
    """YAML or JSON (JSON is YAML, but try it first for exact number handling), decoded;
    a syntax error is a SpecError that names `source` (a file name, `spec`, `body`) and the line.
    `aliases=False` for text from the network."""
    try:
        return json.loads(text)
    except ValueError:
        pass
    except RecursionError:
        raise _too_deep(source, field) from None
    try:  # both loaders are safe ones: plain data, no Python objects
        return yaml.load(io.StringIO(text), Loader=yaml.SafeLoader if aliases else _NoAliasLoader)
    except yaml.YAMLError as e:
        # the source in the field's message too: the CLI shows only the fields
        message = f"{source}: not valid YAML or JSON: {yaml_error(e)}"
        raise SpecError(message, [{"field": field, "message": message}]) from None
    except RecursionError:
        raise _too_deep(source, field) from None


def _too_deep(source: str, field: str) -> SpecError:
    detail = "nested too deeply to be a job spec"
    return SpecError(f"{source}: {detail}", [{"field": field, "message": detail}])


def load_spec_text(text: str, source: str = "spec", field: str = "(spec)") -> JobSpec:
    return parse_spec(decode_spec_text(text, source, field))


def decode_spec_file(path: str | Path) -> Any:
    """A spec file's YAML or JSON, decoded (not validated); errors name the file."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise SpecError(f"cannot read {p}: {e.strerror}", [{"field": "(file)", "message": str(e)}]) from None
    return decode_spec_text(text, source=str(p), field="(file)")


def load_spec_file(path: str | Path) -> JobSpec:
    return parse_spec(decode_spec_file(path))


def json_schema() -> dict:
    """The JSON Schema of the job spec, for the API's OpenAPI document and the dashboard editor."""
    schema = JobSpec.model_json_schema()
    schema["$id"] = f"https://slimtrain.dev/schemas/jobspec-v{SPEC_VERSION}.json"
    return schema


# --- steps: how many a job runs, and whether its schedules fit in them --------------------------
# One piece of code for the API (service.limits, at submit, where the dataset's size is known
# from the spec) and the driver (workers.train_loop.total_steps, on the loaded data), so a
# schedule the API accepts is one the driver runs.

# Samples of sklearn's digits (load_digits: 1797 8x8 images); constant across versions.
DIGITS_SAMPLES = 1797
# `text` reads the first `max_chars` bytes of the standard library's top-level sources. Every
# supported Python has at least this many (3.11: 4.7 MB), so up to it the corpus is exactly
# `max_chars` long; above it only loading can tell.
TEXT_CORPUS_FLOOR = 2_000_000


def split_sizes(n: int, val_fraction: float) -> tuple[int, int]:
    """(train, val) sample counts, as workers.data.sharding.split_indices splits `n` samples."""
    n_val = max(1, round(n * val_fraction))
    return n - n_val, n_val


def known_train_samples(data: DataSpec) -> int | None:
    """Training samples of a built-in dataset, known from its spec without loading it; None for
    a `uri` and for text above TEXT_CORPUS_FLOOR."""
    if data.name == "digits":
        n = DIGITS_SAMPLES
    elif data.name == "synthetic":
        n = data.args["n_samples"]
    elif data.name == "text" and data.args["max_chars"] <= TEXT_CORPUS_FLOOR:
        # one sample per block of `block_size` tokens; the last token is only a target
        n = (data.args["max_chars"] - 1) // data.args["block_size"]
    else:
        return None
    return split_sizes(n, data.val_fraction)[0]


def step_count(train: TrainSpec, n_train: int) -> tuple[int, int]:
    """(steps per epoch, total optimizer steps) on `n_train` training samples: full global
    batches only (workers.data.sharding.steps_per_epoch), capped by `train.max_steps`."""
    per_epoch = n_train // train.batch_size
    total = train.epochs * per_epoch
    if train.max_steps:
        total = min(total, train.max_steps)
    return per_epoch, total


def schedule_errors(spec: JobSpec, n_train: int) -> list[dict[str, str]]:
    """[{field, message}] for each step a schedule names that the job never reaches on
    `n_train` training samples (empty when everything fits)."""
    t = spec.train
    if t.batch_size > n_train:
        return [
            {
                "field": "train.batch_size",
                "message": f"{t.batch_size} is larger than the training split ({n_train} samples)",
            }
        ]
    per_epoch, total = step_count(t, n_train)
    last = f"the job's last step ({total})"
    if t.max_steps and total == t.max_steps:
        why = "set by train.max_steps"
    else:
        why = f"{t.epochs} epoch{'s' if t.epochs > 1 else ''} of {per_epoch} steps"
    errors = []
    pr = spec.compression.pruning
    if pr is not None:
        name, step = ("start_step", pr.start_step) if pr.schedule == "oneshot" else ("end_step", pr.end_step)
        if step > total:  # an update at the last step is allowed: it shapes the exported model
            errors.append(
                {"field": f"compression.pruning.{name}", "message": f"{step} is after {last}: {why}"}
            )
    q = spec.compression.quantization
    if q.mode in ("qat", "fixed"):
        if q.start_step >= total:
            message = f"{q.start_step} is at or after {last}: {why}; fake quantization would never run"
            errors.append({"field": "compression.quantization.start_step", "message": message})
        if q.freeze_step is not None and q.freeze_step > total:
            message = f"{q.freeze_step} is after {last}: {why}"
            errors.append({"field": "compression.quantization.freeze_step", "message": message})
    ws = spec.compression.weight_sharing
    if ws is not None and ws.start_step > total:  # at the last step: shared, not fine-tuned
        message = f"{ws.start_step} is after {last}: {why}"
        errors.append({"field": "compression.weight_sharing.start_step", "message": message})
    return errors


def check_steps(spec: JobSpec, n_train: int) -> tuple[int, int]:
    """(steps per epoch, total steps), raising ConfigError with the first schedule error: the
    driver's check, on the data it loaded."""
    errors = schedule_errors(spec, n_train)
    if errors:
        raise ConfigError(f"{errors[0]['field']}: {errors[0]['message']}")
    return step_count(spec.train, n_train)
