"""What a job's driver writes to its log, which is the user's: `slimtrain logs`, the dashboard's
log panel, `GET /v1/jobs/ID/logs`.

That log is the driver's stdout and stderr (the Ray job's log). It gets slimtrain's own records
(workers.*, service.*), every library's errors and warnings, and the lines Ray forwards from the
training workers. Library chatter goes to a debug log beside Ray's own log files instead:
onnxscript / onnx_ir INFO and torch.onnx's warnings during export (`torchvision is not
installed`), Ray's INFO, Python warnings, and from the forwarded lines Ray core's C++ log lines
(`core_worker.cc: ... 'PreemptionWatcher' ...`) and the output of Ray Train's internal actors.
Ray keeps every forwarded line in its worker log files as well. Colour is off unless the log is
a terminal (RAY_COLOR_PREFIX=0); the API strips what escapes anyway (service.logtext)."""

from __future__ import annotations

import logging
import logging.handlers
import os
import re
import sys
import tempfile
from pathlib import Path

OWN = ("workers", "service", "api", "__main__")
# Loggers whose records below ERROR are chatter to a user: the ONNX exporter's passes and
# registrations, Ray's own progress, and Python warnings raised inside libraries.
QUIET = ("torch.onnx", "torch._dynamo", "torch.export", "onnxscript", "onnx_ir", "onnx", "ray", "py.warnings")
# Loggers that write through handlers of their own instead of propagating to the root.
OWN_HANDLERS = ("torch", "torch.onnx", "ray")
# Ray Train's internal actors: their output (tracebacks of a monitor thread included) is Ray's.
RAY_INTERNAL_ACTORS = frozenset({"PreemptionWatcher", "PlacementGroupCleaner"})
# A C++ log line of Ray core: `[2026-12-01 09:04:40,474 E 16642 16855] core_worker.cc:2465: ...`.
_RAY_CORE_LINE = re.compile(r"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ [DIWEF] \d+ \d+\] \S+:\d+: ")
# torch's own log format below error level: `W1201 09:05:24.191000 16285 path.py:107] ...`.
_TORCH_LINE = re.compile(r"^[DIW]\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ \S+:\d+\] ")
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

debug = logging.getLogger("slimtrain.debug")  # forwarded lines kept out of the user's log


def for_user(name: str, level: int) -> bool:
    """Whether a record of logger `name` at `level` belongs in the user's log."""
    if level >= logging.ERROR:
        return True
    if _under(name, OWN):
        return level >= logging.INFO
    if _under(name, QUIET) or _under(name, ("slimtrain.debug",)):
        return False
    return level >= logging.WARNING


def _under(name: str, roots: tuple[str, ...]) -> bool:
    return any(name == r or name.startswith(r + ".") for r in roots)


def forwarded_for_user(line: str, actor: str | None) -> bool:
    """Whether a line Ray forwards from a worker process (of `actor`, its class name, when it is
    an actor) belongs in the user's log."""
    if actor in RAY_INTERNAL_ACTORS:
        return False
    return not (_RAY_CORE_LINE.match(line) or _TORCH_LINE.match(line))


class UserLog(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return for_user(record.name, record.levelno)


class DebugLog(logging.handlers.MemoryHandler):
    """Every record, held in memory until `open` names the file (the driver learns where Ray
    keeps its logs only once connected), then written through."""

    def __init__(self) -> None:
        super().__init__(capacity=1, flushLevel=logging.CRITICAL + 1, target=None, flushOnClose=True)
        self.path: Path | None = None

    def shouldFlush(self, record: logging.LogRecord) -> bool:
        return self.target is not None

    def open(self, path: Path) -> None:
        target = logging.FileHandler(path, encoding="utf-8", delay=True)
        # Its own formatter: ray.init sets Ray's on every handler of the "ray" logger, this one's too.
        target.setFormatter(logging.Formatter(FORMAT))
        self.path = path
        self.setTarget(target)
        self.flush()


_debug_log: DebugLog | None = None


def setup(stream=None) -> DebugLog:
    """Route this process's logging: the user's records to `stream` (stderr), all of them to the
    debug log. Idempotent; call again after importing a library that installs its own handlers."""
    global _debug_log
    if not (stream or sys.stderr).isatty():
        # Read by Ray's driver each time it prints a forwarded line.
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")
    if _debug_log is None:
        _debug_log = DebugLog()
        root = logging.getLogger()
        for h in list(root.handlers):  # basicConfig's, if anyone called it
            root.removeHandler(h)
        user = logging.StreamHandler(stream or sys.stderr)
        user.setFormatter(logging.Formatter(FORMAT))
        user.addFilter(UserLog())
        root.addHandler(user)
        root.addHandler(_debug_log)
        root.setLevel(logging.INFO)
        logging.captureWarnings(True)
    for name in OWN_HANDLERS:  # these do not propagate: filter their own handlers
        lg = logging.getLogger(name)
        for h in lg.handlers:
            if h is not _debug_log and not any(isinstance(f, UserLog) for f in h.filters):
                h.addFilter(UserLog())
        if _debug_log not in lg.handlers:
            lg.addHandler(_debug_log)
    return _debug_log


def open_debug_log(name: str) -> Path:
    """Write the debug log to `name` in this node's Ray log folder (beside the job's driver log)
    once connected, else in the temporary folder; return the path."""
    log_dir = _ray_logs_dir() or Path(tempfile.gettempdir())
    path = log_dir / name
    setup().open(path)
    return path


def _ray_logs_dir() -> Path | None:
    try:
        from ray._private import worker

        node = worker._global_node
        return Path(node.get_logs_dir_path()) if node is not None else None
    except Exception:  # a private API: without it the temporary folder does
        return None


def filter_forwarded_lines() -> bool:
    """Keep Ray's forwarded worker lines that are noise out of this driver's output (they go to
    the debug log; Ray keeps them in its worker log files). Call after ray.init. False when
    this Ray has no such hook (its output is then left as it is)."""
    try:
        from ray._private import worker as rw

        dispatcher = rw.global_worker_stdstream_dispatcher
        ignore_prefix = rw._should_ignore_worker_log_prefix(rw.global_worker)
        printer = rw.print_to_stdstream
    except (ImportError, AttributeError):
        return False

    def handle(data: dict) -> None:
        actor = data.get("actor_name") or None
        keep = []
        for line in data.get("lines", []):
            if forwarded_for_user(line, actor):
                keep.append(line)
            else:
                debug.info("(%s pid=%s) %s", actor or data.get("task_name") or "", data.get("pid"), line)
        if keep:
            printer({**data, "lines": keep}, ignore_prefix=ignore_prefix)

    if not any(name == "ray_print_logs" for name, _ in dispatcher.handlers):
        return False  # log_to_driver=False: nothing is forwarded
    dispatcher.remove_handler("ray_print_logs")
    dispatcher.add_handler("ray_print_logs", handle)
    return True
