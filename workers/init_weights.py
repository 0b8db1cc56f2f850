"""A job's initial weights (`model.init`): read safetensors, load them strictly, and the report's
`baseline` (the initial weights' score at step 0).

Only safetensors, parsed by the safetensors library (a length, a JSON header, raw tensor bytes):
nothing a user uploads is ever unpickled. A single file or a folder of shards with HuggingFace's
`model.safetensors.index.json` (key names as they are). The service resolved `model.init` to one
store key or s3:// URI at submission (`init.resolved`, service.uploads.resolve_init); this
module never sees tenants.
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load as safetensors_load
from torch import nn

from service.errors import ArtifactKeyError, ArtifactNotFound, ConfigError
from service.spec import JobSpec
from service.uploads import NotSafetensors, safetensors_header
from workers.metrics_log import decoded

INDEX = "model.safetensors.index.json"
SHOWN = 5  # keys named in an error before "and N more"


def _listed(keys: list[str]) -> str:
    keys = sorted(keys)
    more = f" and {len(keys) - SHOWN} more" if len(keys) > SHOWN else ""
    return ", ".join(keys[:SHOWN]) + more


def parse(raw: bytes, where: str) -> dict[str, torch.Tensor]:
    """The tensors of one safetensors file; ConfigError (naming `where`) for anything else."""
    try:
        # Our own check first: its message says what is wrong (a pickle's first bytes read as an
        # absurd header length), and nothing below runs on bytes that are not safetensors.
        safetensors_header(raw[: 8 + min(len(raw), 100 * 1024 * 1024)], len(raw))
        return safetensors_load(raw)
    except NotSafetensors as e:
        raise ConfigError(f"model.init: {where}: {e.message}") from None
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise ConfigError(f"model.init: {where}: not a readable safetensors file ({e})") from None


def _shards(read: Callable[[str], bytes], index_name: str, where: str) -> dict[str, torch.Tensor]:
    folder = posixpath.dirname(index_name)
    try:
        index = json.loads(read(index_name))
        weight_map = index["weight_map"]
        files = sorted(set(weight_map.values()))
    except (ValueError, KeyError, TypeError, AttributeError):
        raise ConfigError(f"model.init: {where}: {INDEX} has no weight_map of tensor -> file") from None
    state: dict[str, torch.Tensor] = {}
    for fn in files:
        # Shard names come from a user's file: plain names beside the index, nothing else.
        if not isinstance(fn, str) or "/" in fn or "\\" in fn or fn.startswith(".") or not fn:
            raise ConfigError(f"model.init: {where}: {INDEX} names shard {fn!r}; shards sit beside it")
        part = parse(read(posixpath.join(folder, fn) if folder else fn), f"{where} shard {fn}")
        claimed = {k for k, v in weight_map.items() if v == fn}
        if set(part) != claimed:
            raise ConfigError(
                f"model.init: {where}: shard {fn} holds {_listed(list(set(part) ^ claimed))} "
                f"other than {INDEX} says"
            )
        state.update(part)
    return state


def read_state(location: str, read: Callable[[str], bytes]) -> dict[str, torch.Tensor]:
    """The state dict at `location` (a file key, a folder ending in '/', or an index's key),
    read through `read(key) -> bytes` (ArtifactNotFound when absent)."""
    try:
        if location.endswith("/"):
            return _shards(read, location + INDEX, location)
        if location.endswith(".index.json"):
            return _shards(read, location, location)
        return parse(read(location), location)
    except ArtifactNotFound as e:
        raise ConfigError(f"model.init: {location}: not found ({e.message})") from None


def load_init_state(spec: JobSpec, store) -> dict[str, torch.Tensor] | None:
    """The initial weights a spec names, or None without `model.init`."""
    init = spec.model.init
    if init is None:
        return None
    if init.resolved is None:
        # Only the service (or `slimtrain run`) resolves: a worker never guesses a tenant.
        raise ConfigError("model.init: not resolved; submit the job through the service or slimtrain run")
    loc = init.resolved
    if loc.startswith("s3://"):
        from service.s3_store import read_s3_uri

        def read_s3(uri: str) -> bytes:  # every key read_state asks for stays an s3:// URI
            try:
                return read_s3_uri(uri)
            except ConfigError as e:  # its messages speak of data.uri, its first user
                raise ConfigError("model.init: " + e.message.removeprefix("data.uri: ")) from None

        return read_state(loc, read_s3)
    if store is None:
        raise ConfigError("model.init: needs an artifact store")

    def read(key: str) -> bytes:
        try:
            return store.get_bytes(key)
        except ArtifactKeyError as e:
            raise ConfigError(f"model.init: {e.message}") from None

    return read_state(loc, read)


def check_state(model: nn.Module, state: dict[str, torch.Tensor], where: str = "model.init") -> None:
    """Raise ConfigError naming the keys unless `state` matches `model` exactly: same keys, same
    shapes. Checked before anything is copied, so a model is never half-loaded."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k} {tuple(state[k].shape)} (model: {tuple(v.shape)})"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    problems = []
    if missing:
        problems.append(f"missing keys {_listed(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {_listed(unexpected)}")
    if shapes:
        problems.append(f"shape mismatches {_listed(shapes)}")
    if problems:
        raise ConfigError(f"{where}: the weights do not fit the model: " + "; ".join(problems))
    bad = [k for k, v in state.items() if v.is_floating_point() != expected[k].is_floating_point()]
    if bad:
        raise ConfigError(f"{where}: the weights do not fit the model: dtype kind differs for {_listed(bad)}")


def apply(model: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """Load `state` into `model` strictly (check_state first)."""
    check_state(model, state)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:  # check_state covers what torch checks; this is the backstop
        raise ConfigError(f"model.init: the weights do not fit the model: {e}") from None
    return model


# --- report: the baseline ------------------------------------------------------------------------

BASELINE_SOURCE = "the initial weights (model.init) evaluated at step 0 on the validation split, PyTorch"


def baseline_of(records, kind: str) -> dict | None:
    """The report's `baseline` from the step-0 evaluation record (decoded dicts or JSON lines),
    None when there is none (no model.init)."""
    for rec in decoded(records):
        if rec.get("kind") == "eval" and rec.get("baseline"):
            out = {
                "accuracy": rec["val_accuracy"],
                "loss": rec["val_loss"],
                "step": rec.get("step", 0),
                "source": BASELINE_SOURCE,
            }
            if kind == "tokens":
                out["perplexity"] = rec.get("val_perplexity")
            return out
    return None


def rebase(report: dict, baseline: dict | None) -> dict:
    """With a baseline, every "vs dense" figure is against it: `dense_accuracy` is the initial
    weights' accuracy (and `dense_perplexity` theirs, for token models)."""
    if baseline is None:
        return report
    report["baseline"] = baseline
    report["dense_accuracy"] = baseline["accuracy"]
    if "perplexity" in baseline:
        report["dense_perplexity"] = baseline["perplexity"]
    return report
