"""What one job may ask of this server (settings `max_workers`, `max_epochs`, `max_steps`), and
what it needs from the Ray cluster. Checked at submit so an oversized job is refused with 422
instead of waiting in the queue forever."""

from __future__ import annotations

from dataclasses import dataclass

from service.errors import SpecError
from service.jobs import LimitExceeded
from service.settings import Settings
from service.spec import JobSpec, known_train_samples, schedule_errors, step_count


def estimated_steps(spec: JobSpec) -> int | None:
    """Optimizer steps the job will run, when that is known at submit time: epochs x steps per
    epoch for built-in datasets (their size follows from the spec), capped by `train.max_steps`;
    `train.max_steps` alone when only loading the data can tell; else None."""
    n_train = known_train_samples(spec.data)
    if n_train is None:
        return spec.train.max_steps
    return step_count(spec.train, n_train)[1]


def check_schedule(spec: JobSpec) -> None:
    """A schedule that ends after the job's last step, refused at submit (SpecError, 422) where
    the dataset's size is known from the spec; the driver makes the same check on the loaded data
    for the others (a uri)."""
    n_train = known_train_samples(spec.data)
    errors = schedule_errors(spec, n_train) if n_train is not None else []
    if errors:
        raise SpecError("; ".join(f"{e['field']}: {e['message']}" for e in errors), errors)


def check_limits(spec: JobSpec, settings: Settings) -> None:
    """What a valid spec may not ask of this server (LimitExceeded), after the check of its
    schedule against its steps (SpecError): both at submit."""
    check_schedule(spec)
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
