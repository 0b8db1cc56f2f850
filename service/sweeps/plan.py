"""A sweep request, its validation and its expansion into trial parameters. Pure: no database,
no Ray; the same request always expands to the same trials (random draws are seeded per trial
index), which is what lets the service re-derive a sweep after a crash instead of remembering it.

A parameter is a dotted path into the job spec (`compression.pruning.final_sparsity`); each is
checked against JobSpec's schema, and each value by validating the base spec with that value
set, so a bad path or value is a 422 at submission that names it, never a failed trial later.
"""

from __future__ import annotations

import copy
import itertools
import math
import random
import typing
from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, Field, StrictBool, StrictFloat, StrictInt, ValidationError, model_validator

from service.errors import SpecError
from service.spec import JobName, JobSpec, Strict, _submodel, _unknown, format_errors, parse_spec

Method = Literal["grid", "random", "tpe"]
Direction = Literal["max", "min"]

# Report keys (DESIGN.md, report.json) a sweep may optimise; dotted as in the report.
METRICS: dict[str, str] = {
    "accuracy": "accuracy of the exported compressed artifact",
    "size.ratio": "dense bytes / compressed bytes",
    "size.compressed_bytes": "bytes of the packed artifact",
    "latency_ms.compressed": "CPU batch-1 median latency of the compressed artifact",
    "sparsity.global": "fraction of zero weights",
    "params.nonzero": "nonzero parameters",
}
# Set by the sweep itself: a path naming one of these would be overwritten or would clash.
RESERVED_PATHS = {
    "name": "trial names are made from the sweep's name",
    "compression.baseline_job": "the sweep runs the dense baseline itself and sets it",
}


class Objective(BaseModel):
    metric: str
    direction: Direction

    @model_validator(mode="before")
    @classmethod
    def _from_text(cls, v: Any) -> Any:
        # "accuracy max" is the short form the issue and the CLI examples use.
        if isinstance(v, str):
            parts = v.split()
            if len(parts) != 2:
                raise ValueError(f"{v!r}: write `<metric> max` or `<metric> min`")
            return {"metric": parts[0], "direction": parts[1]}
        return v

    @model_validator(mode="after")
    def _known(self) -> Objective:
        if self.metric not in METRICS:
            raise ValueError(f"metric: unknown `{self.metric}`; allowed: {', '.join(METRICS)}")
        return self


DEFAULT_OBJECTIVE = [
    Objective(metric="accuracy", direction="max"),
    Objective(metric="size.ratio", direction="max"),
    Objective(metric="latency_ms.compressed", direction="min"),
]


# Strict number and boolean types: pydantic's lax mode would read `false` as 0 and `1` as true,
# values the request's JSON Schema refuses (the contract fuzz's negative_data_rejection).
class Range(Strict):
    low: StrictFloat
    high: StrictFloat
    log: StrictBool = False

    @model_validator(mode="after")
    def _order(self) -> Range:
        if not self.low < self.high:
            raise ValueError(f"high: must be greater than low ({self.low})")
        if self.log and self.low <= 0:
            raise ValueError("low: must be > 0 when log is true")
        return self


class EarlyStopping(Strict):
    """Median stopping (Golovin et al., Google Vizier): a running trial whose best validation
    accuracy so far is below the median of the succeeded trials' best at the same step is
    stopped and reported as `pruned`."""

    rule: Literal["median"] = "median"
    min_trials: StrictInt = Field(
        default=3, ge=1, description="Succeeded trials needed before any is stopped."
    )
    grace_steps: StrictInt = Field(default=0, ge=0, description="No trial is stopped before this step.")


class SweepRequest(Strict):
    """`POST /v1/sweeps`. `base` is a job spec; each trial is `base` with its parameters set."""

    name: JobName
    base: dict[str, Any]
    method: Method = "grid"
    grid: dict[str, list[Any]] = Field(
        default_factory=dict,
        description="Path -> values. grid: every combination; random and tpe: a choice among them.",
    )
    random: dict[str, Range] = Field(
        default_factory=dict, description="Path -> {low, high, log}: random and tpe only."
    )
    samples: StrictInt | None = Field(
        default=None, ge=1, description="random: trials to draw (default max_trials)."
    )
    max_trials: StrictInt | None = Field(default=None, ge=1)
    max_concurrent: StrictInt = Field(default=2, ge=1, description="Trials queued or running at once.")
    objective: list[Objective] = Field(default_factory=lambda: list(DEFAULT_OBJECTIVE), min_length=1)
    baseline: StrictBool = Field(
        default=True,
        description="Run the base spec without compression once, before the trials; every trial "
        "names it as compression.baseline_job.",
    )
    seed: StrictInt = Field(default=0, ge=0, description="Seed of random draws and of the tpe sampler.")
    early_stopping: EarlyStopping | None = Field(
        default=None, description="Stop trials that cannot reach the front (reported as `pruned`)."
    )

    @model_validator(mode="after")
    def _rules(self) -> SweepRequest:
        if self.method == "grid":
            if self.random:
                raise ValueError("random: method grid takes only `grid`; use method random or tpe")
            if not self.grid:
                raise ValueError("grid: required for method grid (path -> list of values)")
            if self.samples is not None:
                raise ValueError("samples: only used by method random")
        else:
            if not self.grid and not self.random:
                raise ValueError(f"random: method {self.method} needs `random` ranges or `grid` choices")
            if self.method == "tpe" and self.samples is not None:
                raise ValueError("samples: only used by method random; tpe runs max_trials")
            if self.method == "tpe" and self.max_trials is None:
                raise ValueError("max_trials: required for method tpe")
            if self.method == "random" and self.samples is None and self.max_trials is None:
                raise ValueError("samples: method random needs samples or max_trials")
        for path, values in self.grid.items():
            if not values:
                raise ValueError(f"grid.{path}: needs at least one value")
        names = [o.metric for o in self.objective]
        if len(set(names)) != len(names):
            raise ValueError("objective: each metric at most once")
        return self

    @property
    def paths(self) -> list[str]:
        return [*self.grid, *self.random]


# --- paths and values ------------------------------------------------------------------------------


def _field_at(path: str) -> tuple[str | None, Any]:
    """(error, annotation of the leaf) for a dotted path into JobSpec. Past a free-form mapping
    (`model.args`, `data.args`) any key is accepted here: validating the spec checks it."""
    model: type[BaseModel] | None = JobSpec
    annotation: Any = None
    parts = path.split(".")
    for i, part in enumerate(parts):
        if model is None:
            if _is_mapping(annotation):
                return None, Any
            return f"`{'.'.join(parts[:i])}` is a value, not a section; it has no `{part}`", None
        field = model.model_fields.get(part)
        if field is None:
            where = ".".join(parts[:i]) or "the job spec"
            return f"{_unknown('field', part, model)} (in {where})", None
        annotation = field.annotation
        model = _submodel(annotation)
        if model is not None and _is_mapping(annotation):
            model = None  # dict[str, X]: keys are free
    if model is not None:
        return f"`{path}` is a section; name one of its fields: {', '.join(model.model_fields)}", None
    return None, annotation


def _is_mapping(annotation: Any) -> bool:
    if annotation is dict or typing.get_origin(annotation) is dict:
        return True
    return any(_is_mapping(a) for a in typing.get_args(annotation))


def _is_int(annotation: Any) -> bool:
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    return annotation is int or (bool(args) and all(a is int for a in args))


def set_path(spec: dict, path: str, value: Any) -> dict:
    """A copy of `spec` with `path` set, creating (or replacing a null) section on the way."""
    out = copy.deepcopy(spec)
    node = out
    *parents, leaf = path.split(".")
    for part in parents:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[leaf] = value
    return out


def apply_params(base: dict, params: dict[str, Any]) -> dict:
    spec = base
    for path, value in params.items():
        spec = set_path(spec, path, value)
    return spec


def trial_spec(req: SweepRequest, index: int, params: dict[str, Any], baseline_job: str | None) -> dict:
    spec = apply_params(req.base, params)
    spec["name"] = trial_name(req.name, index)
    if baseline_job is not None:
        spec = set_path(spec, "compression.baseline_job", baseline_job)
    return spec


def baseline_spec(req: SweepRequest) -> dict:
    """The base spec without compression: the dense model every trial is measured against."""
    spec = {k: v for k, v in copy.deepcopy(req.base).items() if k != "compression"}
    spec["name"] = f"{req.name}-dense"[:100]
    return spec


def trial_name(sweep_name: str, index: int) -> str:
    suffix = f"-t{index:03d}"
    return sweep_name[: 100 - len(suffix)] + suffix


# --- validation ------------------------------------------------------------------------------------


def _spec_error(field: str, message: str) -> SpecError:
    return SpecError(f"{field}: {message}", [{"field": field, "message": message}])


def parse_request(data: Any) -> SweepRequest:
    """Validate the request's own fields (SpecError naming each bad one); not yet the paths."""
    if not isinstance(data, dict):
        raise _spec_error("(body)", "a sweep request must be a mapping")
    try:
        return SweepRequest.model_validate(data)
    except ValidationError as e:
        errors = format_errors(e, model=SweepRequest)
        raise SpecError("; ".join(f"{x['field']}: {x['message']}" for x in errors), errors) from None


def check_request(
    req: SweepRequest, validate: Callable[[dict], JobSpec] | None = None, max_trials: int | None = None
) -> int:
    """Check every path against the job spec's schema and every value (a range's low and high)
    by validating the base spec with it; returns the number of trials. `validate` is the
    service's full check of one job spec (parse, limits, sources); the default parses only.
    `max_trials`: the server's limit per sweep."""
    validate = validate or (lambda d: parse_spec(d, submitted=True))
    for path in RESERVED_PATHS:
        if path in req.grid or path in req.random:
            section = "grid" if path in req.grid else "random"
            raise _spec_error(f"{section}.{path}", f"cannot be swept: {RESERVED_PATHS[path]}")
    # The count first: it is cheap, and a grid far above the limit is not validated value by value.
    n = trial_count(req)
    if max_trials is not None and n > max_trials:
        field = "grid" if req.method == "grid" else ("samples" if req.samples else "max_trials")
        raise _spec_error(field, f"{n} trials; this server allows at most {max_trials} per sweep")
    base_name = trial_name(req.name, 0)
    _validate_one(validate, {**req.base, "name": base_name}, "base", "base")
    for section, entries in (("grid", req.grid), ("random", req.random)):
        for path in entries:
            err, annotation = _field_at(path)
            if err is not None:
                raise _spec_error(f"{section}.{path}", err)
            if section == "random" and annotation is not Any and not _numeric(annotation):
                raise _spec_error(f"random.{path}", "is not a number; sweep it with `grid` values")
    for path, values in req.grid.items():
        for i, value in enumerate(values):
            spec = set_path({**req.base, "name": base_name}, path, value)
            _validate_one(validate, spec, f"grid.{path}[{i}]", f"value {value!r}")
    for path, rng in req.random.items():
        for end in ("low", "high"):
            value = _cast(getattr(rng, end), _field_at(path)[1])
            spec = set_path({**req.base, "name": base_name}, path, value)
            _validate_one(validate, spec, f"random.{path}.{end}", f"value {value!r}")
    if req.baseline:
        _validate_one(validate, baseline_spec(req), "base", "the dense baseline (base without compression)")
    return n


def _numeric(annotation: Any) -> bool:
    args = [a for a in typing.get_args(annotation) if a is not type(None)] or [annotation]
    return all(a in (int, float) for a in args)


def _cast(value: float, annotation: Any) -> float | int:
    return int(round(value)) if _is_int(annotation) else value


def _validate_one(validate: Callable[[dict], JobSpec], spec: dict, field: str, what: str) -> None:
    try:
        validate(spec)
    except SpecError as e:
        inner = "; ".join(f"{x['field']}: {x['message']}" for x in e.errors) if e.errors else e.message
        raise SpecError(
            f"{field}: {what} makes an invalid job: {inner}", [{"field": field, "message": inner}]
        ) from None


def trial_count(req: SweepRequest) -> int:
    if req.method == "grid":
        n = 1
        for values in req.grid.values():
            n *= len(values)
        if req.max_trials is not None and req.max_trials < n:
            raise _spec_error(
                "max_trials", f"the grid has {n} combinations; max_trials {req.max_trials} would drop some"
            )
        return n
    if req.method == "random":
        n = req.samples or req.max_trials
        if req.max_trials is not None and n > req.max_trials:
            raise _spec_error("samples", f"{n} is above max_trials ({req.max_trials})")
        return n
    return req.max_trials


# --- expansion -------------------------------------------------------------------------------------


def grid_params(req: SweepRequest) -> list[dict[str, Any]]:
    """Every combination, the first path varying slowest (itertools.product order)."""
    paths = list(req.grid)
    return [
        dict(zip(paths, combo, strict=True)) for combo in itertools.product(*(req.grid[p] for p in paths))
    ]


def random_params(req: SweepRequest, index: int) -> dict[str, Any]:
    """Trial `index`'s draw: seeded by (seed, index), so it is the same whenever it is drawn."""
    rng = random.Random(f"slimtrain-sweep/{req.seed}/{index}")
    out: dict[str, Any] = {}
    for path, values in req.grid.items():
        out[path] = values[rng.randrange(len(values))]
    for path, r in req.random.items():
        if r.log:
            value = math.exp(rng.uniform(math.log(r.low), math.log(r.high)))
        else:
            value = rng.uniform(r.low, r.high)
        out[path] = _cast(value, _field_at(path)[1])
    return out


def planned_params(req: SweepRequest, index: int) -> dict[str, Any]:
    """Parameters of trial `index` for grid and random (tpe asks its sampler instead)."""
    if req.method == "grid":
        return grid_params(req)[index]
    if req.method == "random":
        return random_params(req, index)
    raise ValueError("tpe trials come from the sampler (service.sweeps.search)")


def is_int_path(path: str) -> bool:
    return _is_int(_field_at(path)[1])
