"""The end of every job: export the trained model, measure the exported artifacts, write the
report. Everything here runs on the final checkpoint, never on a live training process."""

from __future__ import annotations

import logging

import torch
from safetensors.torch import save as safetensors_save

from service.artifacts import ArtifactStore, JobArtifacts
from service.errors import CheckpointError
from service.spec import JobSpec
from workers import pack, report
from workers.checkpoint import load_latest
from workers.data import Dataset
from workers.models import build_model

log = logging.getLogger(__name__)


def final_model(spec: JobSpec, data: Dataset, store: ArtifactStore, job_id: str, total_steps: int):
    ckpt = load_latest(store, job_id)
    if ckpt is None or ckpt.step != total_steps:
        got = "none" if ckpt is None else f"step {ckpt.step}"
        raise CheckpointError(f"no verified final checkpoint (want step {total_steps}, found {got})")
    model = build_model(spec.model.name, spec.model.args, data.info)
    model.load_state_dict(ckpt.state["model"])
    return model.eval(), ckpt


def export(
    spec: JobSpec, data: Dataset, store: ArtifactStore, job_id: str, total_steps: int, run_info: dict
) -> dict:
    """Write model.safetensors and model.packed, verify the packed file rebuilds the same
    weights, score it on the validation split, and return the report (also written)."""
    arts = JobArtifacts(store, job_id)
    model, _ = final_model(spec, data, store, job_id, total_steps)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    arts.put_bytes("model.safetensors", safetensors_save(state, metadata={"job_id": job_id}))

    meta = {"model": spec.model.model_dump(), "data_info": data.info.to_dict(), "job_id": job_id}
    packed = pack.pack(state, meta)
    arts.put_bytes("model.packed", packed)
    rebuilt = pack.rebuild(packed)
    for k, v in rebuilt.state_dict().items():
        if not torch.equal(v, state[k]):
            raise CheckpointError(f"packed model does not rebuild {k} exactly")

    float_scores = report.torch_accuracy(model, data)
    artifact_scores = report.torch_accuracy(rebuilt, data)
    dense = report.dense_bytes(model)
    rep = {
        "job_id": job_id,
        "name": spec.name,
        "model": spec.model.name,
        "data": data.info.source,
        "precision": spec.precision,
        "strategy": spec.parallel.strategy,
        "workers": spec.parallel.workers,
        "input": {
            "shape": ["N", *data.info.input_shape],
            "dtype": data.info.input_dtype,
            "kind": data.info.kind,
        },
        "accuracy": artifact_scores["accuracy"],
        "accuracy_source": "model.packed rebuilt and run in PyTorch on the validation split",
        "float_accuracy": float_scores["accuracy"],
        "val_loss": artifact_scores["loss"],
        "sparsity": report.sparsity_of(model),
        "params": report.param_counts(model),
        "size": {"dense_bytes": dense, "compressed_bytes": len(packed), "ratio": dense / len(packed)},
        **run_info,
    }
    if data.info.kind == "tokens":
        rep["perplexity"] = float(torch.tensor(artifact_scores["loss"]).exp())
    arts.put_json("report.json", rep)
    return rep
