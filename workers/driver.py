"""The job driver: one job, from a validated spec to a report.

It checks that the job can run at all (data loads, model builds, schedule fits the run, the
cluster has the GPUs), runs the training loop on a Ray Train `TorchTrainer`, relays rank 0's
records to the job's metrics (`workers.metrics_log`) and to the caller, then exports and
reports. It runs wherever Ray is reachable: inside `slimtrain run`, or as the entrypoint of a
Ray Job submitted by the service.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import ray
from ray.train.v2._internal.constants import (
    CHECKPOINT_MANAGER_SNAPSHOT_FILENAME,
    ENABLE_PREEMPTION_WATCHER_ENV_VAR,
)

from service.artifacts import ArtifactStore, JobArtifacts
from service.errors import ConfigError, SlimtrainError, TrainingFailed
from service.records import PARTS, Phase, phase_record
from service.spec import JobSpec
from workers import export, init_weights, onnx_export
from workers.checkpoint import CHECKPOINTS
from workers.compression.pruning import layer_scales, prunable_weights
from workers.data import Dataset, load_for_job, streaming
from workers.initial_eval import InitialEval
from workers.metrics_log import MetricsLog, decoded
from workers.models import build_model
from workers.models.stages import require_stages
from workers.relay import MetricsRelay
from workers.store_check import check_store_shared
from workers.train_loop import total_steps

log = logging.getLogger(__name__)
OnRecord = Callable[[dict], None]
# Ray Train's checkpoint-manager state, in its run folder (RunConfig(name=CHECKPOINTS)).
RAY_SNAPSHOT = f"{CHECKPOINTS}/{CHECKPOINT_MANAGER_SNAPSHOT_FILENAME}"
MESSAGE_CHARS = 200  # of a foreign exception's message in a failure reason


@dataclass
class Attempts:
    """Attempts as seen in the records: each (re)start of the worker group is one, in this
    driver or in an earlier one of the same job (a resubmitted driver continues the count)."""

    items: list[dict] = field(default_factory=list)

    @classmethod
    def of_lines(cls, lines: list[str]) -> Attempts:
        seen = cls()
        for rec in decoded(lines):
            seen.observe(rec)  # only `start` events count
        return seen

    def observe(self, record: dict) -> None:
        if record.get("event") == "start":
            self.items.append(
                {
                    "attempt": len(self.items) + 1,
                    "resumed_from": record.get("resumed_from"),
                    "time": record.get("time"),
                }
            )
            record["attempt"] = len(self.items)


def _worker_entry(config: dict) -> None:
    """Runs on every Ray Train worker."""
    import torch

    from service.spec import JobSpec as _Spec
    from workers.session import RaySession
    from workers.train_loop import Faults, train

    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    spec = _Spec.model_validate(config["spec"])
    session = RaySession(config["store"], config["job_id"], config["relay"])
    data = ray.get(config["data"])
    faults = Faults.from_dict(config.get("faults"))
    train(spec, data, session, faults, step0_evaluated=config.get("step0_evaluated", False))


def write_at_once(records: list[dict], awaited: bool, first_train: bool) -> tuple[bool, bool]:
    """Whether the driver writes these relayed records out now rather than within the metrics
    log's interval, and whether the next train record is still a worker group's first.

    Now: when a checkpoint waits for them (RaySession.save), and when they hold what a client
    watching a new or resumed job waits for: the `start` event (which brings the training phase)
    and the first train record after it."""
    now = awaited
    for rec in records:
        if rec.get("event") == "start":
            first_train = now = True
        elif rec.get("kind") == "train" and first_train:
            first_train, now = False, True
    return now, first_train


def attempt_trainer() -> type:
    """Ray Train's TorchTrainer less the helper actors an attempt does not need.

    Every helper actor is one more Python process started for the attempt, importing Ray Train
    on the cores its workers are starting on (bench/README, "Submit -> first metric"). Dropped:
    - the PlacementGroupCleaner, a detached actor that removes the run's placement group if the
      controller dies while the driver lives on. An attempt's driver fails the attempt when its
      controller dies and ends its Ray job, and Ray removes a job's placement groups when the job
      ends;
    - the DatasetManager, which shards Ray Datasets, when the job has none (data held in memory
      and shipped by `ray.put`): Ray Train starts it even for an empty `datasets`.
    `_create_default_callbacks` is private to Ray Train 2.60 (pinned in pyproject.toml):
    tests/integration/test_training_ray.py lists an attempt's actors, so a Ray upgrade that
    renames it, and so starts the helpers again, fails there.

    Its process group is set up by `workers.torch_backend`, whose config does not make the
    controller import torch before it starts the workers."""
    from ray.train.torch import TorchTrainer
    from ray.train.v2._internal.callbacks import DatasetsCallback
    from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback

    from workers.torch_backend import WorkerTorchConfig

    class AttemptTrainer(TorchTrainer):
        def __init__(self, *args, torch_config=None, **kwargs):
            # TorchTrainer fills in the backend: nccl when the workers use GPUs, else gloo.
            super().__init__(*args, torch_config=torch_config or WorkerTorchConfig(), **kwargs)

        def _create_default_callbacks(self) -> list:
            unneeded = (PlacementGroupCleanerCallback,) + (() if self.datasets else (DatasetsCallback,))
            return [cb for cb in super()._create_default_callbacks() if not isinstance(cb, unneeded)]

    return AttemptTrainer


@dataclass
class Prepared:
    """What the preflight loaded and the driver goes on with."""

    data: Dataset
    steps_per_epoch: int
    total_steps: int
    # The model.init weights as read (None without init), for the step-0 evaluation: a large
    # checkpoint on S3 is read once per attempt, not twice. Not to be held past it.
    init_state: dict | None


def preflight(spec: JobSpec, store: ArtifactStore) -> Prepared:
    """Everything that can be known to fail before a worker starts: a ConfigError here fails the
    job once, without retries (retrying cannot fix it)."""
    data = load_for_job(spec.data, spec.parallel.strategy, store)
    spe, total = total_steps(spec, data.info.n_train)
    model = build_model(spec.model.name, spec.model.args, data.info)
    init_state = None
    if spec.model.init is not None:
        # Unreadable or ill-fitting weights fail here, once, before any worker starts.
        init_state = init_weights.load_init_state(spec, store)
        init_weights.apply(model, init_state)
    if spec.parallel.strategy == "pipeline":
        require_stages(model, spec.parallel.workers)
    pr = spec.compression.pruning
    if pr is not None and pr.layer_sparsity:
        # A misspelt layer name fails here, before any worker starts (the pruner checks again
        # against the layers it actually prunes, after the method's own skips).
        layer_scales(pr, list(prunable_weights(model, pr.exclude)))
    if spec.uses_gpu:
        need = spec.parallel.gpus_per_worker * spec.parallel.workers
        have = ray.cluster_resources().get("GPU", 0)
        if have < need:
            raise ConfigError(
                f"parallel.gpus_per_worker: the job needs {need:g} GPUs; the Ray cluster has {have:g}"
            )
    return Prepared(data, spe, total, init_state)


def _chain(err: BaseException) -> list[BaseException]:
    """`err` and what it wraps, outermost first, through Ray's wrappers."""
    out: list[BaseException] = []
    while err is not None and all(e is not err for e in out):
        out.append(err)
        err = getattr(err, "cause", None) or getattr(err, "controller_failure", None) or err.__cause__
    return out


def _cause(err: BaseException) -> BaseException:
    """The first of our own typed errors in the chain, or its innermost exception."""
    chain = _chain(err)
    return next((e for e in chain if isinstance(e, SlimtrainError)), chain[-1])


def _blame(item: tuple[int, BaseException]) -> tuple[int, int]:
    """Which failed rank speaks for the group: one that knows why (our own error), then one
    whose process died (its peers then fail in their collectives with 'connection closed',
    which says nothing), then the lowest."""
    from ray.exceptions import RayActorError
    from ray.train.v2._internal.exceptions import WorkerHealthCheckFailedError, WorkerHealthCheckTimeoutError

    rank, exc = item
    chain = _chain(exc)
    if any(isinstance(e, SlimtrainError) for e in chain):
        return (0, rank)
    deaths = (RayActorError, WorkerHealthCheckFailedError, WorkerHealthCheckTimeoutError)
    return (1 if any(isinstance(e, deaths) for e in chain) else 2, rank)


def _root_cause(err: BaseException) -> tuple[int | None, BaseException]:
    """(rank, cause) of a Ray Train failure: the rank that speaks for a failed worker group
    (`_blame`), None for a failure outside the workers."""
    for e in _chain(err):
        failures = getattr(e, "worker_failures", None)
        if failures:
            rank, exc = min(failures.items(), key=_blame)
            return rank, _cause(exc)
    return None, _cause(err)


def _failure_message(err: BaseException) -> str:
    """The root cause of a Ray Train failure, in one readable line."""
    rank, cause = _root_cause(err)
    if isinstance(cause, SlimtrainError):
        text = cause.message
    else:
        # Ray's own messages run to a paragraph of possible causes: the start says what happened.
        lines = str(cause).strip().splitlines()
        last = lines[-1] if lines else ""
        text = f"{type(cause).__name__}: {last[:MESSAGE_CHARS]}{'...' if len(last) > MESSAGE_CHARS else ''}"
    return f"rank {rank}: {text}" if rank is not None else text


def training_failure(err: BaseException, attempts: int) -> TrainingFailed:
    """The error run_job raises for a failed fit. Retryable unless the cause is one of our
    errors that says a retry cannot help (a ConfigError raised on a worker, masks that
    disagree): a worker process that died or an unexpected exception may not happen again."""
    _rank, cause = _root_cause(err)
    tries = f" after {attempts} attempts" if attempts > 1 else ""
    message = f"training failed{tries}: {_failure_message(err)}"
    if isinstance(cause, SlimtrainError):
        return TrainingFailed(message, retryable=cause.retryable, code=cause.code)
    return TrainingFailed(message, retryable=True)


def run_job(
    spec: JobSpec, job_id: str, store: ArtifactStore, metrics: MetricsLog | None = None, **options
) -> dict:
    """Run one job (`_run_job`, which takes the `options`), and leave its metrics.jsonl
    whether it succeeds or fails. `metrics`: the job's series when the caller has begun it
    (the entrypoint writes the `starting` phase before it imports this module)."""
    metrics = metrics if metrics is not None else MetricsLog(JobArtifacts(store, job_id))
    try:
        return _run_job(spec, job_id, store, metrics, **options)
    except BaseException:
        try:
            metrics.close()
        except Exception as e:  # the job's own error is the one to report
            log.warning("job %s: writing metrics.jsonl: %s", job_id, e)
        raise


def _run_job(
    spec: JobSpec,
    job_id: str,
    store: ArtifactStore,
    metrics: MetricsLog,
    *,
    on_record: OnRecord | None = None,
    faults: dict | None = None,
    worker_restarts: int | None = None,
    poll_seconds: float = 0.25,
) -> dict:
    """Run one job on the connected Ray cluster; return its report. Raises ConfigError (the job
    cannot run as specified) or TrainingFailed (it failed after its retries).

    `worker_restarts`: how often Ray Train restarts a failed worker group inside this run
    (default: the spec's `retries`, for `slimtrain run`). The service passes 0: it owns the
    retry budget and resubmits the job as a new attempt, so every failure is an attempt the
    job record shows, and `retries` is spent once, not once per driver."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig

    # Ray Train starts a PreemptionWatcher actor (one more Python process) right as the workers
    # enter the train function, to pass node-drain notices to a loop that reads them. Ours never
    # does: it checkpoints on its own schedule and a lost node fails the attempt, which resumes
    # from the last checkpoint. The controller reads this from the driver's environment.
    os.environ.setdefault(ENABLE_PREEMPTION_WATCHER_ENV_VAR, "0")
    started = time.time()
    arts = JobArtifacts(store, job_id)
    arts.put_json("spec.json", spec.model_dump(mode="json"))

    def enter(phase: Phase, **known) -> None:
        # Written out at once: the phases outside the loop are the long silent stretches
        # (workers starting, export) a client otherwise shows as a frozen bar.
        rec = phase_record(phase, **known)
        metrics.add(rec)
        metrics.flush(force=True)
        if on_record:
            on_record(rec)

    enter(Phase.PREPARING)
    # Started first: its process boots on a core the preflight below leaves idle, instead of
    # beside Ray Train's controller, which the workers wait for.
    relay = MetricsRelay.remote()
    # a local folder that another node's workers would not see fails here, not at resume
    check_store_shared(store)
    prepared = preflight(spec, store)
    data, spe, total = prepared.data, prepared.steps_per_epoch, prepared.total_steps
    enter(Phase.WAITING_FOR_WORKERS, total_steps=total)
    # The first metric, scored here while Ray starts the workers (workers.initial_eval). Only
    # its thread keeps the init weights: the driver lets go of them here.
    step0 = InitialEval(spec, data, prepared.init_state, metrics.lines)
    del prepared
    if faults is None and os.environ.get("SLIMTRAIN_FAULTS"):
        faults = json.loads(os.environ["SLIMTRAIN_FAULTS"])

    # Resume is decided by our own manifest-verified checkpoints (workers.checkpoint), never by
    # Ray's snapshot of a previous run: restored, it would delete this run's checkpoints that
    # reuse an old one's folder name, and refuse to start once a listed folder is gone.
    store.delete_prefix(arts.key(RAY_SNAPSHOT))
    storage_path, filesystem = store.ray_storage(job_id)
    p = spec.parallel
    streamed = getattr(data, "streamed", False)
    cpus = streaming.worker_cpus(p.workers, ray.cluster_resources().get("CPU", 0), streamed)
    resources = {"CPU": cpus, **({"GPU": p.gpus_per_worker} if spec.uses_gpu else {})}
    ray_data: dict = {}
    if streamed:
        from ray.train import DataConfig

        options = streaming.ingest_options()  # before the datasets, which copy the context
        ray_data = {
            # From the newest checkpoint's epoch to the last, in one Ray Data execution.
            "datasets": data.ray_datasets(
                spec.train.seed, spec.train.batch_size, spe, total, streaming.resume_step(arts)
            ),
            # "val" unsplit: every rank reads it and scores its rows (workers.data.streaming.Feed);
            # "train" too for pipeline stages, which read whole batches (streaming.reads).
            "dataset_config": DataConfig(
                datasets_to_split=["train"] if streaming.reads(p.strategy, 0, p.workers).split else [],
                execution_options=options,
            ),
        }
    trainer = attempt_trainer()(
        _worker_entry,
        train_loop_config={
            "spec": spec.model_dump(mode="json"),
            "job_id": job_id,
            # The store itself, with its endpoint and credentials: workers need no AWS
            # variables of their own to reach the job's bucket.
            "store": store,
            "relay": relay,
            "data": ray.put(data),
            "faults": faults,
            "step0_evaluated": step0.evaluated,
        },
        scaling_config=ScalingConfig(
            num_workers=p.workers, use_gpu=spec.uses_gpu, resources_per_worker=resources
        ),
        **ray_data,
        run_config=RunConfig(
            name=CHECKPOINTS,
            storage_path=storage_path,
            storage_filesystem=filesystem,
            failure_config=FailureConfig(
                max_failures=spec.retries if worker_restarts is None else worker_restarts
            ),
            checkpoint_config=CheckpointConfig(num_to_keep=spec.checkpoint.keep),
        ),
    )
    outcome: dict = {}
    wake = threading.Event()  # the pump's: fit ended, or the step-0 record is ready
    step0.on_ready(wake.set)

    def fit():
        try:
            outcome["result"] = trainer.fit()
        except BaseException as e:  # fit raises TrainingFailedError in Ray Train v2
            outcome["error"] = e
        finally:
            wake.set()

    attempts = Attempts.of_lines(metrics.lines)
    first_here = len(attempts.items)
    summary: dict = {}

    drained = 0
    warm: list[threading.Thread] = []  # the exporter's warm-up, started once training runs
    first_train = True  # the next train record is a worker group's first

    def add_step0(wait: bool) -> bool:
        rec = step0.take(wait)
        if rec is not None:
            metrics.add(rec)
            if on_record:
                on_record(rec)
        return rec is not None

    def pump():
        nonlocal drained, first_train
        records, awaited = ray.get(relay.drain.remote())
        now, first_train = write_at_once(records, awaited, first_train)
        # Before the workers' first records, waiting for it if need be; written at once: it is a
        # client's first metric.
        now = add_step0(wait=bool(records)) or now
        for rec in records:
            attempts.observe(rec)
            if rec.get("event") == "done":
                summary.update(rec)
            metrics.add(rec)
            if on_record:
                on_record(rec)
            if rec.get("event") == "start":  # the worker group is up (again)
                if not warm:  # after the first metric, not before: it would compete with the start-up
                    warm.append(onnx_export.warm_up())
                training = phase_record(Phase.TRAINING, step=rec.get("step"), total_steps=total)
                metrics.add(training)
                if on_record:
                    on_record(training)
        drained += len(records)
        metrics.flush(force=now)
        if awaited:
            relay.ack.remote(drained)

    thread = threading.Thread(target=fit, name=f"fit-{job_id}", daemon=True)
    thread.start()
    try:
        while thread.is_alive():
            wake.wait(poll_seconds)
            wake.clear()
            pump()
        pump()
    finally:  # never leave an export running beside whatever this process does next
        for t in warm:
            t.join()
    error = outcome.get("error") or getattr(outcome.get("result"), "error", None)
    if error is None:
        add_step0(wait=True)  # a run whose workers sent nothing (never in practice)
    metrics.flush(force=True)
    ray.kill(relay)
    if error is not None:
        # The step-0 record, if scored, is dropped with the attempt: the next one scores again.
        raise training_failure(error, len(attempts.items) - first_here)

    run_info = {
        "steps": total,
        "wall_seconds": time.time() - started,
        # Throughput on the training loop's wall clock (all ranks' samples); step_seconds is rank
        # 0's time inside train_step alone (the report's train_seconds before).
        "train_wall_seconds": summary.get("wall_seconds"),
        "step_seconds": summary.get("train_seconds"),
        "samples_per_second": summary.get("samples_per_second"),
        "skipped_steps": summary.get("skipped_steps", 0),
        "devices": summary.get("devices"),
        "attempts": attempts.items,
    }
    enter(Phase.EXPORTING)
    if streamed:  # export scores the artifact on the validation split: read it here
        data = data.for_export(export.CALIBRATION_SAMPLES)
    rep = export.export(spec, data, store, job_id, total, run_info, on_verify=lambda: enter(Phase.VERIFYING))
    rep["wall_seconds"] = time.time() - started
    # model.init: the step-0 evaluation (of this driver or an earlier attempt's) is the baseline.
    init_weights.rebase(rep, init_weights.baseline_of(metrics.lines, data.info.kind))
    arts.put_json("report.json", rep)
    enter(Phase.DONE)  # before the manifest, which lists metrics.jsonl as it ends
    metrics.close()
    # The parts are the stream the API reads; metrics.jsonl holds the same records.
    arts.write_manifest(exclude_prefixes=(f"{CHECKPOINTS}/", PARTS))
    return rep
