"""What one job may ask of this server (settings `max_workers`, `max_epochs`, `max_steps`), and
what it needs from the Ray cluster. Checked at submit so an oversized job is refused with 422
instead of waiting in the queue forever."""

from __future__ import annotations

from dataclasses import dataclass

from service.jobs import LimitExceeded
from service.settings import Settings
from service.spec import JobSpec

# Sizes of the built-in datasets whose size is known without loading them.
_FIXED_SIZES = {"digits": 1797}


def estimated_steps(spec: JobSpec) -> int | None:
    """Optimizer steps the job will run, when that is known at submit time: `train.max_steps`
    caps it; otherwise epochs x steps per epoch for datasets of known size; else None."""
    t = spec.train
    n = None
    if spec.data.name == "synthetic":
        n = spec.data.args["n_samples"]
    elif spec.data.name in _FIXED_SIZES:
        n = _FIXED_SIZES[spec.data.name]
    per_epoch = None
    if n is not None:
        # as workers.data.sharding.split_indices / steps_per_epoch count them
        n_train = n - max(1, round(n * spec.data.val_fraction))
        per_epoch = max(n_train // t.batch_size, 1)
    if per_epoch is None:
        return t.max_steps
    total = t.epochs * per_epoch
    return min(total, t.max_steps) if t.max_steps else total


def check_limits(spec: JobSpec, settings: Settings) -> None:
    errors = []
    if spec.parallel.workers > settings.max_workers:
        errors.append(
            {
                "field": "parallel.workers",
                "message": f"{spec.parallel.workers} is above this server's limit ({settings.max_workers})",
            }
        )
    if spec.train.epochs > settings.max_epochs:
        errors.append(
            {
                "field": "train.epochs",
                "message": f"{spec.train.epochs} is above this server's limit ({settings.max_epochs})",
            }
        )
    steps = estimated_steps(spec)
    if steps is not None and steps > settings.max_steps:
        field = "train.max_steps" if spec.train.max_steps == steps else "train.epochs"
        errors.append(
            {
                "field": field,
                "message": f"the job would run {steps} steps; this server's limit is {settings.max_steps}",
            }
        )
    if errors:
        raise LimitExceeded("; ".join(f"{e['field']}: {e['message']}" for e in errors), errors)


@dataclass(frozen=True)
class Resources:
    cpu: float = 0.0
    gpu: float = 0.0

    def __add__(self, other: Resources) -> Resources:
        return Resources(self.cpu + other.cpu, self.gpu + other.gpu)

    def __sub__(self, other: Resources) -> Resources:
        return Resources(self.cpu - other.cpu, self.gpu - other.gpu)

    def fits(self, capacity: Resources) -> bool:
        return self.cpu <= capacity.cpu + 1e-9 and self.gpu <= capacity.gpu + 1e-9

    def __str__(self) -> str:
        s = f"{self.cpu:g} CPU"
        return s + (f", {self.gpu:g} GPU" if self.gpu else "")

    def to_dict(self) -> dict:
        return {"CPU": self.cpu, "GPU": self.gpu}


def demand(spec: JobSpec) -> Resources:
    """What the job's Ray Train worker group reserves: one CPU per worker plus its GPUs, as the
    driver's ScalingConfig asks (workers/driver.py). The driver process itself and its relay
    actor reserve nothing."""
    p = spec.parallel
    return Resources(cpu=float(p.workers), gpu=float(p.workers * p.gpus_per_worker))
