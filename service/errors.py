"""The typed error hierarchy. Errors are plain picklable exceptions (they cross Ray process
boundaries); only `api/` maps them to HTTP status codes and the CLI maps them to exit codes."""

from __future__ import annotations


class SlimtrainError(Exception):
    """Base class. `code` is a stable machine-readable identifier."""

    code = "error"
    retryable = False

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def __reduce__(self):  # keep subclasses picklable with their message only
        return (self.__class__, (self.message,))


class SpecError(SlimtrainError):
    """The job spec is invalid. `errors` is a list of {"field": ..., "message": ...}."""

    code = "invalid_spec"

    def __init__(self, message: str, errors: list[dict] | None = None):
        super().__init__(message)
        self.errors = errors or []

    def __reduce__(self):
        return (self.__class__, (self.message, self.errors))


class ConfigError(SlimtrainError):
    """The spec is valid but cannot run as given (e.g. a schedule beyond the job's last step, a
    model that cannot take the dataset's input). Never retried: retrying cannot fix it."""

    code = "config_error"


class MaskMismatchError(SlimtrainError):
    """Ranks disagree on their pruning masks: continuing would train diverging models."""

    code = "mask_mismatch"


class CheckpointError(SlimtrainError):
    """A checkpoint is missing, corrupt or incomplete."""

    code = "checkpoint_error"
    retryable = True


class ArtifactKeyError(SlimtrainError):
    """An artifact name that would escape its job's prefix, or is otherwise not allowed."""

    code = "invalid_artifact_name"


class ArtifactNotFound(SlimtrainError):
    code = "artifact_not_found"


class ArtifactCorrupt(SlimtrainError):
    """A stored artifact that fails its manifest's sha256 or cannot be parsed: the store returned
    something other than what the job wrote, so it is refused rather than served."""

    code = "artifact_corrupt"


class TrainingFailed(SlimtrainError):
    """Training failed on its workers. `retryable` when the cause may not recur (a worker
    process died, an unexpected exception): the service then resubmits the job from its last
    checkpoint while attempts remain. A cause that no retry can fix (a ConfigError raised on a
    worker, ranks whose masks disagree) is not."""

    code = "training_failed"

    def __init__(self, message: str, retryable: bool = False, code: str | None = None):
        super().__init__(message)
        self.retryable = retryable
        if code is not None:
            self.code = code

    def __reduce__(self):
        return (self.__class__, (self.message, self.retryable, self.code))


class TrainingDiverged(SlimtrainError):
    """The weights stopped being finite (NaN or inf). Retried like any runtime failure of
    training, from the last checkpoint (saved only while the weights are finite): a transient
    cause (non-deterministic kernels, a bad batch from a flaky source) may not recur; a
    deterministic run diverges again and fails once its retries are spent, with this message."""

    code = "diverged"
    retryable = True


class ExportError(SlimtrainError):
    """The trained model could not be exported or its exported artifact failed verification (e.g.
    the quantized graph does not hold the weights the packed file holds)."""

    code = "export_error"
