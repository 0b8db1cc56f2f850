"""Phase records: what a job's driver is doing, in the metrics stream with the other records.

A driver spends a good part of a job outside the training loop (loading data, waiting for its
Ray Train workers, exporting and measuring the model); without a word from it, a client sees a
bar stuck at step 0 and then frozen at the last step. The driver writes one record per phase it
enters, to `metrics.jsonl` like every record, so the store, the SSE stream, the CLI and the
dashboard get it the same way:

    {"kind": "phase", "phase": "training", "step": 0, "total_steps": 600, "time": ...}

`step` and `total_steps` are present where known (from `waiting_for_workers` on). A phase lasts
until the next phase record or the job's final state; a restarted worker group starts `training`
again with the step it resumed from."""

from __future__ import annotations

import time
from enum import StrEnum

PHASE_KIND = "phase"


class Phase(StrEnum):
    PREPARING = "preparing"  # loading the data, building the model, checking the plan fits
    WAITING_FOR_WORKERS = "waiting_for_workers"  # Ray Train starting the worker group
    TRAINING = "training"  # the loop runs: step/total from the train records
    EXPORTING = "exporting"  # safetensors, packed, ONNX (fp32, quantized)
    VERIFYING = "verifying"  # running the exported artifacts: accuracy, latency
    DONE = "done"  # the report is written; only the manifest follows

    @property
    def label(self) -> str:
        return _LABELS[self]


_LABELS = {
    Phase.PREPARING: "preparing",
    Phase.WAITING_FOR_WORKERS: "waiting for workers",
    Phase.TRAINING: "training",
    Phase.EXPORTING: "exporting",
    Phase.VERIFYING: "verifying",
    Phase.DONE: "done",
}


def phase_record(phase: Phase, step: int | None = None, total_steps: int | None = None) -> dict:
    rec: dict = {"kind": PHASE_KIND, "phase": phase.value, "time": time.time()}
    if step is not None:
        rec["step"] = step
    if total_steps is not None:
        rec["total_steps"] = total_steps
    return rec


def phase_label(name: str | None) -> str | None:
    """The words for a phase name from a record; an unknown one (a newer driver) as written."""
    if name is None:
        return None
    try:
        return Phase(name).label
    except ValueError:
        return str(name).replace("_", " ")
