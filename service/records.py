"""Phase records: what a job's driver is doing, in the metrics stream with the other records.

A driver spends a good part of a job outside the training loop (loading data, waiting for its
Ray Train workers, exporting and measuring the model); without a word from it, a client sees a
bar stuck at step 0 and then frozen at the last step. The driver writes one record per phase it
enters, into the metrics stream like every record, so the store, the SSE stream, the CLI and the
dashboard get it the same way:

    {"kind": "phase", "phase": "training", "step": 0, "total_steps": 600, "time": ...}

`step` and `total_steps` are present where known (from `waiting_for_workers` on). A phase lasts
until the next phase record or the job's final state; a restarted worker group starts `training`
again with the step it resumed from."""

from __future__ import annotations

import time
from enum import StrEnum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from service.artifacts import JobArtifacts

PHASE_KIND = "phase"


class Phase(StrEnum):
    STARTING = "starting"  # the driver process is up: Ray and the training libraries loading
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
    Phase.STARTING: "starting",
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


# --- where the stream lives in the artifact store ---------------------------------------------
# The driver writes the records as append-only parts, each written once and named by the sequence
# number of its first record (zero-padded, so names sort in order): the API reads the part that
# starts where it stopped, with no listing and no re-reading. `metrics.jsonl` is the whole series
# concatenated, written when a driver ends: the artifact users download.
METRICS = "metrics.jsonl"
PARTS = "metrics/"
_PART_DIGITS = 9


def part_name(first_seq: int) -> str:
    return f"{PARTS}part-{first_seq:0{_PART_DIGITS}d}.jsonl"


def part_first(name: str) -> int | None:
    """The first sequence number of a part's name (relative to the job), None for another name."""
    if not (name.startswith(f"{PARTS}part-") and name.endswith(".jsonl")):
        return None
    digits = name[len(PARTS) + 5 : -len(".jsonl")]
    return int(digits) if digits.isdigit() else None


def list_parts(arts: JobArtifacts) -> list[tuple[int, str]]:
    """(first sequence number, name) of the job's parts, in order. One listing: callers use it
    once per driver start or API restart, never per tick."""
    out = []
    for obj in arts.list(PARTS):
        name = arts.name_of(obj.key)
        first = part_first(name)
        if first is not None:
            out.append((first, name))
    return sorted(out)
