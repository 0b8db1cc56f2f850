"""The Ray Job entrypoint the service submits: `python -m workers.entrypoint <job_id>`.

It reads the job's spec.json from the artifact store (the API wrote it; no user code travels),
joins the Ray cluster it runs in, runs the driver, and leaves `outcome.json` for the reconciler:
`failed` for a failure no resubmission can fix (an invalid spec, a ConfigError, ranks whose
masks disagree), `retryable` for one that might not happen again (a worker process that died,
training that diverged, an unexpected error), which the service resubmits while attempts remain. A driver
that is killed leaves no outcome of its attempt, and the reconciler resubmits it.
Settings come from the runtime_env the scheduler sets (SLIMTRAIN_ARTIFACT_URI, ...;
service.ray_jobs). Nothing heavy is imported before the driver's
first record (the `starting` phase) is written: torch and Ray Train come after it."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from service.artifacts import JobArtifacts, check_job_id, open_store
from service.errors import ArtifactKeyError, SlimtrainError
from service.outcome import Outcome, write_outcome
from service.records import Phase, phase_record
from service.settings import Settings
from service.spec import parse_spec
from workers import logs
from workers.metrics_log import MetricsLog

log = logging.getLogger("workers.entrypoint")


def main(argv: list[str] | None = None) -> int:
    logs.setup()  # the user's log gets slimtrain's records and libraries' warnings, not their chatter
    parser = argparse.ArgumentParser(prog="workers.entrypoint", description=__doc__.splitlines()[0])
    parser.add_argument("job_id")
    args = parser.parse_args(argv)
    try:
        job_id = check_job_id(args.job_id)
    except ArtifactKeyError as e:
        log.error("%s", e.message)
        return 2
    attempt = int(os.environ.get("SLIMTRAIN_ATTEMPT", "1"))
    settings = Settings()
    store = open_store(settings.resolved_artifact_uri, settings.s3_endpoint_url)
    arts = JobArtifacts(store, job_id)

    def finish(state: str, code: str | None = None, message: str | None = None) -> int:
        write_outcome(arts, Outcome(attempt, state, code, message))
        if state != "succeeded":
            log.error("job %s attempt %d %s: %s", job_id, attempt, state, message)
        return 0 if state == "succeeded" else 1

    try:
        spec = parse_spec(arts.get_json("spec.json"))
    except SlimtrainError as e:
        return finish("failed", e.code, f"spec.json: {e.message}")

    # The job's first word, before the seconds this process spends importing torch and Ray
    # Train and joining the cluster: a client sees the driver has started, not a silent job.
    try:
        metrics = MetricsLog(arts)
        metrics.add(phase_record(Phase.STARTING))
        metrics.flush(force=True)
    except Exception as e:  # the store, unreachable for now: as any driver error, retryable
        log.exception("job %s: writing the first metrics part", job_id)
        return finish("retryable", "driver_error", f"{type(e).__name__}: {e}")
    try:
        return _drive(spec, job_id, attempt, store, metrics, finish)
    finally:
        try:
            metrics.close()  # once: run_job has closed it when it got that far
        except Exception as e:  # the attempt's own outcome is what matters
            log.warning("job %s: writing metrics.jsonl: %s", job_id, e)


def _drive(spec, job_id: str, attempt: int, store, metrics: MetricsLog, finish) -> int:
    from workers.driver import run_job
    from workers.ray_runtime import connect

    log.info("job %s attempt %d: %s", job_id, attempt, spec.name)
    try:
        logs.setup()  # again: importing the driver brought Ray's and torch's own handlers
        connect(os.environ.get("RAY_ADDRESS") or "auto")
        logs.filter_forwarded_lines()
        path = logs.open_debug_log(f"slimtrain-{job_id}-a{attempt}.debug.log")
        log.info("library logs of this attempt: %s (on the node that runs this driver)", path)
        # Ray Train does not restart workers here: the service resubmits a failed run as the
        # next attempt, so each failure is an attempt in the job record, with its reason.
        run_job(spec, job_id, store, worker_restarts=0, metrics=metrics)
    except SlimtrainError as e:
        return finish("retryable" if e.retryable else "failed", e.code, e.message)
    except Exception as e:  # unknown: may be transient (network, storage), so resubmission may help
        log.exception("job %s: driver error", job_id)
        return finish("retryable", "driver_error", f"{type(e).__name__}: {e}")
    return finish("succeeded")


if __name__ == "__main__":
    sys.exit(main())
